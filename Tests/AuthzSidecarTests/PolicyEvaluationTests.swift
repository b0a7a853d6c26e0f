@testable import AuthzSidecar
import HTTPTypes
import Introspection
import NIOHTTP1
import Testing

@Suite("PolicyEvaluation: DESIGN.md §5 steps 4–7, one row per rule")
struct PolicyEvaluationTests {
    static let now: Double = 1_800_000_000
    static let client1 = Fixtures.thumbprint("client1.pem")
    static let client1Header = Fixtures.escaped("client1.pem")
    static let client2Header = Fixtures.escaped("client2.pem")

    static let policy = PolicyConfiguration(
        name: "token-mtls",
        pathPrefix: "/token-mtls/",
        requiredScopes: ["system-access"],
        audiences: [],
        certificateHeader: "X-Client-Cert"
    )

    static func token(
        active: Bool = true, scope: String? = "system-access", exp: Int64? = 1_800_000_600, nbf: Int64? = nil,
        iss: String? = "https://as", aud: [String] = [], bound: String? = client1
    ) -> TokenInfo {
        TokenInfo(active: active, scope: scope, exp: exp, nbf: nbf, aud: aud, iss: iss, certificateThumbprint: bound)
    }

    static func request(certificate: String? = client1Header) -> AccessRequest {
        var headers = HTTPFields()
        if let certificate { headers[HTTPField.Name("X-Client-Cert")!] = certificate }
        return AccessRequest(front: .nginx, method: "GET", path: "/token-mtls/api/", host: "proxy", headers: headers)
    }

    struct Row: CustomTestStringConvertible, Sendable {
        var name: String
        var token: TokenInfo
        var policy: PolicyConfiguration = PolicyEvaluationTests.policy
        var certificate: String? = PolicyEvaluationTests.client1Header
        var issuer: String? = nil
        var expected: DenialReason?  // nil = allow
        var testDescription: String { name }
    }

    static let rows: [Row] = {
        var audiencePolicy = policy
        audiencePolicy.audiences = ["api-a"]
        var strict = policy
        strict.requireBoundToken = true
        var skewed = policy
        skewed.clockSkewSeconds = 30
        var any = policy
        any.requiredScopes = ["admin", "system-access"]
        any.scopeMatch = .any
        var all = any
        all.scopeMatch = .all
        return [
            Row(name: "bound token, its certificate, its scope → allow", token: token(), expected: nil),
            Row(name: "inactive → inactive", token: .inactive, expected: .inactive),
            Row(name: "exp passed → expired", token: token(exp: Int64(now) - 1), expected: .expired),
            Row(name: "exp exactly now → expired", token: token(exp: Int64(now)), expected: .expired),
            Row(name: "exp passed but within skew → allow", token: token(exp: Int64(now) - 10), policy: skewed, expected: nil),
            Row(name: "nbf ahead → not_yet_valid", token: token(nbf: Int64(now) + 5), expected: .notYetValid),
            Row(name: "nbf ahead within skew → allow", token: token(nbf: Int64(now) + 5), policy: skewed, expected: nil),
            Row(name: "issuer mismatch", token: token(iss: "https://evil"), issuer: "https://as", expected: .issuerMismatch),
            Row(name: "issuer missing when expected", token: token(iss: nil), issuer: "https://as", expected: .issuerMismatch),
            Row(name: "issuer matches", token: token(), issuer: "https://as", expected: nil),
            Row(name: "audience mismatch", token: token(aud: ["api-b"]), policy: audiencePolicy, expected: .audienceMismatch),
            Row(name: "audience matches one of several", token: token(aud: ["api-b", "api-a"]), policy: audiencePolicy, expected: nil),
            Row(name: "bound token, no certificate → certificate_missing", token: token(), certificate: nil, expected: .certificateMissing),
            Row(name: "bound token, another certificate → binding_mismatch", token: token(), certificate: client2Header, expected: .bindingMismatch),
            Row(name: "bound token, garbage certificate → certificate_invalid", token: token(), certificate: "garbage%", expected: .certificateInvalid),
            Row(name: "unbound token, no certificate → allow", token: token(bound: nil), certificate: nil, expected: nil),
            Row(name: "unbound token with require_bound_token → unbound_token", token: token(bound: nil), policy: strict, expected: .unboundToken),
            Row(name: "missing scope → insufficient_scope", token: token(scope: "other"), expected: .insufficientScope),
            Row(name: "no scope at all → insufficient_scope", token: token(scope: nil), expected: .insufficientScope),
            Row(name: "scope is a prefix only → insufficient_scope", token: token(scope: "system-access-x"), expected: .insufficientScope),
            Row(name: "scope_match any: one of two → allow", token: token(scope: "system-access"), policy: any, expected: nil),
            Row(name: "scope_match all: one of two → insufficient_scope", token: token(scope: "system-access"), policy: all, expected: .insufficientScope),
            Row(name: "scope_match all: both → allow", token: token(scope: "admin system-access"), policy: all, expected: nil),
            // order: each earlier rule wins over a later one
            Row(name: "order: expired beats binding mismatch", token: token(exp: Int64(now) - 1), certificate: client2Header, expected: .expired),
            Row(name: "order: binding beats scope", token: token(scope: "other"), certificate: client2Header, expected: .bindingMismatch),
            Row(name: "order: audience beats binding", token: token(aud: ["x"]), policy: audiencePolicy, certificate: client2Header, expected: .audienceMismatch),
        ]
    }()

    @Test("decision table", arguments: rows)
    func decide(row: Row) {
        let evaluation = PolicyEvaluation(policy: row.policy, expectedIssuer: row.issuer)
        let decision = evaluation.decide(token: row.token, request: Self.request(certificate: row.certificate), now: Self.now)
        switch (decision, row.expected) {
        case (.allow(let grant), nil):
            #expect(grant.token == row.token)
        case (.deny(let denial), let expected?):
            #expect(denial.reason == expected)
        default:
            Issue.record("\(row.name): got \(decision)")
        }
    }

    @Test("statuses and RFC 6750 error codes per reason")
    func statuses() {
        #expect(Denial(.noToken).status == 401)
        #expect(Denial(.noToken).errorCode == nil)
        #expect(Denial(.noToken).message == "Unauthenticated.")
        #expect(Denial(.malformedToken).errorCode == .invalidRequest)
        #expect(Denial(.bindingMismatch).status == 401)
        #expect(Denial(.bindingMismatch).errorCode == .invalidToken)
        #expect(Denial(.insufficientScope).status == 403)
        #expect(Denial(.insufficientScope).errorCode == .insufficientScope)
        #expect(Denial(.noPolicy).status == 403)
        for reason in DenialReason.allCases where reason != .noToken {
            #expect(Denial(reason).message == "The resource owner or authorization server denied the request.")
        }
    }

    @Test("proxy_cache_seconds: max-age bounded by exp, 0 when off")
    func proxyCache() {
        var policy = Self.policy
        policy.proxyCacheSeconds = 60
        let short = PolicyEvaluation(policy: policy).decide(token: Self.token(exp: Int64(Self.now) + 20), request: Self.request(), now: Self.now)
        #expect(short == .allow(Grant(token: Self.token(exp: Int64(Self.now) + 20), cacheSeconds: 20)))
        let long = PolicyEvaluation(policy: policy).decide(token: Self.token(), request: Self.request(), now: Self.now)
        #expect(long == .allow(Grant(token: Self.token(), cacheSeconds: 60)))
        let off = PolicyEvaluation(policy: Self.policy).decide(token: Self.token(), request: Self.request(), now: Self.now)
        #expect(off == .allow(Grant(token: Self.token(), cacheSeconds: 0)))
    }

    @Test("the certificate comes from the policy's header only; two copies are refused")
    func oneSource() {
        var headers = HTTPFields()
        headers.append(HTTPField(name: HTTPField.Name("X-Client-Cert")!, value: Self.client1Header))
        headers.append(HTTPField(name: HTTPField.Name("X-Client-Cert")!, value: Self.client1Header))
        let request = AccessRequest(front: .nginx, method: "GET", path: "/token-mtls/", host: "h", headers: headers)
        guard case .deny(let denial) = PolicyEvaluation(policy: Self.policy).decide(token: Self.token(), request: request, now: Self.now) else {
            Issue.record("two certificate headers must be refused")
            return
        }
        #expect(denial.reason == .certificateInvalid)

        var xfccOnly = HTTPFields()
        xfccOnly[HTTPField.Name("x-forwarded-client-cert")!] = "Hash=\(Fixtures.hexHash("client1.pem"))"
        let wrongSource = AccessRequest(front: .nginx, method: "GET", path: "/token-mtls/", host: "h", headers: xfccOnly)
        guard case .deny(let other) = PolicyEvaluation(policy: Self.policy).decide(token: Self.token(), request: wrongSource, now: Self.now) else {
            Issue.record("a certificate in another header must not count")
            return
        }
        #expect(other.reason == .certificateMissing)
    }

    @Test("header names as SwiftNIO delivers them: any case, underscores and digits kept apart")
    func headerLookup() {
        var headers = HTTPHeaders()
        headers.add(name: "x-client-CERT", value: Self.client1Header)
        headers.add(name: "AUTHORIZATION", value: "Bearer a")
        headers.add(name: "x_client_cert2", value: "other")
        headers.add(name: "X-Original-Uri", value: "/token-mtls/api/?q=1")
        headers.add(name: "x-original-method", value: "post")
        headers.add(name: "Host", value: "sidecar")
        headers.add(name: "X-Original-Host", value: "proxy.example")
        guard let request = AccessRequest(method: "GET", target: "/authz", headers: headers, trustPolicyHeader: false) else {
            Issue.record("/authz is the nginx decision path")
            return
        }
        #expect(request.front == .nginx)
        #expect(request.method == "POST")
        #expect(request.path == "/token-mtls/api/?q=1")
        #expect(request.host == "proxy.example")
        #expect(Array(request.headers.values(.authorization)) == ["Bearer a"])
        #expect(request.headers.first(HTTPField.Name("X_Client_Cert2")!) == "other")
        #expect(request.headers.first(HTTPField.Name("X-Client-Cert2")!) == nil)
        #expect(request.headerBytes == headers.reduce(0) { $0 + $1.name.utf8.count + $1.value.utf8.count + 4 })
        #expect(PolicyEvaluation(policy: Self.policy).decide(token: Self.token(), request: request, now: Self.now) == .allow(Grant(token: Self.token(), cacheSeconds: 0)))

        let envoy = AccessRequest(method: "DELETE", target: "/authz/token-mtls/x", headers: ["host": "api"], trustPolicyHeader: false)
        #expect(envoy?.front == .envoyHTTP)
        #expect(envoy?.path == "/token-mtls/x")
        #expect(envoy?.host == "api")
        #expect(envoy?.method == "DELETE")
        #expect(AccessRequest(method: "GET", target: "/authzx", headers: [:], trustPolicyHeader: false) == nil)
    }

    @Test("policy matching: prefix on the path without query, hosts with or without port, methods")
    func matching() {
        let policy = PolicyConfiguration(name: "p", pathPrefix: "/api/", hosts: ["Api.Example"], methods: ["get", "POST"])
        #expect(policy.matches(method: "GET", path: "/api/x", host: "api.example"))
        #expect(policy.matches(method: "POST", path: "/api/", host: "API.example:8443"))
        #expect(!policy.matches(method: "DELETE", path: "/api/x", host: "api.example"))
        #expect(!policy.matches(method: "GET", path: "/apix", host: "api.example"))
        #expect(!policy.matches(method: "GET", path: "/api/x", host: "other.example"))
        #expect(!policy.matches(method: "GET", path: "/api/x", host: "api.example.evil"))
        let any = PolicyConfiguration(name: "any")
        #expect(any.matches(method: "PATCH", path: "/whatever", host: ""))
    }
}
