@testable import AuthzSidecar
import Crypto
import Foundation
import NIOCore
import NIOHTTP1
import HTTPTypes
import Introspection
import JOSE
@testable import JWTValidation
import Metrics
import MetricsTestKit
import NIOConcurrencyHelpers
import Testing

/// An introspector that counts its calls and answers from a closure.
final class CountingIntrospector: TokenIntrospector {
    private let calls = NIOLockedValueBox(0)
    private let answer: @Sendable (String) -> TokenInfo
    init(_ answer: @escaping @Sendable (String) -> TokenInfo) { self.answer = answer }
    var count: Int { calls.withLockedValue { $0 } }
    func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        calls.withLockedValue { $0 += 1 }
        return answer(token)
    }
}

@Suite("JWT access tokens (RFC 9068): verified locally, routed by issuer, claims required")
struct JWTAccessTokenTests {
    static let yaml = """
        issuers:
          - name: idp
            issuer: \(JWTFixtures.issuer)
            audiences: [api]
            algorithms: [RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA]
            token_types: [at+jwt, JWT]
            jwks_min_refetch_seconds: 30
            jwks_cache_seconds: 300
        policies:
          - name: api
            match: { path_prefix: /api/ }
            required_scopes: [read]
            forward_claims: [groups]
          - name: admin
            match: { path_prefix: /admin/ }
            required_claims: { groups: admins, tenant: [acme, umbrella], level: 3 }
          - name: other-audience
            match: { path_prefix: /aud/ }
            audiences: [other]
          - name: bound
            match: { path_prefix: /bound/ }
            certificate_header: X-Client-Cert
        """

    struct Harness {
        let sidecar: Sidecar
        let keys: TestKeySource
        let clock: TestClock
        let metrics: TestMetrics
        let introspector: CountingIntrospector

        init(yaml: String = JWTAccessTokenTests.yaml, keys: String = JWTFixtures.standardKeys, introspection: @escaping @Sendable (String) -> TokenInfo = { _ in .inactive }) throws {
            clock = TestClock()
            metrics = TestMetrics()
            self.keys = TestKeySource(keys)
            introspector = CountingIntrospector(introspection)
            let configuration = try SidecarConfiguration.parse(yaml: yaml)
            sidecar = Sidecar(
                configuration: configuration, introspector: configuration.introspection == nil ? nil : introspector,
                backends: ["idp": IssuerBackends(introspector: introspector, keys: self.keys.backends.keys)],
                clock: clock, metrics: metrics
            )
        }

        var now: Double { clock.now() }

        func decide(_ token: String?, path: String = "/api/x") async -> Authorizer.Outcome {
            await sidecar.authorizer.authorize(JWTFixtures.request(token, path: path)).0
        }

        func answer(_ token: String?, path: String = "/api/x") async -> AuthzAnswer {
            await sidecar.authorizer.answer(JWTFixtures.request(token, path: path))
        }

        func counter(_ label: String, _ dimensions: [(String, String)]) -> Int64 {
            metrics.counters(label: label, dimensions: dimensions).map(\.totalValue).reduce(0, +)
        }
    }

    /// "allow", a denial reason, or "fault:<label>".
    static func describe(_ outcome: Authorizer.Outcome) -> String {
        switch outcome {
        case .decision(.allow): return "allow"
        case .decision(.deny(let denial)): return denial.reason.rawValue
        case .fault(let error): return "fault:\(error.label)"
        }
    }

    typealias Row = (name: String, path: String, expected: String, token: @Sendable (Double) -> String)

    static let rows: [Row] = {
        let c: @Sendable (Double, [String: Any], [String]) -> [String: Any] = { JWTFixtures.claims($0, $1, removing: $2) }
        let t: @Sendable (String, String?, String?, [String: Any], TestKeys.Private, [String: Any]) -> String = {
            TestKeys.token(alg: $0, kid: $1, typ: $2, claims: $3, key: $4, headerExtra: $5)
        }
        return [
            ("RS256", "/api/x", "allow", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("PS256 (kid without alg)", "/api/x", "allow", { t("PS256", "rsa-ps", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("ES256", "/api/x", "allow", { t("ES256", "ec-1", "at+jwt", c($0, [:], []), TestKeys.p256, [:]) }),
            ("ES384", "/api/x", "allow", { t("ES384", "ec-384", "at+jwt", c($0, [:], []), TestKeys.p384, [:]) }),
            ("EdDSA", "/api/x", "allow", { t("EdDSA", "ed-1", "at+jwt", c($0, [:], []), TestKeys.ed25519, [:]) }),
            ("typ JWT (configured, Keycloak)", "/api/x", "allow", { t("RS256", "rsa-1", "JWT", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("typ application/AT+JWT", "/api/x", "allow", { t("RS256", "rsa-1", "application/AT+JWT", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("scope as an array", "/api/x", "allow", { t("RS256", "rsa-1", "at+jwt", c($0, ["scope": ["read", "x"]], []), TestKeys.rsa, [:]) }),
            ("aud array holding api", "/api/x", "allow", { t("RS256", "rsa-1", "at+jwt", c($0, ["aud": ["x", "api"]], []), TestKeys.rsa, [:]) }),
            ("jku/x5u/jwk ignored, signed by our key", "/api/x", "allow", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, ["jku": "https://evil.test/jwks", "x5u": "https://evil.test/c", "jwk": TestKeys.jwk(TestKeys.rsaOther, kid: nil)]) }),
            ("signed by an attacker's key named in jwk", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsaOther, ["jwk": TestKeys.jwk(TestKeys.rsaOther, kid: nil)]) }),
            ("alg none", "/api/x", "jwt_invalid", { TestKeys.token(header: #"{"alg":"none","kid":"rsa-1","typ":"at+jwt"}"#, claims: TestKeys.json(c($0, [:], [])), key: nil, alg: "none") }),
            ("HS256 keyed with the RSA public key (confusion)", "/api/x", "jwt_invalid", { now in
                let header = #"{"alg":"HS256","kid":"rsa-1","typ":"at+jwt"}"#
                let input = TestKeys.b64(Array(header.utf8)) + "." + TestKeys.b64(Array(TestKeys.json(c(now, [:], [])).utf8))
                let secret = Array(TestKeys.jwks([TestKeys.jwk(TestKeys.rsa, kid: "rsa-1", alg: "RS256")]).utf8)
                let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: secret))
                return input + "." + TestKeys.b64(Array(mac))
            }),
            ("alg not on the allow-list", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("ES256 header, RSA kid", "/api/x", "jwt_invalid", { t("ES256", "rsa-ps", "at+jwt", c($0, [:], []), TestKeys.p256, [:]) }),
            ("PS256 with the RS256-only key", "/api/x", "jwt_invalid", { t("PS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("unknown crit", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, ["crit": ["x-custom"], "x-custom": 1]) }),
            ("typ JOSE", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "JOSE", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("no typ", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", nil, c($0, [:], []), TestKeys.rsa, [:]) }),
            ("typ dpop+jwt (a proof, not a token)", "/api/x", "jwt_invalid", { t("ES256", "ec-1", "dpop+jwt", c($0, [:], []), TestKeys.p256, [:]) }),
            ("expired", "/api/x", "expired", { t("RS256", "rsa-1", "at+jwt", c($0, ["exp": Int($0) - 1], []), TestKeys.rsa, [:]) }),
            ("nbf ahead", "/api/x", "not_yet_valid", { t("RS256", "rsa-1", "at+jwt", c($0, ["nbf": Int($0) + 60], []), TestKeys.rsa, [:]) }),
            ("no exp", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, [:], ["exp"]), TestKeys.rsa, [:]) }),
            ("exp a string", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, ["exp": "\(Int($0) + 600)"], []), TestKeys.rsa, [:]) }),
            ("nbf a string", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, ["nbf": "0"], []), TestKeys.rsa, [:]) }),
            ("no iss", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, [:], ["iss"]), TestKeys.rsa, [:]) }),
            ("other iss", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, ["iss": "https://evil.test"], []), TestKeys.rsa, [:]) }),
            ("iss with a trailing slash", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, ["iss": JWTFixtures.issuer + "/"], []), TestKeys.rsa, [:]) }),
            ("wrong aud", "/api/x", "audience_mismatch", { t("RS256", "rsa-1", "at+jwt", c($0, ["aud": "billing"], []), TestKeys.rsa, [:]) }),
            ("no aud", "/api/x", "audience_mismatch", { t("RS256", "rsa-1", "at+jwt", c($0, [:], ["aud"]), TestKeys.rsa, [:]) }),
            ("policy audiences replace the issuer's", "/aud/x", "allow", { t("RS256", "rsa-1", "at+jwt", c($0, ["aud": "other"], []), TestKeys.rsa, [:]) }),
            ("policy audiences: the issuer's alone is not enough", "/aud/x", "audience_mismatch", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("signed by another RSA key", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsaOther, [:]) }),
            ("signed by another P-256 key", "/api/x", "jwt_invalid", { t("ES256", "ec-1", "at+jwt", c($0, [:], []), TestKeys.p256Other, [:]) }),
            ("signature truncated", "/api/x", "jwt_invalid", { String(t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]).dropLast(10)) }),
            ("signature empty", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]).split(separator: ".").prefix(2).joined(separator: ".") + "." }),
            ("claims changed after signing", "/api/x", "jwt_invalid", { now in
                let parts = t("RS256", "rsa-1", "at+jwt", c(now, [:], []), TestKeys.rsa, [:]).split(separator: ".")
                return [String(parts[0]), TestKeys.b64(Array(TestKeys.json(c(now, ["scope": "read admin"], [])).utf8)), String(parts[2])].joined(separator: ".")
            }),
            ("extra dot", "/api/x", "jwt_invalid", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]) + "." }),
            ("JWE shape", "/api/x", "jwt_invalid", { _ in "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.a.b.c.d" }),
            ("nested JWT (cty JWT)", "/api/x", "jwt_invalid", { now in
                let inner = t("RS256", "rsa-1", "at+jwt", c(now, [:], []), TestKeys.rsa, [:])
                return TestKeys.token(header: #"{"alg":"RS256","kid":"rsa-1","typ":"at+jwt","cty":"JWT"}"#, claims: inner, key: TestKeys.rsa, alg: "RS256")
            }),
            ("duplicate claim", "/api/x", "jwt_invalid", { now in
                TestKeys.token(header: #"{"alg":"RS256","kid":"rsa-1","typ":"at+jwt"}"#, claims: #"{"iss":"\#(JWTFixtures.issuer)","exp":\#(Int(now) + 600),"aud":"api","scope":"read","scope":"admin"}"#, key: TestKeys.rsa, alg: "RS256")
            }),
            ("kid with path characters", "/api/x", "jwt_invalid", { t("RS256", "../../etc/passwd", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("kid with SQL", "/api/x", "jwt_invalid", { t("RS256", "x' OR '1'='1", "at+jwt", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("no kid, several RSA keys fit", "/api/x", "jwt_invalid", { t("RS256", nil, "at+jwt", c($0, [:], []), TestKeys.rsa, [:]) }),
            ("no kid, one EdDSA key fits", "/api/x", "allow", { t("EdDSA", nil, "at+jwt", c($0, [:], []), TestKeys.ed25519, [:]) }),
            ("refresh token kind", "/api/x", "token_kind", { t("RS256", "rsa-1", "at+jwt", c($0, ["typ": "Refresh"], []), TestKeys.rsa, [:]) }),
            ("bound to a certificate, none sent", "/bound/x", "certificate_missing", { t("RS256", "rsa-1", "at+jwt", c($0, ["cnf": ["x5t#S256": "abc"]], []), TestKeys.rsa, [:]) }),
            ("cnf.jkt sent as Bearer", "/api/x", "unsupported_binding", { t("RS256", "rsa-1", "at+jwt", c($0, ["cnf": ["jkt": "abc"]], []), TestKeys.rsa, [:]) }),
            ("scope missing", "/api/x", "insufficient_scope", { t("RS256", "rsa-1", "at+jwt", c($0, ["scope": "write"], []), TestKeys.rsa, [:]) }),
            ("huge header (over the bearer parser's bound)", "/api/x", "malformed_token", { t("RS256", "rsa-1", "at+jwt", c($0, [:], []), TestKeys.rsa, ["pad": String(repeating: "x", count: 20_000)]) }),
            ("opaque token", "/api/x", "jwt_invalid", { _ in "2YotnFZFEjr1zCsicMWpAA" }),
        ]
    }()

    @Test("the hostile and the good: each JWT row decided as expected, with no introspection call", arguments: rows.indices)
    func table(_ index: Int) async throws {
        let row = Self.rows[index]
        let yaml = row.name == "alg not on the allow-list" ? Self.yaml.replacingOccurrences(of: "algorithms: [RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA]", with: "algorithms: [ES256]") : Self.yaml
        let harness = try Harness(yaml: yaml)
        let outcome = await harness.decide(row.token(harness.now), path: row.path)
        #expect(Self.describe(outcome) == row.expected, "\(row.name)")
        #expect(harness.introspector.count == 0)
    }

    @Test("an allowed JWT carries the X-Credential headers; a refused one the Kong body and invalid_token")
    func answers() async throws {
        let harness = try Harness()
        let good = TestKeys.token(claims: JWTFixtures.claims(harness.now, ["groups": ["a", "b"]]))
        let allowed = await harness.answer(good)
        #expect(allowed.status == 200)
        #expect(allowed.headers.first(name: "X-Credential-Client-ID") == "device-1")
        #expect(allowed.headers.first(name: "X-Credential-Token-Type") == "Bearer")
        #expect(allowed.headers.first(name: "X-Credential-Iss") == JWTFixtures.issuer)
        #expect(allowed.headers.first(name: "X-Credential-Groups") == "a,b")
        let refused = await harness.answer(good + "x")
        #expect(refused.status == 401)
        #expect(refused.headers.first(name: "WWW-Authenticate") == #"Bearer realm="authz-sidecar", error="invalid_token""#)
        #expect(refused.body == #"{"data":[],"error":{"code":401,"message":"The resource owner or authorization server denied the request."}}"#)
        #expect(harness.counter("authz_jwt_verifications_total", [("issuer", "idp"), ("outcome", "valid")]) == 1)
        #expect(harness.counter("authz_jwt_verifications_total", [("issuer", "idp"), ("outcome", "invalid")]) == 1)
    }

    @Test("required_claims: equality, array membership, any-of, JSON types as they are; a miss is 403 without scope=")
    func requiredClaims() async throws {
        let harness = try Harness()
        func outcome(_ changes: [String: Any]) async -> String {
            let claims = JWTFixtures.claims(harness.now, changes)
            return Self.describe(await harness.decide(TestKeys.token(claims: claims), path: "/admin/x"))
        }
        #expect(await outcome(["groups": "admins", "tenant": "acme", "level": 3]) == "allow")
        #expect(await outcome(["groups": ["users", "admins"], "tenant": "umbrella", "level": 3]) == "allow")
        #expect(await outcome(["groups": ["users"], "tenant": "acme", "level": 3]) == "claims")
        #expect(await outcome(["groups": "admins users", "tenant": "acme", "level": 3]) == "claims")  // not split
        #expect(await outcome(["groups": "admins", "tenant": "initech", "level": 3]) == "claims")
        #expect(await outcome(["groups": "admins", "tenant": "acme", "level": "3"]) == "claims")  // "3" is not 3
        #expect(await outcome(["groups": "admins", "tenant": "acme"]) == "claims")
        #expect(await outcome(["groups": "Admins", "tenant": "acme", "level": 3]) == "claims")
        let denied = await harness.answer(TestKeys.token(claims: JWTFixtures.claims(harness.now)), path: "/admin/x")
        #expect(denied.status == 403)
        #expect(denied.headers.first(name: "WWW-Authenticate") == #"Bearer realm="authz-sidecar", error="insufficient_scope""#)
        #expect(denied.body.contains(#""code":403"#))
    }

    @Test("required_claims apply to introspected tokens too")
    func requiredClaimsIntrospected() async throws {
        let yaml = """
            introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
            policies:
              - name: admin
                match: { path_prefix: / }
                required_claims: { realm_access: admin, tenant: acme }
            """
        let configuration = try SidecarConfiguration.parse(yaml: yaml)
        let introspector = ClosureTokenIntrospector { token in
            TokenInfo(active: true, exp: 2_000_000_000, extra: ["tenant": .string(token == "good" ? "acme" : "other"), "realm_access": .array([.string("admin")])])
        }
        let sidecar = Sidecar(configuration: configuration, introspector: introspector, clock: TestClock(), metrics: NOOPMetricsHandler.instance)
        #expect(await sidecar.authorizer.answer(JWTFixtures.request("good", path: "/x")).status == 200)
        #expect(await sidecar.authorizer.answer(JWTFixtures.request("bad", path: "/x")).status == 403)
    }

    @Test("keys: an unknown kid refetches once per jwks_min_refetch_seconds; rotation is picked up; a refetch that fails is 503")
    func rotation() async throws {
        let harness = try Harness(keys: TestKeys.jwks([TestKeys.jwk(TestKeys.rsa, kid: "rsa-1", alg: "RS256")]))
        let old = TestKeys.token(claims: JWTFixtures.claims(harness.now))
        #expect(Self.describe(await harness.decide(old)) == "allow")
        #expect(harness.keys.fetches == 1)

        // The AS rotates: new tokens are signed with a new key the sidecar has not seen.
        harness.keys.serve(TestKeys.jwks([TestKeys.jwk(TestKeys.p256, kid: "ec-new"), TestKeys.jwk(TestKeys.rsa, kid: "rsa-1", alg: "RS256")]))
        harness.clock.advance(by: 31)
        let new = TestKeys.token(alg: "ES256", kid: "ec-new", claims: JWTFixtures.claims(harness.now, ["jti": "2"]), key: TestKeys.p256)
        #expect(Self.describe(await harness.decide(new)) == "allow")
        #expect(harness.keys.fetches == 2)  // exactly one refetch
        #expect(Self.describe(await harness.decide(old)) == "allow")  // cached, and its key is still there

        // Forged kids within the window: no fetch at all, each refused.
        for i in 0..<50 {
            let forged = TestKeys.token(kid: "forged-\(i)", claims: JWTFixtures.claims(harness.now, ["jti": "f\(i)"]))
            #expect(Self.describe(await harness.decide(forged)) == "jwt_invalid")
        }
        #expect(harness.keys.fetches == 2)

        // Past the window, an unknown kid refetches; when that fetch fails it is a 503, not a 401.
        harness.clock.advance(by: 31)
        harness.keys.fail(true)
        let unknown = TestKeys.token(kid: "later", claims: JWTFixtures.claims(harness.now, ["jti": "3"]))
        #expect(Self.describe(await harness.decide(unknown)) == "fault:keys_unavailable")
        #expect(harness.keys.fetches == 3)
        // Known keys keep working while the key set is unreachable (the last good set stays).
        let fresh = TestKeys.token(alg: "ES256", kid: "ec-new", claims: JWTFixtures.claims(harness.now, ["jti": "4"]), key: TestKeys.p256)
        #expect(Self.describe(await harness.decide(fresh)) == "allow")
        #expect(harness.counter("authz_jwks_fetches_total", [("issuer", "idp"), ("outcome", "ok")]) == 2)
        #expect(harness.counter("authz_jwks_fetches_total", [("issuer", "idp"), ("outcome", "error")]) == 1)
    }

    @Test("keys never obtained are a 503, retried at most once a second; a removed key stops verifying after the refresh")
    func keysUnavailable() async throws {
        let harness = try Harness()
        harness.keys.fail(true)
        let token = TestKeys.token(claims: JWTFixtures.claims(harness.now))
        #expect(Self.describe(await harness.decide(token)) == "fault:keys_unavailable")
        #expect(Self.describe(await harness.decide(token + "")) == "fault:keys_unavailable")
        #expect(harness.keys.fetches == 1)
        harness.clock.advance(by: 1.5)
        harness.keys.fail(false)
        #expect(Self.describe(await harness.decide(token)) == "allow")
        #expect(harness.keys.fetches == 2)

        // The key is withdrawn at the AS; after jwks_cache_seconds the set is refreshed in the
        // background and new tokens signed by it are refused.
        harness.keys.serve(TestKeys.jwks([TestKeys.jwk(TestKeys.p256, kid: "ec-1")]))
        harness.clock.advance(by: 301)
        let second = TestKeys.token(claims: JWTFixtures.claims(harness.now, ["jti": "x"]))
        _ = await harness.decide(second)  // starts the background refresh, decided on the old set
        for _ in 0..<200 where harness.sidecar.authorizer.issuers[0].keys?.current?.keys.count != 1 {
            try await Task.sleep(for: .milliseconds(10))
        }
        let third = TestKeys.token(claims: JWTFixtures.claims(harness.now, ["jti": "y"]))
        #expect(Self.describe(await harness.decide(third)) == "jwt_invalid")
    }

    @Test("1,000 concurrent first requests for one new JWT: one verification, one key fetch, no AS call")
    func burst() async throws {
        let harness = try Harness()
        let token = TestKeys.token(claims: JWTFixtures.claims(harness.now))
        let outcomes = await withTaskGroup(of: String.self) { group in
            for _ in 0..<1000 { group.addTask { Self.describe(await harness.decide(token)) } }
            return await group.reduce(into: [String: Int]()) { $0[$1, default: 0] += 1 }
        }
        #expect(outcomes == ["allow": 1000])
        #expect(harness.counter("authz_jwt_verifications_total", [("issuer", "idp"), ("outcome", "valid")]) == 1)
        #expect(harness.keys.fetches == 1)
        #expect(harness.introspector.count == 0)
    }

    static let mixed = """
        introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
        issuers:
          - name: idp
            issuer: \(JWTFixtures.issuer)
            audiences: [api]
        policies:
          - name: both
            match: { path_prefix: /both/ }
          - name: jwt-only
            match: { path_prefix: /jwt/ }
            issuers: [idp]
          - name: introspection-only
            match: { path_prefix: /opaque/ }
            issuers: [default]
        """

    @Test("routing: a JWT by its iss, anything else to the introspection issuer; policies restrict issuers")
    func routing() async throws {
        let harness = try Harness(yaml: Self.mixed, introspection: { token in
            token == "opaque-good" ? TokenInfo(active: true, scope: "read", exp: 2_000_000_000) : .inactive
        })
        let jwt = TestKeys.token(claims: JWTFixtures.claims(harness.now))
        let foreign = TestKeys.token(claims: JWTFixtures.claims(harness.now, ["iss": "https://elsewhere.test"]))
        #expect(Self.describe(await harness.decide(jwt, path: "/both/x")) == "allow")
        #expect(harness.introspector.count == 0)
        #expect(Self.describe(await harness.decide("opaque-good", path: "/both/x")) == "allow")
        #expect(harness.introspector.count == 1)
        #expect(Self.describe(await harness.decide(foreign, path: "/both/x")) == "inactive")  // to the AS, which does not know it
        #expect(harness.introspector.count == 2)
        #expect(Self.describe(await harness.decide("opaque-good", path: "/jwt/x")) == "jwt_invalid")
        #expect(Self.describe(await harness.decide(jwt, path: "/jwt/x")) == "allow")
        #expect(Self.describe(await harness.decide(jwt, path: "/opaque/x")) == "inactive")  // the AS decides
        #expect(harness.introspector.count == 3)
        // A forged JWT naming the JWT issuer never reaches the AS.
        #expect(Self.describe(await harness.decide(jwt + "x", path: "/both/x")) == "jwt_invalid")
        let none = TestKeys.token(header: #"{"alg":"none","typ":"at+jwt"}"#, claims: TestKeys.json(JWTFixtures.claims(harness.now)), key: nil, alg: "none")
        #expect(Self.describe(await harness.decide(none, path: "/both/x")) == "jwt_invalid")
        #expect(harness.introspector.count == 3)
        // Purge reaches the JWT issuer's cache.
        let purged = harness.sidecar.admin.respond(method: .post, path: "/admin/cache/purge", body: ByteBuffer(string: #"{"all":true}"#))
        #expect(purged?.status == .ok)
        #expect(harness.sidecar.authorizer.issuers.allSatisfy { $0.cache.count == 0 })
    }

    @Test("jwt_then_introspect: a forgery never reaches the AS; a verified token is introspected and the AS decides")
    func verifyThenIntrospect() async throws {
        let yaml = """
            issuers:
              - name: idp
                issuer: \(JWTFixtures.issuer)
                validation: jwt_then_introspect
                audiences: [api]
                introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
            policies:
              - name: api
                match: { path_prefix: / }
            """
        let revoked = NIOLockedValueBox(false)
        let harness = try Harness(yaml: yaml, introspection: { _ in
            revoked.withLockedValue { $0 } ? .inactive : TokenInfo(active: true, scope: "read", clientID: "device-1", exp: 2_000_000_000, aud: ["api"])
        })
        let token = TestKeys.token(claims: JWTFixtures.claims(harness.now))
        #expect(Self.describe(await harness.decide(token + "x")) == "jwt_invalid")
        #expect(harness.introspector.count == 0)
        #expect(Self.describe(await harness.decide(token)) == "allow")
        #expect(harness.introspector.count == 1)
        revoked.withLockedValue { $0 = true }
        _ = harness.sidecar.admin.purge(ByteBuffer(string: #"{"all":true}"#))
        #expect(Self.describe(await harness.decide(token)) == "inactive")
        #expect(harness.introspector.count == 2)
    }

    @Test("configuration errors name the key: HS*/none, two introspection issuers, missing audiences, unknown names")
    func configurationErrors() {
        let issuer = "  - { name: idp, issuer: \(JWTFixtures.issuer), audiences: [api] }\n"
        let policy = "policies:\n  - { name: p, match: { path_prefix: / } }\n"
        let rows: [(String, String)] = [
            ("issuers:\n  - { name: idp, issuer: \(JWTFixtures.issuer), audiences: [api], algorithms: [HS256] }\n" + policy, "issuers[0].algorithms[0]: none and HS* are never accepted"),
            ("issuers:\n  - { name: idp, issuer: \(JWTFixtures.issuer), audiences: [api], algorithms: [none, RS256] }\n" + policy, "never accepted"),
            ("issuers:\n  - { name: idp, issuer: \(JWTFixtures.issuer) }\n" + policy, "issuers[0].audiences: is required for JWT validation"),
            ("issuers:\n  - { name: idp, audiences: [api] }\n" + policy, "issuers[0].issuer: is required"),
            ("issuers:\n  - { name: a, validation: introspection }\n" + policy, "issuers[0].introspection: is required"),
            ("issuers:\n" + issuer + "policies:\n  - { name: p, issuers: [nope] }\n", "policies[0].issuers[0]: names no issuer"),
            ("introspection: { endpoint: http://127.0.0.1:1/i, client_id: c, client_secret: s }\nissuers:\n  - { name: default, issuer: https://x.test, audiences: [a] }\n" + policy, "issuers[0].name: default is the top-level"),
            ("issuers:\n" + issuer + issuer + policy, "issuers[1].name: is the name of issuers[0] too"),
            ("introspection: { endpoint: http://127.0.0.1:1/i, client_id: c, client_secret: s }\nissuers:\n  - { name: b, validation: introspection, introspection: { endpoint: http://127.0.0.1:2/i, client_id: c, client_secret: s } }\n" + policy, "policies[0]: accepts the introspection issuers default and b"),
            ("issuers:\n" + issuer + "  - { name: idp2, issuer: \(JWTFixtures.issuer), audiences: [api] }\n" + policy, "accepts the JWT issuers idp and idp2 with the same issuer URL"),
            ("issuers:\n  - { name: idp, issuer: http://idp.example, audiences: [api] }\n" + policy, "plain http to a non-loopback host requires insecure: true"),
            ("issuers:\n" + issuer + "policies:\n  - { name: p, required_claims: { groups: { nested: 1 } } }\n", "policies[0].required_claims.groups: must be a string, number or boolean"),
            (policy, "introspection: is required (or issuers:)"),
        ]
        for (yaml, expected) in rows {
            do {
                _ = try SidecarConfiguration.parse(yaml: yaml)
                Issue.record("accepted: \(yaml)")
            } catch let error as ConfigurationError {
                #expect(error.problems.contains { $0.contains(expected) }, "\(expected) in \(error.problems)")
            } catch {
                Issue.record("\(error)")
            }
        }
    }

    @Test("check-config prints the issuers, and what it prints reads back as the same configuration")
    func effective() throws {
        let configuration = try SidecarConfiguration.parse(yaml: Self.mixed + "\n    required_claims: { tenant: [acme, 7], admin: true }\n")
        let printed = configuration.effectiveYAML
        #expect(printed.contains("issuers:\n  - name: \"idp\"\n"))
        #expect(printed.contains("validation: jwt"))
        let reread = try SidecarConfiguration.parse(yaml: printed.replacingOccurrences(of: "\"<redacted>\"", with: "s"))
        #expect(reread == configuration)
        #expect(reread.policies[2].requiredClaims == [RequiredClaim(name: "tenant", values: [.string("acme"), .integer(7)]), RequiredClaim(name: "admin", values: [.bool(true)])])
    }

    @Test("reload keeps an unchanged issuer's cache and keys, and drops a changed one's")
    func reload() async throws {
        let harness = try Harness(yaml: Self.mixed, introspection: { _ in TokenInfo(active: true, exp: 2_000_000_000) })
        let token = TestKeys.token(claims: JWTFixtures.claims(harness.now))
        #expect(Self.describe(await harness.decide(token, path: "/both/x")) == "allow")
        let before = harness.sidecar.authorizer.issuers
        let policyOnly = Self.mixed.replacingOccurrences(of: "path_prefix: /both/", with: "path_prefix: /both2/")
        #expect(harness.sidecar.reload(to: try SidecarConfiguration.parse(yaml: policyOnly), introspector: nil) == .kept)
        #expect(zip(before, harness.sidecar.authorizer.issuers).allSatisfy { $0 === $1 })
        #expect(harness.sidecar.authorizer.cache(for: "idp")?.cached(TokenDigest(token: token)) != nil)
        let audienceChanged = policyOnly.replacingOccurrences(of: "audiences: [api]", with: "audiences: [api, other]")
        #expect(harness.sidecar.reload(to: try SidecarConfiguration.parse(yaml: audienceChanged), introspector: nil) == .dropped)
        #expect(harness.sidecar.authorizer.issuers[0] === before[0])  // default unchanged
        #expect(harness.sidecar.authorizer.issuers[1] !== before[1])
        #expect(before[1].cache.count == 0)  // the dropped cache was purged
        #expect(harness.keys.fetches == 1)
        #expect(Self.describe(await harness.decide(token, path: "/both2/x")) == "allow")
        #expect(harness.keys.fetches == 2)  // a new issuer fetches its keys afresh
    }

    @Test("a JWT is verified on the calling thread once the keys are in hand; the first, which fetches them, is not")
    func withoutSuspending() async throws {
        let harness = try Harness()
        let first = TestKeys.token(claims: JWTFixtures.claims(harness.now, ["jti": "1"]))
        #expect(harness.sidecar.authorizer.answerWithoutSuspending(JWTFixtures.request(first)) == nil)  // no keys yet
        #expect(await harness.answer(first).status == 200)
        let second = TestKeys.token(alg: "ES256", kid: "ec-1", claims: JWTFixtures.claims(harness.now, ["jti": "2"]), key: TestKeys.p256)
        #expect(harness.sidecar.authorizer.answerWithoutSuspending(JWTFixtures.request(second))?.status == 200)
        #expect(harness.sidecar.authorizer.answerWithoutSuspending(JWTFixtures.request(second + "x"))?.status == 401)
        #expect(harness.sidecar.authorizer.issuers[0].cache.cached(TokenDigest(token: second)) != nil)  // cached as verified
        // An unknown kid with a refetch due needs the key set: not decided here.
        harness.clock.advance(by: 31)
        let rotated = TestKeys.token(kid: "new", claims: JWTFixtures.claims(harness.now, ["jti": "3"]))
        #expect(harness.sidecar.authorizer.answerWithoutSuspending(JWTFixtures.request(rotated)) == nil)
        #expect(harness.counter("authz_jwt_verifications_total", [("issuer", "idp"), ("outcome", "valid")]) == 2)
    }

    @Test("a policy accepting two JWT issuers and no introspection issuer: a token of neither is no_issuer")
    func noIssuer() async throws {
        let yaml = """
            issuers:
              - { name: idp, issuer: \(JWTFixtures.issuer), audiences: [api] }
              - { name: other, issuer: https://other.test, audiences: [api] }
            policies:
              - { name: api, match: { path_prefix: / } }
            """
        let harness = try Harness(yaml: yaml)
        #expect(Self.describe(await harness.decide("opaque")) == "no_issuer")
        #expect(Self.describe(await harness.decide(TestKeys.token(claims: JWTFixtures.claims(harness.now, ["iss": "https://third.test"])))) == "no_issuer")
        #expect(Self.describe(await harness.decide(TestKeys.token(claims: JWTFixtures.claims(harness.now)))) == "allow")
        let denied = await harness.answer("opaque")
        #expect(denied.status == 401 && denied.headers.first(name: "WWW-Authenticate") == #"Bearer realm="authz-sidecar", error="invalid_token""#)
    }

    @Test("jwt_then_introspect keeps what the JWT proves when the introspection answer leaves it out")
    func verifiedBindingKept() async throws {
        let yaml = """
            issuers:
              - name: idp
                issuer: \(JWTFixtures.issuer)
                validation: jwt_then_introspect
                audiences: [api]
                introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
            policies:
              - { name: api, match: { path_prefix: / }, certificate_header: X-Client-Cert }
            """
        // The AS says active but leaves out cnf and aud.
        let harness = try Harness(yaml: yaml, introspection: { _ in TokenInfo(active: true, scope: "read", tokenType: "bearer", exp: 2_000_000_000) })
        let bound = TestKeys.token(claims: JWTFixtures.claims(harness.now, ["cnf": ["x5t#S256": Fixtures.thumbprint("client1.pem")]]))
        #expect(Self.describe(await harness.decide(bound)) == "certificate_missing")
        let answer = await harness.sidecar.authorizer.answer({
            var request = JWTFixtures.request(bound)
            request.headers.add(name: "X-Client-Cert", value: Fixtures.escaped("client1.pem"))
            return request
        }())
        #expect(answer.status == 200)
        #expect(answer.headers.first(name: "X-Credential-Token-Type") == "Bearer")
        #expect(answer.headers.first(name: "X-Credential-Aud") == "api")
    }

    @Test("a discovered jwks_uri must be https, or http to loopback")
    func discoveredURLs() {
        for url in ["http://127.0.0.1:8080/jwks", "http://localhost/jwks", "http://[::1]:9/k", "http://127.9.9.9/x", "http://u@127.0.0.1/x"] {
            #expect(HTTPKeySetFetcher.isLoopbackURL(url), "\(url)")
        }
        for url in ["http://idp.example/jwks", "http://127.0.0.1.evil.test/jwks", "http://10.0.0.1/k", "https://127.0.0.1/x", "http://127.0.0.1@evil.test/x", "http://[::2]/k"] {
            #expect(!HTTPKeySetFetcher.isLoopbackURL(url), "\(url)")
        }
        let issuer = IssuerConfiguration(name: "k", issuer: "https://kc.example/realms/demo/", validation: .jwt)
        #expect(issuer.discoveryURLs == ["https://kc.example/realms/demo/.well-known/openid-configuration", "https://kc.example/.well-known/oauth-authorization-server/realms/demo"])
    }

    /// An AS whose introspection answers are whatever the test signs (RFC 9701).
    final class SignedAS: RawTokenIntrospector {
        let answer: @Sendable (String) -> String
        let calls = NIOLockedValueBox(0)
        init(_ answer: @escaping @Sendable (String) -> String) { self.answer = answer }
        func introspectRaw(_ token: String) async throws(IntrospectionError) -> [UInt8] {
            calls.withLockedValue { $0 += 1 }
            return Array(answer(token).utf8)
        }
        func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
            throw .transport("a signed-answer AS is read through introspectRaw")
        }
    }

    @Test("RFC 9701 signed introspection: believed only when signature, typ, iss, aud and iat hold; anything else is a fault")
    func signedIntrospection() async throws {
        let yaml = """
            issuers:
              - name: idp
                issuer: \(JWTFixtures.issuer)
                validation: introspection
                introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: rs-client, client_secret: s, response_format: jwt }
            policies:
              - { name: api, match: { path_prefix: / }, required_scopes: [read] }
            """
        let now = 1_800_000_000
        func signed(typ: String? = "token-introspection+jwt", iss: String = JWTFixtures.issuer, aud: Any = "rs-client", iat: Int = now,
                    members: [String: Any] = ["active": true, "scope": "read", "client_id": "device-1", "exp": now + 600, "iss": JWTFixtures.issuer], key: TestKeys.Private = TestKeys.rsa, kid: String = "rsa-1") -> String {
            TestKeys.token(alg: key == TestKeys.rsa || key == TestKeys.rsaOther ? "RS256" : "ES256", kid: kid, typ: typ,
                           claims: ["iss": iss, "aud": aud, "iat": iat, "token_introspection": members], key: key)
        }
        let rows: [(String, String, String)] = [
            ("a good signed answer", signed(), "allow"),
            ("aud an array naming us", signed(aud: ["other", "rs-client"]), "allow"),
            ("a signed inactive answer", signed(members: ["active": false]), "inactive"),
            ("Glewlwyd's aud: the token's own audience", signed(aud: "system-access"), "fault:malformed"),
            ("typ JWT", signed(typ: "JWT"), "fault:malformed"),
            ("no typ", signed(typ: nil), "fault:malformed"),
            ("another iss", signed(iss: "https://evil.test"), "fault:malformed"),
            ("iat an hour old", signed(iat: now - 3600), "fault:malformed"),
            ("signed by another key", signed(key: TestKeys.rsaOther), "fault:malformed"),
            ("unknown kid", signed(kid: "nope"), "fault:malformed"),
            ("plain JSON (the AS ignored Accept)", #"{"active":true,"scope":"read"}"#, "fault:malformed"),
            ("no token_introspection", TestKeys.token(claims: ["iss": JWTFixtures.issuer, "aud": "rs-client", "iat": now, "typ": "x"]).replacingOccurrences(of: "at+jwt", with: "x"), "fault:malformed"),
        ]
        for (name, body, expected) in rows {
            let clock = TestClock(Double(now))
            let configuration = try SidecarConfiguration.parse(yaml: yaml)
            let keys = TestKeySource(JWTFixtures.standardKeys)
            let sidecar = Sidecar(
                configuration: configuration, introspector: nil,
                backends: ["idp": IssuerBackends(introspector: SignedAS { _ in body }, keys: keys.backends.keys)],
                clock: clock, metrics: NOOPMetricsHandler.instance
            )
            let outcome = await sidecar.authorizer.authorize(JWTFixtures.request("opaque-token")).0
            #expect(Self.describe(outcome) == expected, "\(name)")
        }
        do {
            _ = try SidecarConfiguration.parse(yaml: "introspection: { endpoint: http://127.0.0.1:1/i, client_id: c, client_secret: s, response_format: jwt }\npolicies:\n  - { name: p }\n")
            Issue.record("response_format: jwt without expected_issuer was accepted")
        } catch let error as ConfigurationError {
            #expect(error.problems.contains { $0.hasPrefix("introspection.expected_issuer: is required for response_format: jwt") })
        }
    }

    @Test("key sets are fetched ahead of the first token; /readyz says when an issuer has none")
    func readiness() async throws {
        let harness = try Harness()
        harness.keys.fail(true)
        let keys = try #require(harness.sidecar.authorizer.issuers[0].keys)
        #expect(harness.sidecar.admin.respond(method: .get, path: "/readyz", body: nil)?.status == .ok)  // not tried yet
        await keys.prefetch()
        #expect(harness.keys.fetches == 1)
        let down = harness.sidecar.admin.respond(method: .get, path: "/readyz", body: nil)
        #expect(down?.status == .serviceUnavailable)
        #expect(down.map { String(buffer: $0.body) }?.contains("issuer idp: no signing keys obtained") == true)
        await keys.prefetch()
        #expect(harness.keys.fetches == 1)  // at most once a second while there are none
        harness.keys.fail(false)
        harness.clock.advance(by: 1.5)
        await keys.prefetch()
        #expect(harness.keys.fetches == 2)
        #expect(harness.sidecar.admin.respond(method: .get, path: "/readyz", body: nil)?.status == .ok)
        // The first token is decided on the calling thread: the keys are already in hand.
        let token = TestKeys.token(claims: JWTFixtures.claims(harness.now))
        #expect(harness.sidecar.authorizer.answerWithoutSuspending(JWTFixtures.request(token))?.status == 200)
        await keys.prefetch()
        #expect(harness.keys.fetches == 2)  // nothing to do once a set is in hand
    }
}
