@testable import AuthzSidecar
import Crypto
import Foundation
import HTTPTypes
import Introspection
import JOSE
import JWTValidation
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import Testing

@Suite("DPoP (RFC 9449): proofs checked on every request, bound tokens, nonces")
struct DPoPTests {
    static let yaml = """
        issuers:
          - name: idp
            issuer: \(JWTFixtures.issuer)
            audiences: [api]
        server:
          dpop_algorithms: [ES256, PS256, RS256, EdDSA]
        policies:
          - { name: required, match: { path_prefix: /required/ }, dpop: required }
          - { name: disabled, match: { path_prefix: /disabled/ }, dpop: disabled }
          - { name: nonce, match: { path_prefix: /nonce/ }, dpop_nonce: true }
          - { name: based, match: { path_prefix: /based/ }, public_base_url: "https://API.example.com:443/" }
          - { name: cached, match: { path_prefix: /cached/ }, proxy_cache_seconds: 30 }
          - { name: api, match: { path_prefix: / } }
        """

    static let host = "api.example.com"

    static func thumbprint(_ key: TestKeys.Private) -> String {
        try! JSONWebKey(members: TestKeys.jwk(key, kid: nil).mapValues(JSONValue.string)).thumbprint
    }

    static func ath(_ token: String) -> String { Base64URL.encode(Array(SHA256.hash(data: Array(token.utf8)))) }

    /// A proof; every member can be changed or removed.
    static func proof(
        _ key: TestKeys.Private = TestKeys.p256, alg: String = "ES256", typ: String? = "dpop+jwt", jwk: [String: Any]? = nil,
        signer: TestKeys.Private? = nil, claims: [String: Any], removing: [String] = []
    ) -> String {
        var header: [String: Any] = ["alg": alg, "jwk": jwk ?? TestKeys.jwk(key, kid: nil)]
        if let typ { header["typ"] = typ }
        var body = claims
        for name in removing { body.removeValue(forKey: name) }
        return TestKeys.token(header: TestKeys.json(header), claims: TestKeys.json(body), key: signer ?? key, alg: alg)
    }

    static func claims(_ now: Double, token: String, method: String = "GET", url: String = "https://\(host)/api/x", _ changes: [String: Any] = [:]) -> [String: Any] {
        var claims: [String: Any] = ["jti": UUID().uuidString, "htm": method, "htu": url, "iat": Int(now), "ath": ath(token)]
        for (name, value) in changes { claims[name] = value }
        return claims
    }

    /// A DPoP-bound JWT access token for `key`.
    static func token(_ now: Double, boundTo key: TestKeys.Private? = TestKeys.p256) -> String {
        var changes: [String: Any] = ["jti": UUID().uuidString]
        if let key { changes["cnf"] = ["jkt": thumbprint(key)] }
        return TestKeys.token(claims: JWTFixtures.claims(now, changes))
    }

    static func request(_ token: String, scheme: String = "DPoP", proofs: [String], path: String = "/api/x", method: String = "GET", proto: String? = "https", host: String = host) -> AccessRequest {
        var headers = HTTPHeaders()
        headers.add(name: "Authorization", value: "\(scheme) \(token)")
        for proof in proofs { headers.add(name: "DPoP", value: proof) }
        if let proto { headers.add(name: "X-Forwarded-Proto", value: proto) }
        return AccessRequest(front: .nginx, method: method, path: path, host: host, headers: headers)
    }

    static func harness() throws -> JWTAccessTokenTests.Harness {
        try JWTAccessTokenTests.Harness(yaml: yaml)
    }

    static func outcome(_ harness: JWTAccessTokenTests.Harness, _ request: AccessRequest) async -> String {
        JWTAccessTokenTests.describe(await harness.sidecar.authorizer.authorize(request).0)
    }

    typealias Row = (name: String, expected: String, build: @Sendable (Double) -> AccessRequest)

    static let rows: [Row] = {
        let c: @Sendable (Double, String, [String: Any]) -> [String: Any] = { claims($0, token: $1, $2) }
        let t: @Sendable (Double) -> String = { token($0) }
        func simple(_ name: String, _ expected: String, _ changes: @escaping @Sendable (Double, String) -> [String: Any]) -> Row {
            (name, expected, { now in let tok = t(now); return request(tok, proofs: [proof(claims: c(now, tok, changes(now, tok)))]) })
        }
        return [
            simple("a good ES256 proof", "allow") { _, _ in [:] },
            ("a good EdDSA proof", "allow", { now in let tok = token(now, boundTo: TestKeys.ed25519); return request(tok, proofs: [proof(TestKeys.ed25519, alg: "EdDSA", claims: c(now, tok, [:]))]) }),
            ("a good RS256 proof", "allow", { now in let tok = token(now, boundTo: TestKeys.rsa); return request(tok, proofs: [proof(TestKeys.rsa, alg: "RS256", claims: c(now, tok, [:]))]) }),
            ("a good PS256 proof", "allow", { now in let tok = token(now, boundTo: TestKeys.rsa); return request(tok, proofs: [proof(TestKeys.rsa, alg: "PS256", claims: c(now, tok, [:]))]) }),
            ("ES384: not on dpop_algorithms", "dpop_proof", { now in let tok = token(now, boundTo: TestKeys.p384); return request(tok, proofs: [proof(TestKeys.p384, alg: "ES384", claims: c(now, tok, [:]))]) }),
            simple("htu with a query and a fragment (ignored)", "allow") { _, _ in ["htu": "https://\(host)/api/x?a=1#f"] },
            simple("htu with the default port and upper-case host", "allow") { _, _ in ["htu": "HTTPS://API.Example.COM:443/api/x"] },
            simple("htu with a percent-encoded unreserved character", "allow") { _, _ in ["htu": "https://\(host)/api/%78"] },
            simple("htu with a dot segment", "allow") { _, _ in ["htu": "https://\(host)/api/y/../x"] },
            simple("htu over http", "dpop_proof") { _, _ in ["htu": "http://\(host)/api/x"] },
            simple("htu with another port", "dpop_proof") { _, _ in ["htu": "https://\(host):8443/api/x"] },
            simple("htu with a trailing slash", "dpop_proof") { _, _ in ["htu": "https://\(host)/api/x/"] },
            simple("htu of another host", "dpop_proof") { _, _ in ["htu": "https://evil.example/api/x"] },
            simple("htu of another path", "dpop_proof") { _, _ in ["htu": "https://\(host)/api/y"] },
            simple("htu path case differs", "dpop_proof") { _, _ in ["htu": "https://\(host)/API/x"] },
            simple("htu not a URL", "dpop_proof") { _, _ in ["htu": "api/x"] },
            simple("htu a number", "dpop_proof") { _, _ in ["htu": 7] },
            simple("htm lower-case", "dpop_proof") { _, _ in ["htm": "get"] },
            simple("htm another method", "dpop_proof") { _, _ in ["htm": "POST"] },
            simple("iat 55 s old (inside 60 s)", "allow") { now, _ in ["iat": Int(now) - 55] },
            simple("iat 65 s old", "dpop_proof") { now, _ in ["iat": Int(now) - 65] },
            simple("iat 4 s ahead (inside 5 s)", "allow") { now, _ in ["iat": Int(now) + 4] },
            simple("iat 7 s ahead", "dpop_proof") { now, _ in ["iat": Int(now) + 7] },
            simple("iat a string", "dpop_proof") { now, _ in ["iat": "\(Int(now))"] },
            simple("ath of another token", "dpop_proof") { now, _ in ["ath": ath("another-token")] },
            ("ath missing", "dpop_proof", { now in let tok = t(now); return request(tok, proofs: [proof(claims: c(now, tok, [:]), removing: ["ath"])]) }),
            ("jti missing", "dpop_proof", { now in let tok = t(now); return request(tok, proofs: [proof(claims: c(now, tok, [:]), removing: ["jti"])]) }),
            simple("jti empty", "dpop_proof") { _, _ in ["jti": ""] },
            simple("jti of 300 bytes", "dpop_proof") { _, _ in ["jti": String(repeating: "j", count: 300)] },
            ("htm missing", "dpop_proof", { now in let tok = t(now); return request(tok, proofs: [proof(claims: c(now, tok, [:]), removing: ["htm"])]) }),
            ("typ JWT", "dpop_proof", { now in let tok = t(now); return request(tok, proofs: [proof(typ: "JWT", claims: c(now, tok, [:]))]) }),
            ("typ missing", "dpop_proof", { now in let tok = t(now); return request(tok, proofs: [proof(typ: nil, claims: c(now, tok, [:]))]) }),
            ("jwk with its private d", "dpop_proof", { now in
                let tok = t(now)
                var jwk: [String: Any] = TestKeys.jwk(TestKeys.p256, kid: nil)
                jwk["d"] = "AAAA"
                return request(tok, proofs: [proof(jwk: jwk, claims: c(now, tok, [:]))])
            }),
            ("jwk of key A, signed by key B", "dpop_proof", { now in let tok = t(now); return request(tok, proofs: [proof(signer: TestKeys.p256Other, claims: c(now, tok, [:]))]) }),
            ("an RSA jwk for ES256", "dpop_proof", { now in let tok = t(now); return request(tok, proofs: [proof(jwk: TestKeys.jwk(TestKeys.rsa, kid: nil), claims: c(now, tok, [:]))]) }),
            ("alg none", "dpop_proof", { now in
                let tok = t(now)
                let header = TestKeys.json(["alg": "none", "typ": "dpop+jwt", "jwk": TestKeys.jwk(TestKeys.p256, kid: nil)])
                return request(tok, proofs: [TestKeys.token(header: header, claims: TestKeys.json(c(now, tok, [:])), key: nil, alg: "none")])
            }),
            ("no DPoP header", "dpop_proof", { now in request(t(now), proofs: []) }),
            ("two DPoP headers", "dpop_proof", { now in let tok = t(now); return request(tok, proofs: [proof(claims: c(now, tok, [:])), proof(claims: c(now, tok, [:]))]) }),
            ("a proof over 8 KiB", "dpop_proof", { now in let tok = t(now); return request(tok, proofs: [proof(claims: c(now, tok, ["pad": String(repeating: "p", count: 9000)]))]) }),
            ("a proof that is not a JWS", "dpop_proof", { now in request(t(now), proofs: ["not.a.jws.at.all"]) }),
            ("the token bound to another key", "binding_mismatch", { now in let tok = token(now, boundTo: TestKeys.p256Other); return request(tok, proofs: [proof(claims: c(now, tok, [:]))]) }),
            ("an unbound token with the DPoP scheme", "dpop_unbound", { now in let tok = token(now, boundTo: nil); return request(tok, proofs: [proof(claims: c(now, tok, [:]))]) }),
            ("a DPoP-bound token sent as Bearer", "unsupported_binding", { now in request(t(now), scheme: "Bearer", proofs: []) }),
            ("a DPoP-bound token as Bearer, with a proof beside it", "unsupported_binding", { now in let tok = t(now); return request(tok, scheme: "Bearer", proofs: [proof(claims: c(now, tok, [:]))]) }),
            ("an unbound Bearer token with a DPoP header beside it", "allow", { now in let tok = token(now, boundTo: nil); return request(tok, scheme: "Bearer", proofs: [proof(claims: c(now, tok, [:]))]) }),
            ("dpop: required, a Bearer token", "dpop_required", { now in request(token(now, boundTo: nil), scheme: "Bearer", proofs: [], path: "/required/x") }),
            ("dpop: required, a DPoP token", "allow", { now in let tok = t(now); return request(tok, proofs: [proof(claims: c(now, tok, ["htu": "https://\(host)/required/x"]))], path: "/required/x") }),
            ("dpop: disabled, the DPoP scheme", "dpop_unsupported", { now in let tok = t(now); return request(tok, proofs: [proof(claims: c(now, tok, ["htu": "https://\(host)/disabled/x"]))], path: "/disabled/x") }),
            ("public_base_url decides, not X-Forwarded-Proto or the host", "allow", { now in
                let tok = t(now)
                return request(tok, proofs: [proof(claims: c(now, tok, ["htu": "https://api.example.com/based/x"]))], path: "/based/x", proto: "http", host: "internal:8080")
            }),
            ("public_base_url: a proof for the forwarded URL is refused", "dpop_proof", { now in
                let tok = t(now)
                return request(tok, proofs: [proof(claims: c(now, tok, ["htu": "http://internal:8080/based/x"]))], path: "/based/x", proto: "http", host: "internal:8080")
            }),
            ("X-Forwarded-Proto http: the proof must say http", "allow", { now in
                let tok = t(now)
                return request(tok, proofs: [proof(claims: c(now, tok, ["htu": "http://\(host)/api/x"]))], proto: "http")
            }),
            ("no X-Forwarded-Proto: https", "allow", { now in let tok = t(now); return request(tok, proofs: [proof(claims: c(now, tok, [:]))], proto: nil) }),
            ("an original host with ? cannot shorten the URL", "dpop_proof", { now in
                let tok = t(now)
                return request(tok, proofs: [proof(claims: c(now, tok, ["htu": "https://\(host)/"]))], host: host + "?")
            }),
            ("an original host with / cannot move the path", "dpop_proof", { now in
                let tok = t(now)
                return request(tok, proofs: [proof(claims: c(now, tok, ["htu": "https://\(host)/x/api/x"]))], host: host + "/x")
            }),
            ("an original host with @", "dpop_proof", { now in
                let tok = t(now)
                return request(tok, proofs: [proof(claims: c(now, tok, ["htu": "https://\(host)/api/x"]))], host: "someone@" + host)
            }),
            ("X-Forwarded-Proto ftp", "dpop_proof", { now in
                let tok = t(now)
                return request(tok, proofs: [proof(claims: c(now, tok, ["htu": "ftp://\(host)/api/x"]))], proto: "ftp")
            }),
        ]
    }()

    @Test("each proof row is decided as expected", arguments: rows.indices)
    func table(_ index: Int) async throws {
        let harness = try Self.harness()
        let row = Self.rows[index]
        #expect(await Self.outcome(harness, row.build(harness.now)) == row.expected, "\(row.name)")
        #expect(harness.introspector.count == 0)
    }

    @Test("a proof is good once: a replay is refused, the same jti with another key is not")
    func replay() async throws {
        let harness = try Self.harness()
        let token = Self.token(harness.now)
        let claims = Self.claims(harness.now, token: token)
        let proof = Self.proof(claims: claims)
        #expect(await Self.outcome(harness, Self.request(token, proofs: [proof])) == "allow")
        #expect(await Self.outcome(harness, Self.request(token, proofs: [proof])) == "dpop_proof")
        let other = Self.token(harness.now, boundTo: TestKeys.ed25519)
        var sameJTI = Self.claims(harness.now, token: other)
        sameJTI["jti"] = claims["jti"]
        #expect(await Self.outcome(harness, Self.request(other, proofs: [Self.proof(TestKeys.ed25519, alg: "EdDSA", claims: sameJTI)])) == "allow")
        // A header accepted before is remembered, but every proof's signature is still checked:
        // the same header (key A's jwk) over a signature by key B is refused.
        let forged = Self.proof(signer: TestKeys.p256Other, claims: Self.claims(harness.now, token: token))
        #expect(forged.split(separator: ".")[0] == proof.split(separator: ".")[0])
        #expect(await Self.outcome(harness, Self.request(token, proofs: [forged])) == "dpop_proof")
        let tampered = Self.proof(claims: Self.claims(harness.now, token: token)).split(separator: ".")
        let otherClaims = Base64URL.encode(Array(TestKeys.json(Self.claims(harness.now, token: token)).utf8))
        #expect(await Self.outcome(harness, Self.request(token, proofs: [[tampered[0], Substring(otherClaims), tampered[2]].joined(separator: ".")])) == "dpop_proof")
        #expect(await Self.outcome(harness, Self.request(token, proofs: [Self.proof(claims: Self.claims(harness.now, token: token))])) == "allow")
    }

    @Test("answers: DPoP challenges with algs; an allow is no-store with Token-Type DPoP and the key")
    func answers() async throws {
        let harness = try Self.harness()
        let authorizer = harness.sidecar.authorizer
        let token = Self.token(harness.now)
        let allowed = await authorizer.answer(Self.request(token, proofs: [Self.proof(claims: Self.claims(harness.now, token: token, url: "https://\(Self.host)/cached/x"))], path: "/cached/x"))
        #expect(allowed.status == 200)
        #expect(allowed.headers.first(name: "X-Credential-Token-Type") == "DPoP")
        #expect(allowed.headers.first(name: "X-Credential-Jkt") == Self.thumbprint(TestKeys.p256))
        #expect(allowed.headers.first(name: "Cache-Control") == "no-store")  // despite proxy_cache_seconds
        let algs = #"algs="ES256 PS256 RS256 EdDSA""#
        let badProof = await authorizer.answer(Self.request(token, proofs: []))
        #expect(badProof.status == 401)
        #expect(badProof.headers.first(name: "WWW-Authenticate") == #"DPoP realm="authz-sidecar", error="invalid_dpop_proof", "# + algs)
        #expect(badProof.body == #"{"data":[],"error":{"code":401,"message":"The resource owner or authorization server denied the request."}}"#)
        let unbound = Self.token(harness.now, boundTo: nil)
        let badToken = await authorizer.answer(Self.request(unbound, proofs: [Self.proof(claims: Self.claims(harness.now, token: unbound))]))
        #expect(badToken.headers.first(name: "WWW-Authenticate") == #"DPoP realm="authz-sidecar", error="invalid_token", "# + algs)
        let required = await authorizer.answer(Self.request(unbound, scheme: "Bearer", proofs: [], path: "/required/x"))
        #expect(required.status == 401 && required.headers.first(name: "WWW-Authenticate") == #"DPoP realm="authz-sidecar", "# + algs)
        let disabled = await authorizer.answer(Self.request(token, proofs: [], path: "/disabled/x"))
        #expect(disabled.headers.first(name: "WWW-Authenticate") == #"Bearer realm="authz-sidecar", error="invalid_request""#)
        let asBearer = await authorizer.answer(Self.request(token, scheme: "Bearer", proofs: []))
        #expect(asBearer.headers.first(name: "WWW-Authenticate") == #"Bearer realm="authz-sidecar", error="invalid_token""#)
        // The hot path (no suspension) checks the proof too, and never remembers a DPoP allow.
        let proof = Self.proof(claims: Self.claims(harness.now, token: token))
        #expect(authorizer.answerWithoutSuspending(Self.request(token, proofs: [proof]))?.status == 200)
        #expect(authorizer.answerWithoutSuspending(Self.request(token, proofs: [proof]))?.status == 401)
        // A remembered rendering is used for the next allow of the token: still DPoP, still its key.
        let again = authorizer.answerWithoutSuspending(Self.request(token, proofs: [Self.proof(claims: Self.claims(harness.now, token: token))]))
        #expect(again?.status == 200 && again?.headers.first(name: "X-Credential-Jkt") == Self.thumbprint(TestKeys.p256))
        #expect(again?.headers.first(name: "X-Credential-Token-Type") == "DPoP" && again?.headers.first(name: "Cache-Control") == "no-store")
    }

    @Test("server nonces: none or a stale one is use_dpop_nonce with a fresh DPoP-Nonce; the current and the previous are accepted")
    func nonces() async throws {
        let harness = try Self.harness()
        let authorizer = harness.sidecar.authorizer
        let url = "https://\(Self.host)/nonce/x"
        let token = Self.token(harness.now)
        let first = await authorizer.answer(Self.request(token, proofs: [Self.proof(claims: Self.claims(harness.now, token: token, url: url))], path: "/nonce/x"))
        #expect(first.status == 401)
        #expect(first.headers.first(name: "WWW-Authenticate")?.contains(#"error="use_dpop_nonce""#) == true)
        let nonce = try #require(first.headers.first(name: "DPoP-Nonce"))
        let second = await authorizer.answer(Self.request(token, proofs: [Self.proof(claims: Self.claims(harness.now, token: token, url: url, ["nonce": nonce]))], path: "/nonce/x"))
        #expect(second.status == 200)
        #expect(second.headers.first(name: "DPoP-Nonce") == nonce)  // every answer carries the current one
        harness.clock.advance(by: 61)  // the next window: the previous nonce is still good
        #expect(await Self.outcome(harness, Self.request(token, proofs: [Self.proof(claims: Self.claims(harness.now, token: token, url: url, ["nonce": nonce]))], path: "/nonce/x")) == "allow")
        harness.clock.advance(by: 60)  // two windows on: stale
        let fresh = Self.token(harness.now)
        #expect(await Self.outcome(harness, Self.request(fresh, proofs: [Self.proof(claims: Self.claims(harness.now, token: fresh, url: url, ["nonce": nonce]))], path: "/nonce/x")) == "dpop_nonce")
        #expect(await Self.outcome(harness, Self.request(fresh, proofs: [Self.proof(claims: Self.claims(harness.now, token: fresh, url: url, ["nonce": "made-up"]))], path: "/nonce/x")) == "dpop_nonce")
        // Replicas with the same key accept each other's nonces.
        let key = Array("a shared nonce key of at least 32 bytes".utf8)
        let a = DPoPVerifier(nonceKey: key), b = DPoPVerifier(nonceKey: key), c = DPoPVerifier()
        #expect(b.isValid(nonce: a.currentNonce(now: 1_000), now: 1_000))
        #expect(!c.isValid(nonce: a.currentNonce(now: 1_000), now: 1_000))
    }

    @Test("introspected tokens are DPoP-bound the same way")
    func introspected() async throws {
        let yaml = """
            introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
            policies:
              - { name: api, match: { path_prefix: / } }
            """
        let jkt = Self.thumbprint(TestKeys.p256)
        let sidecar = Sidecar(
            configuration: try SidecarConfiguration.parse(yaml: yaml),
            introspector: ClosureTokenIntrospector { _ in TokenInfo(active: true, tokenType: "DPoP", exp: 2_000_000_000, jwkThumbprint: jkt) },
            clock: TestClock(), metrics: NOOPMetricsHandler.instance
        )
        let now = TestClock().now()
        let proof = Self.proof(claims: Self.claims(now, token: "opaque-dpop-token"))
        // The listener asks without suspending first; a miss there must not use up the proof.
        #expect(sidecar.authorizer.answerWithoutSuspending(Self.request("opaque-dpop-token", proofs: [proof])) == nil)
        #expect(await sidecar.authorizer.answer(Self.request("opaque-dpop-token", proofs: [proof])).status == 200)
        #expect(await sidecar.authorizer.answer(Self.request("opaque-dpop-token", proofs: [proof])).status == 401)  // now a replay
        let other = Self.proof(TestKeys.p256Other, claims: Self.claims(now, token: "opaque-dpop-token"))
        #expect(JWTAccessTokenTests.describe(await sidecar.authorizer.authorize(Self.request("opaque-dpop-token", proofs: [other])).0) == "binding_mismatch")
    }

    @Test("URLs are compared after RFC 3986 normalisation")
    func urls() {
        let same: [(String, String)] = [
            ("https://a.example/x", "HTTPS://A.EXAMPLE:443/x"), ("http://a.example:80/x", "http://a.example/x"),
            ("https://a.example", "https://a.example/"), ("https://a.example/%7e", "https://a.example/~"),
            ("https://a.example/%2f", "https://a.example/%2F"), ("https://a.example/a/./b/../c", "https://a.example/a/c"),
            ("https://u:p@a.example/x", "https://a.example/x"), ("https://[::1]:443/x", "https://[::1]/x"),
        ]
        for (a, b) in same { #expect(DPoPURL.normalized(a) == DPoPURL.normalized(b) && DPoPURL.normalized(a) != nil, "\(a) \(b)") }
        let different: [(String, String)] = [
            ("https://a.example/x", "http://a.example/x"), ("https://a.example/x", "https://a.example:8443/x"),
            ("https://a.example/x", "https://a.example/x/"), ("https://a.example/X", "https://a.example/x"),
            ("https://a.example/%2F", "https://a.example//"),
        ]
        for (a, b) in different { #expect(DPoPURL.normalized(a) != DPoPURL.normalized(b), "\(a) \(b)") }
        for bad in ["ftp://a.example/x", "https:///x", "a.example/x", "https://a.example:99999/x", "https://a.example/%zz", "https://a b/x"] {
            #expect(DPoPURL.normalized(bad) == nil, "\(bad)")
        }
        #expect(DPoPURL.origin("https://API.example.com:443/") == "https://api.example.com")
        #expect(DPoPURL.origin("https://api.example.com/base") == nil)
        #expect(DPoPURL.origin("https://api.example.com?x") == nil)
    }

    @Test("the fast path for URLs already in normal form agrees with the full normalisation")
    func fastPathAgrees() {
        let schemes = ["https://", "http://", "HTTP://", "ftp://"]
        let hosts = ["a.example", "A.example", "a_b", "127.0.0.1", "[::1]", "u@a", "", "xn--bcher-kva.example"]
        let ports = ["", "", ":443", ":80", ":8443", ":0", ":", ":65536", ":08"]
        let path = ["/", "//", "/x", "/./", "/../", "/.", "/..", "/.x", "/..x", "%7e", "%2F", "~", "x", "\\", " ", "é", ".", ".."]
        let suffixes = ["", "", "?", "#f", "?q=/../", "?a#b"]
        var checked = 0
        for _ in 0..<20_000 {
            let url = schemes.randomElement()! + hosts.randomElement()! + ports.randomElement()!
                + (0..<Int.random(in: 0...5)).map { _ in path.randomElement()! }.joined() + suffixes.randomElement()!
            guard let fast = DPoPURL.alreadyNormal(url) else { continue }
            checked += 1
            #expect(fast == DPoPURL.fullyNormalized(url), "\(url)")
        }
        #expect(checked > 100)
    }

    @Test("configuration: public_base_url is an origin; dpop_algorithms are asymmetric")
    func configuration() {
        let rows: [(String, String)] = [
            ("policies:\n  - { name: p, public_base_url: \"https://a.example/api\" }\n", "policies[0].public_base_url: must be scheme://host[:port]"),
            ("server: { dpop_algorithms: [HS256] }\npolicies:\n  - { name: p }\n", "server.dpop_algorithms[0]: none and HS* are never accepted"),
            ("policies:\n  - { name: p, dpop: sometimes }\n", "policies[0].dpop: must be one of disabled | allowed | required"),
        ]
        for (yaml, expected) in rows {
            do {
                _ = try SidecarConfiguration.parse(yaml: "introspection: { endpoint: http://127.0.0.1:1/i, client_id: c, client_secret: s }\n" + yaml)
                Issue.record("accepted: \(yaml)")
            } catch let error as ConfigurationError {
                #expect(error.problems.contains { $0.contains(expected) }, "\(expected) in \(error.problems)")
            } catch {
                Issue.record("\(error)")
            }
        }
    }
}
