import HTTPTypes
import Introspection

/// The HTTP answer to a proxy, independent of the server framework (DESIGN.md §6).
public struct AuthzAnswer: Sendable {
    public var status: Int
    public var headers: HTTPFields
    public var body: String
    /// Claim headers dropped because their value held a control character.
    public var droppedHeaders: [String]

    public static let realm = "authz-sidecar"
    /// Seconds a client should wait after an AS fault.
    public static let retryAfterSeconds = 2

    /// Renders a decision or a fault for the proxy that asked.
    public init(outcome: Authorizer.Outcome, policy: PolicyConfiguration?, front: AccessRequest.Front) {
        droppedHeaders = []
        switch outcome {
        case .decision(.allow(let grant)):
            status = 200
            body = ""
            let rendered = UpstreamHeaders(grant: grant, policy: policy, front: front)
            headers = rendered.fields
            droppedHeaders = rendered.dropped
            headers[.cacheControl] = grant.cacheSeconds > 0 ? "max-age=\(grant.cacheSeconds)" : "no-store"
        case .decision(.deny(let denial)):
            status = denial.status
            body = Self.kongBody(code: denial.status, message: denial.message)
            headers = HTTPFields()
            headers[.contentType] = "application/json"
            headers[.wwwAuthenticate] = Self.wwwAuthenticate(denial, policy: policy)
            headers[.authzBody] = body
            headers[.cacheControl] = "no-store"
        case .fault:
            status = 503
            body = Self.kongBody(code: 503, message: "Authorization server unavailable.")
            headers = HTTPFields()
            headers[.contentType] = "application/json"
            headers[.retryAfter] = "\(Self.retryAfterSeconds)"
            headers[.authzBody] = body
            headers[.cacheControl] = "no-store"
        }
    }

    /// `{"data":[],"error":{"code":401,"message":"…"}}`, JSON-escaped, ASCII, one line.
    public static func kongBody(code: Int, message: String) -> String {
        var out = "{\"data\":[],\"error\":{\"code\":\(code),\"message\":"
        JSONValue.writeString(message, into: &out)
        out += "}}"
        return out
    }

    /// RFC 6750 §3: `Bearer realm="…"` with `error` and, for insufficient_scope, `scope`.
    static func wwwAuthenticate(_ denial: Denial, policy: PolicyConfiguration?) -> String {
        var value = "Bearer realm=\"\(realm)\""
        if let code = denial.errorCode {
            value += ", error=\"\(code.rawValue)\""
            if code == .insufficientScope, let scopes = policy?.requiredScopes, !scopes.isEmpty {
                value += ", scope=\"\(scopes.joined(separator: " "))\""
            }
        }
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
    static let standardNames = [scope, clientID, username, tokenType, exp, iat, nbf, sub, aud, iss, jti]

    var fields = HTTPFields()
    var dropped: [String] = []

    init(grant: Grant, policy: PolicyConfiguration?, front: AccessRequest.Front) {
        if let info = grant.token {
            let extraString = { (name: String) in info.extra[name]?.stringValue }
            add(Self.scope, info.scope)
            add(Self.clientID, info.clientID ?? extraString("clientId") ?? extraString("azp"))
            add(Self.username, info.username ?? extraString("preferred_username"))
            add(Self.tokenType, info.tokenType ?? extraString("typ"))
            add(Self.exp, info.exp.map { String($0) })
            add(Self.iat, info.iat.map { String($0) })
            add(Self.nbf, info.nbf.map { String($0) })
            add(Self.sub, info.sub)
            add(Self.aud, info.aud.isEmpty ? nil : info.aud.joined(separator: ","))
            add(Self.iss, info.iss)
            add(Self.jti, info.jti)
            for (claim, name) in policy?.forwardClaimHeaders ?? [] {
                add(name, info.claim(claim).map(Self.text))
            }
        } else {
            fields[.anonymous] = "true"
        }
        if front != .nginx {
            // Envoy keeps a client's copy of any header the answer does not set (DESIGN.md §6).
            var remove = (Self.standardNames + (policy?.forwardClaimHeaders ?? []).map(\.1))
                .filter { fields[$0] == nil }
                .map(\.canonicalName)
            if policy?.hideCredentials == true {
                remove.append("authorization")
                if let header = policy?.certificateHeader { remove.append(header.lowercased()) }
            }
            if !remove.isEmpty {
                fields[.envoyHeadersToRemove] = remove.joined(separator: ",")
            }
        }
    }

    private mutating func add(_ name: HTTPField.Name, _ value: String?) {
        guard let value else { return }
        guard !value.utf8.contains(where: { $0 < 0x20 || $0 == 0x7F }) else {
            dropped.append(name.rawName)
            return
        }
        fields.append(HTTPField(name: name, value: value))
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
