import Introspection
import Synchronization
import Testing
import NIOConcurrencyHelpers

/// An upstream introspector that counts its calls and answers from a script.
final class ScriptedIntrospector: TokenIntrospector {
    let calls = Atomic<Int>(0)
    private let answer: NIOLockedValueBox<@Sendable (String) async throws(IntrospectionError) -> TokenInfo>

    init(_ answer: @escaping @Sendable (String) async throws(IntrospectionError) -> TokenInfo) {
        self.answer = NIOLockedValueBox(answer)
    }

    func set(_ answer: @escaping @Sendable (String) async throws(IntrospectionError) -> TokenInfo) {
        self.answer.withLockedValue { $0 = answer }
    }

    func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        calls.add(1, ordering: .relaxed)
        let body = answer.withLockedValue { $0 }
        return try await body(token)
    }

    var count: Int { calls.load(ordering: .relaxed) }
}

@Suite("CachingTokenIntrospector: honest TTLs, single-flight, stale-if-error")
struct CachingTokenIntrospectorTests {
    let clock = TestClock()

    func active(exp: Double?) -> TokenInfo {
        TokenInfo(active: true, scope: "a", exp: exp.map { Int64($0) })
    }

    @Test("a positive answer lives ttl_seconds")
    func positiveTTL() async throws {
        let now = clock.now()
        let upstream = ScriptedIntrospector { [self] _ in active(exp: now + 3600) }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 30), clock: clock)
        _ = try await cache.introspect("t")
        clock.advance(by: 29)
        _ = try await cache.introspect("t")
        #expect(upstream.count == 1)
        clock.advance(by: 1)
        _ = try await cache.introspect("t")
        #expect(upstream.count == 2)
    }

    @Test("the TTL is cut at exp, and a hit past exp is never served")
    func boundedByExp() async throws {
        let now = clock.now()
        let upstream = ScriptedIntrospector { [self] _ in active(exp: now + 10) }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock)
        let first = try await cache.lookup(token: "t", digest: TokenDigest(token: "t"))
        #expect(first.source == .miss)
        clock.advance(by: 9)
        #expect(try await cache.lookup(token: "t", digest: TokenDigest(token: "t")).source == .hit)
        clock.advance(by: 1)
        upstream.set { _ in .inactive }
        let after = try await cache.lookup(token: "t", digest: TokenDigest(token: "t"))
        #expect(after.source == .miss)
        #expect(after.info == .inactive)
        #expect(upstream.count == 2)
    }

    @Test("an answer whose exp has already passed is not cached")
    func alreadyExpired() async throws {
        let now = clock.now()
        let upstream = ScriptedIntrospector { [self] _ in active(exp: now - 1) }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock)
        _ = try await cache.introspect("t")
        _ = try await cache.introspect("t")
        #expect(upstream.count == 2)
    }

    @Test("inactive answers live negative_ttl_seconds")
    func negativeTTL() async throws {
        let upstream = ScriptedIntrospector { _ in .inactive }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300, negativeTTLSeconds: 5), clock: clock)
        _ = try await cache.introspect("t")
        clock.advance(by: 4.9)
        _ = try await cache.introspect("t")
        #expect(upstream.count == 1)
        clock.advance(by: 0.1)
        _ = try await cache.introspect("t")
        #expect(upstream.count == 2)
    }

    @Test("faults are never cached and never reported as inactive")
    func faultsNotCached() async throws {
        let upstream = ScriptedIntrospector { _ throws(IntrospectionError) in throw .status(500) }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(), clock: clock)
        for _ in 0..<3 {
            await #expect(throws: IntrospectionError.status(500)) { try await cache.introspect("t") }
        }
        #expect(upstream.count == 3)
        #expect(cache.count == 0)
    }

    @Test("ttl_seconds 0 disables caching")
    func disabled() async throws {
        let upstream = ScriptedIntrospector { [self] _ in active(exp: nil) }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 0), clock: clock)
        _ = try await cache.introspect("t")
        _ = try await cache.introspect("t")
        #expect(upstream.count == 2)
    }

    @Test("1,000 concurrent callers for one new token make exactly one upstream call")
    func singleFlight() async throws {
        let gate = Gate()
        let now = clock.now()
        let upstream = ScriptedIntrospector { [self] _ in
            await gate.wait()
            return active(exp: now + 60)
        }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(), clock: clock)
        let sources = try await withThrowingTaskGroup(of: CachingTokenIntrospector.Source.self) { group in
            for _ in 0..<1000 {
                group.addTask { try await cache.lookup(token: "burst", digest: TokenDigest(token: "burst")).source }
            }
            // let every caller reach the cache before the AS answers
            while upstream.count == 0 { await Task.yield() }
            try await Task.sleep(for: .milliseconds(100))
            await gate.open()
            var all: [CachingTokenIntrospector.Source] = []
            for try await source in group { all.append(source) }
            return all
        }
        #expect(upstream.count == 1)
        #expect(sources.count == 1000)
        #expect(sources.filter { $0 == .miss }.count == 1)
    }

    @Test("a fault reaches the waiters of that one call only")
    func faultToWaitersOnly() async throws {
        let gate = Gate()
        let upstream = ScriptedIntrospector { _ throws(IntrospectionError) in
            await gate.wait()
            throw .timeout
        }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(), clock: clock)
        let failures = await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<50 {
                group.addTask { (try? await cache.introspect("t")) == nil }
            }
            while upstream.count == 0 { await Task.yield() }
            try? await Task.sleep(for: .milliseconds(50))
            await gate.open()
            return await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        #expect(failures == 50)
        #expect(upstream.count == 1)
        let now = clock.now()
        upstream.set { [self] _ in active(exp: now + 60) }
        #expect(try await cache.introspect("t").active)
        #expect(upstream.count == 2)
    }

    @Test("stale-if-error: served within the window during a fault, never past exp, never without the setting")
    func staleIfError() async throws {
        let now = clock.now()
        let upstream = ScriptedIntrospector { [self] _ in active(exp: now + 100) }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 30, staleIfErrorSeconds: 60), clock: clock)
        _ = try await cache.introspect("t")
        upstream.set { _ throws(IntrospectionError) in throw .connect("refused") }
        clock.advance(by: 31)
        #expect(try await cache.lookup(token: "t", digest: TokenDigest(token: "t")).source == .stale)
        clock.advance(by: 58)  // 89 s after: inside the window (30 + 60) and before exp (100)
        #expect(try await cache.lookup(token: "t", digest: TokenDigest(token: "t")).source == .stale)
        clock.advance(by: 2)  // 91 s: past the window
        await #expect(throws: IntrospectionError.connect("refused")) { try await cache.introspect("t") }

        // exp caps the stale window
        let short = ScriptedIntrospector { [self] _ in active(exp: now + 91 + 40) }
        let capped = CachingTokenIntrospector(upstream: short, configuration: .init(ttlSeconds: 30, staleIfErrorSeconds: 60), clock: clock)
        _ = try await capped.introspect("u")
        short.set { _ throws(IntrospectionError) in throw .timeout }
        clock.advance(by: 35)
        #expect(try await capped.lookup(token: "u", digest: TokenDigest(token: "u")).source == .stale)
        clock.advance(by: 5)  // exp reached
        await #expect(throws: IntrospectionError.timeout) { try await capped.introspect("u") }

        // without the setting: the fault
        let plain = ScriptedIntrospector { [self] _ in active(exp: now + 10_000) }
        let strict = CachingTokenIntrospector(upstream: plain, configuration: .init(ttlSeconds: 30), clock: clock)
        _ = try await strict.introspect("v")
        plain.set { _ throws(IntrospectionError) in throw .timeout }
        clock.advance(by: 31)
        await #expect(throws: IntrospectionError.timeout) { try await strict.introspect("v") }
    }

    @Test("max_entries bounds the cache; purge removes one or all")
    func capacityAndPurge() async throws {
        let now = clock.now()
        let upstream = ScriptedIntrospector { [self] _ in active(exp: now + 600) }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(maxEntries: 64), clock: clock, shardCount: 4)
        for i in 0..<1000 { _ = try await cache.introspect("token-\(i)") }
        #expect(cache.count <= 64)
        #expect(cache.count >= 48)
        _ = try await cache.introspect("keep")
        #expect(cache.purge(TokenDigest(token: "keep")))
        #expect(!cache.purge(TokenDigest(token: "keep")))
        let before = upstream.count
        _ = try await cache.introspect("keep")
        #expect(upstream.count == before + 1)
        let cached = cache.count
        #expect(cached > 0)
        #expect(cache.purgeAll() == cached)
        #expect(cache.count == 0)
    }

    @Test("the digest is SHA-256, shown as 8 hex digits, and round-trips through hex")
    func digest() {
        let digest = TokenDigest(token: "abc")
        #expect(digest.hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(digest.prefix == "ba7816bf")
        #expect(TokenDigest(hex: digest.hex) == digest)
        #expect(TokenDigest(hex: "xyz") == nil)
    }
}

/// Holds callers until opened.
actor Gate {
    private var isOpen = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func wait() async {
        if isOpen { return }
        await withCheckedContinuation { waiters.append($0) }
    }

    func open() {
        isOpen = true
        for waiter in waiters { waiter.resume() }
        waiters = []
    }
}
