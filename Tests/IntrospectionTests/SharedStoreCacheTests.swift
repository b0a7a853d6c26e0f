import Introspection
import NIOConcurrencyHelpers
import Synchronization
import Testing

/// A shared store held in memory, with every call recorded.
final class MemoryStore: SharedAnswerStore {
    struct Saved: Sendable {
        var digest: TokenDigest
        var info: TokenInfo
        var until: Double
        var epoch: SharedEpoch
    }
    let loadAnswer = NIOLockedValueBox<@Sendable (TokenDigest) -> SharedLoad>({ _ in .miss(SharedEpoch(7)) })
    let saved = NIOLockedValueBox<[Saved]>([])
    let loads = Atomic<Int>(0)
    let cap = NIOLockedValueBox<Double?>(nil)
    /// Runs inside `load`, before it answers (a test's hook to act while the store is asked).
    let duringLoad = NIOLockedValueBox<(@Sendable () async -> Void)?>(nil)

    func load(_ digest: TokenDigest) async -> SharedLoad {
        loads.add(1, ordering: .relaxed)
        // The store's answer is what it held when asked; the hook acts while it travels back.
        let answer = loadAnswer.withLockedValue { $0 }(digest)
        if let hook = duringLoad.withLockedValue({ $0 }) { await hook() }
        return answer
    }

    func save(_ digest: TokenDigest, info: TokenInfo, until: Double, epoch: SharedEpoch) {
        saved.withLockedValue { $0.append(Saved(digest: digest, info: info, until: until, epoch: epoch)) }
    }

    var localLifetimeCap: Double? { cap.withLockedValue { $0 } }
}

@Suite("The cache with a store shared by replicas (DESIGN.md §11)")
struct SharedStoreCacheTests {
    let clock = TestClock()
    let active = TokenInfo(active: true, scope: "a b", clientID: "c", exp: 1_800_000_000 + 3600)

    @Test("a store hit answers without the AS and is cached locally, no longer than the storing replica said")
    func storeHit() async throws {
        let upstream = ScriptedIntrospector { _ in TokenInfo(active: true, scope: "from-as") }
        let store = MemoryStore()
        let active = self.active
        store.loadAnswer.withLockedValue { $0 = { _ in .hit(active, until: 1_800_000_000 + 10) } }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock, shared: store)
        let digest = TokenDigest(token: "t")
        let answer = try await cache.lookup(token: "t", digest: digest)
        #expect(answer.source == .shared)
        #expect(answer.info == active)
        #expect(upstream.calls.load(ordering: .relaxed) == 0)
        #expect(store.saved.withLockedValue { $0.isEmpty }, "a store hit is not written back")
        #expect(cache.cached(digest) == active)
        clock.advance(by: 11)  // past the storing replica's `until`, well within ttl_seconds
        #expect(cache.cached(digest) == nil)
    }

    @Test("a miss asks the AS and saves its answer with the epoch read before the call, expiring no later than exp")
    func missSaves() async throws {
        let short = TokenInfo(active: true, scope: "a", exp: 1_800_000_000 + 20)
        let upstream = ScriptedIntrospector { _ in short }
        let store = MemoryStore()
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock, shared: store)
        let answer = try await cache.lookup(token: "t", digest: TokenDigest(token: "t"))
        #expect(answer.source == .miss)
        #expect(upstream.calls.load(ordering: .relaxed) == 1)
        let saved = try #require(store.saved.withLockedValue { $0.first })
        #expect(saved.epoch == SharedEpoch(7))
        #expect(abs(saved.until - (1_800_000_000 + 20)) < 0.001)
        #expect(saved.info == short)
        // A hit afterwards touches neither the store nor the AS.
        _ = try await cache.lookup(token: "t", digest: TokenDigest(token: "t"))
        #expect(store.loads.load(ordering: .relaxed) == 1)
    }

    @Test("inactive answers are shared for negative_ttl_seconds; faults never")
    func negativesAndFaults() async throws {
        let upstream = ScriptedIntrospector { token throws(IntrospectionError) in
            if token == "fault" { throw .transport("down") }
            return .inactive
        }
        let store = MemoryStore()
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300, negativeTTLSeconds: 4), clock: clock, shared: store)
        _ = try await cache.lookup(token: "junk", digest: TokenDigest(token: "junk"))
        await #expect(throws: IntrospectionError.self) { try await cache.lookup(token: "fault", digest: TokenDigest(token: "fault")) }
        let saved = store.saved.withLockedValue { $0 }
        #expect(saved.count == 1)
        #expect(saved.first?.info.active == false)
        #expect(abs((saved.first?.until ?? 0) - (1_800_000_000 + 4)) < 0.001)
    }

    @Test("a store that is unavailable costs nothing: the AS decides and nothing is saved")
    func unavailable() async throws {
        let upstream = ScriptedIntrospector { _ in TokenInfo(active: true, scope: "a") }
        let store = MemoryStore()
        store.loadAnswer.withLockedValue { $0 = { _ in .unavailable } }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock, shared: store)
        let answer = try await cache.lookup(token: "t", digest: TokenDigest(token: "t"))
        #expect(answer.info.active)
        #expect(upstream.calls.load(ordering: .relaxed) == 1)
        #expect(store.saved.withLockedValue { $0.isEmpty })
    }

    @Test("a stored answer already past exp is not used: the AS is asked")
    func storedPastExp() async throws {
        let upstream = ScriptedIntrospector { _ in .inactive }
        let store = MemoryStore()
        let expired = TokenInfo(active: true, scope: "a", exp: 1_800_000_000 - 1)
        store.loadAnswer.withLockedValue { $0 = { _ in .hit(expired, until: 1_800_000_000 + 60) } }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock, shared: store)
        let answer = try await cache.lookup(token: "t", digest: TokenDigest(token: "t"))
        #expect(answer.info.active == false)
        #expect(upstream.calls.load(ordering: .relaxed) == 1)
    }

    @Test("a purge while the store is asked: the stored answer is neither cached nor used")
    func purgeDuringStoreLoad() async throws {
        let upstream = ScriptedIntrospector { _ in .inactive }
        let store = MemoryStore()
        let active = self.active
        let purgedOnce = Atomic<Bool>(false)
        let box = NIOLockedValueBox<CachingTokenIntrospector?>(nil)
        store.loadAnswer.withLockedValue { $0 = { _ in purgedOnce.load(ordering: .relaxed) ? .miss(SharedEpoch(0)) : .hit(active, until: 1_800_000_000 + 60) } }
        store.duringLoad.withLockedValue {
            $0 = {
                // The first load is overtaken by a purge (as a broadcast would do).
                if !purgedOnce.exchange(true, ordering: .relaxed) { box.withLockedValue { $0 }?.purge(TokenDigest(token: "t")) }
            }
        }
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock, shared: store)
        box.withLockedValue { $0 = cache }
        let answer = try await cache.lookup(token: "t", digest: TokenDigest(token: "t"))
        #expect(answer.info.active == false, "the answer read before the purge must not decide")
        #expect(upstream.calls.load(ordering: .relaxed) == 1)
        #expect(store.loads.load(ordering: .relaxed) == 2)
    }

    @Test("a purge while the AS is asked: its answer is not saved to the store")
    func purgeDuringASCall() async throws {
        let gate = ArrivalGate()
        let upstream = ScriptedIntrospector { _ in
            await gate.wait()
            return TokenInfo(active: true, scope: "a")
        }
        let store = MemoryStore()
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock, shared: store)
        let lookup = Task { try await cache.lookup(token: "t", digest: TokenDigest(token: "t")) }
        try await gate.waitForArrivals(1)
        cache.purge(TokenDigest(token: "t"))
        gate.open()
        _ = try await lookup.value
        // The purged call saved nothing; the retry's own answer was saved once.
        #expect(store.saved.withLockedValue { $0.count } == 1)
        #expect(upstream.calls.load(ordering: .relaxed) == 2)
    }

    @Test("while broadcasts are lost, entries live at most the degraded lifetime, old and new")
    func degraded() async throws {
        let upstream = ScriptedIntrospector { _ in TokenInfo(active: true, scope: "a") }
        let store = MemoryStore()
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 300), clock: clock, shared: store)
        _ = try await cache.lookup(token: "old", digest: TokenDigest(token: "old"))
        // The subscription is lost: the store caps new entries and the cache caps old ones.
        store.cap.withLockedValue { $0 = 5 }
        cache.capLifetimes(seconds: 5)
        _ = try await cache.lookup(token: "new", digest: TokenDigest(token: "new"))
        clock.advance(by: 4)
        #expect(cache.cached(TokenDigest(token: "old")) != nil)
        #expect(cache.cached(TokenDigest(token: "new")) != nil)
        clock.advance(by: 1.5)
        #expect(cache.cached(TokenDigest(token: "old")) == nil)
        #expect(cache.cached(TokenDigest(token: "new")) == nil)
    }

    @Test("introspectionMembers reads back to the same decision-relevant answer, bindings included")
    func membersRoundTrip() throws {
        var info = TokenInfo(active: true, scope: "a b", clientID: "c", exp: 1_900_000_000)
        info.username = "u"
        info.tokenType = "Bearer"
        info.iat = 1
        info.nbf = 2
        info.sub = "s"
        info.aud = ["x", "y"]
        info.iss = "https://as"
        info.jti = "j"
        info.extra = ["custom": .array([.integer(1), .string("z")])]
        // A binding without a `cnf` member of its own (as a merged answer may hold it).
        info.certificateThumbprint = "thumb"
        info.jwkThumbprint = "jkt"
        let back = try TokenInfo(members: info.introspectionMembers)
        #expect(back.certificateThumbprint == "thumb")
        #expect(back.jwkThumbprint == "jkt")
        for path in [\TokenInfo.scope, \.clientID, \.username, \.tokenType, \.sub, \.iss, \.jti] {
            #expect(back[keyPath: path] == info[keyPath: path])
        }
        #expect(back.exp == info.exp && back.iat == info.iat && back.nbf == info.nbf && back.aud == info.aud)
        #expect(back.extra["custom"] == info.extra["custom"])
        var other = TokenInfo(active: true)
        other.otherConfirmation = "x5t"
        #expect(try TokenInfo(members: other.introspectionMembers).otherConfirmation == "x5t")
        #expect(try TokenInfo(members: TokenInfo.inactive.introspectionMembers) == .inactive)
    }
}
