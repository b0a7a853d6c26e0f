/// What the authorization server said about a token: an RFC 7662 §2.2 introspection response.
///
/// Tolerant where real servers differ (`aud` as string or array, times as integer or number,
/// `scope` as a string or an array of strings) and strict where a security decision depends on
/// it: `active` must be a JSON boolean and `cnf` must be an object whose `x5t#S256` is a string,
/// otherwise the response is refused as malformed (an AS fault), never read as "unbound".
public struct TokenInfo: Sendable, Equatable {
    public var active: Bool { get { box.members.active } set { unique().members.active = newValue } }
    public var scope: String? { get { box.members.scope } set { unique().members.scope = newValue } }
    public var clientID: String? { get { box.members.clientID } set { unique().members.clientID = newValue } }
    public var username: String? { get { box.members.username } set { unique().members.username = newValue } }
    public var tokenType: String? { get { box.members.tokenType } set { unique().members.tokenType = newValue } }
    public var exp: Int64? { get { box.members.exp } set { unique().members.exp = newValue } }
    public var iat: Int64? { get { box.members.iat } set { unique().members.iat = newValue } }
    public var nbf: Int64? { get { box.members.nbf } set { unique().members.nbf = newValue } }
    public var sub: String? { get { box.members.sub } set { unique().members.sub = newValue } }
    public var aud: [String] { get { box.members.aud } set { unique().members.aud = newValue } }
    public var iss: String? { get { box.members.iss } set { unique().members.iss = newValue } }
    public var jti: String? { get { box.members.jti } set { unique().members.jti = newValue } }
    /// RFC 8705 §3.1 `cnf["x5t#S256"]`: base64url SHA-256 of the certificate the token is bound to.
    public var certificateThumbprint: String? { get { box.members.certificateThumbprint } set { unique().members.certificateThumbprint = newValue } }
    /// RFC 9449 `cnf["jkt"]` (DPoP): the token may only be used with a proof by that key.
    public var jwkThumbprint: String? { get { box.members.jwkThumbprint } set { unique().members.jwkThumbprint = newValue } }
    /// The name of a `cnf` member other than `x5t#S256` and `jkt`: a binding the sidecar cannot
    /// check, so the token is refused rather than treated as unbound (DESIGN.md §5.5).
    public var otherConfirmation: String? { get { box.members.otherConfirmation } set { unique().members.otherConfirmation = newValue } }
    /// Members that are not modelled above (Keycloak's `clientId`, `typ`, `azp`,
    /// `preferred_username`, custom claims), for the header fallbacks and `forward_claims`.
    public var extra: [String: JSONValue] { get { box.members.extra } set { unique().members.extra = newValue } }
    /// Why a locally validated token (a JWT) was refused; set only on inactive answers. An
    /// introspected inactive token has none: the AS gives no reason.
    public var rejection: String? { get { box.members.rejection } set { unique().members.rejection = newValue } }

    /// The members, behind one reference. A cached token is copied several times per decision
    /// (out of the cache, into the grant, into the answer); as a plain struct each copy retained
    /// and released every string member, which measured as a tenth of a cache hit's own cost.
    /// Copy-on-write keeps the value semantics.
    struct Members: Sendable, Equatable {
        var active: Bool
        var scope: String?
        var clientID: String?
        var username: String?
        var tokenType: String?
        var exp: Int64?
        var iat: Int64?
        var nbf: Int64?
        var sub: String?
        var aud: [String]
        var iss: String?
        var jti: String?
        var certificateThumbprint: String?
        var jwkThumbprint: String?
        var otherConfirmation: String?
        var extra: [String: JSONValue]
        var rejection: String?
    }

    /// Mutated only while uniquely referenced (`unique()`), so sharing it across threads is safe.
    private final class Box: @unchecked Sendable {
        var members: Members
        init(_ members: Members) { self.members = members }
    }

    private var box: Box

    private mutating func unique() -> Box {
        if !isKnownUniquelyReferenced(&box) { box = Box(box.members) }
        return box
    }

    public static func == (lhs: TokenInfo, rhs: TokenInfo) -> Bool {
        lhs.box === rhs.box || lhs.box.members == rhs.box.members
    }

    /// Whether `other` is this very value: the same introspection answer, not one with equal
    /// members that was built or parsed again. Constant time.
    public func isSameStorage(as other: TokenInfo) -> Bool {
        box === other.box
    }

    public init(
        active: Bool,
        scope: String? = nil,
        clientID: String? = nil,
        username: String? = nil,
        tokenType: String? = nil,
        exp: Int64? = nil,
        iat: Int64? = nil,
        nbf: Int64? = nil,
        sub: String? = nil,
        aud: [String] = [],
        iss: String? = nil,
        jti: String? = nil,
        certificateThumbprint: String? = nil,
        jwkThumbprint: String? = nil,
        otherConfirmation: String? = nil,
        extra: [String: JSONValue] = [:]
    ) {
        box = Box(Members(
            active: active,
            scope: scope,
            clientID: clientID,
            username: username,
            tokenType: tokenType,
            exp: exp,
            iat: iat,
            nbf: nbf,
            sub: sub,
            aud: aud,
            iss: iss,
            jti: jti,
            certificateThumbprint: certificateThumbprint,
            jwkThumbprint: jwkThumbprint,
            otherConfirmation: otherConfirmation,
            extra: extra,
            rejection: nil
        ))
    }

    /// The answer for every token the AS does not vouch for; all other members are dropped
    /// (RFC 7662 §2.2: an inactive response carries no other information we may use).
    public static let inactive = TokenInfo(active: false)

    /// An inactive answer for a token refused by local validation, with the reason for the log.
    public static func rejected(_ why: String) -> TokenInfo {
        var info = TokenInfo(active: false)
        info.rejection = why
        return info
    }

    /// The scopes, split on spaces (RFC 6749 §3.3).
    public var scopes: [Substring] {
        scope?.split(separator: " ", omittingEmptySubsequences: true) ?? []
    }

    /// Whether `scope` grants `wanted`: one of its space-separated names is exactly it. Reads the
    /// string in place (no array of scopes per request).
    public func grants(scope wanted: String) -> Bool {
        guard var scope, !wanted.isEmpty else { return false }
        var wanted = wanted
        return scope.withUTF8 { granted in
            wanted.withUTF8 { wanted in
                var start = 0
                while start < granted.count {
                    var end = start
                    while end < granted.count, granted[end] != UInt8(ascii: " ") { end += 1 }
                    if end - start == wanted.count, granted[start..<end].elementsEqual(wanted) {
                        return true
                    }
                    start = end + 1
                }
                return false
            }
        }
    }

    /// Token kinds that are not access tokens, as `token_type` or `typ` name them (DESIGN.md §5.4;
    /// Keycloak introspects refresh, offline and ID tokens as `active: true`).
    public static let refusedKinds: Set<String> = ["refresh_token", "refresh", "offline", "id", "id_token", "logout"]

    /// The `token_type` or `typ` that names a kind other than an access token, nil for an access
    /// token (or a token that names no kind).
    public var refusedKind: String? {
        if let tokenType, Self.isRefusedKind(tokenType) { return tokenType }
        if case .string(let typ)? = extra["typ"], Self.isRefusedKind(typ) { return typ }
        return nil
    }

    private static func isRefusedKind(_ kind: String) -> Bool {
        // Longer names are none of these; shorter ones lower-case as small strings (no allocation).
        kind.utf8.count <= 13 && refusedKinds.contains(kind.lowercased())
    }

    /// Whether `exp` has passed at `now` (a token without `exp` never expires by it).
    public func hasExpired(at now: Double) -> Bool {
        guard let exp else { return false }
        return Double(exp) <= now
    }

    /// A claim by its JSON member name, modelled or not.
    public func claim(_ name: String) -> JSONValue? {
        switch name {
        case "active": return .bool(active)
        case "scope": return scope.map(JSONValue.string)
        case "client_id": return clientID.map(JSONValue.string)
        case "username": return username.map(JSONValue.string)
        case "token_type": return tokenType.map(JSONValue.string)
        case "exp": return exp.map(JSONValue.integer)
        case "iat": return iat.map(JSONValue.integer)
        case "nbf": return nbf.map(JSONValue.integer)
        case "sub": return sub.map(JSONValue.string)
        case "aud": return aud.isEmpty ? nil : .array(aud.map(JSONValue.string))
        case "iss": return iss.map(JSONValue.string)
        case "jti": return jti.map(JSONValue.string)
        default: return extra[name]
        }
    }
}

extension TokenInfo {
    /// Parses a response body. Throws `IntrospectionError.malformed` for anything that is not a
    /// JSON object with a boolean `active`, or whose security-relevant members have the wrong type.
    public init<Bytes: Collection<UInt8>>(jsonBody: Bytes) throws(IntrospectionError) {
        let document: JSONValue
        do {
            document = try JSONParser.parse(jsonBody)
        } catch {
            throw .malformed("body is not JSON: \(error.description)")
        }
        guard case .object(let members) = document else { throw .malformed("body is not a JSON object") }
        try self.init(members: members)
    }

    /// Reads the members of a response object (see `init(jsonBody:)`).
    public init(members: [String: JSONValue]) throws(IntrospectionError) {
        guard case .bool(let active)? = members["active"] else {
            throw .malformed("\"active\" is missing or not a boolean")
        }
        guard active else {
            self = .inactive
            return
        }
        try self.init(activeMembers: members)
    }

    /// The claims of a token validated locally (a verified JWT): active by its signature, every
    /// other member read as in an introspection answer (a claim named `active` means nothing).
    public init(verifiedClaims claims: [String: JSONValue]) throws(IntrospectionError) {
        try self.init(activeMembers: claims)
    }

    private init(activeMembers members: [String: JSONValue]) throws(IntrospectionError) {
        self.init(active: true)
        for (name, value) in members {
            switch name {
            case "active": continue
            case "scope": scope = try Self.scopeString(value)
            case "client_id": clientID = value.stringValue
            case "username": username = value.stringValue
            case "token_type": tokenType = value.stringValue
            case "sub": sub = value.stringValue
            case "iss": iss = value.stringValue
            case "jti": jti = value.stringValue
            case "exp": exp = try Self.seconds(value, name)
            case "iat": iat = try Self.seconds(value, name)
            case "nbf": nbf = try Self.seconds(value, name)
            case "aud": aud = try Self.audiences(value)
            case "cnf": try readConfirmation(value)
            default: extra[name] = value
            }
        }
    }

    /// RFC 7662 §2.2 times: absent, null, integer or number; anything else is malformed, since
    /// an `exp` we cannot read must not be mistaken for "never expires".
    private static func seconds(_ value: JSONValue, _ name: String) throws(IntrospectionError) -> Int64? {
        if case .null = value { return nil }
        guard let seconds = value.integerSeconds else { throw .malformed("\"\(name)\" is not a number") }
        return seconds
    }

    /// `scope` as RFC 7662's space-delimited string, or the array some servers send.
    private static func scopeString(_ value: JSONValue) throws(IntrospectionError) -> String? {
        switch value {
        case .null: return nil
        case .string(let s): return s
        case .array(let items):
            var parts: [String] = []
            for item in items {
                guard case .string(let s) = item else { throw .malformed("\"scope\" array holds a non-string") }
                parts.append(s)
            }
            return parts.joined(separator: " ")
        default: throw .malformed("\"scope\" is not a string")
        }
    }

    /// `aud` as a string or an array of strings (RFC 7519 §4.1.3).
    private static func audiences(_ value: JSONValue) throws(IntrospectionError) -> [String] {
        switch value {
        case .null: return []
        case .string(let s): return [s]
        case .array(let items):
            var result: [String] = []
            for item in items {
                guard case .string(let s) = item else { throw .malformed("\"aud\" array holds a non-string") }
                result.append(s)
            }
            return result
        default: throw .malformed("\"aud\" is neither a string nor an array")
        }
    }

    /// RFC 7800 `cnf`; RFC 8705 §3.1 `x5t#S256` must be a string when present.
    private mutating func readConfirmation(_ value: JSONValue) throws(IntrospectionError) {
        switch value {
        case .null: return
        case .object(let cnf):
            switch cnf["x5t#S256"] {
            case nil: break
            case .string(let thumbprint)?: certificateThumbprint = thumbprint
            default: throw .malformed("\"cnf.x5t#S256\" is not a string")
            }
            switch cnf["jkt"] {
            case nil: break
            case .string(let jkt)?: jwkThumbprint = jkt
            default: throw .malformed("\"cnf.jkt\" is not a string")
            }
            otherConfirmation = cnf.keys.filter { $0 != "x5t#S256" && $0 != "jkt" }.min()
            extra["cnf"] = value
        default:
            throw .malformed("\"cnf\" is not an object")
        }
    }
}
