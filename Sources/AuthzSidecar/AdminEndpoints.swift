import Crypto
import Foundation
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
    /// - Parameters:
    ///   - authorization: the request's `Authorization` header, for `server.admin_token_file`.
    ///   - localListener: whether the listener is loopback or unix (DESIGN.md §4): without an
    ///     admin token, `/admin/*` is served only there.
    public func respond(method: HTTPRequest.Method, path: String, body: ByteBuffer?, authorization: String? = nil, localListener: Bool = true) -> Reply? {
        let path = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? path
        if path.hasPrefix("/admin/") {
            if let token = slot.current.configuration.server.adminToken {
                guard Self.presents(token, authorization) else {
                    var reply = Self.json(.unauthorized, #"{"error":"the admin endpoints need Authorization: Bearer <the token in server.admin_token_file>"}"#)
                    reply.headers[.wwwAuthenticate] = #"Bearer realm="authz-sidecar-admin""#
                    return reply
                }
            } else if !localListener {
                return Self.json(.forbidden, #"{"error":"the admin endpoints are served only on a loopback or unix listener, or with server.admin_token_file"}"#)
            }
        }
        switch (method, path) {
        case (.get, "/healthz"), (.head, "/healthz"):
            return Self.text(.ok, "ok\n")
        case (.get, "/readyz"), (.head, "/readyz"):
            // Ready once configured, unless the AS was unreachable on the last attempt, or an
            // issuer could not obtain its signing keys (every JWT of it would be a 503).
            for issuer in slot.current.issuers {
                if let fault = issuer.keys?.unavailable {
                    return Self.text(.serviceUnavailable, "issuer \(issuer.name): no signing keys obtained (\(fault.label))\n")
                }
            }
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
        // Every issuer's cache: the token may have been validated by any of them.
        let caches = slot.current.caches
        switch (members["token"], members["token_sha256"], members["all"]) {
        case (.string(let token)?, nil, nil) where !token.isEmpty:
            let digest = TokenDigest(token: token)
            purged = caches.filter { $0.purge(digest) }.isEmpty ? 0 : 1
        case (nil, .string(let hex)?, nil):
            guard let digest = TokenDigest(hex: hex.lowercased()) else {
                return Self.json(.badRequest, #"{"error":"token_sha256 must be 64 hex digits"}"#)
            }
            purged = caches.filter { $0.purge(digest) }.isEmpty ? 0 : 1
        case (nil, nil, .bool(true)?):
            purged = caches.reduce(0) { $0 + $1.purgeAll() }
        default:
            return Self.json(.badRequest, Self.purgeUsage)
        }
        return Self.json(.ok, "{\"purged\":\(purged)}")
    }

    /// Whether `authorization` is `Bearer <token>`, compared in constant time (over SHA-256
    /// digests, so neither the length nor a prefix of the token leaks through timing).
    static func presents(_ token: Secret, _ authorization: String?) -> Bool {
        guard let authorization else { return false }
        let trimmed = authorization.trimmingCharacters(in: .whitespaces)
        guard trimmed.utf8.count > 7, trimmed.prefix(7).lowercased() == "bearer " else { return false }
        let presented = trimmed.dropFirst(7).trimmingCharacters(in: .whitespaces)
        let a = SHA256.hash(data: Array(presented.utf8))
        let b = SHA256.hash(data: Array(token.value.utf8))
        var difference: UInt8 = 0
        for (x, y) in zip(a, b) { difference |= x ^ y }
        return difference == 0
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
