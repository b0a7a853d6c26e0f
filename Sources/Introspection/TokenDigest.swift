import Crypto

/// The SHA-256 of a token: the only form a token takes in cache keys, logs and metrics.
public struct TokenDigest: Hashable, Sendable, CustomStringConvertible {
    // 32 bytes as four words: hashing and equality without an allocation.
    public let w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64

    /// Digests a token.
    public init(token: String) {
        var token = token
        let digest = token.withUTF8 { SHA256.hash(data: UnsafeRawBufferPointer($0)) }
        self.init(digest: digest)
    }

    init(digest: SHA256.Digest) {
        var words: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        digest.withUnsafeBytes { raw in
            words.0 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
            words.1 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            words.2 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
            words.3 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        }
        (w0, w1, w2, w3) = words
    }

    /// Parses 64 hex digits (what `/admin/cache/purge` accepts as `token_sha256`).
    public init?(hex: String) {
        let utf8 = Array(hex.utf8)
        guard utf8.count == 64 else { return nil }
        var words: [UInt64] = []
        for chunk in stride(from: 0, to: 64, by: 16) {
            guard let word = UInt64(String(decoding: utf8[chunk..<chunk + 16], as: UTF8.self), radix: 16) else { return nil }
            words.append(word)
        }
        (w0, w1, w2, w3) = (words[0], words[1], words[2], words[3])
    }

    /// The 32 bytes of the digest (DPoP's `ath` is their base64url, RFC 9449 §4.2).
    public var bytes: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(32)
        for word in [w0, w1, w2, w3] {
            for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) }
        }
        return out
    }

    /// All 64 lowercase hex digits.
    public var hex: String {
        [w0, w1, w2, w3].map { word in
            let s = String(word, radix: 16)
            return String(repeating: "0", count: 16 - s.count) + s
        }.joined()
    }

    /// The first 8 hex digits: what logs show of a token.
    public var prefix: String { String(hex.prefix(8)) }

    public var description: String { prefix }

    /// Which of `count` shards this digest belongs to.
    func shard(of count: Int) -> Int { Int(truncatingIfNeeded: w3 % UInt64(count)) }

    public func hash(into hasher: inout Hasher) {
        // The digest is already uniformly distributed: one word is enough.
        hasher.combine(w0)
    }
}
