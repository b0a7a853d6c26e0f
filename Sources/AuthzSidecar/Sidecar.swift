import Hummingbird
import Introspection
import Logging
import Prometheus
import ServiceLifecycle

/// The assembled service: the authorizer, the decision listener and, when configured apart,
/// the admin listener.
public struct Sidecar: Sendable {
    public let authorizer: Authorizer
    public let reachability: ASReachability
    public let decisionApplication: Application<SidecarResponder>
    public let adminApplication: Application<AdminEndpoints>?
    /// Envoy's gRPC Check service, when `server.grpc_listen` is set.
    public let grpcService: GRPCServerService?

    /// Wires a configuration to an introspector (the HTTP one in production, a closure in tests).
    public init(
        configuration: SidecarConfiguration,
        introspector: any TokenIntrospector,
        registry: PrometheusCollectorRegistry? = nil,
        clock: any EpochClock = SystemEpochClock(),
        logger: Logger = Logger(label: "authz")
    ) {
        let reachability = ASReachability()
        let cache = CachingTokenIntrospector(
            upstream: InstrumentedTokenIntrospector(introspector, reachability: reachability),
            configuration: configuration.cache,
            clock: clock
        )
        let authorizer = Authorizer(configuration: configuration, cache: cache, clock: clock, logger: logger)
        let admin = AdminEndpoints(authorizer: authorizer, reachability: reachability, registry: registry)
        let separateAdmin = configuration.server.adminListen
        self.authorizer = authorizer
        self.reachability = reachability
        self.decisionApplication = Application(
            responder: SidecarResponder(authorizer: authorizer, admin: separateAdmin == nil ? admin : nil),
            configuration: .init(address: Self.bindAddress(configuration.server.listen), serverName: nil),
            logger: logger
        )
        self.adminApplication = separateAdmin.map { address in
            Application(responder: admin, configuration: .init(address: Self.bindAddress(address), serverName: nil), logger: logger)
        }
        self.grpcService = configuration.server.grpcListen.map { GRPCServerService(address: $0, authorizer: authorizer) }
    }

    /// The services to run, in start order (shutdown runs in reverse).
    public var services: [any Service] {
        [decisionApplication as any Service] + (adminApplication.map { [$0 as any Service] } ?? [])
            + (grpcService.map { [$0 as any Service] } ?? [])
    }

    static func bindAddress(_ address: ListenAddress) -> BindAddress {
        switch address {
        case .tcp(let host, let port): return .hostname(host, port: port)
        case .unix(let path): return .unixDomainSocket(path: path)
        }
    }
}
