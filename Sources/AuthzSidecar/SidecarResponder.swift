import HTTPTypes
import Hummingbird
import Introspection
import NIOCore

/// The decision listener: `/authz` for nginx, `/authz/**` for Envoy, and (when no admin
/// listener is configured) the admin endpoints; 404 elsewhere. No router: one switch on the path.
public struct SidecarResponder: HTTPResponder {
    public typealias Context = BasicRequestContext

    let authorizer: Authorizer
    /// nil when the admin endpoints have their own listener.
    let admin: AdminEndpoints?

    public init(authorizer: Authorizer, admin: AdminEndpoints?) {
        self.authorizer = authorizer
        self.admin = admin
    }

    public func respond(to request: Request, context: Context) async throws -> Response {
        let target = request.head.path ?? "/"
        if target == "/authz" || target.hasPrefix("/authz?") {
            return Self.response(await authorizer.answer(nginxRequest(request)))
        }
        if target.hasPrefix("/authz/") {
            return Self.response(await authorizer.answer(envoyRequest(request, target: target)))
        }
        if let admin {
            return try await admin.respond(to: request, context: context)
        }
        return Response(status: .notFound)
    }

    /// nginx `auth_request`: the subrequest is a GET; the original method, URI and host come in
    /// `X-Original-*` (DESIGN.md §4).
    func nginxRequest(_ request: Request) -> AccessRequest {
        let headers = request.headers
        return AccessRequest(
            front: .nginx,
            method: (headers[.originalMethod] ?? request.method.rawValue).uppercased(),
            path: headers[.originalURI] ?? "/",
            host: headers[.originalHost] ?? request.head.authority ?? headers[.host] ?? "",
            headers: headers,
            policyHint: authorizer.configuration.server.trustPolicyHeader ? headers[.authzPolicy] : nil,
            headerBytes: Self.headerBytes(headers)
        )
    }

    /// Envoy `ext_authz` HTTP service with `path_prefix: /authz`: method and host as sent, the
    /// original path (with query) after the prefix.
    func envoyRequest(_ request: Request, target: String) -> AccessRequest {
        let headers = request.headers
        return AccessRequest(
            front: .envoyHTTP,
            method: request.method.rawValue,
            path: String(target.dropFirst("/authz".count)),
            host: request.head.authority ?? headers[.host] ?? "",
            headers: headers,
            policyHint: authorizer.configuration.server.trustPolicyHeader ? headers[.authzPolicy] : nil,
            headerBytes: Self.headerBytes(headers)
        )
    }

    static func headerBytes(_ headers: HTTPFields) -> Int {
        headers.reduce(0) { $0 + $1.name.rawName.utf8.count + $1.value.utf8.count + 4 }
    }

    static func response(_ answer: AuthzAnswer) -> Response {
        Response(
            status: HTTPResponse.Status(code: answer.status),
            headers: answer.headers,
            body: answer.body.isEmpty ? ResponseBody() : ResponseBody(byteBuffer: ByteBuffer(string: answer.body))
        )
    }
}

extension HTTPField.Name {
    static let host = HTTPField.Name("Host")!
}
