import AsyncHTTPClient
@testable import AuthzSidecar
import HTTPTypes
import Introspection
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle

/// What a test sees of a response.
struct TestResponse: Sendable {
    var status: HTTPResponse.Status
    var headers: HTTPFields
    var body: ByteBuffer
}

/// A client for a sidecar running on a loopback port.
struct LiveClient: Sendable {
    let http: HTTPClient
    let port: Int
    /// Starts the sidecar's graceful shutdown (what SIGTERM does).
    let shutdown: @Sendable () async -> Void

    func execute(
        uri: String, method: HTTPRequest.Method, headers: HTTPFields = HTTPFields(), body: ByteBuffer? = nil,
        _ check: (TestResponse) async throws -> Void
    ) async throws {
        var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)\(uri)")
        request.method = HTTPMethod(rawValue: method.rawValue)
        for field in headers { request.headers.add(name: field.name.rawName, value: field.value) }
        if let body { request.body = .bytes(body) }
        let response = try await http.execute(request, timeout: .seconds(10))
        var fields = HTTPFields()
        for (name, value) in response.headers {
            if let fieldName = HTTPField.Name(name) { fields.append(HTTPField(name: fieldName, value: value)) }
        }
        let collected = try await response.body.collect(upTo: 1 << 20)
        try await check(TestResponse(status: HTTPResponse.Status(code: Int(response.status.code)), headers: fields, body: collected))
    }
}

enum LiveSidecarError: Error {
    case neverListened
}

/// Runs a sidecar (its real NIO listener, queue and services) on a loopback port for `body`.
func withLiveSidecar(
    configuration: SidecarConfiguration,
    introspector: any TokenIntrospector,
    logger: Logger = Logger(label: "authz-test"),
    _ body: @Sendable (LiveClient, Sidecar) async throws -> Void
) async throws {
    var configuration = configuration
    configuration.server.listen = .tcp(host: "127.0.0.1", port: 0)
    configuration.server.adminListen = nil
    configuration.server.grpcListen = nil
    let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
    let sidecar = Sidecar(configuration: configuration, introspector: introspector, logger: logger, onBound: { _, port in continuation.yield(port ?? 0) })
    var quiet = Logger(label: "service-group")
    quiet.logLevel = .critical
    let group = ServiceGroup(services: sidecar.services, logger: quiet)
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        var iterator = ports.makeAsyncIterator()
        guard let port = await iterator.next() else {
            // The sidecar stopped before it listened: the test did not run, so it must not pass.
            throw LiveSidecarError.neverListened
        }
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        do {
            try await body(LiveClient(http: http, port: port, shutdown: { await group.triggerGracefulShutdown() }), sidecar)
        } catch {
            try? await http.shutdown()
            await group.triggerGracefulShutdown()
            throw error
        }
        try await http.shutdown()
        await group.triggerGracefulShutdown()
        try await tasks.waitForAll()
    }
}
