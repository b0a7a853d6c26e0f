import Synchronization
import NIOConcurrencyHelpers

/// Certificate header value → thumbprint, bounded. The same client presents the same header on
/// every request, and decoding it (percent-decoding, base64, DER outline, SHA-256) costs several
/// times the rest of a cache-hit decision. A thumbprint is a pure function of the header text
/// and its format, so this caches a computation, not a decision: binding is still compared on
/// every request. Failures are not cached.
final class ThumbprintCache: Sendable {
    struct Key: Hashable, Sendable {
        var value: String
        var format: CertificateFormat
        var element: PolicyConfiguration.XFCCElement
    }

    private final class Shard: Sendable {
        let entries = NIOLockedValueBox<[Key: CertificateThumbprint]>([:])
    }

    private let shards: [Shard]
    private let perShard: Int

    init(capacity: Int = 4096, shardCount: Int = 8) {
        shards = (0..<shardCount).map { _ in Shard() }
        perShard = max(1, capacity / shardCount)
    }

    func thumbprint(header value: String, format: CertificateFormat, element: PolicyConfiguration.XFCCElement) throws(CertificateError) -> CertificateThumbprint {
        let key = Key(value: value, format: format, element: element)
        let shard = shards[Int(UInt(bitPattern: key.hashValue) % UInt(shards.count))]
        if let known = shard.entries.withLockedValue({ $0[key] }) { return known }
        let computed = try ClientCertificate.thumbprint(header: value, format: format, xfccElement: element)
        shard.entries.withLockedValue { entries in
            // Bounded: when a shard is full it starts over (certificates in use come back at once).
            if entries.count >= perShard { entries.removeAll(keepingCapacity: true) }
            entries[key] = computed
        }
        return computed
    }

    /// Remembered thumbprints (for tests).
    var count: Int { shards.reduce(0) { $0 + $1.entries.withLockedValue { $0.count } } }
}
