import HTTPTypes
import Hummingbird
import Introspection
import NIOCore
import Prometheus

/// `/healthz`, `/readyz`, `/metrics` and `POST /admin/cache/purge` (DESIGN.md §4).
public struct AdminEndpoints: HTTPResponder {
    public typealias Context = BasicRequestContext

    let authorizer: Authorizer
    let reachability: ASReachability
    let registry: PrometheusCollectorRegistry?

    public init(authorizer: Authorizer, reachability: ASReachability, registry: PrometheusCollectorRegistry?) {
        self.authorizer = authorizer
        self.reachability = reachability
        self.registry = registry
    }

    public func respond(to request: Request, context: Context) async throws -> Response {
        switch (request.method, request.uri.path) {
        case (.get, "/healthz"), (.head, "/healthz"):
            return Self.text(.ok, "ok\n")
        case (.get, "/readyz"), (.head, "/readyz"):
            // Ready once configured, unless the AS was unreachable on the last attempt.
            switch reachability.current {
            case .neverTried, .reachable: return Self.text(.ok, "ready\n")
            case .unreachable: return Self.text(.serviceUnavailable, "authorization server unreachable on the last attempt\n")
            }
        case (.get, "/metrics"):
            guard let registry else { return Self.text(.notFound, "metrics are not enabled\n") }
            var headers = HTTPFields()
            headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
            return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: registry.emitToBuffer())))
        case (.post, "/admin/cache/purge"):
            let body = try await request.body.collect(upTo: 16 * 1024)
            return purge(body)
        default:
            return Response(status: .notFound)
        }
    }

    /// `{"token": …}`, `{"token_sha256": "<64 hex>"}` or `{"all": true}` → `{"purged": N}`.
    func purge(_ body: ByteBuffer) -> Response {
        guard let document = try? JSONParser.parse(body.readableBytesView), case .object(let members) = document, members.count == 1 else {
            return Self.json(.badRequest, #"{"error":"expected {\"token\": …}, {\"token_sha256\": …} or {\"all\": true}"}"#)
        }
        let purged: Int
        switch (members["token"], members["token_sha256"], members["all"]) {
        case (.string(let token)?, nil, nil) where !token.isEmpty:
            purged = authorizer.cache.purge(TokenDigest(token: token)) ? 1 : 0
        case (nil, .string(let hex)?, nil):
            guard let digest = TokenDigest(hex: hex.lowercased()) else {
                return Self.json(.badRequest, #"{"error":"token_sha256 must be 64 hex digits"}"#)
            }
            purged = authorizer.cache.purge(digest) ? 1 : 0
        case (nil, nil, .bool(true)?):
            purged = authorizer.cache.purgeAll()
        default:
            return Self.json(.badRequest, #"{"error":"expected {\"token\": …}, {\"token_sha256\": …} or {\"all\": true}"}"#)
        }
        return Self.json(.ok, "{\"purged\":\(purged)}")
    }

    static func text(_ status: HTTPResponse.Status, _ text: String) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "text/plain; charset=utf-8"
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
    }

    static func json(_ status: HTTPResponse.Status, _ text: String) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
    }
}
