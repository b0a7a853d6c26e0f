import Introspection
import Logging
import Prometheus
import ServiceLifecycle

/// The assembled service: the authorizer, its listeners (decisions, admin, gRPC) and the queue
/// that runs cache misses.
public struct Sidecar: Sendable {
    public let authorizer: Authorizer
    public let reachability: ASReachability
    public let admin: AdminEndpoints
    let queue: DecisionQueue
    let decisionServer: DecisionServer
    let adminServer: DecisionServer?
    /// Envoy's gRPC Check service, when `server.grpc_listen` is set.
    public let grpcService: GRPCServerService?

    /// Wires a configuration to an introspector (the HTTP one in production, a closure in tests).
    /// `onBound` learns each HTTP listener's port (tests listen on port 0).
    public init(
        configuration: SidecarConfiguration,
        introspector: any TokenIntrospector,
        registry: PrometheusCollectorRegistry? = nil,
        clock: any EpochClock = SystemEpochClock(),
        logger: Logger = Logger(label: "authz"),
        onBound: @escaping @Sendable (_ admin: Bool, _ port: Int?) -> Void = { _, _ in }
    ) {
        let reachability = ASReachability()
        let cache = CachingTokenIntrospector(
            upstream: InstrumentedTokenIntrospector(introspector, reachability: reachability),
            configuration: configuration.cache,
            clock: clock
        )
        let authorizer = Authorizer(configuration: configuration, cache: cache, clock: clock, logger: logger)
        let admin = AdminEndpoints(cache: cache, reachability: reachability, registry: registry)
        let queue = DecisionQueue()
        let separateAdmin = configuration.server.adminListen
        self.authorizer = authorizer
        self.reachability = reachability
        self.admin = admin
        self.queue = queue
        self.decisionServer = DecisionServer(
            address: configuration.server.listen,
            routes: .init(authorizer: authorizer, admin: separateAdmin == nil ? admin : nil),
            queue: queue,
            logger: logger,
            onBound: { onBound(false, $0) }
        )
        self.adminServer = separateAdmin.map { address in
            DecisionServer(address: address, routes: .init(authorizer: nil, admin: admin), queue: queue, logger: logger, onBound: { onBound(true, $0) })
        }
        self.grpcService = configuration.server.grpcListen.map { GRPCServerService(address: $0, authorizer: authorizer) }
    }

    /// The services to run, in start order; shutdown runs in reverse, so the listeners drain
    /// before the queue they hand misses to.
    public var services: [any Service] {
        var services: [any Service] = [queue, decisionServer]
        if let adminServer { services.append(adminServer) }
        if let grpcService { services.append(grpcService) }
        return services
    }
}
