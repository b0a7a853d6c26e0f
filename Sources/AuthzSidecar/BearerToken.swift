/// The `Authorization: Bearer` credential of a request (RFC 6750 §2.1).
public enum BearerToken: Equatable, Sendable {
    /// No Authorization header, or one with another scheme (e.g. `Basic`): no bearer credential.
    case missing
    /// A Bearer header we cannot use; the text says why (for logs, never echoing the value).
    case malformed(String)
    case token(String)
    /// `Authorization: DPoP <token>` (RFC 9449): a token that needs a proof. Never read as no
    /// token (DESIGN.md §5.2).
    case dpop(String)

    /// The longest token accepted; longer ones are malformed.
    public static let maxLength = 8192

    /// Parses the values of every `Authorization` header of a request.
    public static func parse<Values: Collection<String>>(_ values: Values) -> BearerToken {
        guard let value = values.first else { return .missing }
        let parsed = parse(value)
        if values.count > 1 {
            // Which one would the upstream read? Refuse rather than guess.
            if case .missing = parsed, values.dropFirst().allSatisfy({ parse($0) == .missing }) { return .missing }
            return .malformed("more than one Authorization header")
        }
        return parsed
    }

    /// Parses one header value: a case-insensitive `Bearer` scheme, one or more spaces and one
    /// b64token (`1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`).
    public static func parse(_ value: String) -> BearerToken {
        let bytes = value.utf8
        guard bytes.count <= maxLength + 64 else { return .malformed("Authorization header too long") }
        var i = bytes.startIndex
        // optional leading whitespace
        while i != bytes.endIndex, bytes[i] == UInt8(ascii: " ") || bytes[i] == UInt8(ascii: "\t") { i = bytes.index(after: i) }
        let schemeStart = i
        while i != bytes.endIndex, bytes[i] != UInt8(ascii: " "), bytes[i] != UInt8(ascii: "\t") { i = bytes.index(after: i) }
        let scheme = bytes[schemeStart..<i]
        let isDPoP: Bool
        if scheme.count == 6, scheme.elementsEqual("bearer".utf8, by: { ($0 | 0x20) == $1 }) {
            isDPoP = false
        } else if scheme.count == 4, scheme.elementsEqual("dpop".utf8, by: { ($0 | 0x20) == $1 }) {
            isDPoP = true
        } else {
            return .missing
        }
        let separatorStart = i
        while i != bytes.endIndex, bytes[i] == UInt8(ascii: " ") || bytes[i] == UInt8(ascii: "\t") { i = bytes.index(after: i) }
        guard i != separatorStart, i != bytes.endIndex else { return .malformed(isDPoP ? "DPoP without a token" : "Bearer without a token") }
        let tokenStart = i
        var sawPadding = false
        while i != bytes.endIndex {
            let c = bytes[i]
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"), UInt8(ascii: "+"), UInt8(ascii: "/"):
                if sawPadding { return .malformed("characters after '=' padding in the token") }
            case UInt8(ascii: "="):
                sawPadding = true
            case UInt8(ascii: " "), UInt8(ascii: "\t"):
                // trailing whitespace is allowed; anything after it is a second token
                let tokenEnd = i
                while i != bytes.endIndex, bytes[i] == UInt8(ascii: " ") || bytes[i] == UInt8(ascii: "\t") { i = bytes.index(after: i) }
                guard i == bytes.endIndex else { return .malformed("more than one token after the scheme") }
                return token(bytes[tokenStart..<tokenEnd], dpop: isDPoP)
            default:
                return .malformed("invalid character in the token")
            }
            i = bytes.index(after: i)
        }
        return token(bytes[tokenStart..<i], dpop: isDPoP)
    }

    private static func token(_ bytes: Substring.UTF8View, dpop: Bool) -> BearerToken {
        guard bytes.first != UInt8(ascii: "=") else { return .malformed("token is only padding") }
        guard bytes.count <= maxLength else { return .malformed("token longer than \(maxLength) bytes") }
        let text = String(Substring(bytes))
        return dpop ? .dpop(text) : .token(text)
    }
}
