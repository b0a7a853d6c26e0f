import HTTPTypes
import Introspection
import NIOCore
import NIOHTTP1

/// The HTTP answer to a proxy, independent of the server framework (DESIGN.md §6).
public struct AuthzAnswer: Sendable {
    public var status: Int
    /// In the order they are sent; names as they are sent. For the HTTP front ends (nginx,
    /// Envoy's HTTP service) they include `Content-Length`, so an answer is sent as it is.
    public private(set) var headers: HTTPHeaders
    /// The whole answer as HTTP/1.1 bytes, rendered once with it (nil for gRPC): a remembered
    /// allow is written without rendering anything again.
    let http1: HTTP1Response?
    public private(set) var body: String
    /// Claim headers dropped because their value held a control character.
    public var droppedHeaders: [String]

    public static let realm = "authz-sidecar"
    /// Repeats a denial's JSON body: nginx drops an auth subrequest's body (deploy/nginx.conf).
    public static let bodyHeader = "X-Authz-Body"
    /// Seconds a client should wait after an AS fault.
    public static let retryAfterSeconds = 2

    /// What an answer to a DPoP request adds (RFC 9449 §7.1, §9): the DPoP challenge with the
    /// accepted algorithms, and the current server nonce when nonces are on.
    public struct DPoPContext: Sendable {
        public var algorithms: String
        public var nonce: String?

        public init(algorithms: String, nonce: String?) {
            self.algorithms = algorithms
            self.nonce = nonce
        }
    }

    /// Renders a decision or a fault for the proxy that asked; `dpop` for a request that used
    /// the DPoP scheme (or was refused for not using it).
    public init(outcome: Authorizer.Outcome, policy: PolicyConfiguration?, front: AccessRequest.Front, dpop: DPoPContext? = nil) {
        droppedHeaders = []
        switch outcome {
        case .decision(.allow(let grant)):
            status = 200
            body = ""
            let rendered = UpstreamHeaders(grant: grant, policy: policy, front: front)
            headers = rendered.fields
            droppedHeaders = rendered.dropped
            headers.add(name: "Cache-Control", value: grant.cacheSeconds > 0 && grant.dpopKey == nil ? "max-age=\(grant.cacheSeconds)" : "no-store")
        case .decision(.deny(let denial)):
            status = denial.status
            body = Self.kongBody(code: denial.status, message: denial.message)
            headers = [
                "Content-Type": "application/json",
                "WWW-Authenticate": Self.wwwAuthenticate(denial, policy: policy, dpop: dpop),
                Self.bodyHeader: body,
                "Cache-Control": "no-store",
            ]
        case .fault:
            status = 503
            body = Self.kongBody(code: 503, message: "Authorization server unavailable.")
            headers = [
                "Content-Type": "application/json",
                "Retry-After": "\(Self.retryAfterSeconds)",
                Self.bodyHeader: body,
                "Cache-Control": "no-store",
            ]
        }
        if let nonce = dpop?.nonce {
            headers.add(name: "DPoP-Nonce", value: nonce)
        }
        if front != .envoyGRPC {
            headers.add(name: "Content-Length", value: String(body.utf8.count))
            http1 = HTTP1Response(status: status, headers: headers, body: body.isEmpty ? nil : ByteBuffer(string: body))
        } else {
            http1 = nil
        }
    }

    /// `{"data":[],"error":{"code":401,"message":"…"}}`, JSON-escaped, ASCII, one line.
    public static func kongBody(code: Int, message: String) -> String {
        var out = "{\"data\":[],\"error\":{\"code\":\(code),\"message\":"
        JSONValue.writeString(message, into: &out)
        out += "}}"
        return out
    }

    /// RFC 6750 §3: `Bearer realm="…"` with `error` and, for insufficient_scope, `scope`; for a
    /// DPoP request RFC 9449 §7.1's `DPoP realm="…"`, the same parameters and `algs`.
    static func wwwAuthenticate(_ denial: Denial, policy: PolicyConfiguration?, dpop: DPoPContext? = nil) -> String {
        var value = (dpop == nil ? "Bearer" : "DPoP") + " realm=\"\(realm)\""
        if let code = denial.errorCode {
            value += ", error=\"\(code.rawValue)\""
            // A claims miss names no scope: scopes would not help (DESIGN.md §9).
            if denial.reason == .insufficientScope, let scopes = policy?.requiredScopes, !scopes.isEmpty {
                value += ", scope=\"\(scopes.joined(separator: " "))\""
            }
        }
        if let dpop { value += ", algs=\"\(dpop.algorithms)\"" }
        return value
    }
}

/// The `X-Credential-*` headers of an allow answer (DESIGN.md §6), with the fallbacks for
/// Keycloak's names, values holding control characters dropped, and for Envoy the list of
/// credential headers it must remove because this answer does not set them.
struct UpstreamHeaders {
    /// The standard credential headers, parsed once (DESIGN.md §6 order).
    static let scope = HTTPField.Name("X-Credential-Scope")!
    static let clientID = HTTPField.Name("X-Credential-Client-ID")!
    static let username = HTTPField.Name("X-Credential-Username")!
    static let tokenType = HTTPField.Name("X-Credential-Token-Type")!
    static let exp = HTTPField.Name("X-Credential-Exp")!
    static let iat = HTTPField.Name("X-Credential-Iat")!
    static let nbf = HTTPField.Name("X-Credential-Nbf")!
    static let sub = HTTPField.Name("X-Credential-Sub")!
    static let aud = HTTPField.Name("X-Credential-Aud")!
    static let iss = HTTPField.Name("X-Credential-Iss")!
    static let jti = HTTPField.Name("X-Credential-Jti")!
    static let jkt = HTTPField.Name("X-Credential-Jkt")!
    static let standardNames = [scope, clientID, username, tokenType, exp, iat, nbf, sub, aud, iss, jti, jkt]

    var fields = HTTPHeaders()
    var dropped: [String] = []
    /// Which names were set, for Envoy's remove list: bit i is standardNames[i], bit 11 + j the
    /// policy's j-th forwarded claim (beyond 53 claims the list is computed from `fields`).
    private var set: UInt64 = 0

    init(grant: Grant, policy: PolicyConfiguration?, front: AccessRequest.Front) {
        let claims = policy?.forwardClaimHeaders ?? []
        fields.reserveCapacity(Self.standardNames.count + claims.count + 2)
        if let info = grant.token {
            let extraString = { (name: String) in info.extra[name]?.stringValue }
            add(0, info.scope)
            add(1, info.clientID ?? extraString("clientId") ?? extraString("azp"))
            add(2, info.username ?? extraString("preferred_username"))
            // The scheme that was verified: DPoP when a proof was (RFC 9449 §7.1).
            add(3, grant.dpopKey != nil ? "DPoP" : info.tokenType ?? extraString("typ"))
            add(4, info.exp.map { String($0) })
            add(5, info.iat.map { String($0) })
            add(6, info.nbf.map { String($0) })
            add(7, info.sub)
            add(8, info.aud.isEmpty ? nil : info.aud.count == 1 ? info.aud[0] : info.aud.joined(separator: ","))
            add(9, info.iss)
            add(10, info.jti)
            add(11, grant.dpopKey)
            for (j, (claim, name)) in claims.enumerated() {
                add(name, bit: Self.standardNames.count + j, info.claim(claim).map(Self.text))
            }
        } else {
            fields.add(name: "X-Anonymous", value: "true")
        }
        if front != .nginx {
            // Envoy keeps a client's copy of any header the answer does not set (DESIGN.md §6).
            var remove = ""
            remove.reserveCapacity(256)
            func append(_ name: String) {
                if !remove.isEmpty { remove += "," }
                remove += name
            }
            for (i, name) in Self.standardNames.enumerated() where !isSet(name, bit: i) {
                append(name.canonicalName)
            }
            for (j, (_, name)) in claims.enumerated() where !isSet(name, bit: Self.standardNames.count + j) {
                append(name.canonicalName)
            }
            if policy?.hideCredentials == true {
                append("authorization")
                if let header = policy?.certificateHeader { append(header.lowercased()) }
            }
            if !remove.isEmpty {
                fields.add(name: "x-envoy-auth-headers-to-remove", value: remove)
            }
        }
    }

    private mutating func add(_ index: Int, _ value: String?) {
        add(Self.standardNames[index], bit: index, value)
    }

    private mutating func add(_ name: HTTPField.Name, bit: Int, _ value: String?) {
        guard let value else { return }
        guard !Self.holdsControlCharacter(value) else {
            dropped.append(name.rawName)
            return
        }
        fields.add(name: name.rawName, value: value)
        if bit < 64 { set |= 1 << UInt64(bit) }
    }

    private func isSet(_ name: HTTPField.Name, bit: Int) -> Bool {
        bit < 64 ? set & (1 << UInt64(bit)) != 0 : fields.contains(name: name.rawName)
    }

    /// CR, LF, NUL and the other C0 controls and DEL would break or smuggle a header.
    static func holdsControlCharacter(_ value: String) -> Bool {
        var value = value
        return value.withUTF8 { bytes in bytes.contains(where: { $0 < 0x20 || $0 == 0x7F }) }
    }

    /// A claim as header text: strings as they are, arrays of strings comma-separated, other
    /// values as compact JSON.
    static func text(_ value: JSONValue) -> String {
        switch value {
        case .string(let s): return s
        case .integer(let i): return String(i)
        case .bool(let b): return b ? "true" : "false"
        case .array(let items) where items.allSatisfy({ $0.stringValue != nil }):
            return items.compactMap(\.stringValue).joined(separator: ",")
        default: return value.compactJSON
        }
    }
}
