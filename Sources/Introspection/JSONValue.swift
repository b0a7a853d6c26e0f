/// A JSON value as the introspection endpoint sent it (RFC 8259).
///
/// Numbers keep integers exact (`exp` of a far-future token must not lose precision) and
/// everything else as a `Double`.
public enum JSONValue: Sendable, Hashable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// The string, when this is one.
    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    /// Seconds as an integer: JSON integers, and finite numbers truncated toward zero
    /// (RFC 7662 §2.2 calls `exp`, `iat` and `nbf` integers; some servers send `1.7e9`).
    public var integerSeconds: Int64? {
        switch self {
        case .integer(let i): return i
        case .number(let d) where d.isFinite && d > -9.2e18 && d < 9.2e18: return Int64(d)
        default: return nil
        }
    }

    /// Compact JSON text, keys sorted so that the output is stable.
    public var compactJSON: String {
        var out = ""
        write(into: &out)
        return out
    }

    func write(into out: inout String) {
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .integer(let i): out += String(i)
        case .number(let d): out += d.isFinite ? "\(d)" : "null"
        case .string(let s): JSONValue.writeString(s, into: &out)
        case .array(let a):
            out += "["
            for (i, v) in a.enumerated() {
                if i > 0 { out += "," }
                v.write(into: &out)
            }
            out += "]"
        case .object(let o):
            out += "{"
            for (i, key) in o.keys.sorted().enumerated() {
                if i > 0 { out += "," }
                JSONValue.writeString(key, into: &out)
                out += ":"
                o[key]!.write(into: &out)
            }
            out += "}"
        }
    }

    /// Writes `s` as a JSON string literal; non-ASCII is `\u`-escaped so the text is safe on one
    /// HTTP header line.
    public static func writeString(_ s: String, into out: inout String) {
        out += "\""
        for unit in s.utf16 {
            switch unit {
            case 0x22: out += "\\\""
            case 0x5C: out += "\\\\"
            case 0x0A: out += "\\n"
            case 0x0D: out += "\\r"
            case 0x09: out += "\\t"
            case 0x20...0x7E: out.unicodeScalars.append(Unicode.Scalar(UInt8(unit)))
            default:
                out += "\\u"
                let hex = String(unit, radix: 16)
                out += String(repeating: "0", count: 4 - hex.count) + hex
            }
        }
        out += "\""
    }
}
