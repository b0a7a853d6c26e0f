import HTTPTypes
import InMemoryTracing
import Introspection
import JOSE
import JWTValidation
import Logging
import Metrics
import Testing
import Tracing

@testable import AuthzSidecar

/// The process's tracer for these tests (a process bootstraps once). Only decisions of a
/// configuration with `tracing.otlp_endpoint` make the sidecar's spans; but once a tracer is
/// bootstrapped, AsyncHTTPClient traces its own requests (`POST`…) in suites running in
/// parallel, so the tests look at the sidecar's spans only (`authz.*`).
enum TestTracer {
    static let shared: InMemoryTracer = {
        let tracer = InMemoryTracer()
        InstrumentationSystem.bootstrap(tracer)
        return tracer
    }()
}

extension InMemoryTracer {
    /// The sidecar's finished spans, taken out of the tracer.
    func popSidecarSpans() -> [FinishedInMemorySpan] {
        popFinishedSpans().filter { $0.operationName.hasPrefix("authz.") }
    }
}

@Suite("Tracing: a span per decision, its children, nothing when off (DESIGN.md §12)", .serialized)
struct TracingTests {
    static func yaml(tracing: Bool) -> String {
        """
        introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
        \(tracing ? "tracing: { otlp_endpoint: http://127.0.0.1:4318 }" : "")
        policies:
          - name: api
            match: { path_prefix: /api/ }
            required_scopes: [read]
        """
    }

    static let introspector = ClosureTokenIntrospector { token throws(IntrospectionError) in
        switch token {
        case "reader-secret-token": return TokenInfo(active: true, scope: "read", clientID: "client-name", exp: 4_102_444_800, sub: "subject-name")
        case "writer-secret-token": return TokenInfo(active: true, scope: "write", exp: 4_102_444_800)
        case "down": throw .status(500)
        default: return .inactive
        }
    }

    static func request(_ token: String, parent: (trace: String, span: String)? = nil) -> AccessRequest {
        var headers = HTTPFields()
        headers[.authorization] = "Bearer \(token)"
        if let parent {
            headers[HTTPField.Name(InMemoryTracer.traceIDKey)!] = parent.trace
            headers[HTTPField.Name(InMemoryTracer.spanIDKey)!] = parent.span
        }
        return AccessRequest(front: .nginx, method: "GET", path: "/api/x", host: "h", headers: headers)
    }

    func sidecar(tracing: Bool) throws -> Sidecar {
        Sidecar(
            configuration: try SidecarConfiguration.parse(yaml: Self.yaml(tracing: tracing)), introspector: Self.introspector,
            logger: Logger(label: "test"), metrics: NOOPMetricsHandler.instance
        )
    }

    @Test("a miss: the decision continues the proxy's trace, and the AS call is its child; a hit has its span too")
    func missAndHit() async throws {
        let tracer = TestTracer.shared
        tracer.clearAll()
        let authorizer = try sidecar(tracing: true).authorizer
        let miss = await authorizer.answer(Self.request("reader-secret-token", parent: ("trace-1", "proxy-span")))
        #expect(miss.status == 200)
        let spans = tracer.popSidecarSpans()
        let decision = try #require(spans.first { $0.operationName == "authz.decision" })
        #expect(decision.traceID == "trace-1")
        #expect(decision.parentSpanID == "proxy-span")
        #expect(decision.kind == .server)
        #expect(decision.attributes["authz.policy"]?.toSpanAttribute() == "api")
        #expect(decision.attributes["authz.outcome"]?.toSpanAttribute() == "allow")
        #expect(decision.attributes["authz.cache"]?.toSpanAttribute() == "miss")
        #expect(decision.attributes["authz.token"]?.toSpanAttribute() == .string(TokenDigest(token: "reader-secret-token").prefix))
        let call = try #require(spans.first { $0.operationName == "authz.introspect" })
        #expect(call.parentSpanID == decision.spanID)
        #expect(call.traceID == "trace-1")
        #expect(call.kind == .client)
        // The hit is answered without suspending; its span is made there.
        let hit = try #require(authorizer.answerWithoutSuspending(Self.request("reader-secret-token")))
        #expect(hit.status == 200)
        let hitSpans = tracer.popSidecarSpans()
        #expect(hitSpans.count == 1)
        #expect(hitSpans.first?.attributes["authz.cache"]?.toSpanAttribute() == "hit")
        // No token and no claim value in any attribute.
        for span in spans + hitSpans {
            span.attributes.forEach { name, value in
                let text = "\(value)"
                #expect(!text.contains("secret-token") && !text.contains("client-name") && !text.contains("subject-name") && !text.contains("read"), "\(name) = \(text)")
            }
        }
    }

    @Test("a denial and a fault say so; a fault's span is an error")
    func denialAndFault() async throws {
        let tracer = TestTracer.shared
        tracer.clearAll()
        let authorizer = try sidecar(tracing: true).authorizer
        _ = await authorizer.answer(Self.request("writer-secret-token"))
        let denied = try #require(tracer.popSidecarSpans().first { $0.operationName == "authz.decision" })
        #expect(denied.attributes["authz.outcome"]?.toSpanAttribute() == "deny")
        #expect(denied.attributes["authz.reason"]?.toSpanAttribute() == "insufficient_scope")
        #expect(denied.attributes["http.response.status_code"]?.toSpanAttribute() == 403)
        _ = await authorizer.answer(Self.request("down"))
        let spans = tracer.popSidecarSpans()
        let fault = try #require(spans.first { $0.operationName == "authz.decision" })
        #expect(fault.attributes["authz.outcome"]?.toSpanAttribute() == "fault")
        #expect(fault.status?.code == .error)
        #expect(fault.attributes["authz.cache"]?.toSpanAttribute() == "miss")
        // Denials answered without suspending (a cached token, no token at all) say why too.
        tracer.clearAll()
        _ = try #require(authorizer.answerWithoutSuspending(Self.request("writer-secret-token")))
        var none = Self.request("x")
        none.headers.remove(name: "Authorization")
        _ = try #require(authorizer.answerWithoutSuspending(none))
        let quick = tracer.popSidecarSpans()
        #expect(quick.map { $0.attributes["authz.reason"]?.toSpanAttribute() } == ["insufficient_scope", "no_token"])
        #expect(spans.first { $0.operationName == "authz.introspect" }?.status?.code == .error)
    }

    @Test("tracing off: no span, on either path")
    func off() async throws {
        let tracer = TestTracer.shared
        tracer.clearAll()
        let authorizer = try sidecar(tracing: false).authorizer
        _ = await authorizer.answer(Self.request("reader-secret-token", parent: ("trace-2", "proxy-span")))
        _ = authorizer.answerWithoutSuspending(Self.request("reader-secret-token"))
        _ = await authorizer.answer(Self.request("down"))
        #expect(tracer.popSidecarSpans().isEmpty)
    }

    @Test("sampling: the proxy's sampled flag decides; without a parent, a draw at the ratio")
    func sampling() throws {
        let yaml = Self.yaml(tracing: true).replacingOccurrences(of: "otlp_endpoint: http://127.0.0.1:4318", with: "otlp_endpoint: http://127.0.0.1:4318, sampling_ratio: 0.01")
        let authorizer = try Sidecar(
            configuration: try SidecarConfiguration.parse(yaml: yaml), introspector: Self.introspector, logger: Logger(label: "test"), metrics: NOOPMetricsHandler.instance
        ).authorizer
        func request(_ traceparent: String?) -> AccessRequest {
            var headers = HTTPFields()
            if let traceparent { headers[HTTPField.Name("traceparent")!] = traceparent }
            return AccessRequest(front: .nginx, method: "GET", path: "/api/x", host: "h", headers: headers)
        }
        #expect(authorizer.sampled(request("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")))
        #expect(!authorizer.sampled(request("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")))
        let draws = (0..<100_000).filter { _ in authorizer.sampled(request(nil)) }.count
        #expect((700...1300).contains(draws), "\(draws) of 100000 drawn at 1%")
        #expect((0..<1000).allSatisfy { _ in !SamplingDraw(ratio: 0).draw() })
        #expect((0..<1000).allSatisfy { _ in SamplingDraw(ratio: 1).draw() })
    }

    @Test("inside a decision's span, a shared-store lookup and a key-set fetch are its children")
    func storeAndKeyFetchSpans() async throws {
        let tracer = TestTracer.shared
        tracer.clearAll()
        final class Store: SharedAnswerStore {
            func load(_ digest: TokenDigest) async -> SharedLoad { .miss(SharedEpoch(0)) }
            func save(_ digest: TokenDigest, info: TokenInfo, until: Double, epoch: SharedEpoch) {}
            var localLifetimeCap: Double? { nil }
        }
        let cache = CachingTokenIntrospector(upstream: Self.introspector, configuration: .init(), shared: Store())
        let keys = IssuerKeys(issuer: "jwt-issuer", cacheSeconds: 300, minRefetchSeconds: 1, clock: SystemEpochClock(), logger: Logger(label: "test"), metrics: NOOPMetricsHandler.instance) { () async throws(IntrospectionError) -> JSONWebKeySet in
            throw .keysUnavailable("none here")
        }
        await withSpan("authz.decision", ofKind: .server) { _ in
            _ = try? await cache.lookup(token: "reader-secret-token", digest: TokenDigest(token: "reader-secret-token"))
            await keys.prefetch()
        }
        let spans = tracer.popSidecarSpans()
        let decision = try #require(spans.first { $0.operationName == "authz.decision" })
        let load = try #require(spans.first { $0.operationName == "authz.shared_store.load" })
        #expect(load.parentSpanID == decision.spanID)
        #expect(load.attributes["authz.shared.result"]?.toSpanAttribute() == "miss")
        let fetch = try #require(spans.first { $0.operationName == "authz.jwks_fetch" })
        #expect(fetch.parentSpanID == decision.spanID)
        #expect(fetch.attributes["authz.issuer"]?.toSpanAttribute() == "jwt-issuer")
        #expect(fetch.status?.code == .error)
        // Outside any decision's span: none of them.
        _ = try? await cache.lookup(token: "writer-secret-token", digest: TokenDigest(token: "writer-secret-token"))
        #expect(tracer.popSidecarSpans().isEmpty)
    }
}
