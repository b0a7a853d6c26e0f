import HTTPTypes
import Introspection
import NIOCore
import Prometheus

/// `/healthz`, `/readyz`, `/metrics` and `POST /admin/cache/purge` (DESIGN.md §4), free of any
/// server framework.
public struct AdminEndpoints: Sendable {
    /// A plain HTTP answer.
    public struct Reply: Sendable {
        public var status: HTTPResponse.Status
        public var headers: HTTPFields
        public var body: ByteBuffer
    }

    let slot: AuthorizerSlot
    let reachability: ASReachability
    let registry: PrometheusCollectorRegistry?

    public init(slot: AuthorizerSlot, reachability: ASReachability, registry: PrometheusCollectorRegistry?) {
        self.slot = slot
        self.reachability = reachability
        self.registry = registry
    }

    /// The reply for an admin path, or nil when the path is not one.
    public func respond(method: HTTPRequest.Method, path: String, body: ByteBuffer?) -> Reply? {
        let path = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? path
        switch (method, path) {
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
            return Reply(status: .ok, headers: headers, body: ByteBuffer(bytes: registry.emitToBuffer()))
        case (.post, "/admin/cache/purge"):
            return purge(body ?? ByteBuffer())
        case (_, "/healthz"), (_, "/readyz"), (_, "/metrics"), (_, "/admin/cache/purge"):
            return Self.text(.methodNotAllowed, "method not allowed\n")
        default:
            return nil
        }
    }

    static let purgeUsage = #"{"error":"expected {\"token\": …}, {\"token_sha256\": …} or {\"all\": true}"}"#

    /// `{"token": …}`, `{"token_sha256": "<64 hex>"}` or `{"all": true}` → `{"purged": N}`.
    func purge(_ body: ByteBuffer) -> Reply {
        guard let document = try? JSONParser.parse(body.readableBytesView), case .object(let members) = document, members.count == 1 else {
            return Self.json(.badRequest, Self.purgeUsage)
        }
        let purged: Int
        let cache = slot.current.cache
        switch (members["token"], members["token_sha256"], members["all"]) {
        case (.string(let token)?, nil, nil) where !token.isEmpty:
            purged = cache.purge(TokenDigest(token: token)) ? 1 : 0
        case (nil, .string(let hex)?, nil):
            guard let digest = TokenDigest(hex: hex.lowercased()) else {
                return Self.json(.badRequest, #"{"error":"token_sha256 must be 64 hex digits"}"#)
            }
            purged = cache.purge(digest) ? 1 : 0
        case (nil, nil, .bool(true)?):
            purged = cache.purgeAll()
        default:
            return Self.json(.badRequest, Self.purgeUsage)
        }
        return Self.json(.ok, "{\"purged\":\(purged)}")
    }

    static func text(_ status: HTTPResponse.Status, _ text: String) -> Reply {
        var headers = HTTPFields()
        headers[.contentType] = "text/plain; charset=utf-8"
        return Reply(status: status, headers: headers, body: ByteBuffer(string: text))
    }

    static func json(_ status: HTTPResponse.Status, _ text: String) -> Reply {
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Reply(status: status, headers: headers, body: ByteBuffer(string: text))
    }
}
