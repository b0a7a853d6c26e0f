import GRPCCore
import GRPCNIOTransportHTTP2
import ServiceLifecycle

/// The gRPC listener (`server.grpc_listen`) as a lifecycle service: serves until graceful
/// shutdown, then lets in-flight Check calls finish.
public struct GRPCServerService: Service {
    let server: GRPCServer<HTTP2ServerTransport.Posix>

    init(address: ListenAddress, slot: AuthorizerSlot) {
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
            services: [EnvoyGRPCService(slot: slot)]
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
