import Logging
import Metrics
import Synchronization
import NIOConcurrencyHelpers

/// Caches any introspector's answers, honestly (DESIGN.md §5.3):
/// keyed by `TokenDigest`; an active answer lives `min(ttl, exp − now)` and is never served once
/// `exp` has passed; an inactive one lives `negative_ttl`; faults are never cached; N concurrent
/// lookups of one uncached token make one upstream call (single-flight); during an AS fault an
/// answer whose TTL ran out less than `stale_if_error` ago may be served, never past `exp`.
public final class CachingTokenIntrospector: TokenIntrospector {
    /// Where an answer came from, for logs and metrics.
    public enum Source: String, Sendable {
        case hit, miss, coalesced, stale
    }

    /// An answer and its source.
    public struct Answer: Sendable {
        public var info: TokenInfo
        public var source: Source
    }

    private typealias Outcome = Result<Answer, IntrospectionError>

    /// One call in flight; its waiters are continuations, resumed when it ends.
    private final class Flight: Sendable {
        private let state = NIOLockedValueBox<(result: Outcome?, waiters: [CheckedContinuation<Outcome, Never>])>((nil, []))

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
    }

    private struct ShardState: Sendable {
        var entries: TTLCache<TokenDigest, TokenInfo>
        var flights: [TokenDigest: Flight] = [:]
    }

    private final class Shard: Sendable {
        let state: NIOLockedValueBox<ShardState>
        init(capacity: Int) { state = NIOLockedValueBox(ShardState(entries: TTLCache(capacity: capacity))) }
    }

    private let upstream: any TokenIntrospector
    private let configuration: CacheConfiguration
    private let clock: any EpochClock
    private let shards: [Shard]
    private let metrics: CacheMetrics

    /// - Parameters:
    ///   - shardCount: independent locks; a power of two near the core count is plenty.
    public init(
        upstream: any TokenIntrospector,
        configuration: CacheConfiguration,
        clock: any EpochClock = SystemEpochClock(),
        shardCount: Int = 16,
        metrics factory: any MetricsFactory = MetricsSystem.factory
    ) {
        self.upstream = upstream
        self.configuration = configuration
        self.clock = clock
        let shardCount = max(1, min(shardCount, configuration.maxEntries))
        let perShard = max(1, (configuration.maxEntries + shardCount - 1) / shardCount)
        self.shards = (0..<shardCount).map { _ in Shard(capacity: perShard) }
        self.metrics = CacheMetrics(factory: factory)
    }

    public func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        try await lookup(token: token, digest: TokenDigest(token: token)).info
    }

    /// A fresh cached answer, without suspending: the hot path. nil on a miss (and for an
    /// entry that is stale or past `exp`), in which case `lookup` must be used.
    public func cached(_ digest: TokenDigest) -> TokenInfo? {
        let now = clock.now()
        let info: TokenInfo? = shards[digest.shard(of: shards.count)].state.withLockedValue { state in
            guard case .fresh(let info) = state.entries.lookup(digest, now: now) else { return nil }
            return info.active && info.hasExpired(at: now) ? nil : info
        }
        if info != nil { metrics.hits.increment() }
        return info
    }

    /// Looks a token up, calling the upstream introspector on a miss.
    public func lookup(token: String, digest: TokenDigest) async throws(IntrospectionError) -> Answer {
        let shard = shards[digest.shard(of: shards.count)]
        let now = clock.now()

        enum Step {
            case hit(TokenInfo)
            case wait(Flight)
            case lead(Flight, stale: TokenInfo?)
        }
        let step: Step = shard.state.withLockedValue { state in
            var stale: TokenInfo?
            switch state.entries.lookup(digest, now: now) {
            case .fresh(let info):
                // exp is re-checked on every hit, whatever the entry's own lifetime says.
                if info.active, info.hasExpired(at: now) {
                    state.entries.remove(digest)
                } else {
                    return .hit(info)
                }
            case .stale(let info):
                stale = info
            case .absent:
                break
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
            var answer = try await flight.wait().get()
            if answer.source == .miss { answer.source = .coalesced }
            return answer
        case .lead(let flight, let stale):
            metrics.misses.increment()
            let outcome = await callUpstream(token: token, digest: digest, shard: shard, stale: stale)
            flight.finish(outcome)
            return try outcome.get()
        }
    }

    private func callUpstream(token: String, digest: TokenDigest, shard: Shard, stale: TokenInfo?) async -> Outcome {
        let result: Result<TokenInfo, IntrospectionError>
        do throws(IntrospectionError) {
            result = .success(try await upstream.introspect(token))
        } catch {
            result = .failure(error)
        }
        let now = clock.now()
        return shard.state.withLockedValue { state -> Outcome in
            state.flights[digest] = nil
            switch result {
            case .success(let info):
                let (fresh, staleUntil) = lifetime(of: info, now: now)
                if fresh > now {
                    let evicted = state.entries.insert(digest, value: info, freshUntil: fresh, staleUntil: staleUntil, now: now)
                    if evicted > 0 { metrics.evictions.increment(by: evicted) }
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

    /// When an answer stops being fresh, and when it stops being usable even as stale.
    private func lifetime(of info: TokenInfo, now: Double) -> (fresh: Double, stale: Double) {
        guard configuration.ttlSeconds > 0, configuration.maxEntries > 0 else { return (now, now) }
        guard info.active else { return (now + configuration.negativeTTLSeconds, now + configuration.negativeTTLSeconds) }
        let exp = info.exp.map(Double.init) ?? .infinity
        let fresh = min(now + configuration.ttlSeconds, exp)
        let stale = min(fresh + max(0, configuration.staleIfErrorSeconds), exp)
        return (fresh, stale)
    }

    private func staleUsable(_ info: TokenInfo, now: Double) -> Bool {
        configuration.staleIfErrorSeconds > 0 && !info.hasExpired(at: now)
    }

    /// Removes one token's answer; returns whether it was cached.
    @discardableResult
    public func purge(_ digest: TokenDigest) -> Bool {
        shards[digest.shard(of: shards.count)].state.withLockedValue { $0.entries.remove(digest) }
    }

    /// Empties the cache; returns how many answers it held.
    @discardableResult
    public func purgeAll() -> Int {
        shards.reduce(0) { total, shard in total + shard.state.withLockedValue { $0.entries.removeAll() } }
    }

    /// Calls the upstream introspector directly, bypassing the cache, with a token no AS knows:
    /// the readiness probe (its outcome feeds `ASReachability` when the upstream is instrumented).
    public func probeUpstream() async {
        _ = try? await upstream.introspect("authz-sidecar-readiness-probe")
    }

    /// Cached answers (expired ones count until met).
    public var count: Int {
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

    init(factory: any MetricsFactory) {
        hits = Counter(label: "authz_cache_hits_total", factory: factory)
        misses = Counter(label: "authz_cache_misses_total", factory: factory)
        coalesced = Counter(label: "authz_cache_coalesced_waits_total", factory: factory)
        evictions = Counter(label: "authz_cache_evictions_total", factory: factory)
        staleServes = Counter(label: "authz_cache_stale_serves_total", factory: factory)
    }
}
