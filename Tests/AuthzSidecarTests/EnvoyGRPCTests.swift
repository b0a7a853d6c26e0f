@testable import AuthzSidecar
import EnvoyAuthProto
import Foundation
import HTTPTypes
import Introspection
import Testing

@Suite("Envoy gRPC Check: CheckRequest → decision → CheckResponse")
struct EnvoyGRPCTests {
    static let yaml = """
        introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
        policies:
          - name: shadow
            match: { path_prefix: /g/ }
            required_scopes: [never-granted]
          - name: token-mtls
            match: { path_prefix: /token-mtls/ }
            required_scopes: [system-access]
          - name: admin
            match: { path_prefix: /admin-api/ }
            required_scopes: [admin]
        """

    static func authorizer() throws -> Authorizer {
        let configuration = try SidecarConfiguration.parse(yaml: yaml)
        let introspector = ClosureTokenIntrospector { token throws(IntrospectionError) in
            switch token {
            case "good": return TokenInfo(active: true, scope: "system-access", sub: "svc", certificateThumbprint: Fixtures.thumbprint("client1.pem"))
            case "boom": throw .timeout
            default: return .inactive
            }
        }
        return Sidecar(configuration: configuration, introspector: introspector).authorizer
    }

    static func checkRequest(path: String, token: String?, certificate: String? = Fixtures.escaped("client1.pem"), policy: String? = nil, headerMap: Bool = false) -> Envoy_Service_Auth_V3_CheckRequest {
        var request = Envoy_Service_Auth_V3_CheckRequest()
        request.attributes.request.http.method = "POST"
        request.attributes.request.http.path = path
        request.attributes.request.http.host = "localhost:8443"
        var headers = [":method": "POST", ":path": path, ":authority": "localhost:8443", "x-credential-sub": "forged"]
        if let token { headers["authorization"] = "Bearer \(token)" }
        if headerMap {
            for (key, value) in headers {
                var header = Envoy_Config_Core_V3_HeaderValue()
                header.key = key
                header.rawValue = Data(value.utf8)
                request.attributes.request.http.headerMap.headers.append(header)
            }
        } else {
            request.attributes.request.http.headers = headers
        }
        if let certificate { request.attributes.source.certificate = certificate }
        if let policy { request.attributes.contextExtensions["policy"] = policy }
        return request
    }

    static func decide(_ request: Envoy_Service_Auth_V3_CheckRequest) async throws -> Envoy_Service_Auth_V3_CheckResponse {
        let authorizer = try authorizer()
        let access = EnvoyGRPCService.accessRequest(request, trustPolicyHeader: false)
        let (outcome, policy) = await authorizer.authorize(access)
        return EnvoyGRPCService.checkResponse(AuthzAnswer(outcome: outcome, policy: policy, front: .envoyGRPC))
    }

    @Test("allow: OK, credential headers overwrite, unset ones removed; the peer certificate binds", arguments: [false, true])
    func allow(headerMap: Bool) async throws {
        let response = try await Self.decide(Self.checkRequest(path: "/token-mtls/api/?q=1", token: "good", headerMap: headerMap))
        #expect(response.status.code == 0)
        guard case .okResponse(let ok)? = response.httpResponse else {
            Issue.record("expected ok_response, got \(response)")
            return
        }
        let sub = ok.headers.first { $0.header.key.lowercased() == "x-credential-sub" }
        #expect(sub?.header.value == "svc")
        #expect(sub?.appendAction == .overwriteIfExistsOrAdd)
        #expect(ok.headersToRemove.contains("x-credential-username"))
        #expect(!ok.headersToRemove.contains("x-credential-sub"))
        #expect(!ok.headers.contains { $0.header.key.lowercased() == "cache-control" })
    }

    @Test("deny: UNAUTHENTICATED with a 401 DeniedHttpResponse carrying the Kong body and WWW-Authenticate")
    func bindingMismatch() async throws {
        let response = try await Self.decide(Self.checkRequest(path: "/token-mtls/api/", token: "good", certificate: Fixtures.escaped("client2.pem")))
        #expect(response.status.code == 16)
        guard case .deniedResponse(let denied)? = response.httpResponse else {
            Issue.record("expected denied_response")
            return
        }
        #expect(denied.status.code == .unauthorized)
        #expect(denied.body == #"{"data":[],"error":{"code":401,"message":"The resource owner or authorization server denied the request."}}"#)
        #expect(denied.headers.contains { $0.header.key.lowercased() == "www-authenticate" && $0.header.value.contains("invalid_token") })
        #expect(denied.headers.contains { $0.header.key.lowercased() == "content-type" && $0.header.value == "application/json" })
        #expect(!denied.headers.contains { $0.header.key.lowercased() == "x-authz-body" })
    }

    @Test("deny: PERMISSION_DENIED with 403 for a missing scope")
    func scope() async throws {
        let response = try await Self.decide(Self.checkRequest(path: "/admin-api/x", token: "good"))
        #expect(response.status.code == 7)
        guard case .deniedResponse(let denied)? = response.httpResponse else {
            Issue.record("expected denied_response")
            return
        }
        #expect(denied.status.code == .forbidden)
    }

    @Test("context_extensions[policy] picks the policy over the first path match")
    func contextExtensions() async throws {
        let byPath = try await Self.decide(Self.checkRequest(path: "/g/x", token: "good"))
        #expect(byPath.status.code == 7)
        let byRoute = try await Self.decide(Self.checkRequest(path: "/g/x", token: "good", policy: "token-mtls"))
        #expect(byRoute.status.code == 0)
        let unknown = try await Self.decide(Self.checkRequest(path: "/token-mtls/x", token: "good", policy: "nope"))
        #expect(unknown.status.code == 7)
    }

    @Test("no token → 401 Unauthenticated.; the request's fields reach the decision")
    func noToken() async throws {
        let request = Self.checkRequest(path: "/token-mtls/api/", token: nil)
        let access = EnvoyGRPCService.accessRequest(request, trustPolicyHeader: false)
        #expect(access.method == "POST")
        #expect(access.path == "/token-mtls/api/")
        #expect(access.host == "localhost:8443")
        #expect(access.peerCertificate == Fixtures.escaped("client1.pem"))
        let response = try await Self.decide(request)
        guard case .deniedResponse(let denied)? = response.httpResponse else {
            Issue.record("expected denied_response")
            return
        }
        #expect(denied.body.contains("Unauthenticated."))
    }
}
