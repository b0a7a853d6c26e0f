import ArgumentParser
import AsyncHTTPClient
import AuthzSidecar
import Foundation
import Introspection
import Logging
import Metrics
import Prometheus
import ServiceLifecycle
import SharedCache

/// `authz-sidecar serve`: runs the service until SIGTERM or SIGINT.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the sidecar (the default command).")

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let configuration: SidecarConfiguration
        let path = try options.path()
        do {
            configuration = try SidecarConfiguration.load(path: path)
        } catch let error as ConfigurationError {
            FileHandle.standardError.write(Data((error.description + "\n").utf8))
            throw ExitCode(1)
        }
        LogSetup.bootstrap(configuration.logging)
        let logger = Logger(label: "authz")

        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
            .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
            .seconds(1), .milliseconds(2500), .seconds(5),
        ]
        MetricsSystem.bootstrap(factory)

        // Every issuer's AS clients, `default` (the top-level introspection block) included.
        let connections = try IssuerConnections.make(for: configuration.allIssuers, logger: logger)
        for address in [configuration.server.listen, configuration.server.adminListen].compactMap({ $0 }) {
            if case .unix(let path) = address { try? FileManager.default.removeItem(atPath: path) }
        }
        // The store shared by replicas (DESIGN.md §11), when configured; it connects on demand.
        let sharedStore: SharedTokenStore?
        if let shared = configuration.sharedCache {
            do {
                sharedStore = try SharedTokenStore(
                    configuration: shared, answerLifetimeSeconds: configuration.cache.ttlSeconds + configuration.cache.staleIfErrorSeconds, logger: logger
                )
            } catch {
                FileHandle.standardError.write(Data("cache.shared: cannot set up TLS for the store: \(error)\n".utf8))
                throw ExitCode(1)
            }
        } else {
            sharedStore = nil
        }
        let sidecar = Sidecar(
            configuration: configuration, introspector: nil, backends: connections.backends, registry: registry, logger: logger, sharedStore: sharedStore
        )
        logger.notice(
            "starting",
            metadata: [
                "authz.version": "\(SidecarVersion.current)",
                "authz.listen": "\(configuration.server.listen)",
                "authz.admin_listen": "\(configuration.server.adminListen?.description ?? "same")",
                "authz.endpoint": "\(configuration.introspection?.endpoint ?? "none")",
                "authz.issuers": "\(configuration.allIssuers.map { "\($0.name):\($0.validation.rawValue)" }.joined(separator: ","))",
                "authz.policies": "\(configuration.policies.map(\.name).joined(separator: ","))",
                "authz.shared": "\(configuration.sharedCache?.endpoint.redacted ?? "off")",
            ]
        )
        // Tracing (DESIGN.md §12): swift-otel's tracer, exporting over OTLP/HTTP; only when
        // configured, so that with it off no span is made anywhere.
        var tracingServices: [any Service] = []
        if let endpoint = configuration.tracing.otlpEndpoint {
            do {
                tracingServices.append(try TracingSetup.bootstrap(configuration.tracing, endpoint: endpoint, logger: logger))
            } catch {
                FileHandle.standardError.write(Data("tracing: cannot set up the OTLP exporter: \(error)\n".utf8))
                throw ExitCode(1)
            }
        }
        let group = ServiceGroup(
            configuration: .init(
                // The reloader owns the AS client: it starts first and so stops last.
                // The tracer starts first and stops last, so that the last spans are exported.
                services: tracingServices.map { .init(service: $0) }
                    + [.init(service: ConfigReloader(path: path, configuration: configuration, connections: connections, sidecar: sidecar, logger: logger))]
                    + sidecar.services.map { .init(service: $0) },
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger
            )
        )
        try await group.run()
    }
}

