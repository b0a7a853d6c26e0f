import Introspection
import Synchronization
import Testing
import NIOConcurrencyHelpers

/// A gate an upstream call waits at until the test opens it.
final class ArrivalGate: Sendable {
    private let state = NIOLockedValueBox<(open: Bool, waiters: [CheckedContinuation<Void, Never>], arrived: Int)>((false, [], 0))

    func wait() async {
        await withCheckedContinuation { continuation in
            let ready = state.withLockedValue { state -> Bool in
                state.arrived += 1
                if state.open { return true }
                state.waiters.append(continuation)
                return false
            }
            if ready { continuation.resume() }
        }
    }

    func open() {
        let waiters = state.withLockedValue { state in
            state.open = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    var arrived: Int { state.withLockedValue { $0.arrived } }

    /// Waits (bounded) until `count` calls have arrived at the gate.
    func waitForArrivals(_ count: Int) async throws {
        for _ in 0..<500 where arrived < count { try await Task.sleep(for: .milliseconds(10)) }
        #expect(arrived >= count, "only \(arrived) of \(count) calls reached the gate")
    }
}

/// A clock whose wall time can step back while its monotonic time only moves forward.
final class SteppingClock: EpochClock {
    private let state = NIOLockedValueBox<(wall: Double, mono: Double)>((1_800_000_000, 1000))
    func now() -> Double { state.withLockedValue { $0.wall } }
    func uptime() -> Double { state.withLockedValue { $0.mono } }
    func elapse(_ seconds: Double) { state.withLockedValue { $0.wall += seconds; $0.mono += seconds } }
    func stepWall(by seconds: Double) { state.withLockedValue { $0.wall += seconds } }
}

@Suite("Cache edges: purges reach lookups in flight, junk cannot evict, TTLs on the monotonic clock")
struct CacheEdgeTests {
    let clock = TestClock()

    /// A revoked token, purged while its first lookup is in flight: every request that arrives
    /// after the purge is decided on a new answer, and the old answer is never cached.
    @Test("purge by token, by digest and of all ends the lookup in flight", arguments: ["token", "digest", "all"])
    func purgeReachesFlight(kind: String) async throws {
        let gate = ArrivalGate()
        let revoked = Atomic<Bool>(false)
        let upstream = ScriptedIntrospector { _ in
            // The answer is decided when the call starts, as an AS would answer it then.
            let active = !revoked.load(ordering: .relaxed)
            await gate.wait()
            return active ? TokenInfo(active: true, scope: "a") : .inactive
        }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock)
        let digest = TokenDigest(token: "t")
        // A: the first lookup, in flight at the AS, which still calls the token active.
        let first = Task { try await cache.lookup(token: "t", digest: digest) }
        try await gate.waitForArrivals(1)
        // The token is revoked at the AS, then purged.
        revoked.store(true, ordering: .relaxed)
        switch kind {
        case "token": cache.purge(TokenDigest(token: "t"))
        case "digest": cache.purge(try #require(TokenDigest(hex: digest.hex)))
        default: cache.purgeAll()
        }
        // B arrives after the purge: it must not join A's call.
        let second = Task { try await cache.lookup(token: "t", digest: digest) }
        try await gate.waitForArrivals(2)
        gate.open()
        let a = try await first.value
        let b = try await second.value
        #expect(!b.info.active, "a request after the purge was decided on the answer from before it")
        // A's own request started before the purge but is answered after it: it looks again.
        #expect(!a.info.active)
        // And what is cached now is the post-purge answer.
        let c = try await cache.lookup(token: "t", digest: digest)
        #expect(!c.info.active)
        #expect(c.source == .hit)
        #expect(upstream.count == 2)
    }

    @Test("without a purge, lookups in flight are still shared (single-flight is kept)")
    func singleFlightKept() async throws {
        let gate = ArrivalGate()
        let upstream = ScriptedIntrospector { _ in
            await gate.wait()
            return TokenInfo(active: true, scope: "a")
        }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock)
        let lookups = (0..<20).map { _ in Task { try await cache.introspect("t") } }
        try await gate.waitForArrivals(1)
        try await Task.sleep(for: .milliseconds(50))
        gate.open()
        for lookup in lookups { #expect(try await lookup.value.active) }
        #expect(upstream.count == 1)
    }

    /// The hot set's hit ratio while a flood of unique junk tokens arrives.
    static func hotSetHitRatio(configuration: CacheConfiguration) async throws -> Double {
        let clock = TestClock()
        // A plain closure: ScriptedIntrospector's swappable closure grows a thunk per call.
        let upstream = ClosureTokenIntrospector { token in token.hasPrefix("hot-") ? TokenInfo(active: true, scope: "a") : .inactive }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: configuration, clock: clock, shardCount: 1)
        let hot = (0..<1000).map { "hot-\($0)" }
        for token in hot { _ = try await cache.introspect(token) }
        var hits = 0
        var asked = 0
        for junk in 0..<100_000 {
            _ = try await cache.introspect("junk-\(junk)")
            if junk % 5000 == 4999 {
                // every hot token once per 5,000 junk tokens: as many as max_entries
                for token in hot {
                    asked += 1
                    if try await cache.lookup(token: token, digest: TokenDigest(token: token)).source == .hit { hits += 1 }
                }
            }
        }
        return Double(hits) / Double(asked)
    }

    @Test("100,000 junk tokens do not evict a hot set of 1,000 active tokens")
    func junkCannotEvict() async throws {
        // max_entries 5,000: room for the hot set, not for the junk.
        let ratio = try await Self.hotSetHitRatio(configuration: .init(ttlSeconds: 300, negativeTTLSeconds: 300, maxEntries: 5000))
        print("hot-set hit ratio under a junk flood (separate negative bound): \(ratio)")
        #expect(ratio == 1.0)
    }

    @Test("inactive answers live in their own bound, max_negative_entries")
    func negativeBound() async throws {
        let upstream = ScriptedIntrospector { _ in .inactive }
        let cache = CachingTokenIntrospector(
            upstream: upstream, configuration: .init(ttlSeconds: 300, negativeTTLSeconds: 300, maxEntries: 1000, maxNegativeEntries: 10), clock: clock, shardCount: 1
        )
        for i in 0..<50 { _ = try await cache.introspect("junk-\(i)") }
        #expect(cache.count == 10)
        #expect(cache.activeCount == 0)
        _ = try await cache.introspect("junk-49")
        #expect(upstream.count == 50)  // the newest is still cached
        _ = try await cache.introspect("junk-0")
        #expect(upstream.count == 51)  // the oldest was evicted
    }

    @Test("an NTP step back does not extend a TTL; exp stays on the wall clock")
    func monotonicTTL() async throws {
        let clock = SteppingClock()
        let exp = Int64(clock.now()) + 3600
        let upstream = ScriptedIntrospector { _ in TokenInfo(active: true, scope: "a", exp: exp) }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 30), clock: clock)
        _ = try await cache.introspect("t")
        clock.elapse(20)
        clock.stepWall(by: -600)  // the wall clock steps back ten minutes
        clock.elapse(10)
        _ = try await cache.introspect("t")
        #expect(upstream.count == 2, "the entry outlived its 30 s because the wall clock stepped back")
        // exp is judged on the wall clock: a step forward past exp ends the entry at once.
        clock.stepWall(by: 600 + 3600)
        #expect(cache.cached(TokenDigest(token: "t")) == nil)
    }
}
