@testable import AuthzSidecar
import Testing

@Suite("PathReadings: what policies match, whatever the client wrote")
struct RequestPathTests {
    /// The strict reading when every reading agrees.
    static func strict(_ raw: String) -> Substring? {
        guard case .readings(let readings) = PathReadings.of(raw[...]) else { return nil }
        return readings.strict
    }

    @Test("the strict reading", arguments: [
        ("/token-mtls/api/", "/token-mtls/api/"),
        ("/token-mtls/api/?x=1&y=/../admin", "/token-mtls/api/"),
        ("/token-mtls/../admin-api/x", "/admin-api/x"),
        ("/token-mtls/%2e%2e/admin-api/x", "/admin-api/x"),
        ("/token-mtls/%2E%2E/admin-api/x", "/admin-api/x"),
        ("/public/./../admin-api/", "/admin-api/"),
        ("//admin-api//x", "/admin-api/x"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/%61dmin-api/x", "/admin-api/x"),
        ("/a%2fb/c", "/a%2Fb/c"),
        ("/a#frag/../x", "/a"),
        ("/a%252Fb", "/a%252Fb"),
        // found by FuzzPaths: a stray % cannot combine with a decoded character into an escape
        ("/a%2%46b", "/a%252Fb"), ("/a%2%62", "/a%252b"), ("/100%", "/100%25"), ("/%zz", "/%25zz"),
        ("http://h.example/admin-api/x", "/admin-api/x"),
        ("HTTPS://h.example:8443", "/"),
        // found by FuzzPaths: "/" and a combining mark are one Character; paths are bytes
        ("//\u{34E}", "/\u{34E}"),
        ("/\u{34E}admin-api/x", "/\u{34E}admin-api/x"),
        ("http://h/\u{34E}admin-api/x", "/\u{34E}admin-api/x"),
    ])
    func normalized(raw: String, expected: String) throws {
        guard case .readings(let readings) = PathReadings.of(raw[...]) else {
            Issue.record("\(raw) was refused")
            return
        }
        #expect(readings.strict == expected[...])
    }

    @Test("refused: climbing above the root, control characters, %00, no path", arguments: [
        "/..", "/../etc", "/a/../../etc", "/%2e%2e/x", "/a/..;/..;/x", "/a/..%2F..%2Fx", "/a\\..\\..\\x",
        "/a\u{0}b", "/a%00b", "/a%0Ab", "/a%0d%0ab", "/a%7Fb", "/a\tb", "/a%1fb",
        "", "admin", "*", "ftp://h/x",
    ])
    func refused(raw: String) {
        guard case .refused = PathReadings.of(raw[...]) else {
            Issue.record("\(raw.debugDescription) was not refused")
            return
        }
    }

    @Test("readings that differ", arguments: [
        ("/public/..;/admin-api/users", ["/public/..;/admin-api/users", "/admin-api/users"]),
        ("/public/..%2Fadmin-api/users", ["/public/..%2Fadmin-api/users", "/admin-api/users"]),
        ("/public/..%5cadmin-api/users", ["/public/..%5Cadmin-api/users", "/admin-api/users"]),
        ("/public/..\\admin-api/users", ["/public/..\\admin-api/users", "/admin-api/users"]),
        ("/api/group%2Fproject", ["/api/group%2Fproject", "/api/group/project"]),
        ("/public;x=1/a", ["/public;x=1/a", "/public/a"]),
    ])
    func differing(raw: String, expected: [String]) {
        guard case .readings(let readings) = PathReadings.of(raw[...]) else {
            Issue.record("\(raw) was refused")
            return
        }
        for reading in expected {
            #expect(readings.all.contains(reading[...]), "\(raw): \(readings.all) lacks \(reading)")
        }
    }

    @Test("plain paths have one reading, the path itself")
    func plain() {
        for raw in ["/", "/api/v1/items", "/a.b/c-d_e~f", "/.well-known/x"] {
            #expect(PathReadings.of(raw[...]) == .readings(.init(strict: raw[...], others: [])), "\(raw)")
        }
    }

    @Test("a policy prefix cannot be escaped with dot segments or encodings")
    func prefixEscape() throws {
        let policy = PolicyConfiguration(name: "public", pathPrefix: "/public/")
        for raw in ["/public/../admin-api/x", "/public/%2e%2e/admin-api/x", "/public/.%2E/admin-api/x"] {
            let path = try #require(Self.strict(raw))
            #expect(!policy.matches(method: "GET", path: path, host: "h"), "\(raw)")
        }
        #expect(policy.matches(method: "GET", path: try #require(Self.strict("/public/a/../b")), host: "h"))
    }

    @Test("host names: lower-cased, port and one trailing dot dropped", arguments: [
        ("admin.example", "admin.example"), ("Admin.Example.", "admin.example"), ("admin.example.:443", "admin.example"),
        ("ADMIN.EXAMPLE:8443", "admin.example"), ("[::1]:443", "[::1]"), ("admin.example..", "admin.example."),
        ("admin.example:\u{301}443", "admin.example:\u{301}443"), ("admin.example.\u{301}", "admin.example.\u{301}"),
    ])
    func hosts(raw: String, expected: String) {
        #expect(HostName.normalized(raw[...]) == expected[...])
    }
}
