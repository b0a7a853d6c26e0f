import Introspection
import JWTValidation
import Logging
import Metrics
import Prometheus
import SharedCache
import ServiceLifecycle
import Synchronization
import NIOConcurrencyHelpers

/// The authorizer in force. A reload swaps it whole: each request takes the one current when it
/// arrives and finishes on it.
public final class AuthorizerSlot: Sendable {
    /// One configuration's authorizer and the backends its issuers were built from.
    struct Generation: Sendable {
        var authorizer: Authorizer
        var backends: [String: IssuerBackends]
    }

    private let generation: NIOLockedValueBox<Generation>

    init(_ generation: Generation) {
        self.generation = NIOLockedValueBox(generation)
    }

    public var current: Authorizer { generation.withLockedValue { $0.authorizer } }

    var currentGeneration: Generation { generation.withLockedValue { $0 } }

    func replace(with next: Generation) {
        generation.withLockedValue { $0 = next }
    }
}

/// The assembled service: the authorizer, its listeners (decisions, admin, gRPC), the queue that
/// runs cache misses, and the readiness probe.
public struct Sidecar: Sendable {
    public let slot: AuthorizerSlot
    public let reachability: ASReachability
    public let admin: AdminEndpoints
    let queue: DecisionQueue
    let decisionServer: DecisionServer
    let adminServer: DecisionServer?
    /// Envoy's gRPC Check service, when `server.grpc_listen` is set.
    public let grpcService: GRPCServerService?
    private let clock: any EpochClock
    private let logger: Logger
    private let metricsFactory: any MetricsFactory
    /// DPoP replay memory and nonces: one for the life of the process, across reloads.
    private let dpop: DPoPVerifier
    /// The store shared by replicas (DESIGN.md §11), for the life of the process.
    public let sharedStore: SharedTokenStore?

    /// Wires a configuration to an introspector for the issuer `default` (the HTTP one in
    /// production, a closure in tests) and to the backends of the issuers of `issuers:`, by name.
    /// `onBound` learns each HTTP listener's port (tests listen on port 0).
    public init(
        configuration: SidecarConfiguration,
        introspector: (any TokenIntrospector)?,
        backends: [String: IssuerBackends] = [:],
        registry: PrometheusCollectorRegistry? = nil,
        clock: any EpochClock = SystemEpochClock(),
        logger: Logger = Logger(label: "authz"),
        metrics factory: any MetricsFactory = MetricsSystem.factory,
        sharedStore: SharedTokenStore? = nil,
        onBound: @escaping @Sendable (_ admin: Bool, _ port: Int?) -> Void = { _, _ in }
    ) {
        self.sharedStore = sharedStore
        self.clock = clock
        self.logger = logger
        self.metricsFactory = factory
        let reachability = ASReachability()
        var backends = backends
        if let introspector { backends["default"] = IssuerBackends(introspector: introspector) }
        let issuers = configuration.allIssuers.map { issuer in
            Issuer.make(
                issuer, backends: backends[issuer.name] ?? IssuerBackends(), cache: configuration.cache, reachability: reachability,
                clock: clock, logger: logger, metrics: factory, shared: sharedStore
            )
        }
        let dpop = DPoPVerifier(server: configuration.server)
        self.dpop = dpop
        let slot = AuthorizerSlot(.init(
            authorizer: Authorizer(
                configuration: configuration, issuers: issuers, dpop: dpop, sharedStore: sharedStore, clock: clock, logger: logger, metrics: factory
            ),
            backends: backends
        ))
        // Purge broadcasts reach the caches of the configuration in force.
        sharedStore?.attach(caches: { [slot] in slot.current.issuers.map(\.cache) })
        let admin = AdminEndpoints(slot: slot, reachability: reachability, registry: registry, shared: sharedStore)
        let queue = DecisionQueue()
        let separateAdmin = configuration.server.adminListen
        self.slot = slot
        self.reachability = reachability
        self.admin = admin
        self.queue = queue
        self.decisionServer = DecisionServer(
            address: configuration.server.listen,
            routes: .init(decisions: slot, admin: separateAdmin == nil ? admin : nil),
            queue: queue,
            logger: logger,
            idleTimeoutSeconds: configuration.server.idleTimeoutSeconds,
            onBound: { onBound(false, $0) }
        )
        self.adminServer = separateAdmin.map { address in
            DecisionServer(
                address: address, routes: .init(decisions: nil, admin: admin), queue: queue, logger: logger,
                idleTimeoutSeconds: configuration.server.idleTimeoutSeconds, onBound: { onBound(true, $0) }
            )
        }
        self.grpcService = configuration.server.grpcListen.map {
            GRPCServerService(address: $0, slot: slot, tracing: configuration.tracing.otlpEndpoint != nil)
        }
    }

    /// The authorizer in force.
    public var authorizer: Authorizer { slot.current }

    /// The services to run, in start order; shutdown runs in reverse, so the listeners drain
    /// before the queue they hand misses to.
    public var services: [any Service] {
        var services: [any Service] = [ReachabilityProbe(slot: slot, reachability: reachability), queue, decisionServer]
        if let adminServer { services.append(adminServer) }
        if let grpcService { services.append(grpcService) }
        if let sharedStore { services.append(SharedStoreSubscription(store: sharedStore)) }
        return services
    }

    /// What a reload did with the cache.
    public enum CacheFate: String, Sendable {
        case kept, dropped
    }

    /// Swaps in a validated configuration (the caller validated it). `introspector` is the new AS
    /// client of the issuer `default` when its settings changed, nil to keep the current one;
    /// `backends` holds new backends for the issuers of `issuers:` whose settings changed (an
    /// issuer not named keeps its backends). An issuer keeps its cache and key set only when its
    /// settings, its backends and the cache settings are unchanged; the dropped caches are purged.
    /// Listener addresses are fixed at start: a change there needs a restart (logged).
    @discardableResult
    public func reload(to configuration: SidecarConfiguration, introspector: (any TokenIntrospector)?, backends replaced: [String: IssuerBackends] = [:]) -> CacheFate {
        let old = slot.currentGeneration
        if configuration.server != old.authorizer.configuration.server {
            logger.warning("server settings changed: listeners keep their addresses until a restart")
        }
        if configuration.sharedCache != old.authorizer.configuration.sharedCache {
            logger.warning("cache.shared changed: the shared store keeps its settings until a restart")
        }
        var replaced = replaced
        if let introspector { replaced["default"] = IssuerBackends(introspector: introspector) }
        var backends = old.backends
        for (name, fresh) in replaced { backends[name] = fresh }
        let cacheUnchanged = configuration.cache == old.authorizer.configuration.cache
        var kept: [Issuer] = []
        let issuers = configuration.allIssuers.map { issuer in
            if cacheUnchanged, replaced[issuer.name] == nil,
                let previous = old.authorizer.issuers.first(where: { $0.name == issuer.name && $0.configuration == issuer })
            {
                kept.append(previous)
                return previous
            }
            return Issuer.make(
                issuer, backends: backends[issuer.name] ?? IssuerBackends(), cache: configuration.cache,
                reachability: reachability, clock: clock, logger: logger, metrics: metricsFactory, shared: sharedStore
            )
        }
        let authorizer = Authorizer(
            configuration: configuration, issuers: issuers, dpop: dpop, sharedStore: sharedStore, clock: clock, logger: logger, metrics: metricsFactory
        )
        slot.replace(with: .init(authorizer: authorizer, backends: backends))
        // Requests still on the old generation must not be decided on answers a dropped cache
        // holds or is still fetching: a dropped cache is a purge (DESIGN.md §4).
        for issuer in old.authorizer.issuers where !kept.contains(where: { $0 === issuer }) {
            issuer.cache.purgeAll()
        }
        return kept.count == issuers.count && kept.count == old.authorizer.issuers.count ? .kept : .dropped
    }
}

/// Receives the shared store's purge broadcasts (DESIGN.md §11) until shutdown.
struct SharedStoreSubscription: Service {
    let store: SharedTokenStore

    func run() async throws {
        try? await cancelWhenGracefulShutdown {
            await store.runSubscription()
        }
        store.shutdown()
    }
}

/// While the AS is unreachable, asks it again every few seconds (bypassing the cache), so that
/// `/readyz` recovers even when no traffic arrives, as when an orchestrator stops sending any.
/// Likewise fetches the key set of every issuer that has none yet (at start, then every few
/// seconds until it has one).
struct ReachabilityProbe: Service {
    let slot: AuthorizerSlot
    let reachability: ASReachability
    var interval: Duration = .seconds(5)

    func run() async throws {
        // Issuers' key sets are fetched at start, so that the first JWT does not wait for them
        // and /readyz can tell when they cannot be had.
        await prefetchKeys()
        while !Task.isCancelled, !Task.isShuttingDownGracefully {
            do {
                try await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
            } catch {
                return
            }
            await prefetchKeys()
            if reachability.current == .unreachable {
                for issuer in slot.current.issuers where issuer.configuration.validation.introspects {
                    await issuer.cache.probeUpstream()
                }
            }
        }
    }

    private func prefetchKeys() async {
        await withTaskGroup(of: Void.self) { group in
            for issuer in slot.current.issuers {
                guard let keys = issuer.keys, keys.current == nil else { continue }
                group.addTask { await keys.prefetch() }
            }
        }
    }
}
