import Introspection
import Testing

@Suite("TTLCache: expiry, stale window, capacity and recency")
struct TTLCacheTests {
    @Test("an entry is fresh until freshUntil, stale until staleUntil, then gone")
    func lifetime() {
        var cache = TTLCache<Int, String>(capacity: 4)
        cache.insert(1, value: "a", freshUntil: 10, staleUntil: 20, now: 0)
        guard case .fresh("a") = cache.lookup(1, now: 9.9) else { Issue.record("fresh expected"); return }
        guard case .stale("a") = cache.lookup(1, now: 10) else { Issue.record("stale expected"); return }
        guard case .absent = cache.lookup(1, now: 20) else { Issue.record("absent expected"); return }
        #expect(cache.count == 0)
    }

    @Test("when full, the least recently used entry goes")
    func evictsLeastRecentlyUsed() {
        var cache = TTLCache<Int, Int>(capacity: 3)
        for k in 1...3 { cache.insert(k, value: k, freshUntil: 100, staleUntil: 100, now: 0) }
        _ = cache.lookup(1, now: 1)  // 1 is now the most recent; 2 the least
        let evicted = cache.insert(4, value: 4, freshUntil: 100, staleUntil: 100, now: 1)
        #expect(evicted == 1)
        guard case .absent = cache.lookup(2, now: 1) else { Issue.record("2 should be evicted"); return }
        for k in [1, 3, 4] {
            guard case .fresh(k) = cache.lookup(k, now: 1) else { Issue.record("\(k) should stay"); return }
        }
        #expect(cache.count == 3)
    }

    @Test("replacing a key does not grow the cache; remove and removeAll")
    func replaceAndRemove() {
        var cache = TTLCache<Int, Int>(capacity: 2)
        cache.insert(1, value: 1, freshUntil: 10, staleUntil: 10, now: 0)
        cache.insert(1, value: 2, freshUntil: 10, staleUntil: 10, now: 0)
        #expect(cache.count == 1)
        guard case .fresh(2) = cache.lookup(1, now: 0) else { Issue.record("replaced value expected"); return }
        let removed = cache.remove(1)
        let removedAgain = cache.remove(1)
        #expect(removed)
        #expect(!removedAgain)
        cache.insert(2, value: 2, freshUntil: 10, staleUntil: 10, now: 0)
        cache.insert(3, value: 3, freshUntil: 10, staleUntil: 10, now: 0)
        let emptied = cache.removeAll()
        #expect(emptied == 2)
        #expect(cache.count == 0)
    }

    @Test("an entry dead on arrival is not stored")
    func deadOnArrival() {
        var cache = TTLCache<Int, Int>(capacity: 2)
        cache.insert(1, value: 1, freshUntil: 5, staleUntil: 5, now: 5)
        #expect(cache.count == 0)
    }

    @Test("random workload against a reference model: same hits, never over capacity")
    func matchesReferenceModel() {
        var cache = TTLCache<Int, Int>(capacity: 50)
        var model: [Int: (value: Int, until: Double, used: Int)] = [:]
        var generator = SplitMix(seed: 7)
        var tick = 0
        for step in 0..<20_000 {
            tick += 1
            let now = Double(step) / 10
            let key = Int(generator.next() % 120)
            if generator.next() % 3 == 0 {
                let until = now + Double(generator.next() % 50) / 10 + 0.1
                cache.insert(key, value: step, freshUntil: until, staleUntil: until, now: now)
                model[key] = (step, until, tick)
                if model.count > 50, let lru = model.min(by: { $0.value.used < $1.value.used })?.key {
                    model[lru] = nil
                }
            } else {
                let expected: Int? = model[key].flatMap { $0.until > now ? $0.value : nil }
                if let entry = model[key] {
                    if entry.until > now { model[key]!.used = tick } else { model[key] = nil }
                }
                switch cache.lookup(key, now: now) {
                case .fresh(let v): #expect(v == expected, "step \(step)")
                case .stale, .absent: #expect(expected == nil, "step \(step)")
                }
            }
            #expect(cache.count <= 50)
        }
    }
}

/// A small deterministic generator for tests.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
