import Synchronization

/// Certificate header value → thumbprint, bounded. The same client presents the same header on
/// every request, and decoding it (percent-decoding, base64, DER outline, SHA-256) costs several
/// times the rest of a cache-hit decision. A thumbprint is a pure function of the header text
/// and its format, so this caches a computation, not a decision: binding is still compared on
/// every request. Failures are not cached.
final class ThumbprintCache: Sendable {
    struct Key: Hashable, Sendable {
        let value: String
        let format: CertificateFormat
        let element: PolicyConfiguration.XFCCElement
        /// Hashed once, from the length and both ends of the value: a certificate header is 1–2
        /// KiB and its ends (the PEM header, the signature) already tell certificates apart, so
        /// the whole text is read once more only to confirm a hit (`==`).
        let digest: Int

        init(value: String, format: CertificateFormat, element: PolicyConfiguration.XFCCElement) {
            self.value = value
            self.format = format
            self.element = element
            var hasher = Hasher()
            var text = value
            text.withUTF8 { bytes in
                hasher.combine(bytes.count)
                hasher.combine(bytes: UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: bytes.prefix(64))))
                hasher.combine(bytes: UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: bytes.suffix(192))))
            }
            hasher.combine(format)
            hasher.combine(element)
            digest = hasher.finalize()
        }

        func hash(into hasher: inout Hasher) { hasher.combine(digest) }

        static func == (lhs: Key, rhs: Key) -> Bool {
            lhs.digest == rhs.digest && lhs.format == rhs.format && lhs.element == rhs.element && lhs.value == rhs.value
        }
    }

    private let memo: BoundedMemo<Key, CertificateThumbprint>

    init(capacity: Int = 4096, shardCount: Int = 8) {
        memo = BoundedMemo(capacity: capacity, shardCount: shardCount)
    }

    func thumbprint(header value: String, format: CertificateFormat, element: PolicyConfiguration.XFCCElement) throws(CertificateError) -> CertificateThumbprint {
        let key = Key(value: value, format: format, element: element)
        let spread = UInt64(bitPattern: Int64(key.digest))
        if let known = memo.value(for: key, spread: spread) { return known }
        let computed = try ClientCertificate.thumbprint(header: value, format: format, xfccElement: element)
        memo.remember(computed, for: key, spread: spread)
        return computed
    }

    /// Remembered thumbprints (for tests).
    var count: Int { memo.count }
}
