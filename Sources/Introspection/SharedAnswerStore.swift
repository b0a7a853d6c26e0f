/// A store of answers shared by replicas (DESIGN.md §11), seen from one issuer's cache. The cache
/// asks it on a local miss, before the AS, and tells it what the AS answered. Every failure of
/// the store is a miss: it never decides anything on its own.
public protocol SharedAnswerStore: Sendable {
    /// What the store holds for a token: an answer another replica stored (with the wall-clock
    /// time it stops being fresh, in Unix seconds), a miss (with the store's purge epoch, to be
    /// handed back to `save`), or `unavailable` (down, slow, garbage: ask the AS, store nothing).
    func load(_ digest: TokenDigest) async -> SharedLoad

    /// Stores the AS's answer, set-if-absent, until `until` (Unix seconds), if the store's purge
    /// epoch is still `epoch`. Does not wait for the store.
    func save(_ digest: TokenDigest, info: TokenInfo, until: Double, epoch: SharedEpoch)

    /// While purge broadcasts cannot be received: the longest a local entry may live, in seconds
    /// from its insertion; nil while they can.
    var localLifetimeCap: Double? { get }
}

/// The store's purge-all counter when a lookup began: answers learned after an older epoch are
/// not shared.
public struct SharedEpoch: Sendable, Equatable {
    public var value: Int64
    public init(_ value: Int64) { self.value = value }
}

/// What `SharedAnswerStore.load` found.
public enum SharedLoad: Sendable {
    case hit(TokenInfo, until: Double)
    case miss(SharedEpoch)
    case unavailable
}

extension TokenInfo {
    /// The answer as RFC 7662 members, such that `TokenInfo(members:)` reads back an equal value
    /// (the shared store's payload). `rejection` is not among them.
    public var introspectionMembers: [String: JSONValue] {
        guard active else { return ["active": .bool(false)] }
        var members = extra
        members["active"] = .bool(true)
        if let scope { members["scope"] = .string(scope) }
        if let clientID { members["client_id"] = .string(clientID) }
        if let username { members["username"] = .string(username) }
        if let tokenType { members["token_type"] = .string(tokenType) }
        if let sub { members["sub"] = .string(sub) }
        if let iss { members["iss"] = .string(iss) }
        if let jti { members["jti"] = .string(jti) }
        if let exp { members["exp"] = .integer(exp) }
        if let iat { members["iat"] = .integer(iat) }
        if let nbf { members["nbf"] = .integer(nbf) }
        if !aud.isEmpty { members["aud"] = .array(aud.map(JSONValue.string)) }
        // The binding is written from the modelled fields, which are what the decision checks
        // (a merged answer may hold them without a `cnf` member of its own): never less binding.
        if certificateThumbprint != nil || jwkThumbprint != nil || otherConfirmation != nil {
            var cnf: [String: JSONValue] = [:]
            if case .object(let existing)? = extra["cnf"] { cnf = existing }
            if let certificateThumbprint { cnf["x5t#S256"] = .string(certificateThumbprint) }
            if let jwkThumbprint { cnf["jkt"] = .string(jwkThumbprint) }
            if let otherConfirmation, cnf[otherConfirmation] == nil { cnf[otherConfirmation] = .bool(true) }
            members["cnf"] = .object(cnf)
        }
        return members
    }
}
