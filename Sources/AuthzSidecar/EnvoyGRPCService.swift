import EnvoyAuthProto
import GRPCCore
import HTTPTypes
import Introspection
import SwiftProtobuf
import Tracing

/// Envoy's gRPC external authorization, `envoy.service.auth.v3.Authorization/Check`
/// (DESIGN.md §4): the same decision as the HTTP front ends, mapped to a `CheckResponse`.
public struct EnvoyGRPCService: Envoy_Service_Auth_V3_Authorization.SimpleServiceProtocol {
    let slot: AuthorizerSlot

    /// google.rpc.Code values for `CheckResponse.status`.
    static let ok: Int32 = 0
    static let permissionDenied: Int32 = 7
    static let unauthenticated: Int32 = 16

    public init(slot: AuthorizerSlot) {
        self.slot = slot
    }

    public func check(request: Envoy_Service_Auth_V3_CheckRequest, context: ServerContext) async throws -> Envoy_Service_Auth_V3_CheckResponse {
        let authorizer = slot.current
        let access = Self.accessRequest(request, trustPolicyHeader: authorizer.configuration.server.trustPolicyHeader)
        if authorizer.tracesSomeRequests, authorizer.wantsTrace(access) {
            // The debug log of this one decision (X-Authz-Debug behind trust, or debug_log).
            let explanation = await authorizer.explainAndLog(access)
            if case .fault = explanation.outcome { throw RPCError(code: .unavailable, message: "authorization server unavailable") }
            return Self.checkResponse(explanation.answer)
        }
        // The parent span: from the call's metadata (TraceContextInterceptor), else the headers.
        let (outcome, policy, dpop) = await authorizer.decideAndExplain(access, parent: ServiceContext.current)
        if case .fault = outcome {
            // Envoy answers its status_on_error (503 in deploy/envoy-grpc.yaml).
            throw RPCError(code: .unavailable, message: "authorization server unavailable")
        }
        return Self.checkResponse(AuthzAnswer(outcome: outcome, policy: policy, front: .envoyGRPC, dpop: dpop))
    }

    /// The question in `attributes.request.http`: method, path (with query), host and headers
    /// (from `header_map` when Envoy sends it, else the `headers` map; pseudo-headers skipped).
    /// The peer certificate comes from `attributes.source.certificate`; a policy named in
    /// `context_extensions["policy"]` (set per route in Envoy's configuration) is trusted.
    static func accessRequest(_ request: Envoy_Service_Auth_V3_CheckRequest, trustPolicyHeader: Bool) -> AccessRequest {
        let http = request.attributes.request.http
        var headers = HTTPFields()
        var bytes = 0
        if http.hasHeaderMap, !http.headerMap.headers.isEmpty {
            for header in http.headerMap.headers {
                let value = header.value.isEmpty && !header.rawValue.isEmpty ? String(decoding: header.rawValue, as: UTF8.self) : header.value
                bytes += header.key.utf8.count + value.utf8.count + 4
                if let name = HTTPField.Name(header.key) { headers.append(HTTPField(name: name, value: value)) }
            }
        } else {
            for (key, value) in http.headers.sorted(by: { $0.key < $1.key }) {
                bytes += key.utf8.count + value.utf8.count + 4
                guard let name = HTTPField.Name(key) else { continue }
                // Envoy joins repeated headers with ","; only Authorization is kept whole.
                headers.append(HTTPField(name: name, value: value))
            }
        }
        let certificate = request.attributes.source.certificate
        let fromRoute = request.attributes.contextExtensions["policy"]
        var question = AccessRequest(
            front: .envoyGRPC,
            method: http.method.uppercased(),
            path: http.path.isEmpty ? "/" : http.path,
            host: http.host,
            headers: headers,
            peerCertificate: certificate.isEmpty ? nil : certificate,
            policyHint: fromRoute ?? (trustPolicyHeader ? headers[.authzPolicy] : nil),
            headerBytes: bytes
        )
        question.scheme = http.scheme.isEmpty ? nil : http.scheme.lowercased()
        return question
    }

    /// OK → `OkHttpResponse` (headers overwrite, `headers_to_remove`); deny →
    /// `DeniedHttpResponse` with the same status, JSON body and WWW-Authenticate.
    static func checkResponse(_ answer: AuthzAnswer) -> Envoy_Service_Auth_V3_CheckResponse {
        var response = Envoy_Service_Auth_V3_CheckResponse()
        if answer.status == 200 {
            response.status.code = Self.ok
            var ok = Envoy_Service_Auth_V3_OkHttpResponse()
            for (name, value) in answer.headers {
                switch name.lowercased() {
                case "x-envoy-auth-headers-to-remove":
                    ok.headersToRemove = value.split(separator: ",").map(String.init)
                case "cache-control":
                    continue  // about the answer, not the upstream request
                case "dpop-nonce":
                    ok.responseHeadersToAdd.append(option(name, value))  // for the client (RFC 9449 §9)
                default:
                    ok.headers.append(option(name, value))
                }
            }
            response.okResponse = ok
        } else {
            response.status.code = answer.status == 403 ? Self.permissionDenied : Self.unauthenticated
            response.status.message = answer.status == 403 ? "denied: forbidden" : "denied: unauthenticated"
            var denied = Envoy_Service_Auth_V3_DeniedHttpResponse()
            denied.status.code = Envoy_Type_V3_StatusCode(rawValue: answer.status) ?? .unauthorized
            denied.body = answer.body
            for (name, value) in answer.headers where name.lowercased() != AuthzAnswer.bodyHeader.lowercased() {
                denied.headers.append(option(name, value))
            }
            response.deniedResponse = denied
        }
        return response
    }

    private static func option(_ name: String, _ value: String) -> Envoy_Config_Core_V3_HeaderValueOption {
        var option = Envoy_Config_Core_V3_HeaderValueOption()
        option.header.key = name.lowercased()
        option.header.value = value
        option.appendAction = .overwriteIfExistsOrAdd
        return option
    }
}
