import Introspection

/// base64url without padding (RFC 7515 §2), decoded strictly: only the URL-safe alphabet, no
/// padding, no whitespace, and the unused low bits of the last character must be zero, so that
/// every byte string has exactly one accepted encoding.
public enum Base64URL {
    public static func encode<Bytes: Collection<UInt8>>(_ bytes: Bytes) -> String {
        Base64.encodeURLSafe(bytes)
    }

    /// The decoded bytes, or nil for any character outside the alphabet (padding included), a
    /// length no encoding has (4n+1), or non-zero unused bits.
    public static func decode<Bytes: Collection<UInt8>>(_ text: Bytes) -> [UInt8]? {
        if let decoded = text.withContiguousStorageIfAvailable({ decode(buffer: $0) }) { return decoded }
        return Array(text).withUnsafeBufferPointer { decode(buffer: $0) }
    }

    /// The 6-bit value of an alphabet character; 0xFF (whose top bits are set) for any other byte.
    @inline(__always)
    private static func value(_ c: UInt8) -> UInt8 {
        switch c {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): return c &- UInt8(ascii: "A")
        case UInt8(ascii: "a")...UInt8(ascii: "z"): return c &- UInt8(ascii: "a") &+ 26
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c &- UInt8(ascii: "0") &+ 52
        case UInt8(ascii: "-"): return 62
        case UInt8(ascii: "_"): return 63
        default: return 0xFF
        }
    }

    private static func decode(buffer: UnsafeBufferPointer<UInt8>) -> [UInt8]? {
        let count = buffer.count
        guard count % 4 != 1 else { return nil }
        let outCount = count / 4 * 3 + max(0, count % 4 - 1)
        var valid = true
        let out = [UInt8](unsafeUninitializedCapacity: outCount) { out, initialized in
            var i = 0
            var o = 0
            while i + 4 <= count {
                let a = value(buffer[i]), b = value(buffer[i + 1]), c = value(buffer[i + 2]), d = value(buffer[i + 3])
                guard (a | b | c | d) & 0xC0 == 0 else {
                    valid = false
                    break
                }
                out[o] = a << 2 | b >> 4
                out[o + 1] = b << 4 | c >> 2
                out[o + 2] = c << 6 | d
                i += 4
                o += 3
            }
            if valid, count - i >= 2 {
                let a = value(buffer[i]), b = value(buffer[i + 1])
                let c = count - i == 3 ? value(buffer[i + 2]) : 0
                // The unused low bits of the last character must be zero (one spelling only).
                if (a | b | c) & 0xC0 != 0 || (count - i == 2 ? b & 0x0F : c & 0x03) != 0 {
                    valid = false
                } else {
                    out[o] = a << 2 | b >> 4
                    o += 1
                    if count - i == 3 {
                        out[o] = b << 4 | c >> 2
                        o += 1
                    }
                }
            }
            initialized = valid ? o : 0
        }
        return valid ? out : nil
    }
}
