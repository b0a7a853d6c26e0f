import Logging
import Metrics
import Synchronization
import Tracing
import NIOConcurrencyHelpers

/// Caches any introspector's answers, honestly (DESIGN.md §4, §5.3):
/// keyed by `TokenDigest`; an active answer lives `min(ttl, exp − now)` and is never served once
/// `exp` has passed; an inactive one lives `negative_ttl` in a bound of its own, so junk tokens
/// never evict active answers; faults are never cached; N concurrent lookups of one uncached
/// token make one upstream call (single-flight); during an AS fault an answer whose TTL ran out
/// less than `stale_if_error` ago may be served, never past `exp`. Lifetimes are counted on the
/// monotonic clock (`uptime`), `exp` on the wall clock.
///
/// A purge reaches lookups in flight: the purged call is taken out of the flight table, so new
/// arrivals start a call of their own; its answer is never cached, and the requests that waited
/// for it (and the one that made it) look the token up again instead of using it. Once a purge
/// has returned, no request is decided on an answer the AS gave before it.
public final class CachingTokenIntrospector: TokenIntrospector {
    /// Where an answer came from, for logs and metrics.
    public enum Source: String, Sendable {
        case hit, miss, coalesced, stale
        /// A local miss answered by the store shared by replicas (DESIGN.md §11).
        case shared
    }

    /// An answer and its source.
    public struct Answer: Sendable {
        public var info: TokenInfo
        public var source: Source
    }

    private typealias Outcome = Result<Answer, IntrospectionError>

    /// How often a lookup starts again because a purge overtook the call it relied on, before it
    /// gives up with a fault (a purge loop faster than the AS answers).
    static let maxPurgeRetries = 4

    /// One call in flight; its waiters are continuations, resumed when it ends.
    private final class Flight: Sendable {
        private let state = NIOLockedValueBox<(result: Outcome?, waiters: [CheckedContinuation<Outcome, Never>])>((nil, []))
        /// Set (under the shard's lock) by a purge: the answer must not be cached or used.
        let purged = Atomic<Bool>(false)

        func wait() async -> Outcome {
            await withCheckedContinuation { continuation in
                let ready: Outcome? = state.withLockedValue { state in
                    if let result = state.result { return result }
                    state.waiters.append(continuation)
                    return nil
                }
                if let ready { continuation.resume(returning: ready) }
            }
        }

        func finish(_ result: Outcome) {
            let waiters = state.withLockedValue { state in
                state.result = result
                defer { state.waiters = [] }
                return state.waiters
            }
            for waiter in waiters { waiter.resume(returning: result) }
        }

        var isPurged: Bool { purged.load(ordering: .acquiring) }
    }

    private struct ShardState: Sendable {
        /// Active answers.
        var entries: TTLCache<TokenDigest, TokenInfo>
        /// Inactive answers, bounded apart.
        var negatives: TTLCache<TokenDigest, TokenInfo>
        var flights: [TokenDigest: Flight] = [:]

        mutating func remove(_ digest: TokenDigest) -> Bool {
            let active = entries.remove(digest)
            let inactive = negatives.remove(digest)
            if let flight = flights.removeValue(forKey: digest) { flight.purged.store(true, ordering: .releasing) }
            return active || inactive
        }

        mutating func capLifetimes(until: Double) {
            entries.capLifetimes(until: until)
            negatives.capLifetimes(until: until)
        }

        mutating func removeAll() -> Int {
            for flight in flights.values { flight.purged.store(true, ordering: .releasing) }
            flights = [:]
            return entries.removeAll() + negatives.removeAll()
        }
    }

    private final class Shard: Sendable {
        let state: NIOLockedValueBox<ShardState>
        init(capacity: Int, negativeCapacity: Int) {
            state = NIOLockedValueBox(ShardState(entries: TTLCache(capacity: capacity), negatives: TTLCache(capacity: negativeCapacity)))
        }
    }

    private let upstream: any TokenIntrospector
    /// The upstream, when it can answer without suspending.
    private let synchronousUpstream: (any SynchronousTokenIntrospector)?
    private let configuration: CacheConfiguration
    private let clock: any EpochClock
    private let shards: [Shard]
    private let metrics: CacheMetrics
    /// The store shared by replicas, asked on a local miss before the upstream.
    private let shared: (any SharedAnswerStore)?

    /// - Parameters:
    ///   - shardCount: independent locks; a power of two near the core count is plenty.
    ///   - shared: the store shared by replicas (DESIGN.md §11), nil for none.
    public init(
        upstream: any TokenIntrospector,
        configuration: CacheConfiguration,
        clock: any EpochClock = SystemEpochClock(),
        shardCount: Int = 16,
        metrics factory: any MetricsFactory = MetricsSystem.factory,
        shared: (any SharedAnswerStore)? = nil
    ) {
        self.shared = shared
        self.upstream = upstream
        self.synchronousUpstream = upstream as? any SynchronousTokenIntrospector
        self.configuration = configuration
        self.clock = clock
        let shardCount = max(1, min(shardCount, configuration.maxEntries))
        let perShard = max(1, (configuration.maxEntries + shardCount - 1) / shardCount)
        let negativePerShard = max(1, (configuration.effectiveMaxNegativeEntries + shardCount - 1) / shardCount)
        self.shards = (0..<shardCount).map { _ in Shard(capacity: perShard, negativeCapacity: negativePerShard) }
        self.metrics = CacheMetrics(factory: factory)
    }

    public func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        try await lookup(token: token, digest: TokenDigest(token: token)).info
    }

    /// A fresh cached answer, without suspending: the hot path. nil on a miss (and for an
    /// entry that is stale or past `exp`), in which case `lookup` must be used.
    public func cached(_ digest: TokenDigest) -> TokenInfo? {
        let uptime = clock.uptime()
        let info: TokenInfo? = shards[digest.shard(of: shards.count)].state.withLockedValue { state in
            if case .fresh(let info) = state.entries.lookup(digest, now: uptime) { return info }
            if case .fresh(let info) = state.negatives.lookup(digest, now: uptime) { return info }
            return nil
        }
        if let info, info.active, info.hasExpired(at: clock.now()) { return nil }
        if info != nil { metrics.hits.increment() }
        return info
    }

    /// A fresh cached answer, or on a miss the upstream's answer when it can give one without
    /// suspending (cached like any other). nil: use `lookup`. A lookup already in flight for the
    /// token is not duplicated: its waiters get its answer.
    public func lookupWithoutSuspending(token: String, digest: TokenDigest) -> Answer? {
        if let info = cached(digest) { return Answer(info: info, source: .hit) }
        // (With a shared store the miss goes through `lookup`, which asks the store first.)
        guard let synchronousUpstream, shared == nil else { return nil }
        let shard = shards[digest.shard(of: shards.count)]
        guard shard.state.withLockedValue({ $0.flights[digest] == nil }) else { return nil }
        guard let info = synchronousUpstream.introspectWithoutSuspending(token) else { return nil }
        metrics.misses.increment()
        let now = clock.now()
        let uptime = clock.uptime()
        let (fresh, staleUntil) = lifetime(of: info, now: now, uptime: uptime)
        if fresh > uptime {
            shard.state.withLockedValue { state in
                let evicted = info.active
                    ? state.entries.insert(digest, value: info, freshUntil: fresh, staleUntil: staleUntil, now: uptime)
                    : state.negatives.insert(digest, value: info, freshUntil: fresh, staleUntil: staleUntil, now: uptime)
                if evicted > 0 { metrics.evictions.increment(by: evicted) }
            }
        }
        return Answer(info: info, source: .miss)
    }

    /// Looks a token up, calling the upstream introspector on a miss.
    public func lookup(token: String, digest: TokenDigest) async throws(IntrospectionError) -> Answer {
        let shard = shards[digest.shard(of: shards.count)]
        for _ in 0..<Self.maxPurgeRetries {
            if let answer = try await lookupOnce(token: token, digest: digest, shard: shard) { return answer }
            metrics.purgedFlights.increment()
        }
        throw .transport("the token was purged \(Self.maxPurgeRetries) times while the authorization server was asked")
    }

    /// One lookup; nil when a purge overtook the call it relied on (the caller starts again).
    private func lookupOnce(token: String, digest: TokenDigest, shard: Shard) async throws(IntrospectionError) -> Answer? {
        let uptime = clock.uptime()
        let now = clock.now()

        enum Step {
            case hit(TokenInfo)
            case wait(Flight)
            case lead(Flight, stale: TokenInfo?)
        }
        let step: Step = shard.state.withLockedValue { state in
            var stale: TokenInfo?
            switch state.entries.lookup(digest, now: uptime) {
            case .fresh(let info):
                // exp is re-checked on every hit, whatever the entry's own lifetime says.
                if info.hasExpired(at: now) {
                    state.entries.remove(digest)
                } else {
                    return .hit(info)
                }
            case .stale(let info):
                stale = info
            case .absent:
                if case .fresh(let info) = state.negatives.lookup(digest, now: uptime) { return .hit(info) }
            }
            if let flight = state.flights[digest] { return .wait(flight) }
            let flight = Flight()
            state.flights[digest] = flight
            return .lead(flight, stale: stale)
        }

        switch step {
        case .hit(let info):
            metrics.hits.increment()
            return Answer(info: info, source: .hit)
        case .wait(let flight):
            metrics.coalesced.increment()
            let outcome = await flight.wait()
            guard !flight.isPurged else { return nil }
            var answer = try outcome.get()
            if answer.source == .miss { answer.source = .coalesced }
            return answer
        case .lead(let flight, let stale):
            metrics.misses.increment()
            let outcome = await callUpstream(token: token, digest: digest, shard: shard, flight: flight, stale: stale)
            flight.finish(outcome)
            guard !flight.isPurged else { return nil }
            return try outcome.get()
        }
    }

    private func callUpstream(token: String, digest: TokenDigest, shard: Shard, flight: Flight, stale: TokenInfo?) async -> Outcome {
        var sharedEpoch: SharedEpoch?
        if let shared {
            let load: SharedLoad
            if ServiceContext.current != nil {
                load = await withSpan("authz.shared_store.load", ofKind: .client) { span in
                    let load = await shared.load(digest)
                    switch load {
                    case .hit: span.attributes["authz.shared.result"] = "hit"
                    case .miss: span.attributes["authz.shared.result"] = "miss"
                    case .unavailable: span.attributes["authz.shared.result"] = "unavailable"
                    }
                    return load
                }
            } else {
                load = await shared.load(digest)
            }
            switch load {
            case .hit(let info, let until):
                if let answer = adoptShared(info, until: until, digest: digest, shard: shard, flight: flight) { return answer }
            case .miss(let epoch):
                sharedEpoch = epoch
            case .unavailable:
                break
            }
        }
        let result: Result<TokenInfo, IntrospectionError>
        do throws(IntrospectionError) {
            result = .success(try await upstream.introspect(token))
        } catch {
            result = .failure(error)
        }
        let now = clock.now()
        let uptime = clock.uptime()
        if let shared, let sharedEpoch, case .success(let info) = result, !flight.isPurged {
            let (fresh, _) = lifetime(of: info, now: now, uptime: uptime)
            if fresh > uptime { shared.save(digest, info: info, until: now + (fresh - uptime), epoch: sharedEpoch) }
        }
        return shard.state.withLockedValue { state -> Outcome in
            // A purge took this call out of the table (and may have let a newer one in): its
            // answer is not cached, and the newer call's entry is not touched.
            let purged = flight.isPurged
            if !purged { state.flights[digest] = nil }
            switch result {
            case .success(let info):
                let (fresh, staleUntil) = lifetime(of: info, now: now, uptime: uptime)
                if !purged, fresh > uptime {
                    let evicted = info.active
                        ? state.entries.insert(digest, value: info, freshUntil: fresh, staleUntil: staleUntil, now: uptime)
                        : state.negatives.insert(digest, value: info, freshUntil: fresh, staleUntil: staleUntil, now: uptime)
                    if evicted > 0 { metrics.evictions.increment(by: evicted) }
                    if info.active { state.negatives.remove(digest) } else { state.entries.remove(digest) }
                }
                return .success(Answer(info: info, source: .miss))
            case .failure(let error):
                if let stale, stale.active, staleUsable(stale, now: now) {
                    metrics.staleServes.increment()
                    return .success(Answer(info: stale, source: .stale))
                }
                return .failure(error)
            }
        }
    }

    /// An answer another replica stored: cached here (never longer than this replica's own
    /// lifetime for it, nor past the time the storing replica gave) and returned; nil when it is
    /// not usable (expired meanwhile) and the AS must be asked.
    private func adoptShared(_ info: TokenInfo, until: Double, digest: TokenDigest, shard: Shard, flight: Flight) -> Outcome? {
        let now = clock.now()
        let uptime = clock.uptime()
        if info.active, info.hasExpired(at: now) { return nil }
        let (ownFresh, _) = lifetime(of: info, now: now, uptime: uptime)
        let fresh = min(ownFresh, uptime + (until - now))
        guard fresh > uptime else { return nil }
        shard.state.withLockedValue { state in
            let purged = flight.isPurged
            if !purged { state.flights[digest] = nil }
            guard !purged else { return }
            let evicted = info.active
                ? state.entries.insert(digest, value: info, freshUntil: fresh, staleUntil: fresh, now: uptime)
                : state.negatives.insert(digest, value: info, freshUntil: fresh, staleUntil: fresh, now: uptime)
            if evicted > 0 { metrics.evictions.increment(by: evicted) }
            if info.active { state.negatives.remove(digest) } else { state.entries.remove(digest) }
        }
        return .success(Answer(info: info, source: .shared))
    }

    /// When an answer stops being fresh, and when it stops being usable even as stale, on the
    /// monotonic clock: `min(ttl, exp − now)` from `uptime`; while the shared store's purge
    /// broadcasts cannot be received, at most its degraded lifetime.
    private func lifetime(of info: TokenInfo, now: Double, uptime: Double) -> (fresh: Double, stale: Double) {
        guard configuration.ttlSeconds > 0, configuration.maxEntries > 0 else { return (uptime, uptime) }
        let cap = shared?.localLifetimeCap.map { uptime + $0 } ?? .infinity
        guard info.active else {
            let until = min(uptime + configuration.negativeTTLSeconds, cap)
            return (until, until)
        }
        let untilExp = min(info.exp.map { uptime + (Double($0) - now) } ?? .infinity, cap)
        let fresh = min(uptime + configuration.ttlSeconds, untilExp)
        let stale = min(fresh + max(0, configuration.staleIfErrorSeconds), untilExp)
        return (fresh, stale)
    }

    /// Shortens every local entry's lifetime to at most `seconds` from now: the shared store's
    /// purge broadcasts can no longer be received (DESIGN.md §11).
    public func capLifetimes(seconds: Double) {
        let until = clock.uptime() + seconds
        for shard in shards { shard.state.withLockedValue { $0.capLifetimes(until: until) } }
    }

    private func staleUsable(_ info: TokenInfo, now: Double) -> Bool {
        configuration.staleIfErrorSeconds > 0 && !info.hasExpired(at: now)
    }

    /// Removes one token's answer and ends its lookup in flight for everyone (see the type's
    /// documentation); returns whether an answer was cached.
    @discardableResult
    public func purge(_ digest: TokenDigest) -> Bool {
        shards[digest.shard(of: shards.count)].state.withLockedValue { $0.remove(digest) }
    }

    /// Empties the cache and ends every lookup in flight; returns how many answers it held.
    @discardableResult
    public func purgeAll() -> Int {
        shards.reduce(0) { total, shard in total + shard.state.withLockedValue { $0.removeAll() } }
    }

    /// Calls the upstream introspector directly, bypassing the cache, with a token no AS knows:
    /// the readiness probe (its outcome feeds `ASReachability` when the upstream is instrumented).
    public func probeUpstream() async {
        _ = try? await upstream.introspect("authz-sidecar-readiness-probe")
    }

    /// Cached answers, active and inactive (expired ones count until met).
    public var count: Int {
        shards.reduce(0) { total, shard in total + shard.state.withLockedValue { $0.entries.count + $0.negatives.count } }
    }

    /// Cached active answers.
    public var activeCount: Int {
        shards.reduce(0) { total, shard in total + shard.state.withLockedValue { $0.entries.count } }
    }
}

/// The cache's counters (DESIGN.md §8).
struct CacheMetrics: Sendable {
    let hits: Counter
    let misses: Counter
    let coalesced: Counter
    let evictions: Counter
    let staleServes: Counter
    let purgedFlights: Counter

    init(factory: any MetricsFactory) {
        hits = Counter(label: "authz_cache_hits_total", factory: factory)
        misses = Counter(label: "authz_cache_misses_total", factory: factory)
        coalesced = Counter(label: "authz_cache_coalesced_waits_total", factory: factory)
        evictions = Counter(label: "authz_cache_evictions_total", factory: factory)
        staleServes = Counter(label: "authz_cache_stale_serves_total", factory: factory)
        purgedFlights = Counter(label: "authz_cache_purged_lookups_total", factory: factory)
    }
}
