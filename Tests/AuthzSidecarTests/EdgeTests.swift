@testable import AuthzSidecar
import Foundation
import HTTPTypes
import Introspection
import NIOCore
import Testing

/// The edges of DESIGN.md §4, §5 and §8 through the real listener, with exact bytes on the socket.
@Suite("Edges: path readings, the proxy's headers, hosts, token kinds, bindings, admin surface")
struct EdgeTests {
    static let yaml = """
        introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
        policies:
          - name: admin-host
            match: { path_prefix: /, hosts: [admin.example] }
            required_scopes: [admin]
          - name: public
            match: { path_prefix: /public/ }
            allow_anonymous: true
          - name: admin
            match: { path_prefix: /admin-api/ }
            required_scopes: [admin]
          - name: api
            match: { path_prefix: /api/ }
            required_scopes: [api]
          - name: root
            match: { path_prefix: / }
            allow_anonymous: true
        """

    static let tokens: [String: TokenInfo] = [
        "api": TokenInfo(active: true, scope: "api", tokenType: "Bearer"),
        "refresh": TokenInfo(active: true, scope: "api", tokenType: "Refresh"),
        "offline": TokenInfo(active: true, scope: "api", extra: ["typ": .string("Offline")]),
        "id": TokenInfo(active: true, scope: "api", extra: ["typ": .string("ID")]),
        "at-jwt": TokenInfo(active: true, scope: "api", extra: ["typ": .string("at+jwt")]),
        "jkt": TokenInfo(active: true, scope: "api", jwkThumbprint: "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"),
        "cnf-other": TokenInfo(active: true, scope: "api", otherConfirmation: "x5t"),
    ]

    static func withSidecar(_ body: @Sendable (LiveClient, LogCapture) async throws -> Void) async throws {
        let configuration = try SidecarConfiguration.parse(yaml: yaml)
        let logs = LogCapture()
        let introspector = ClosureTokenIntrospector { token in tokens[token] ?? .inactive }
        try await withLiveSidecar(configuration: configuration, introspector: introspector, logger: logs.logger) { client, _ in
            try await body(client, logs)
        }
    }

    static func nginx(_ path: String, host: String = "api.example", token: String? = nil, extra: String = "") -> [UInt8] {
        var request = "GET /authz HTTP/1.1\r\nHost: sidecar\r\nX-Original-URI: \(path)\r\nX-Original-Method: GET\r\nX-Original-Host: \(host)\r\n"
        if let token { request += "Authorization: Bearer \(token)\r\n" }
        return Array((request + extra + "Connection: close\r\n\r\n").utf8)
    }

    static func envoy(_ path: String, host: String = "api.example", token: String? = nil) -> [UInt8] {
        var request = "GET /authz\(path) HTTP/1.1\r\nHost: \(host)\r\n"
        if let token { request += "Authorization: Bearer \(token)\r\n" }
        return Array((request + "Connection: close\r\n\r\n").utf8)
    }

    static let ambiguous = [
        "/public/..;/admin-api/users", "/public/..%2Fadmin-api/users", "/public/..%2fadmin-api/users",
        "/public/..%5Cadmin-api/users", "/public/..%5cadmin-api/users", "/public/..\\admin-api/users",
        "/public/%2e%2e;/admin-api/users", "/public/%2E%2E%2Fadmin-api/", "/public/.;/..;/admin-api/", "/public/..;jsessionid=1/admin-api/users", "/public/x/..;/..;/admin-api/",
        "/public/..%2F..%2Fapi/x", "/api/..;/public/x", "/public/..;/api/x?q=1", "/public/..%5C/admin-api/",
        "/..", "/public/../../admin-api/", "/public/%00/x", "/public/a%0Ab", "/public/a%0d%0aX:y", "/public/%7f",
        "/public/a%1Fb",
    ]

    @Test("ambiguous paths are 403 ambiguous_path, in both front forms", arguments: ambiguous)
    func ambiguousPaths(path: String) async throws {
        try await Self.withSidecar { client, logs in
            for (form, request) in [("nginx", Self.nginx(path)), ("envoy", Self.envoy(path))] {
                let response = try RawConnection.exchange(port: client.port, request)
                // A raw control character never reaches a decision: the parser refuses it (400).
                if path.contains("%") || !path.unicodeScalars.contains(where: { $0.value < 0x20 }) {
                    #expect(response.status == 403, "\(form) \(path.debugDescription): \(response.status)")
                    #expect(response.body == AuthzAnswer.kongBody(code: 403, message: "The resource owner or authorization server denied the request."))
                    #expect(response.headers.value("WWW-Authenticate") == #"Bearer realm="authz-sidecar""#)
                }
                #expect(response.status != 200, "\(form) \(path.debugDescription)")
            }
            #expect(logs.all.contains("ambiguous_path"))
        }
    }

    /// (`/public/..%2F` is here for contrast: its readings are `/public/..%2F` and `/`, two policies.)
    @Test("paths that mean one thing under every reading are decided normally", arguments: [
        ("/public/a;b", nil as String?, 200), ("/public/a%2Fb", nil, 200), ("/public/..%2F", nil, 403), ("/public;x=1/../admin-api/", nil, 401),
        ("/api/group%2Fproject", "api", 200), ("/api/group%2Fproject", nil, 401), ("/api/x/../y", "api", 200),
        ("/public/x/../y", nil, 200), ("/public/%252F..%252Fadmin-api/", nil, 200), ("//public//x", nil, 200),
        ("/admin-api/x;a=b", "api", 403), ("/x\\y", nil, 200), ("http://h.example/public/x", nil, 200),
    ])
    func agreeingPaths(path: String, token: String?, status: Int) async throws {
        try await Self.withSidecar { client, _ in
            for request in [Self.nginx(path, token: token), Self.envoy(path, token: token)] where !(path.hasPrefix("http") && request == Self.envoy(path, token: token)) {
                let response = try RawConnection.exchange(port: client.port, request)
                #expect(response.status == status, "\(path) → \(response.status)")
            }
        }
    }

    @Test("an nginx-form question without X-Original-URI is refused (403), logged as a proxy misconfiguration")
    func missingOriginalURI() async throws {
        try await Self.withSidecar { client, logs in
            let request = Array("GET /authz HTTP/1.1\r\nHost: sidecar\r\nX-Original-Method: GET\r\nConnection: close\r\n\r\n".utf8)
            let response = try RawConnection.exchange(port: client.port, request)
            #expect(response.status == 403)
            #expect(logs.all.contains("missing_original_uri"))
            #expect(logs.all.contains("proxy misconfiguration"))
        }
    }

    @Test("host names select their policy however they are spelled", arguments: [
        "admin.example", "admin.example.", "Admin.Example.", "admin.example.:443", "ADMIN.EXAMPLE:8443",
    ])
    func hosts(host: String) async throws {
        try await Self.withSidecar { client, _ in
            // admin-host needs a token: 401, where the catch-all would be anonymous 200.
            for request in [Self.nginx("/x", host: host), Self.envoy("/x", host: host)] {
                let status = try RawConnection.exchange(port: client.port, request).status
                #expect(status == 401, "\(host)")
            }
            let other = try RawConnection.exchange(port: client.port, Self.envoy("/x", host: "admin.example.evil")).status
            #expect(other == 200)
        }
    }

    @Test("only access tokens pass; bindings the sidecar cannot check refuse the token", arguments: [
        ("api", 200, nil as String?), ("at-jwt", 200, nil), ("refresh", 401, "token_kind"), ("offline", 401, "token_kind"),
        ("id", 401, "token_kind"), ("jkt", 401, "unsupported_binding"), ("cnf-other", 401, "unsupported_binding"),
    ])
    func tokenKindsAndBindings(token: String, status: Int, reason: String?) async throws {
        try await Self.withSidecar { client, logs in
            let response = try RawConnection.exchange(port: client.port, Self.nginx("/api/x", token: token))
            #expect(response.status == status)
            if let reason {
                #expect(response.headers.value("WWW-Authenticate") == #"Bearer realm="authz-sidecar", error="invalid_token""#)
                #expect(logs.all.contains(reason))
            }
        }
    }

    @Test("Authorization: DPoP is never anonymous; Basic still is no token")
    func dpopScheme() async throws {
        try await Self.withSidecar { client, logs in
            let dpop = try RawConnection.exchange(port: client.port, Self.nginx("/public/x", extra: "Authorization: DPoP api\r\n"))
            #expect(dpop.status == 401)
            #expect(logs.all.contains("dpop_proof"))  // no proof: refused, never anonymous
            let lower = try RawConnection.exchange(port: client.port, Self.nginx("/public/x", extra: "Authorization: dpop api\r\n"))
            #expect(lower.status == 401)
            let basic = try RawConnection.exchange(port: client.port, Self.nginx("/public/x", extra: "Authorization: Basic dTpw\r\n"))
            #expect(basic.status == 200)
        }
    }

    @Test("a max_header_bytes above SwiftNIO's 80 KiB applies: a 100 KiB header is decided, not cut off")
    func largeHeaderLimit() async throws {
        var configuration = try SidecarConfiguration.parse(yaml: Self.yaml)
        configuration.server.maxHeaderBytes = 200_000
        let introspector = ClosureTokenIntrospector { token in Self.tokens[token] ?? .inactive }
        try await withLiveSidecar(configuration: configuration, introspector: introspector) { client, _ in
            let padding = "X-Padding: " + String(repeating: "p", count: 100 * 1024) + "\r\n"
            let response = try RawConnection.exchange(port: client.port, Self.nginx("/public/x", extra: padding))
            #expect(response.status == 200)
        }
        configuration.server.maxHeaderBytes = 16384
        try await withLiveSidecar(configuration: configuration, introspector: introspector) { client, _ in
            let padding = "X-Padding: " + String(repeating: "p", count: 20 * 1024) + "\r\n"
            let response = try RawConnection.exchange(port: client.port, Self.nginx("/public/x", extra: padding))
            #expect(response.status == 401)  // request_too_large
        }
    }
}

@Suite("Admin surface, loopback, configuration errors")
struct AdminAndConfigEdgeTests {
    @Test("loopback is 127.0.0.0/8, ::1 and localhost, parsed, never by prefix", arguments: [
        ("127.0.0.1", true), ("127.8.9.10", true), ("::1", true), ("[::1]", true), ("0:0:0:0:0:0:0:1", true), ("localhost", true),
        ("LOCALHOST", true), ("127.attacker.example", false), ("127.0.0.1.nip.io", false), ("0.0.0.0", false), ("::", false),
        ("10.0.0.1", false), ("128.0.0.1", false), ("::2", false), ("localhost.attacker.example", false), ("1270.0.0.1", false),
    ])
    func loopback(host: String, expected: Bool) {
        #expect(Loopback.isLoopback(host: host) == expected, "\(host)")
    }

    @Test("plain http to 127.attacker.example needs insecure: true")
    func endpointLoopback() {
        let yaml = """
            introspection: { endpoint: http://127.attacker.example/introspect, client_id: c, client_secret: s }
            policies: [ { name: p } ]
            """
        #expect(throws: ConfigurationError.self) { try SidecarConfiguration.parse(yaml: yaml) }
        #expect(throws: Never.self) { try SidecarConfiguration.parse(yaml: yaml.replacingOccurrences(of: "127.attacker.example", with: "127.0.0.2")) }
    }

    @Test("forward_claims whose header names collide are a start-up error naming both")
    func forwardClaimCollision() {
        let yaml = """
            introspection: { endpoint: http://127.0.0.1/introspect, client_id: c, client_secret: s }
            policies: [ { name: p, forward_claims: [tenant_id, roles, tenant-id] } ]
            """
        do {
            _ = try SidecarConfiguration.parse(yaml: yaml)
            Issue.record("accepted colliding forward_claims")
        } catch let error as ConfigurationError {
            #expect(error.problems.contains { $0.contains("policies[0].forward_claims[2]") && $0.contains("policies[0].forward_claims[0]") }, "\(error.problems)")
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    static func admin(token: String?) throws -> AdminEndpoints {
        var configuration = try SidecarConfiguration.parse(yaml: EdgeTests.yaml)
        configuration.server.adminToken = token.map(Secret.init)
        let sidecar = Sidecar(configuration: configuration, introspector: ClosureTokenIntrospector { _ in .inactive })
        return sidecar.admin
    }

    @Test("/admin/* without a token file: served on loopback, refused elsewhere; health and metrics everywhere")
    func adminWithoutToken() throws {
        let admin = try Self.admin(token: nil)
        let body = ByteBuffer(string: #"{"all":true}"#)
        #expect(admin.respond(method: .post, path: "/admin/cache/purge", body: body, localListener: true)?.status == .ok)
        #expect(admin.respond(method: .post, path: "/admin/cache/purge", body: body, localListener: false)?.status == .forbidden)
        #expect(admin.respond(method: .get, path: "/healthz", body: nil, localListener: false)?.status == .ok)
        #expect(admin.respond(method: .get, path: "/readyz", body: nil, localListener: false)?.status == .ok)
    }

    @Test("/admin/* with a token file: the token, in constant time, on every listener")
    func adminWithToken() throws {
        let token = "0123456789abcdef-admin"
        let admin = try Self.admin(token: token)
        let body = ByteBuffer(string: #"{"all":true}"#)
        for local in [true, false] {
            #expect(admin.respond(method: .post, path: "/admin/cache/purge", body: body, authorization: nil, localListener: local)?.status == .unauthorized)
            #expect(admin.respond(method: .post, path: "/admin/cache/purge", body: body, authorization: "Bearer wrong", localListener: local)?.status == .unauthorized)
            #expect(admin.respond(method: .post, path: "/admin/cache/purge", body: body, authorization: "Bearer \(token)x", localListener: local)?.status == .unauthorized)
            #expect(admin.respond(method: .post, path: "/admin/cache/purge", body: body, authorization: "Bearer \(token)", localListener: local)?.status == .ok)
            #expect(admin.respond(method: .post, path: "/admin/cache/purge", body: body, authorization: "bearer  \(token) ", localListener: local)?.status == .ok)
        }
    }

    static let secret = "Zq9-TOPSECRET-7f3b"
    static let template = """
        server:
          listen: 127.0.0.1:9191
        introspection:
          endpoint: https://idp.example/introspect
          client_id: c
          client_secret: \(secret)
          timeout_ms: 1500
        policies:
          - name: p
            match: { path_prefix: /p/ }
        """

    @Test("broken files never echo the secret", arguments: [
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "client_secret: \"\(secret)"),
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "   client_secret: \(secret)"),
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "client_secret: \(secret): x"),
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "client_secret:\t\(secret)\n\tx: y"),
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "client_secret: \(secret)\n  client_secret: \(secret)"),
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "\(secret): client_secret"),
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "client_secret_file: \(secret)"),
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "auth_method: \(secret)"),
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "client_secret: [\(secret)"),
        template.replacingOccurrences(of: "client_secret: \(secret)", with: "client_secret: *\(secret)"),
        template.replacingOccurrences(of: "listen: 127.0.0.1:9191", with: "listen: \(secret)"),
        template.replacingOccurrences(of: "https://idp.example/introspect", with: "\(secret)"),
    ])
    func secretNeverEchoed(yaml: String) {
        do {
            _ = try SidecarConfiguration.parse(yaml: yaml)
            Issue.record("a broken file was accepted")
        } catch {
            let text = "\(error)"
            #expect(!text.contains(Self.secret), "\(text)")
            #expect(!text.contains("TOPSECRET"), "\(text)")
            #expect(text.contains("line") || text.contains("introspection.") || text.contains("server."), "\(text)")
        }
    }

    @Test("random mutations of a file never put the secret in an error (property, seeded)")
    func secretNeverEchoedUnderMutation() {
        var generator = SplitMix64(seed: 0x5EC2E7)
        let bytes = Array(Self.template.utf8)
        let inserts: [[UInt8]] = [":", "\"", "'", "\t", "\n", " ", "-", "[", "{", "}", "&", "*", "#", "?", "|", ">", "%", "!"].map { Array($0.utf8) }
        var refused = 0
        for _ in 0..<3000 {
            var mutated = bytes
            for _ in 0..<Int.random(in: 1...4, using: &generator) {
                let at = Int.random(in: 0..<mutated.count, using: &generator)
                switch Int.random(in: 0..<3, using: &generator) {
                case 0: mutated.insert(contentsOf: inserts.randomElement(using: &generator)!, at: at)
                case 1: mutated.remove(at: at)
                default: mutated[at] = inserts.randomElement(using: &generator)![0]
                }
            }
            do {
                _ = try SidecarConfiguration.parse(yaml: String(decoding: mutated, as: UTF8.self))
            } catch {
                refused += 1
                let text = "\(error)"
                if text.contains("TOPSECRET") {
                    Issue.record("secret echoed for:\n\(String(decoding: mutated, as: UTF8.self))\n→ \(text)")
                    return
                }
            }
        }
        #expect(refused > 1000, "the mutations should break most files (\(refused) refused)")
    }
}

/// A small seeded generator, so property tests are repeatable.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
