@testable import AuthzSidecar
import AsyncHTTPClient
import Foundation
import HTTPTypes
import Introspection
import Logging
import Metrics
import NIOCore
import Prometheus
import ServiceLifecycle
import NIOPosix
import Synchronization
import Testing

@Suite("Operations: metrics, reload, graceful shutdown")
struct OperationsTests {
    static let yaml = """
        introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
        policies:
          - name: api
            match: { path_prefix: /api/ }
            required_scopes: [read]
          - name: admin
            match: { path_prefix: /admin/ }
            required_scopes: [admin]
        """

    static func request(_ path: String, token: String?) -> AccessRequest {
        var headers = HTTPFields()
        if let token { headers[.authorization] = "Bearer \(token)" }
        return AccessRequest(front: .nginx, method: "GET", path: path, host: "h", headers: headers)
    }

    static let introspector = ClosureTokenIntrospector { token throws(IntrospectionError) in
        switch token {
        case "reader": return TokenInfo(active: true, scope: "read", exp: 4_102_444_800)
        case "down": throw .status(500)
        default: return .inactive
        }
    }

    @Test("metric names and values after a scripted sequence of decisions")
    func metrics() async throws {
        let registry = PrometheusCollectorRegistry()
        let factory = PrometheusMetricsFactory(registry: registry)
        let sidecar = Sidecar(configuration: try SidecarConfiguration.parse(yaml: Self.yaml), introspector: Self.introspector, metrics: factory)
        let authorizer = sidecar.authorizer
        for (path, token) in [("/api/x", "reader"), ("/api/x", "reader"), ("/api/x", "reader"), ("/admin/x", "reader"), ("/api/x", nil), ("/api/x", "nobody"), ("/api/x", "down"), ("/other", "reader")] {
            _ = await authorizer.answer(Self.request(path, token: token))
        }
        let text = registry.emitToString()
        let expected = [
            #"authz_decisions_total{policy="api",outcome="allow",reason="granted"} 3"#,
            #"authz_decisions_total{policy="admin",outcome="deny",reason="insufficient_scope"} 1"#,
            #"authz_decisions_total{policy="api",outcome="deny",reason="no_token"} 1"#,
            #"authz_decisions_total{policy="api",outcome="deny",reason="inactive"} 1"#,
            #"authz_decisions_total{policy="api",outcome="fault",reason="as_fault"} 1"#,
            #"authz_decisions_total{policy="none",outcome="deny",reason="no_policy"} 1"#,
            #"authz_introspection_calls_total{outcome="active"} 1"#,
            #"authz_introspection_calls_total{outcome="inactive"} 1"#,
            #"authz_introspection_calls_total{outcome="fault_status_5xx"} 1"#,
            "authz_cache_hits_total 3",
            "authz_cache_misses_total 3",
            "authz_introspection_duration_seconds_count 3",
            #"authz_introspection_duration_seconds_bucket{le="+Inf"} 3"#,
        ]
        for line in expected {
            #expect(text.contains(line), "missing: \(line)")
        }
        // labels stay bounded: no token and no raw path ever becomes a label value
        #expect(!text.contains("reader"))
        #expect(!text.contains("/api/x"))
    }

    @Test("reload: policies swap atomically; the cache is kept when the AS client and cache settings are unchanged")
    func reload() async throws {
        let calls = CallCounter()
        let introspector = ClosureTokenIntrospector { _ in
            calls.increment()
            return TokenInfo(active: true, scope: "read admin", exp: 4_102_444_800)
        }
        let sidecar = Sidecar(configuration: try SidecarConfiguration.parse(yaml: Self.yaml), introspector: introspector)
        #expect(await sidecar.authorizer.answer(Self.request("/api/x", token: "t")).status == 200)
        let old = sidecar.authorizer

        // New policies, same AS and cache settings: kept, no new AS call.
        let stricter = Self.yaml.replacingOccurrences(of: "required_scopes: [read]", with: "required_scopes: [write]")
        #expect(sidecar.reload(to: try SidecarConfiguration.parse(yaml: stricter), introspector: nil) == .kept)
        #expect(await sidecar.authorizer.answer(Self.request("/api/x", token: "t")).status == 403)
        #expect(calls.count == 1)
        // a request that took the old authorizer still decides on the old policies
        #expect(await old.answer(Self.request("/api/x", token: "t")).status == 200)

        // A new AS client: dropped, so the next request asks the (new) AS.
        let newCalls = CallCounter()
        let other = ClosureTokenIntrospector { _ in
            newCalls.increment()
            return .inactive
        }
        #expect(sidecar.reload(to: try SidecarConfiguration.parse(yaml: stricter), introspector: other) == .dropped)
        #expect(await sidecar.authorizer.answer(Self.request("/api/x", token: "t")).status == 401)
        #expect(newCalls.count == 1)

        // New cache settings: dropped too.
        #expect(sidecar.reload(to: try SidecarConfiguration.parse(yaml: stricter + "\ncache: { ttl_seconds: 5 }\n"), introspector: nil) == .dropped)
    }

    @Test("graceful shutdown: a decision in flight completes with its answer")
    func gracefulShutdown() async throws {
        let gate = Gate()
        let entered = CallCounter()
        let slow = ClosureTokenIntrospector { _ in
            entered.increment()
            await gate.wait()
            return TokenInfo(active: true, scope: "read")
        }
        let configuration = try SidecarConfiguration.parse(yaml: Self.yaml)
        try await withLiveSidecar(configuration: configuration, introspector: slow) { client, _ in
            async let status: Int = {
                var headers = HTTPFields()
                headers[.authorization] = "Bearer slow"
                headers[HTTPField.Name("X-Original-URI")!] = "/api/x"
                var result = 0
                try await client.execute(uri: "/authz", method: .get, headers: headers) { result = $0.status.code }
                return result
            }()
            while entered.count == 0 { try await Task.sleep(for: .milliseconds(5)) }
            // SIGTERM while the decision waits for the AS; the AS answers 200 ms later.
            await client.shutdown()
            try await Task.sleep(for: .milliseconds(200))
            await gate.open()
            #expect(try await status == 200)
            // and the listener no longer accepts new connections
            var noRetry = HTTPClient.Configuration()
            noRetry.connectionPool.retryConnectionEstablishment = false
            let fresh = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: noRetry)
            var refused = false
            do {
                try await LiveClient(http: fresh, port: client.port, shutdown: {}).execute(uri: "/healthz", method: .get) { _ in }
            } catch {
                refused = true
            }
            try await fresh.shutdown()
            #expect(refused)
        }
    }
}

@Suite("DecisionQueue: misses decided on the asking event loop, drained on shutdown")
struct DecisionQueueTests {
    @Test("answers on the promise's loop; shutdown waits for decisions in flight, then refuses new ones with 503")
    func drainsThenRefuses() async throws {
        let gate = Gate()
        let entered = CallCounter()
        let slow = ClosureTokenIntrospector { _ in
            entered.increment()
            await gate.wait()
            return TokenInfo(active: true, scope: "read")
        }
        let configuration = try SidecarConfiguration.parse(yaml: OperationsTests.yaml)
        let authorizer = Authorizer(
            configuration: configuration,
            cache: CachingTokenIntrospector(upstream: slow, configuration: configuration.cache),
            metrics: NOOPMetricsHandler.instance
        )
        let queue = DecisionQueue()
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let group = ServiceGroup(services: [queue], logger: Logger(label: "test"))
        let returned = CallCounter()

        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask {
                try await group.run()
                returned.increment()
            }
            do {
                let first = loop.makePromise(of: AuthzAnswer.self)
                let onLoop = CallCounter()
                first.futureResult.whenSuccess { _ in if loop.inEventLoop { onLoop.increment() } }
                queue.submit(OperationsTests.request("/api/x", token: "one"), to: authorizer, promise: first)
                while entered.count == 0 { try await Task.sleep(for: .milliseconds(5)) }

                await group.triggerGracefulShutdown()
                // The service group delivers the shutdown asynchronously: wait (bounded) until the
                // queue has stopped taking decisions, then check it still waits for the one in flight.
                for _ in 0..<1000 where !queue.isClosed { try await Task.sleep(for: .milliseconds(10)) }
                try #require(queue.isClosed, "graceful shutdown must close the queue")
                try await Task.sleep(for: .milliseconds(100))
                #expect(returned.count == 0, "the queue must wait for the decision in flight")

                let late = loop.makePromise(of: AuthzAnswer.self)
                queue.submit(OperationsTests.request("/api/x", token: "two"), to: authorizer, promise: late)
                #expect(try await late.futureResult.get().status == 503)
                await gate.open()
                #expect(try await first.futureResult.get().status == 200)
                try await tasks.waitForAll()
                #expect(returned.count == 1)
                #expect(onLoop.count == 1)
                #expect(entered.count == 1)
            } catch {
                // Never leave the queue waiting on the gate: the task group would wait forever.
                await gate.open()
                await group.triggerGracefulShutdown()
                throw error
            }
        }
    }
}

/// Holds callers until opened.
actor Gate {
    private var isOpen = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func wait() async {
        if isOpen { return }
        await withCheckedContinuation { waiters.append($0) }
    }

    func open() {
        isOpen = true
        for waiter in waiters { waiter.resume() }
        waiters = []
    }
}
