@testable import AuthzSidecar
import Foundation
import HTTPTypes
import NIOCore
import Introspection
import Logging
import Synchronization
import Testing
import NIOConcurrencyHelpers

/// Counts introspection calls.
final class CallCounter: Sendable {
    private let value = Atomic<Int>(0)
    func increment() { value.add(1, ordering: .relaxed) }
    var count: Int { value.load(ordering: .relaxed) }
}

/// Collects log lines in memory so tests can read them.
final class LogCapture: Sendable {
    let lines = NIOLockedValueBox<[String]>([])

    var logger: Logger {
        var logger = Logger(label: "authz") { _ in CaptureHandler(capture: self) }
        logger.logLevel = .debug
        return logger
    }

    var all: String { lines.withLockedValue { $0.joined(separator: "\n") } }

    struct CaptureHandler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            capture.lines.withLockedValue { $0.append(JSONLogHandler.render(event: event, label: "authz", handlerMetadata: metadata)) }
        }
    }
}

@Suite("Endpoints: /authz for nginx, /authz/** for Envoy, admin, 404")
struct EndpointTests {
    static let goodToken = "good-token"
    static let kong401 = #"{"data":[],"error":{"code":401,"message":"The resource owner or authorization server denied the request."}}"#

    static let yaml = """
        introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
        cache: { ttl_seconds: 30 }
        policies:
          - name: token-mtls
            match: { path_prefix: /token-mtls/ }
            required_scopes: [system-access]
            certificate_header: X-Client-Cert
            forward_claims: [tenant_id, roles]
          - name: envoy
            match: { path_prefix: /envoy/ }
            required_scopes: [system-access]
            certificate_header: x-forwarded-client-cert
            certificate_format: xfcc
            hide_credentials: true
          - name: admin
            match: { path_prefix: /admin-api/, methods: [GET] }
            required_scopes: [admin]
            certificate_header: X-Client-Cert
          - name: public
            match: { path_prefix: /public/ }
            allow_anonymous: true
        """

    /// Tokens: good (bound to client1), evil (claims with CR/LF), inactive; "boom" faults.
    static func introspector(calls: CallCounter) -> ClosureTokenIntrospector {
        ClosureTokenIntrospector { token throws(IntrospectionError) in
            calls.increment()
            switch token {
            case goodToken:
                return TokenInfo(
                    active: true, scope: "system-access", clientID: "system-client-mtls", tokenType: "Bearer",
                    exp: 4_102_444_800, iat: 1_800_000_000, sub: "svc", aud: ["api-a", "api-b"], iss: "https://as", jti: "j-1",
                    certificateThumbprint: Fixtures.thumbprint("client1.pem"),
                    extra: ["tenant_id": .string("acme"), "roles": .array([.string("r1"), .string("r2")])]
                )
            case "evil":
                return TokenInfo(active: true, scope: "system-access", sub: "x\r\nX-Injected: 1", jti: "ok")
            case "keycloak":
                return TokenInfo(active: true, scope: "system-access", extra: ["clientId": .string("kc-client"), "typ": .string("Bearer"), "preferred_username": .string("svc-kc")])
            case "boom":
                throw .connect("refused")
            default:
                return .inactive
            }
        }
    }

    static func withSidecar(_ body: @Sendable (LiveClient, CallCounter, LogCapture) async throws -> Void) async throws {
        let configuration = try SidecarConfiguration.parse(yaml: yaml)
        let calls = CallCounter()
        let logs = LogCapture()
        try await withLiveSidecar(configuration: configuration, introspector: introspector(calls: calls), logger: logs.logger) { client, _ in
            try await body(client, calls, logs)
        }
    }

    static func nginxHeaders(uri: String, method: String = "GET", token: String? = goodToken, cert: String? = Fixtures.escaped("client1.pem")) -> HTTPFields {
        var headers = HTTPFields()
        headers[HTTPField.Name("X-Original-URI")!] = uri
        headers[HTTPField.Name("X-Original-Method")!] = method
        if let token { headers[.authorization] = "Bearer \(token)" }
        if let cert { headers[HTTPField.Name("X-Client-Cert")!] = cert }
        return headers
    }

    @Test("nginx: bound token + its certificate → 200 with X-Credential-* and Cache-Control: no-store")
    func nginxAllow() async throws {
        try await Self.withSidecar { client, _, _ in
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/?x=1")) { response in
                #expect(response.status == .ok)
                let h = response.headers
                #expect(h[HTTPField.Name("X-Credential-Scope")!] == "system-access")
                #expect(h[HTTPField.Name("X-Credential-Client-ID")!] == "system-client-mtls")
                #expect(h[HTTPField.Name("X-Credential-Token-Type")!] == "Bearer")
                #expect(h[HTTPField.Name("X-Credential-Exp")!] == "4102444800")
                #expect(h[HTTPField.Name("X-Credential-Iat")!] == "1800000000")
                #expect(h[HTTPField.Name("X-Credential-Sub")!] == "svc")
                #expect(h[HTTPField.Name("X-Credential-Aud")!] == "api-a,api-b")
                #expect(h[HTTPField.Name("X-Credential-Iss")!] == "https://as")
                #expect(h[HTTPField.Name("X-Credential-Jti")!] == "j-1")
                #expect(h[HTTPField.Name("X-Credential-Tenant-Id")!] == "acme")
                #expect(h[HTTPField.Name("X-Credential-Roles")!] == "r1,r2")
                #expect(h[HTTPField.Name("X-Credential-Username")!] == nil)
                #expect(h[.cacheControl] == "no-store")
                #expect(h[HTTPField.Name("x-envoy-auth-headers-to-remove")!] == nil)
                #expect(response.body.readableBytes == 0)
            }
        }
    }

    @Test("nginx: another client's certificate → 401, exact Kong body, WWW-Authenticate, X-Authz-Body")
    func nginxBindingMismatch() async throws {
        try await Self.withSidecar { client, _, logs in
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/", cert: Fixtures.escaped("client2.pem"))) { response in
                #expect(response.status == .unauthorized)
                #expect(String(buffer: response.body) == Self.kong401)
                #expect(response.headers[.contentType] == "application/json")
                #expect(response.headers[.wwwAuthenticate] == #"Bearer realm="authz-sidecar", error="invalid_token""#)
                #expect(response.headers[HTTPField.Name("X-Authz-Body")!] == Self.kong401)
                #expect(response.headers[.cacheControl] == "no-store")
            }
            #expect(logs.all.contains("binding_mismatch"))
            #expect(!logs.all.contains(Self.goodToken))
        }
    }

    @Test("nginx: the rows of DESIGN.md §5 at the HTTP level", arguments: [
        ("no token", "/token-mtls/api/", "GET", nil as String?, 401, "Unauthenticated.", #"Bearer realm="authz-sidecar""#),
        ("malformed", "/token-mtls/api/", "GET", "a b", 401, "The resource owner or authorization server denied the request.", #"Bearer realm="authz-sidecar", error="invalid_request""#),
        ("inactive", "/token-mtls/api/", "GET", "unknown", 401, "The resource owner or authorization server denied the request.", #"Bearer realm="authz-sidecar", error="invalid_token""#),
        ("scope", "/admin-api/x", "GET", goodToken, 403, "The resource owner or authorization server denied the request.", #"Bearer realm="authz-sidecar", error="insufficient_scope", scope="admin""#),
        ("method", "/admin-api/x", "DELETE", goodToken, 403, "The resource owner or authorization server denied the request.", #"Bearer realm="authz-sidecar""#),
        ("no policy", "/elsewhere", "GET", goodToken, 403, "The resource owner or authorization server denied the request.", #"Bearer realm="authz-sidecar""#),
    ])
    func nginxDenials(name: String, uri: String, method: String, token: String?, status: Int, message: String, www: String) async throws {
        try await Self.withSidecar { client, _, _ in
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: uri, method: method, token: token)) { response in
                #expect(response.status.code == status, "\(name)")
                #expect(String(buffer: response.body) == AuthzAnswer.kongBody(code: status, message: message), "\(name)")
                #expect(response.headers[.wwwAuthenticate] == www, "\(name)")
            }
        }
    }

    @Test("AS fault → 503 with Retry-After, never 200 or 401; recovers when the AS does")
    func fault() async throws {
        try await Self.withSidecar { client, _, logs in
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/", token: "boom")) { response in
                #expect(response.status == .serviceUnavailable)
                #expect(response.headers[.retryAfter] == "2")
                #expect(String(buffer: response.body) == AuthzAnswer.kongBody(code: 503, message: "Authorization server unavailable."))
            }
            #expect(logs.all.contains("authorization server fault"))
        }
    }

    @Test("the cache: 20 requests with one token make one introspection; binding checked on every hit")
    func cacheAndBinding() async throws {
        try await Self.withSidecar { client, calls, _ in
            for _ in 0..<20 {
                try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/")) { #expect($0.status == .ok) }
            }
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/", cert: Fixtures.escaped("client2.pem"))) {
                #expect($0.status == .unauthorized)
            }
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/", cert: nil)) {
                #expect($0.status == .unauthorized)
            }
            #expect(calls.count == 1)
        }
    }

    @Test("claims with CR/LF are dropped, not injected; the rest are sent")
    func headerInjection() async throws {
        try await Self.withSidecar { client, _, logs in
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/", token: "evil", cert: nil)) { response in
                #expect(response.status == .ok)
                #expect(response.headers[HTTPField.Name("X-Credential-Sub")!] == nil)
                #expect(response.headers[HTTPField.Name("X-Injected")!] == nil)
                #expect(response.headers[HTTPField.Name("X-Credential-Jti")!] == "ok")
            }
            #expect(logs.all.contains("X-Credential-Sub"))
        }
    }

    @Test("Keycloak fallbacks: clientId, typ, preferred_username")
    func keycloakFallbacks() async throws {
        try await Self.withSidecar { client, _, _ in
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/", token: "keycloak", cert: nil)) { response in
                #expect(response.headers[HTTPField.Name("X-Credential-Client-ID")!] == "kc-client")
                #expect(response.headers[HTTPField.Name("X-Credential-Token-Type")!] == "Bearer")
                #expect(response.headers[HTTPField.Name("X-Credential-Username")!] == "svc-kc")
            }
        }
    }

    @Test("anonymous access where the policy allows it")
    func anonymous() async throws {
        try await Self.withSidecar { client, _, _ in
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/public/x", token: nil)) { response in
                #expect(response.status == .ok)
                #expect(response.headers[HTTPField.Name("X-Anonymous")!] == "true")
            }
        }
    }

    @Test("Envoy: any method on /authz/<path>; XFCC Hash; headers-to-remove names what was not set")
    func envoy() async throws {
        try await Self.withSidecar { client, _, _ in
            var headers = HTTPFields()
            headers[.authorization] = "Bearer \(Self.goodToken)"
            headers[HTTPField.Name("x-forwarded-client-cert")!] = "By=spiffe://e;Hash=\(Fixtures.hexHash("client1.pem"));Subject=\"CN=client1\""
            for method in [HTTPRequest.Method.get, .post, .delete, HTTPRequest.Method("PATCH")!] {
                try await client.execute(uri: "/authz/envoy/items?q=1", method: method, headers: headers) { response in
                    #expect(response.status == .ok)
                    #expect(response.headers[HTTPField.Name("X-Credential-Sub")!] == "svc")
                    let remove = response.headers[HTTPField.Name("x-envoy-auth-headers-to-remove")!] ?? ""
                    #expect(remove.split(separator: ",").contains("x-credential-username"))
                    #expect(remove.split(separator: ",").contains("x-credential-nbf"))
                    #expect(!remove.split(separator: ",").contains("x-credential-sub"))
                    #expect(remove.split(separator: ",").contains("authorization"))
                    #expect(remove.split(separator: ",").contains("x-forwarded-client-cert"))
                }
            }
            headers[HTTPField.Name("x-forwarded-client-cert")!] = "Hash=\(Fixtures.hexHash("client2.pem"))"
            try await client.execute(uri: "/authz/envoy/items", method: .post, headers: headers) { response in
                #expect(response.status == .unauthorized)
                #expect(String(buffer: response.body) == Self.kong401)
            }
        }
    }

    @Test("admin endpoints on the same listener; 404 elsewhere")
    func admin() async throws {
        try await Self.withSidecar { client, _, _ in
            try await client.execute(uri: "/healthz", method: .get) { #expect($0.status == .ok) }
            try await client.execute(uri: "/readyz", method: .get) { #expect($0.status == .ok) }
            try await client.execute(uri: "/nope", method: .get) { #expect($0.status == .notFound) }
            try await client.execute(uri: "/authzx", method: .get) { #expect($0.status == .notFound) }
        }
    }

    @Test("/readyz turns 503 after an unreachable AS, and back after it answers")
    func readiness() async throws {
        try await Self.withSidecar { client, _, _ in
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/", token: "boom")) { _ in }
            try await client.execute(uri: "/readyz", method: .get) { #expect($0.status == .serviceUnavailable) }
            try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/")) { _ in }
            try await client.execute(uri: "/readyz", method: .get) { #expect($0.status == .ok) }
        }
    }

    @Test("purge: by token, by digest, all; 400 on a malformed body")
    func purge() async throws {
        try await Self.withSidecar { client, calls, _ in
            let ask = { () async throws in
                try await client.execute(uri: "/authz", method: .get, headers: Self.nginxHeaders(uri: "/token-mtls/api/")) { #expect($0.status == .ok) }
            }
            try await ask()
            try await client.execute(uri: "/admin/cache/purge", method: .post, body: ByteBuffer(string: #"{"token":"good-token"}"#)) { response in
                #expect(response.status == .ok)
                #expect(String(buffer: response.body) == #"{"purged":1}"#)
            }
            try await ask()
            #expect(calls.count == 2)
            let hex = TokenDigest(token: Self.goodToken).hex
            try await client.execute(uri: "/admin/cache/purge", method: .post, body: ByteBuffer(string: #"{"token_sha256":"\#(hex.uppercased())"}"#)) { response in
                #expect(String(buffer: response.body) == #"{"purged":1}"#)
            }
            try await ask()
            try await client.execute(uri: "/admin/cache/purge", method: .post, body: ByteBuffer(string: #"{"all":true}"#)) { response in
                #expect(String(buffer: response.body) == #"{"purged":1}"#)
            }
            #expect(calls.count == 3)
            for bad in ["", "{}", "[]", #"{"token_sha256":"abc"}"#, #"{"all":false}"#, #"{"token":"a","all":true}"#, "not json"] {
                try await client.execute(uri: "/admin/cache/purge", method: .post, body: ByteBuffer(string: bad)) { response in
                    #expect(response.status == .badRequest, "\(bad)")
                }
            }
        }
    }

    @Test("headers over max_header_bytes are refused with 401 invalid_request")
    func headerLimit() async throws {
        try await Self.withSidecar { client, calls, _ in
            var headers = Self.nginxHeaders(uri: "/token-mtls/api/")
            headers[HTTPField.Name("X-Padding")!] = String(repeating: "p", count: 20_000)
            try await client.execute(uri: "/authz", method: .get, headers: headers) { response in
                #expect(response.status == .unauthorized)
                #expect(response.headers[.wwwAuthenticate]?.contains("invalid_request") == true)
            }
            #expect(calls.count == 0)
        }
    }
}
