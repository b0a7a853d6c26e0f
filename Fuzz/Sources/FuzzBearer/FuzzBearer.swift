// Fuzzes BearerToken.parse: one header value (the whole input), and the same input split on
// '\n' as the values of several Authorization headers.
import AuthzSidecar

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    let value = String(decoding: bytes, as: UTF8.self)

    let parsed = BearerToken.parse(value)
    check(parsed == BearerToken.parse(value), "parse is not deterministic")
    check(BearerToken.parse([value]) == parsed, "parse([v]) differs from parse(v)")
    check(BearerToken.parse([String]()) == .missing, "no header must be .missing")

    // Reference for the scheme: the first run of non-blank characters after leading blanks.
    let utf8 = Array(value.utf8)
    let isBlank = { (c: UInt8) in c == 0x20 || c == 0x09 }
    let schemeStart = utf8.firstIndex { !isBlank($0) } ?? utf8.count
    let schemeEnd = utf8[schemeStart...].firstIndex(where: isBlank) ?? utf8.count
    let scheme = String(decoding: utf8[schemeStart..<schemeEnd], as: UTF8.self).lowercased()
    let isBearer = scheme == "bearer"
    let isDPoP = scheme == "dpop"
    let tooLong = utf8.count > BearerToken.maxLength + 64

    switch parsed {
    case .missing:
        check(!isBearer && !isDPoP && !tooLong, "a Bearer, DPoP (or overlong) header read as missing")
    case .dpop(let token):
        check(isDPoP && !tooLong, "a header whose scheme is not DPoP read as DPoP")
        checkToken(token, in: value)
        check(BearerToken.parse("DPoP " + token) == .dpop(token), "canonical DPoP header does not round-trip")
    case .malformed(let why):
        check(!why.isEmpty, "malformed without a reason")
        check(isBearer || isDPoP || tooLong, "a header whose scheme is neither Bearer nor DPoP read as malformed")
    case .token(let token):
        check(isBearer && !tooLong, "token from an overlong header or one whose scheme is not Bearer")
        checkToken(token, in: value)
        // The token alone, re-wrapped in a canonical header, reads back the same.
        check(BearerToken.parse("Bearer " + token) == .token(token), "canonical header does not round-trip")
        check(BearerToken.parse("bEaReR\t" + token + " \t") == .token(token), "case/blank variant does not round-trip")
    }

    // Several headers (split on '\n'): more than one is never a token.
    let values = value.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    let many = BearerToken.parse(values)
    if values.count > 1 {
        switch many {
        case .token, .dpop: fatalError("a token from \(values.count) Authorization headers")
        case .missing:
            check(values.allSatisfy { BearerToken.parse($0) == .missing }, "several headers read as missing although one is Bearer")
        case .malformed:
            check(!values.allSatisfy { BearerToken.parse($0) == .missing }, "several non-Bearer headers read as malformed")
        }
    }
    return 0
}

/// b64token (RFC 6750 §2.1): 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=".
func checkToken(_ token: String, in header: String) {
    let utf8 = Array(token.utf8)
    check(!utf8.isEmpty, "empty token")
    check(utf8.count <= BearerToken.maxLength, "token longer than maxLength (\(utf8.count))")
    var padding = false
    for c in utf8 {
        switch c {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
            UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"), UInt8(ascii: "+"), UInt8(ascii: "/"):
            check(!padding, "token has characters after '='")
        case UInt8(ascii: "="):
            check(!utf8.isEmpty && utf8[0] != UInt8(ascii: "="), "token is only padding")
            padding = true
        default:
            fatalError("token holds byte \(c), not a b64token character")
        }
    }
    check(Array(header.utf8).firstRange(of: utf8) != nil, "token is not a part of the header")
}

@inline(never)
func check(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String, file: StaticString = #file, line: UInt = #line) {
    if !condition() { fatalError("invariant violated: \(message())", file: file, line: line) }
}
