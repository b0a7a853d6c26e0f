import GRPCCore
import Tracing
import GRPCNIOTransportHTTP2
import ServiceLifecycle

/// The gRPC listener (`server.grpc_listen`) as a lifecycle service: serves until graceful
/// shutdown, then lets in-flight Check calls finish.
public struct GRPCServerService: Service {
    let server: GRPCServer<HTTP2ServerTransport.Posix>

    init(address: ListenAddress, slot: AuthorizerSlot, tracing: Bool = false) {
        let bind: GRPCNIOTransportCore.SocketAddress
        switch address {
        case .tcp(let host, let port):
            let resolved = host == "localhost" ? "127.0.0.1" : host
            bind = resolved.contains(":") ? .ipv6(host: resolved, port: port) : .ipv4(host: resolved, port: port)
        case .unix(let path):
            bind = .unixDomainSocket(path: path)
        }
        server = GRPCServer(
            transport: .http2NIOPosix(address: bind, transportSecurity: .plaintext),
            services: [EnvoyGRPCService(slot: slot)],
            // The trace context Envoy sends in the call's metadata (DESIGN.md §12).
            interceptors: tracing ? [TraceContextInterceptor()] : []
        )
    }

    public func run() async throws {
        try await withGracefulShutdownHandler {
            try await server.serve()
        } onGracefulShutdown: {
            server.beginGracefulShutdown()
        }
    }
}

/// Makes the W3C trace context of a call's metadata (`traceparent`, `tracestate`, as Envoy's gRPC
/// client sends them when its tracing is on) the handler's `ServiceContext.current`.
struct TraceContextInterceptor: ServerInterceptor {
    func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>,
        context: ServerContext,
        next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        // A parent's sampled flag is followed by the tracer (parent-based sampling).
        guard request.metadata[stringValues: "traceparent"].first(where: { _ in true }) != nil else { return try await next(request, context) }
        var trace = ServiceContext.topLevel
        InstrumentationSystem.instrument.extract(request.metadata, into: &trace, using: MetadataExtractor())
        return try await ServiceContext.withValue(trace) { try await next(request, context) }
    }
}

struct MetadataExtractor: Extractor {
    func extract(key: String, from carrier: Metadata) -> String? {
        carrier[stringValues: key].first(where: { _ in true })
    }
}
