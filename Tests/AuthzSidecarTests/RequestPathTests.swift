@testable import AuthzSidecar
import Testing

@Suite("RequestPath: what policies match, whatever the client wrote")
struct RequestPathTests {
    @Test("normalisation", arguments: [
        ("/token-mtls/api/", "/token-mtls/api/"),
        ("/token-mtls/api/?x=1&y=/../admin", "/token-mtls/api/"),
        ("/token-mtls/../admin-api/x", "/admin-api/x"),
        ("/token-mtls/%2e%2e/admin-api/x", "/admin-api/x"),
        ("/token-mtls/%2E%2E/admin-api/x", "/admin-api/x"),
        ("/public/./../admin-api/", "/admin-api/"),
        ("//admin-api//x", "/admin-api/x"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/../../etc", "/etc"),
        ("/%61dmin-api/x", "/admin-api/x"),
        ("/a%2fb/c", "/a%2Fb/c"),
        ("/a#frag/../x", "/a"),
        ("", "/"),
        ("admin", "/admin"),
    ])
    func normalized(raw: String, expected: String) {
        #expect(RequestPath.normalized(raw[...]) == expected[...])
    }

    @Test("a policy prefix cannot be escaped with dot segments or encodings")
    func prefixEscape() {
        let policy = PolicyConfiguration(name: "public", pathPrefix: "/public/")
        for raw in ["/public/../admin-api/x", "/public/%2e%2e/admin-api/x", "/public/.%2E/admin-api/x"] {
            #expect(!policy.matches(method: "GET", path: RequestPath.normalized(raw[...]), host: "h"), "\(raw)")
        }
        #expect(policy.matches(method: "GET", path: RequestPath.normalized("/public/a/../b"), host: "h"))
    }
}
