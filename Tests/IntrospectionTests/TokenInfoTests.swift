import Introspection
import Testing

@Suite("TokenInfo: RFC 7662 §2.2 responses, tolerant and strict")
struct TokenInfoTests {
    static func parse(_ json: String) throws(IntrospectionError) -> TokenInfo {
        try TokenInfo(jsonBody: Array(json.utf8))
    }

    @Test("the RFC 7662 §2.2 example, with cnf and a custom claim")
    func rfcExample() throws {
        let info = try Self.parse(#"""
            {"active":true,"client_id":"l238j323ds-23ij4","username":"jdoe","scope":"read write dolphin",
             "sub":"Z5O3upPC88QrAjx00dis","aud":"https://protected.example.net/resource","iss":"https://server.example.com/",
             "exp":1419356238,"iat":1419350238,"nbf":1419350000,"jti":"abc","token_type":"Bearer",
             "cnf":{"x5t#S256":"bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"},"tenant":"acme"}
            """#)
        #expect(info.active)
        #expect(info.clientID == "l238j323ds-23ij4")
        #expect(info.username == "jdoe")
        #expect(info.scopes == ["read", "write", "dolphin"])
        #expect(info.sub == "Z5O3upPC88QrAjx00dis")
        #expect(info.aud == ["https://protected.example.net/resource"])
        #expect(info.iss == "https://server.example.com/")
        #expect(info.exp == 1419356238)
        #expect(info.iat == 1419350238)
        #expect(info.nbf == 1419350000)
        #expect(info.jti == "abc")
        #expect(info.tokenType == "Bearer")
        #expect(info.certificateThumbprint == "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2")
        #expect(info.extra["tenant"] == .string("acme"))
        #expect(info.claim("tenant") == .string("acme"))
    }

    @Test("Glewlwyd's shape: no client_id, no sub — nothing requires them")
    func glewlwydShape() throws {
        let info = try Self.parse(#"{"active":true,"scope":"system-access","token_type":"bearer","exp":1900000000,"iat":1800000000,"cnf":{"x5t#S256":"abc"}}"#)
        #expect(info.clientID == nil)
        #expect(info.sub == nil)
        #expect(info.certificateThumbprint == "abc")
    }

    @Test("Keycloak's names are kept for the header fallbacks")
    func keycloakNames() throws {
        let info = try Self.parse(#"{"active":true,"clientId":"system-client-mtls","azp":"system-client-mtls","typ":"Bearer","preferred_username":"service-account-x","aud":["a","b"]}"#)
        #expect(info.extra["clientId"] == .string("system-client-mtls"))
        #expect(info.extra["azp"] == .string("system-client-mtls"))
        #expect(info.extra["typ"] == .string("Bearer"))
        #expect(info.extra["preferred_username"] == .string("service-account-x"))
        #expect(info.aud == ["a", "b"])
    }

    @Test("times as integer or number", arguments: [
        (#"{"active":true,"exp":1900000000}"#, Int64(1_900_000_000)),
        (#"{"active":true,"exp":1900000000.75}"#, 1_900_000_000),
        (#"{"active":true,"exp":1.9e9}"#, 1_900_000_000),
        (#"{"active":true,"exp":-5}"#, -5),
    ])
    func times(json: String, exp: Int64) throws {
        #expect(try Self.parse(json).exp == exp)
    }

    @Test("scope as an array of strings is joined")
    func scopeArray() throws {
        #expect(try Self.parse(#"{"active":true,"scope":["a","b"]}"#).scope == "a b")
    }

    @Test("an inactive answer keeps nothing else")
    func inactive() throws {
        let info = try Self.parse(#"{"active":false,"scope":"admin","sub":"x"}"#)
        #expect(info == .inactive)
    }

    @Test("malformed responses are faults, never inactive", arguments: [
        "not json",
        "<html><body>Login</body></html>",
        "[]",
        #"{"scope":"a"}"#,
        #"{"active":"true"}"#,
        #"{"active":1}"#,
        #"{"active":null}"#,
        #"{"active":true,"exp":"1900000000"}"#,
        #"{"active":true,"exp":1e400}"#,
        #"{"active":true,"cnf":"x"}"#,
        #"{"active":true,"cnf":{"x5t#S256":42}}"#,
        #"{"active":true,"aud":7}"#,
        #"{"active":true,"scope":7}"#,
        #"{"active":false,"active":true}"#,
        #"{"active":true} trailing"#,
        #"{"active":true,"sub":"a\u0000b""#,
        String(repeating: "[", count: 100) + String(repeating: "]", count: 100),
    ])
    func malformed(json: String) {
        #expect(throws: IntrospectionError.self) { try Self.parse(json) }
        do {
            _ = try Self.parse(json)
        } catch {
            guard case .malformed = error else {
                Issue.record("expected .malformed, got \(error)")
                return
            }
        }
    }

    @Test("non-string values where strings are expected are left out, not guessed")
    func nonStrings() throws {
        let info = try Self.parse(#"{"active":true,"sub":123,"client_id":{"a":1},"username":null}"#)
        #expect(info.sub == nil)
        #expect(info.clientID == nil)
        #expect(info.username == nil)
    }

    @Test("control characters in claims survive parsing (the header renderer drops them)")
    func controlCharacters() throws {
        let info = try Self.parse(#"{"active":true,"sub":"a\r\nX-Evil: 1","jti":"\u0000"}"#)
        #expect(info.sub == "a\r\nX-Evil: 1")
        #expect(info.jti == "\u{0}")
    }

    @Test("a 10,000-scope scope parses")
    func manyScopes() throws {
        let scope = (0..<10_000).map { "s\($0)" }.joined(separator: " ")
        let info = try Self.parse(#"{"active":true,"scope":"\#(scope)"}"#)
        #expect(info.scopes.count == 10_000)
    }

    @Test("value semantics: a copy changed is another value; equal members compare equal")
    func valueSemantics() throws {
        let original = try Self.parse(#"{"active":true,"scope":"a b","sub":"s","aud":["x"],"tenant":"t"}"#)
        var copy = original
        #expect(copy == original)
        copy.sub = "other"
        copy.extra["tenant"] = .string("u")
        copy.aud.append("y")
        #expect(original.sub == "s")
        #expect(original.extra["tenant"] == .string("t"))
        #expect(original.aud == ["x"])
        #expect(copy != original)
        copy.sub = "s"
        copy.extra["tenant"] = .string("t")
        copy.aud = ["x"]
        #expect(copy == original)
        #expect(TokenInfo(active: true, scope: "a b", sub: "s", aud: ["x"], extra: ["tenant": .string("t")]) == original)
        // Equal is not the same storage: a copy shares it until it is changed.
        let shared = original
        #expect(shared.isSameStorage(as: original))
        #expect(!copy.isSameStorage(as: original))
    }

    @Test("grants(scope:) agrees with the split scopes: whole names only")
    func grantsScope() throws {
        let table: [(scope: String?, wanted: String, granted: Bool)] = [
            ("system-access", "system-access", true),
            ("read  write", "write", true),
            (" read", "read", true),
            ("read ", "read", true),
            ("system-access", "system", false),
            ("system", "system-access", false),
            ("a b c", "a b", false),
            ("a b c", "", false),
            ("", "a", false),
            (nil, "a", false),
            ("réad write", "réad", true),
        ]
        for row in table {
            var info = TokenInfo(active: true)
            info.scope = row.scope
            #expect(info.grants(scope: row.wanted) == row.granted, "\(String(describing: row.scope)) / \(row.wanted)")
            #expect(info.grants(scope: row.wanted) == (!row.wanted.isEmpty && info.scopes.contains { $0 == row.wanted }))
        }
        // Against the split form over random scope strings from a small alphabet.
        var rng = SystemRandomNumberGenerator()
        let alphabet: [Character] = ["a", "b", " ", "c"]
        for _ in 0..<2_000 {
            var info = TokenInfo(active: true)
            info.scope = String((0..<Int.random(in: 0...9, using: &rng)).map { _ in alphabet.randomElement(using: &rng)! })
            let wanted = String((0..<Int.random(in: 1...3, using: &rng)).map { _ in alphabet.randomElement(using: &rng)! })
            #expect(info.grants(scope: wanted) == info.scopes.contains { $0 == wanted }, "\(info.scope!) / \(wanted)")
        }
    }

    @Test("unicode escapes, including surrogate pairs")
    func unicode() throws {
        let info = try Self.parse(#"{"active":true,"sub":"caf\u00e9 \ud83d\ude00 ü"}"#)
        #expect(info.sub == "café 😀 ü")
    }
}
