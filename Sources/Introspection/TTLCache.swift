/// A bounded map whose entries expire: a pure value with no lock, no clock and no I/O.
///
/// Each entry is fresh until `freshUntil` and may be served as stale (for stale-if-error) until
/// `staleUntil`; past that it is gone. When full, the least recently used entry is evicted.
/// Slots live in one array linked into a recency list by index, so lookups, inserts and
/// evictions are O(1) and an entry costs one slot plus one dictionary bucket.
public struct TTLCache<Key: Hashable, Value> {
    /// What a lookup found.
    public enum Lookup {
        case fresh(Value)
        /// Past `freshUntil`, still before `staleUntil`: usable only when the source fails.
        case stale(Value)
        case absent
    }

    struct Slot {
        var key: Key
        var value: Value?
        var freshUntil: Double
        var staleUntil: Double
        var newer: Int32  // towards the head (most recent); -1 = none
        var older: Int32  // towards the tail (least recent); -1 = none
    }

    private var index: [Key: Int32] = [:]
    private var slots: [Slot] = []
    private var freeSlots: [Int32] = []
    private var head: Int32 = -1
    private var tail: Int32 = -1
    public let capacity: Int

    /// - Parameter capacity: at least 1.
    public init(capacity: Int) {
        self.capacity = max(1, capacity)
    }

    /// Live entries (expired ones count until a lookup or an insert meets them).
    public var count: Int { index.count }

    /// Finds `key` at time `now`; a fresh hit becomes the most recently used entry, and an
    /// entry past `staleUntil` is removed.
    public mutating func lookup(_ key: Key, now: Double) -> Lookup {
        guard let slot = index[key] else { return .absent }
        let entry = slots[Int(slot)]
        if now < entry.freshUntil, let value = entry.value {
            moveToHead(slot)
            return .fresh(value)
        }
        if now < entry.staleUntil, let value = entry.value {
            return .stale(value)
        }
        remove(slot: slot)
        return .absent
    }

    /// Stores `value`, replacing any entry for `key`; returns how many entries were evicted to
    /// make room (0 or 1). An entry that would be dead on arrival is not stored.
    @discardableResult
    public mutating func insert(_ key: Key, value: Value, freshUntil: Double, staleUntil: Double, now: Double) -> Int {
        if let existing = index[key] {
            remove(slot: existing)
        }
        guard max(freshUntil, staleUntil) > now else { return 0 }
        var evicted = 0
        if index.count >= capacity, tail >= 0 {
            remove(slot: tail)
            evicted = 1
        }
        let entry = Slot(key: key, value: value, freshUntil: freshUntil, staleUntil: max(freshUntil, staleUntil), newer: -1, older: head)
        let slot: Int32
        if let reused = freeSlots.popLast() {
            slot = reused
            slots[Int(slot)] = entry
        } else {
            slot = Int32(slots.count)
            slots.append(entry)
        }
        if head >= 0 { slots[Int(head)].newer = slot }
        head = slot
        if tail < 0 { tail = slot }
        index[key] = slot
        return evicted
    }

    /// Removes `key`; returns whether it was there.
    @discardableResult
    public mutating func remove(_ key: Key) -> Bool {
        guard let slot = index[key] else { return false }
        remove(slot: slot)
        return true
    }

    /// Shortens every entry's lifetime to end by `until` at the latest (entries that end sooner
    /// keep their own): the shared cache's degraded mode. O(entries), run once per outage.
    public mutating func capLifetimes(until: Double) {
        for slot in index.values {
            slots[Int(slot)].freshUntil = min(slots[Int(slot)].freshUntil, until)
            slots[Int(slot)].staleUntil = min(slots[Int(slot)].staleUntil, until)
        }
    }

    /// Empties the cache and returns how many entries it held.
    @discardableResult
    public mutating func removeAll() -> Int {
        let n = index.count
        index = [:]
        slots = []
        freeSlots = []
        head = -1
        tail = -1
        return n
    }

    private mutating func unlink(_ slot: Int32) {
        let entry = slots[Int(slot)]
        if entry.newer >= 0 { slots[Int(entry.newer)].older = entry.older } else { head = entry.older }
        if entry.older >= 0 { slots[Int(entry.older)].newer = entry.newer } else { tail = entry.newer }
    }

    private mutating func moveToHead(_ slot: Int32) {
        guard head != slot else { return }
        unlink(slot)
        slots[Int(slot)].newer = -1
        slots[Int(slot)].older = head
        if head >= 0 { slots[Int(head)].newer = slot }
        head = slot
        if tail < 0 { tail = slot }
    }

    private mutating func remove(slot: Int32) {
        unlink(slot)
        index[slots[Int(slot)].key] = nil
        slots[Int(slot)].value = nil
        slots[Int(slot)].newer = -1
        slots[Int(slot)].older = -1
        freeSlots.append(slot)
    }
}

extension TTLCache: Sendable where Key: Sendable, Value: Sendable {}
extension TTLCache.Slot: Sendable where Key: Sendable, Value: Sendable {}
