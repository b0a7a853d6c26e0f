import NIOConcurrencyHelpers

/// A bounded, sharded map for memos of pure computations (certificate thumbprints, rendered
/// answers). Each shard has its own lock; when a shard is full it starts over, since the values
/// in use come back at once.
final class BoundedMemo<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    private final class Shard: Sendable {
        let entries = NIOLockedValueBox<[Key: Value]>([:])
    }

    private let shards: [Shard]
    private let perShard: Int

    init(capacity: Int, shardCount: Int) {
        shards = (0..<max(1, shardCount)).map { _ in Shard() }
        perShard = max(1, capacity / max(1, shardCount))
    }

    /// `spread` picks the shard: any well-mixed bits of the key (a hash, a digest word).
    func value(for key: Key, spread: UInt64) -> Value? {
        shard(spread).entries.withLockedValue { $0[key] }
    }

    func remember(_ value: Value, for key: Key, spread: UInt64) {
        shard(spread).entries.withLockedValue { entries in
            if entries.count >= perShard { entries.removeAll(keepingCapacity: true) }
            entries[key] = value
        }
    }

    /// Remembered values (for tests).
    var count: Int { shards.reduce(0) { $0 + $1.entries.withLockedValue { $0.count } } }

    private func shard(_ spread: UInt64) -> Shard {
        shards[Int(spread % UInt64(shards.count))]
    }
}
