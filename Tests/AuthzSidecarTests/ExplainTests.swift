import HTTPTypes
import Introspection
import Logging
import Metrics
import NIOHTTP1
import Testing

@testable import AuthzSidecar

@Suite("Why was I denied: the step trace of one decision")
struct ExplainTests {
    static let yaml = """
        server: { trust_debug_header: true }
        introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
        policies:
          - name: api
            match: { path_prefix: /api/ }
            required_scopes: [read]
            certificate_header: X-Client-Cert
          - name: traced
            match: { path_prefix: /traced/ }
            required_scopes: [read]
            debug_log: true
        """

    static let introspector = ClosureTokenIntrospector { token throws(IntrospectionError) in
        switch token {
        case "reader": return TokenInfo(active: true, scope: "read", clientID: "c1", exp: 4_102_444_800)
        case "writer": return TokenInfo(active: true, scope: "write", exp: 4_102_444_800)
        case "bound": return TokenInfo(active: true, scope: "read", exp: 4_102_444_800, certificateThumbprint: Fixtures.thumbprint("client1.pem"))
        case "down": throw .status(500)
        default: return .inactive
        }
    }

    func makeAuthorizer(_ logs: LogCapture, yaml: String = Self.yaml) throws -> Authorizer {
        let configuration = try SidecarConfiguration.parse(yaml: yaml)
        return Authorizer(
            configuration: configuration, cache: CachingTokenIntrospector(upstream: Self.introspector, configuration: configuration.cache),
            logger: logs.logger, metrics: NOOPMetricsHandler.instance
        )
    }

    static func request(_ path: String, token: String?, certificate: String? = nil, debug: Bool = false) -> AccessRequest {
        var headers = HTTPFields()
        if let token { headers[.authorization] = "Bearer \(token)" }
        if let certificate { headers[HTTPField.Name("X-Client-Cert")!] = Fixtures.escaped(certificate) }
        if debug { headers[HTTPField.Name("X-Authz-Debug")!] = "1" }
        headers[HTTPField.Name("X-Request-Id")!] = "rid-1"
        return AccessRequest(front: .nginx, method: "GET", path: path, host: "h", headers: headers)
    }

    func step(_ explanation: Explanation, _ name: String) -> String? {
        explanation.steps.first { $0.name == name }?.result
    }

    @Test("each step says what it found, and the answer is the one the proxy would get")
    func steps() async throws {
        let logs = LogCapture()
        let authorizer = try makeAuthorizer(logs)
        let allowed = await authorizer.explain(Self.request("/api/x", token: "reader"))
        #expect(step(allowed, "policy")?.hasPrefix("api") == true)
        #expect(step(allowed, "token")?.contains("Bearer scheme, an opaque token, sha256 \(TokenDigest(token: "reader").prefix)") == true)
        #expect(step(allowed, "validation")?.contains("client_id=c1") == true)
        #expect(step(allowed, "scopes")?.hasPrefix("ok: all of [read]") == true)
        #expect(step(allowed, "decision") == "allow")
        #expect(allowed.answer.status == 200)

        let scoped = await authorizer.explain(Self.request("/api/x", token: "writer"))
        #expect(step(scoped, "scopes") == #"insufficient: all of [read] required, granted "write""#)
        #expect(step(scoped, "decision") == "deny 403: insufficient_scope")
        #expect(scoped.answer.status == 403)

        let inactive = await authorizer.explain(Self.request("/api/x", token: "unknown"))
        #expect(step(inactive, "active")?.hasPrefix("no") == true)
        #expect(inactive.answer.status == 401)

        let bound = await authorizer.explain(Self.request("/api/x", token: "bound", certificate: "client1.pem"))
        #expect(step(bound, "binding cnf.x5t#S256") == "match: certificate \(Fixtures.thumbprint("client1.pem"))")
        let other = await authorizer.explain(Self.request("/api/x", token: "bound", certificate: "client2.pem"))
        #expect(step(other, "binding cnf.x5t#S256")?.hasPrefix("mismatch") == true)
        #expect(other.answer.status == 401)
        let none = await authorizer.explain(Self.request("/api/x", token: "bound"))
        #expect(step(none, "binding cnf.x5t#S256")?.contains("no certificate came (header X-Client-Cert)") == true)

        let fault = await authorizer.explain(Self.request("/api/x", token: "down"))
        #expect(step(fault, "validation")?.hasPrefix("fault") == true)
        #expect(fault.answer.status == 503)

        let lost = await authorizer.explain(Self.request("/elsewhere", token: "reader"))
        #expect(step(lost, "policy")?.hasPrefix("none") == true)
        // The token itself is in no step.
        for explanation in [allowed, scoped, inactive, bound, other, none, fault, lost] {
            #expect(!explanation.steps.contains { $0.result.contains("reader") || $0.result.contains("writer") })
        }
    }

    @Test("explain and answer agree, row by row", arguments: ["reader", "writer", "unknown", "bound", "down"])
    func agree(token: String) async throws {
        let logs = LogCapture()
        let authorizer = try makeAuthorizer(logs)
        let request = Self.request("/api/x", token: token, certificate: "client1.pem")
        let explained = await authorizer.explain(request)
        let answered = await authorizer.answer(request)
        #expect(explained.answer.status == answered.status)
        #expect(explained.answer.body == answered.body)
    }

    @Test("the debug log: X-Authz-Debug behind trust, or a debug_log policy; nothing otherwise")
    func debugLog() async throws {
        let logs = LogCapture()
        let authorizer = try makeAuthorizer(logs)
        // Trusted header: traced, through the suspending path (the fast path declines it).
        #expect(authorizer.answerWithoutSuspending(Self.request("/api/x", token: "reader", debug: true)) == nil)
        let traced = await authorizer.answer(Self.request("/api/x", token: "reader", debug: true))
        #expect(traced.status == 200)
        #expect(logs.all.contains(#""message":"decision trace""#))
        #expect(logs.all.contains("rid-1"))
        #expect(logs.all.contains("scopes: ok"))
        #expect(!logs.all.contains("reader"), "the token is never logged")
        // No header: no trace.
        let quiet = LogCapture()
        let plain = try makeAuthorizer(quiet)
        _ = await plain.answer(Self.request("/api/x", token: "writer"))
        #expect(!quiet.all.contains("decision trace"))
        // A debug_log policy: traced without the header.
        _ = await plain.answer(Self.request("/traced/x", token: "writer"))
        #expect(quiet.all.contains("decision trace"))
        // The header without trust: ignored.
        let untrusted = LogCapture()
        let strict = try makeAuthorizer(untrusted, yaml: Self.yaml.replacingOccurrences(of: "server: { trust_debug_header: true }", with: ""))
        #expect(strict.answerWithoutSuspending(Self.request("/api/x", token: "unknown", debug: true)) == nil)  // a miss, not a trace
        _ = await strict.answer(Self.request("/api/x", token: "writer", debug: true))
        #expect(!untrusted.all.contains("decision trace"))
    }
}
