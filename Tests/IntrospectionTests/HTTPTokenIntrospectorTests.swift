import AsyncHTTPClient
import Foundation
import Introspection
import Synchronization
import Testing
import NIOConcurrencyHelpers

@Suite("HTTPTokenIntrospector against a fake AS on loopback")
struct HTTPTokenIntrospectorTests {
    static let hostileToken = "a+b&c=d%e f/=="
    static let hostileSecret = "s3cr:t+&=% é"
    static let activeBody = #"{"active":true,"scope":"system-access","exp":4102444800,"cnf":{"x5t#S256":"abc"}}"#

    /// Runs `body` with an introspector pointed at a fake AS that answers with `reply`.
    static func withIntrospector<T: Sendable>(
        _ configure: @Sendable (inout IntrospectionConfiguration) -> Void = { _ in },
        tls: Bool = false,
        reply: @escaping @Sendable (RecordedRequest) async -> FakeReply,
        _ body: @Sendable (HTTPTokenIntrospector) async throws -> T
    ) async throws -> T {
        try await FakeAuthorizationServer.run(tls: tls ? try FakeAuthorizationServer.tlsConfiguration() : nil, reply: reply) { port in
            var configuration = IntrospectionConfiguration(
                endpoint: "\(tls ? "https" : "http")://127.0.0.1:\(port)/introspect",
                clientID: "intro client",
                clientSecret: Secret(hostileSecret),
                // Generous: under ThreadSanitizer, with the other suites running in parallel, a
                // loopback call has taken over a second. The timeout case sets its own deadline.
                timeoutMilliseconds: 10_000
            )
            configure(&configuration)
            let client = try HTTPTokenIntrospector.makeHTTPClient(for: configuration)
            do {
                let result = try await body(HTTPTokenIntrospector(configuration: configuration, client: client))
                try await client.shutdown()
                return result
            } catch {
                try? await client.shutdown()
                throw error
            }
        }
    }

    @Test("client_secret_basic: exact form body and Authorization header, hostile characters intact")
    func basic() async throws {
        let seen = NIOLockedValueBox<RecordedRequest?>(nil)
        let info = try await Self.withIntrospector(reply: { request in
            seen.withLockedValue { $0 = request }
            return .json(Self.activeBody)
        }) { try await $0.introspect(Self.hostileToken) }
        #expect(info.active)
        let request = try #require(seen.withLockedValue { $0 })
        #expect(request.method == "POST")
        #expect(request.headers[.contentType] == "application/x-www-form-urlencoded")
        #expect(request.headers[.accept] == "application/json")
        // RFC 6749 §2.3.1: each part form-encoded, then base64 (computed here with Foundation)
        let pair = "intro+client:s3cr%3At%2B%26%3D%25+%C3%A9"
        #expect(request.headers[.authorization] == "Basic " + Data(pair.utf8).base64EncodedString())
        #expect(request.body == "token=a%2Bb%26c%3Dd%25e+f%2F%3D%3D&token_type_hint=access_token")
        #expect(request.form == ["token": Self.hostileToken, "token_type_hint": "access_token"])
    }

    @Test("client_secret_post: credentials in the form, no Authorization header")
    func post() async throws {
        let seen = NIOLockedValueBox<RecordedRequest?>(nil)
        _ = try await Self.withIntrospector({ $0.authMethod = .clientSecretPost }, reply: { request in
            seen.withLockedValue { $0 = request }
            return .json(Self.activeBody)
        }) { try await $0.introspect(Self.hostileToken) }
        let request = try #require(seen.withLockedValue { $0 })
        #expect(request.headers[.authorization] == nil)
        #expect(request.form == ["token": Self.hostileToken, "token_type_hint": "access_token", "client_id": "intro client", "client_secret": Self.hostileSecret])
    }

    @Test("none: only the token")
    func none() async throws {
        let seen = NIOLockedValueBox<RecordedRequest?>(nil)
        _ = try await Self.withIntrospector({ $0.authMethod = .none; $0.clientID = nil }, reply: { request in
            seen.withLockedValue { $0 = request }
            return .json(Self.activeBody)
        }) { try await $0.introspect("t") }
        let request = try #require(seen.withLockedValue { $0 })
        #expect(request.headers[.authorization] == nil)
        #expect(request.form == ["token": "t", "token_type_hint": "access_token"])
    }

    @Test("an inactive answer is inactive, not a fault")
    func inactive() async throws {
        let info = try await Self.withIntrospector(reply: { _ in .json(#"{"active":false}"#) }) { try await $0.introspect("t") }
        #expect(info == .inactive)
    }

    @Test("each bad answer is a fault of its kind", arguments: [
        (FakeReply.json(status: 500, "oops"), IntrospectionError.status(500)),
        (.json(status: 401, #"{"error":"invalid_client"}"#), .status(401)),
        (.json(status: 429, "slow down"), .status(429)),
        (.json(status: 200, "<html>login</html>", contentType: "text/html"), .malformed("")),
        (.json(status: 200, "{not json"), .malformed("")),
        (.json(status: 200, #"{"active":"true"}"#), .malformed("")),
        (.json(status: 200, #"{"active":true,"pad":""# + String(repeating: "x", count: 70_000) + #""}"#), .tooLarge(65536)),
        (.hang(seconds: 12), .timeout),
    ])
    func faults(reply: FakeReply, expected: IntrospectionError) async throws {
        let outcome: Result<TokenInfo, IntrospectionError> = try await Self.withIntrospector({ $0.timeoutMilliseconds = 5000 }, reply: { _ in reply }) { introspector in
            do throws(IntrospectionError) {
                return .success(try await introspector.introspect("t"))
            } catch {
                return .failure(error)
            }
        }
        guard case .failure(let error) = outcome else {
            Issue.record("expected a fault, got \(outcome)")
            return
        }
        #expect(error.label == expected.label, "\(error)")
    }

    @Test("connection refused is a connect fault, reported at once rather than after timeout_ms")
    func refused() async throws {
        let port = try await FakeAuthorizationServer.closedPort()
        let configuration = IntrospectionConfiguration(endpoint: "http://127.0.0.1:\(port)/introspect", clientID: "c", clientSecret: Secret("s"), timeoutMilliseconds: 30_000)
        let client = try HTTPTokenIntrospector.makeHTTPClient(for: configuration)
        defer { Task { try await client.shutdown() } }
        await #expect(throws: IntrospectionError.self) {
            do throws(IntrospectionError) {
                _ = try await HTTPTokenIntrospector(configuration: configuration, client: client).introspect("t")
            } catch {
                // with a 30 s deadline, "timeout" here would mean the refusal was retried
                #expect(error.label == "connect", "\(error)")
                throw error
            }
        }
    }

    @Test("TLS with the AS's CA from ca_file works; an unknown CA is a TLS fault")
    func tls() async throws {
        let info = try await Self.withIntrospector({ $0.caFile = Fixtures.path("ca.pem") }, tls: true, reply: { _ in .json(Self.activeBody) }) {
            try await $0.introspect("t")
        }
        #expect(info.active)
        let outcome: IntrospectionError? = try await Self.withIntrospector({ $0.caFile = Fixtures.path("other-ca.pem") }, tls: true, reply: { _ in .json(Self.activeBody) }) { introspector in
            do throws(IntrospectionError) {
                _ = try await introspector.introspect("t")
                return nil
            } catch {
                return error
            }
        }
        #expect(outcome?.label == "tls", "\(String(describing: outcome))")
    }

    @Test("recovers after the AS comes back: the pool heals")
    func recovers() async throws {
        let failing = Atomic<Bool>(true)
        try await Self.withIntrospector(reply: { _ in failing.load(ordering: .relaxed) ? .json(status: 503, "down") : .json(Self.activeBody) }) { introspector in
            await #expect(throws: IntrospectionError.status(503)) { try await introspector.introspect("t") }
            failing.store(false, ordering: .relaxed)
            let info = try await introspector.introspect("t")
            #expect(info.active)
        }
    }

    @Test("the secret never appears in descriptions")
    func secretRedacted() {
        let configuration = IntrospectionConfiguration(endpoint: "https://as", clientID: "c", clientSecret: Secret("hunter2"))
        #expect(!"\(configuration)".contains("hunter2"))
        #expect(!String(reflecting: configuration).contains("hunter2"))
    }
}
