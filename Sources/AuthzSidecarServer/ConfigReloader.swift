import AsyncHTTPClient
import AuthzSidecar
import Foundation
import Introspection
import Logging
import ServiceLifecycle
import UnixSignals

/// Reloads the configuration on SIGHUP and when the file changes (checked every 2 s): the new
/// file is validated first; an invalid one is logged and the running configuration stays; a
/// valid one is swapped in atomically. Owns the AS HTTP clients: a client replaced by a reload is
/// shut down once requests on it have had time to finish, the last one at shutdown.
actor ConfigReloader: Service {
    private let path: String
    private let sidecar: Sidecar
    private let logger: Logger
    private var configuration: SidecarConfiguration
    /// Every issuer's AS clients, `default` included.
    private var connections: IssuerConnections
    private var fileContents: String?

    init(path: String, configuration: SidecarConfiguration, connections: IssuerConnections, sidecar: Sidecar, logger: Logger) {
        self.path = path
        self.configuration = configuration
        self.connections = connections
        self.sidecar = sidecar
        self.logger = logger
        self.fileContents = try? String(contentsOfFile: path, encoding: .utf8)
    }

    nonisolated func run() async throws {
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        await withDiscardingTaskGroup { group in
            group.addTask {
                for await _ in hangups.cancelOnGracefulShutdown() {
                    await self.reload(reason: "SIGHUP")
                }
            }
            group.addTask {
                while !Task.isShuttingDownGracefully {
                    do {
                        try await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(2)) }
                    } catch {
                        return
                    }
                    await self.reloadIfFileChanged()
                }
            }
        }
        // The listeners and the queue have drained (they stop before this service).
        try await shutdownClient()
    }

    private func shutdownClient() async throws {
        for client in connections.allClients { try? await client.shutdown() }
    }

    private func reloadIfFileChanged() async {
        let contents = try? String(contentsOfFile: path, encoding: .utf8)
        guard contents != fileContents else { return }
        await reload(reason: "file changed")
    }

    /// Validates and applies the file; never leaves the sidecar without a working configuration.
    func reload(reason: String) async {
        fileContents = try? String(contentsOfFile: path, encoding: .utf8)
        let next: SidecarConfiguration
        do {
            next = try SidecarConfiguration.load(path: path)
        } catch {
            logger.error("configuration rejected, the running one stays", metadata: ["authz.reload": "\(reason)", "authz.problems": "\(error)"])
            return
        }
        guard next != configuration else {
            logger.info("configuration unchanged", metadata: ["authz.reload": "\(reason)"])
            return
        }
        var connections = self.connections
        let changed: [String: IssuerBackends]
        let retired: [HTTPClient]
        do {
            (changed, retired) = try connections.update(to: next.allIssuers, logger: logger)
        } catch {
            logger.error("configuration rejected: cannot set up the AS client", metadata: ["authz.reload": "\(reason)", "authz.problems": "\(error)"])
            return
        }
        self.connections = connections
        let fate = sidecar.reload(to: next, introspector: nil, backends: changed)
        configuration = next
        logger.notice(
            "configuration reloaded",
            metadata: ["authz.reload": "\(reason)", "authz.cache": "\(fate.rawValue)", "authz.policies": "\(next.policies.map(\.name).joined(separator: ","))"]
        )
        if !retired.isEmpty {
            // Requests that took the old authorizer finish within the AS deadlines.
            let longest = next.allIssuers.map { max($0.timeoutMilliseconds, $0.introspection?.timeoutMilliseconds ?? 0) }.max() ?? 1500
            try? await Task.sleep(for: .milliseconds(longest + 1000))
            for client in retired { try? await client.shutdown() }
        }
    }
}
