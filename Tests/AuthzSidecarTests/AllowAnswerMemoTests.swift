@testable import AuthzSidecar
import HTTPTypes
import Introspection
import Metrics
import NIOConcurrencyHelpers
import Testing

@Suite("AllowAnswerMemo: an allow's rendering remembered, never its decision")
struct AllowAnswerMemoTests {
    static let yaml = """
        introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
        cache: { ttl_seconds: 3600 }
        policies:
          - name: api
            match: { path_prefix: /api/ }
            required_scopes: [read]
            certificate_header: X-Client-Cert
          - name: cached
            match: { path_prefix: /cached/ }
            required_scopes: [read]
            certificate_header: X-Client-Cert
            proxy_cache_seconds: 30
        """

    /// The AS's current answer for every token, bound to client1.
    final class AS: Sendable {
        let sub = NIOLockedValueBox("first")
        func info(now: Double) -> TokenInfo {
            TokenInfo(
                active: true, scope: "read", exp: Int64(now) + 600, sub: sub.withLockedValue { $0 },
                certificateThumbprint: Fixtures.thumbprint("client1.pem")
            )
        }
    }

    static func request(_ path: String, certificate: String = "client1.pem") -> AccessRequest {
        var headers = HTTPFields()
        headers[.authorization] = "Bearer memo-token"
        headers[HTTPField.Name("X-Client-Cert")!] = Fixtures.escaped(certificate)
        return AccessRequest(front: .nginx, method: "GET", path: path, host: "h", headers: headers)
    }

    static func value(_ answer: AuthzAnswer?, _ name: String) -> String? {
        answer?.headers.first(name: name)
    }

    @Test("hits reuse the rendering; binding and scope are still decided each time; new claims render afresh")
    func memo() async throws {
        let clock = TestClock()
        let server = AS()
        let introspector = ClosureTokenIntrospector { _ in server.info(now: clock.now()) }
        let configuration = try SidecarConfiguration.parse(yaml: Self.yaml)
        let cache = CachingTokenIntrospector(upstream: introspector, configuration: configuration.cache, clock: clock)
        let authorizer = Authorizer(configuration: configuration, cache: cache, clock: clock, metrics: NOOPMetricsHandler.instance)

        // The miss fills the cache; the hits after it are rendered once.
        #expect(await authorizer.answer(Self.request("/api/x")).status == 200)
        let first = authorizer.answerWithoutSuspending(Self.request("/api/x"))
        let second = authorizer.answerWithoutSuspending(Self.request("/api/y"))
        #expect(first?.status == 200 && second?.status == 200)
        #expect(Self.value(second, "X-Credential-Sub") == "first")
        #expect(Self.value(second, "Content-Length") == "0")
        #expect(authorizer.allowAnswers.count == 1)

        // Not a decision cache: another certificate with the same token is refused, every time.
        for _ in 0..<2 {
            let other = authorizer.answerWithoutSuspending(Self.request("/api/x", certificate: "client2.pem"))
            #expect(other?.status == 401)
            #expect(other?.headers.first(name: "WWW-Authenticate")?.contains("invalid_token") == true)
        }
        // Nor past exp: the cache refuses to serve it, so no answer comes from here.
        clock.advance(by: 601)
        #expect(authorizer.answerWithoutSuspending(Self.request("/api/x")) == nil)

        // The token introspected again, with other claims: rendered afresh.
        server.sub.withLockedValue { $0 = "second" }
        #expect(await authorizer.answer(Self.request("/api/x")).status == 200)
        #expect(Self.value(authorizer.answerWithoutSuspending(Self.request("/api/x")), "X-Credential-Sub") == "second")

        // Another policy is another rendering; its proxy cache lifetime counts down with the clock.
        let cached = authorizer.answerWithoutSuspending(Self.request("/cached/x"))
        #expect(Self.value(cached, "Cache-Control") == "max-age=30")
        clock.advance(by: 590)
        #expect(Self.value(authorizer.answerWithoutSuspending(Self.request("/cached/x")), "Cache-Control") == "max-age=10")
        #expect(Self.value(authorizer.answerWithoutSuspending(Self.request("/api/x")), "Cache-Control") == "no-store")
    }

    @Test("only the very same introspection answer and proxy-cache lifetime reuse a rendering")
    func identity() {
        let memo = AllowAnswerMemo()
        let policy = PolicyEvaluation(policy: PolicyConfiguration(name: "p"))
        let digest = TokenDigest(token: "t")
        var renders = 0
        func answer(_ grant: Grant, front: AccessRequest.Front = .nginx) {
            _ = memo.answer(for: grant, digest: digest, policy: policy, front: front) {
                renders += 1
                return AuthzAnswer(outcome: .decision(.allow(grant)), policy: policy.policy, front: front)
            }
        }
        let token = TokenInfo(active: true, sub: "s")
        answer(Grant(token: token))
        answer(Grant(token: token))
        #expect(renders == 1)
        answer(Grant(token: TokenInfo(active: true, sub: "s")))  // equal, but introspected again
        #expect(renders == 2)
        answer(Grant(token: token, cacheSeconds: 5))
        #expect(renders == 3)
        answer(Grant(token: token), front: .envoyHTTP)
        #expect(renders == 4)
        answer(Grant(token: nil))  // anonymous: never remembered
        answer(Grant(token: nil))
        #expect(renders == 6)
    }

    @Test("bounded")
    func bounded() {
        let memo = AllowAnswerMemo(capacity: 8, shardCount: 1)
        let policy = PolicyEvaluation(policy: PolicyConfiguration(name: "p"))
        var renders = 0
        for i in 0..<100 {
            let grant = Grant(token: TokenInfo(active: true, sub: "s\(i)"))
            _ = memo.answer(for: grant, digest: TokenDigest(token: "t\(i)"), policy: policy, front: .nginx) {
                renders += 1
                return AuthzAnswer(outcome: .decision(.allow(grant)), policy: policy.policy, front: .nginx)
            }
        }
        #expect(renders == 100)
        #expect(memo.count <= 8)
    }
}
