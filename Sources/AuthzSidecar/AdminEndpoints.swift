import Crypto
import Foundation
import HTTPTypes
import Introspection
import NIOCore
import Prometheus
import SharedCache

/// `/healthz`, `/readyz`, `/metrics` and `POST /admin/cache/purge` (DESIGN.md §4), free of any
/// server framework.
public struct AdminEndpoints: Sendable {
    /// A plain HTTP answer.
    public struct Reply: Sendable {
        public var status: HTTPResponse.Status
        public var headers: HTTPFields
        public var body: ByteBuffer
    }

    /// An answer now, or one that needs the shared store first (a purge to propagate).
    public enum Answer: Sendable {
        case now(Reply)
        case later(@Sendable () async -> Reply)
    }

    let slot: AuthorizerSlot
    let reachability: ASReachability
    let registry: PrometheusCollectorRegistry?
    let shared: SharedTokenStore?

    public init(slot: AuthorizerSlot, reachability: ASReachability, registry: PrometheusCollectorRegistry?, shared: SharedTokenStore? = nil) {
        self.slot = slot
        self.reachability = reachability
        self.registry = registry
        self.shared = shared
    }

    /// The reply for an admin path, nil when the path is not one; a purge that the shared store
    /// must propagate answers with this replica's count and `"propagated": false` here (use
    /// `answer` to wait for the store).
    public func respond(method: HTTPRequest.Method, path: String, body: ByteBuffer?, authorization: String? = nil, localListener: Bool = true) -> Reply? {
        switch answer(method: method, path: path, body: body, authorization: authorization, localListener: localListener) {
        case nil: return nil
        case .now(let reply)?: return reply
        case .later?: return Self.json(.ok, #"{"propagated":false}"#)
        }
    }

    /// The reply for an admin path, or nil when the path is not one.
    /// - Parameters:
    ///   - authorization: the request's `Authorization` header, for `server.admin_token_file`.
    ///   - localListener: whether the listener is loopback or unix (DESIGN.md §4): without an
    ///     admin token, `/admin/*` is served only there.
    public func answer(method: HTTPRequest.Method, path: String, body: ByteBuffer?, authorization: String? = nil, localListener: Bool = true) -> Answer? {
        if method == .post, path.split(separator: "?", maxSplits: 1).first == "/admin/cache/purge",
            case .now(let denied)? = guardAdmin(path: "/admin/cache/purge", authorization: authorization, localListener: localListener)
        {
            return .now(denied)
        }
        if method == .post, path.split(separator: "?", maxSplits: 1).first == "/admin/cache/purge" {
            return purge(body ?? ByteBuffer())
        }
        return routeReply(method: method, path: path, body: body, authorization: authorization, localListener: localListener).map { .now($0) }
    }

    /// nil when the admin request may go on; the refusal otherwise.
    private func guardAdmin(path: String, authorization: String?, localListener: Bool) -> Answer? {
        guard path.hasPrefix("/admin/") else { return nil }
        if let token = slot.current.configuration.server.adminToken {
            guard Self.presents(token, authorization) else {
                var reply = Self.json(.unauthorized, #"{"error":"the admin endpoints need Authorization: Bearer <the token in server.admin_token_file>"}"#)
                reply.headers[.wwwAuthenticate] = #"Bearer realm="authz-sidecar-admin""#
                return .now(reply)
            }
        } else if !localListener {
            return .now(Self.json(.forbidden, #"{"error":"the admin endpoints are served only on a loopback or unix listener, or with server.admin_token_file"}"#))
        }
        return nil
    }

    private func routeReply(method: HTTPRequest.Method, path: String, body: ByteBuffer?, authorization: String?, localListener: Bool) -> Reply? {
        let path = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? path
        if case .now(let refusal)? = guardAdmin(path: path, authorization: authorization, localListener: localListener) { return refusal }
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
        case (_, "/healthz"), (_, "/readyz"), (_, "/metrics"), (_, "/admin/cache/purge"):
            return Self.text(.methodNotAllowed, "method not allowed\n")
        default:
            return nil
        }
    }

    static let purgeUsage = #"{"error":"expected {\"token\": …}, {\"token_sha256\": …} or {\"all\": true}"}"#

    /// `{"token": …}`, `{"token_sha256": "<64 hex>"}` or `{"all": true}` → `{"purged": N}`; with a
    /// shared store, the purge is then tombstoned and broadcast there, and the answer adds
    /// `"propagated"` and `"receivers"` (DESIGN.md §11).
    func purge(_ body: ByteBuffer) -> Answer {
        guard let document = try? JSONParser.parse(body.readableBytesView), case .object(let members) = document, members.count == 1 else {
            return .now(Self.json(.badRequest, Self.purgeUsage))
        }
        let purged: Int
        // Every issuer's cache: the token may have been validated by any of them.
        let issuers = slot.current.issuers
        let caches = issuers.map(\.cache)
        let digest: TokenDigest?
        switch (members["token"], members["token_sha256"], members["all"]) {
        case (.string(let token)?, nil, nil) where !token.isEmpty:
            digest = TokenDigest(token: token)
        case (nil, .string(let hex)?, nil):
            guard let parsed = TokenDigest(hex: hex.lowercased()) else {
                return .now(Self.json(.badRequest, #"{"error":"token_sha256 must be 64 hex digits"}"#))
            }
            digest = parsed
        case (nil, nil, .bool(true)?):
            digest = nil
        default:
            return .now(Self.json(.badRequest, Self.purgeUsage))
        }
        if let digest {
            purged = caches.filter { $0.purge(digest) }.isEmpty ? 0 : 1
        } else {
            purged = caches.reduce(0) { $0 + $1.purgeAll() }
        }
        guard let shared else { return .now(Self.json(.ok, "{\"purged\":\(purged)}")) }
        let names = issuers.filter { $0.configuration.validation.introspects }.map(\.name)
        return .later {
            let propagation = digest == nil ? await shared.purgeAll() : await shared.purge(digest!, issuers: names)
            let tail = propagation.propagated ? #""propagated":true,"receivers":\#(propagation.receivers)"# : #""propagated":false"#
            return Self.json(.ok, "{\"purged\":\(purged),\(tail)}")
        }
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
