@testable import AuthzSidecar
import Testing

@Suite("BearerToken: RFC 6750 §2.1 Authorization header")
struct BearerTokenTests {
    @Test("accepted forms", arguments: [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("BeArEr abc", "abc"),
        ("Bearer   abc", "abc"),
        ("  Bearer abc  ", "abc"),
        ("Bearer a.b-c_d~e+f/g==", "a.b-c_d~e+f/g=="),
        ("Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"),
    ])
    func accepted(header: String, token: String) {
        #expect(BearerToken.parse(header) == .token(token))
    }

    @Test("other schemes are no bearer credential", arguments: ["Basic dXNlcjpwYXNz", "Digest x", "Bearerabc", "Token abc", "", "   "])
    func otherSchemes(header: String) {
        #expect(BearerToken.parse(header) == .missing)
    }

    @Test("malformed bearer credentials", arguments: [
        "Bearer",
        "Bearer ",
        "Bearer abc def",
        "Bearer abc,def",
        "Bearer ab\"c",
        "Bearer a=b",
        "Bearer ===",
        "Bearer ab\u{7}c",
        "Bearer ab\u{0}c",
        "Bearer tökén",
        "Bearer " + String(repeating: "a", count: BearerToken.maxLength + 1),
        "Bearer " + String(repeating: "a", count: 1 << 20),
    ])
    func malformed(header: String) {
        guard case .malformed = BearerToken.parse(header) else {
            Issue.record("\(header.prefix(40)) should be malformed, got \(BearerToken.parse(header))")
            return
        }
    }

    @Test("a token of exactly the maximum length is accepted")
    func maxLength() {
        let token = String(repeating: "a", count: BearerToken.maxLength)
        #expect(BearerToken.parse("Bearer " + token) == .token(token))
    }

    @Test("several Authorization headers are refused unless none is Bearer")
    func severalHeaders() {
        #expect(BearerToken.parse(["Bearer a", "Bearer a"]) == .malformed("more than one Authorization header"))
        #expect(BearerToken.parse(["Basic x", "Bearer a"]) == .malformed("more than one Authorization header"))
        #expect(BearerToken.parse(["Basic x", "Basic y"]) == .missing)
        #expect(BearerToken.parse([String]()) == .missing)
    }
}
