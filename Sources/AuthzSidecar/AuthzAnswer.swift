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
    static let standardNames = [
        "X-Credential-Scope", "X-Credential-Client-ID", "X-Credential-Username", "X-Credential-Token-Type",
        "X-Credential-Exp", "X-Credential-Iat", "X-Credential-Nbf", "X-Credential-Sub", "X-Credential-Aud",
        "X-Credential-Iss", "X-Credential-Jti",
    ]

    var fields = HTTPFields()
    var dropped: [String] = []

    init(grant: Grant, policy: PolicyConfiguration?, front: AccessRequest.Front) {
        var set: Set<String> = []
        if let info = grant.token {
            let extraString = { (name: String) in info.extra[name]?.stringValue }
            add("X-Credential-Scope", info.scope, &set)
            add("X-Credential-Client-ID", info.clientID ?? extraString("clientId") ?? extraString("azp"), &set)
            add("X-Credential-Username", info.username ?? extraString("preferred_username"), &set)
            add("X-Credential-Token-Type", info.tokenType ?? extraString("typ"), &set)
            add("X-Credential-Exp", info.exp.map { String($0) }, &set)
            add("X-Credential-Iat", info.iat.map { String($0) }, &set)
            add("X-Credential-Nbf", info.nbf.map { String($0) }, &set)
            add("X-Credential-Sub", info.sub, &set)
            add("X-Credential-Aud", info.aud.isEmpty ? nil : info.aud.joined(separator: ","), &set)
            add("X-Credential-Iss", info.iss, &set)
            add("X-Credential-Jti", info.jti, &set)
            for claim in policy?.forwardClaims ?? [] {
                add(HeaderName.credential(forClaim: claim), info.claim(claim).map(Self.text), &set)
            }
        } else {
            fields[.anonymous] = "true"
        }
        if front != .nginx {
            // Envoy keeps a client's copy of any header the answer does not set (DESIGN.md §6).
            var remove = (Self.standardNames + (policy?.forwardClaims ?? []).map(HeaderName.credential(forClaim:)))
                .filter { !set.contains($0) }
                .map { $0.lowercased() }
            if policy?.hideCredentials == true {
                remove.append("authorization")
                if let header = policy?.certificateHeader { remove.append(header.lowercased()) }
            }
            if !remove.isEmpty {
                fields[.envoyHeadersToRemove] = remove.joined(separator: ",")
            }
        }
    }

    private mutating func add(_ name: String, _ value: String?, _ set: inout Set<String>) {
        guard let value, let fieldName = HTTPField.Name(name) else { return }
        guard !value.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) else {
            dropped.append(name)
            return
        }
        fields.append(HTTPField(name: fieldName, value: value))
        set.insert(name)
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
