import Introspection

/// A DPoP proof (RFC 9449 §4.2), its signature verified with the public key it carries: the
/// claims are what the key's holder signed. What they must say about this request (method, URL,
/// time, token, replay, nonce) is the caller's to check (§4.3).
public struct DPoPProof: Sendable {
    /// Longer proofs are refused before any parsing.
    public static let maxLength = 8192
    public static let maxJTILength = 256

    /// The proof's `jwk`; its `thumbprint` is what a bound token's `cnf.jkt` holds.
    public let key: JSONWebKey
    public let algorithm: JWSAlgorithm
    public let jti: String
    public let htm: String
    public let htu: String
    public let iat: Int64
    public let ath: String?
    public let nonce: String?

    /// Parses and verifies: compact JWS, `typ: dpop+jwt`, `alg` on `algorithms`, a public `jwk`
    /// (no private member) that fits `alg` and verifies the signature, and claims of the right
    /// types (`jti`, `htm`, `htu` strings, `iat` a number; `ath`, `nonce` strings when present).
    /// - Parameter keys: where keys built from `jwk` members are remembered; nil builds each.
    public init(_ text: Substring, algorithms: [JWSAlgorithm], keys: JSONWebKeyMemo? = nil) throws(JOSEError) {
        guard text.utf8.count <= Self.maxLength else { throw JOSEError("the proof is longer than \(Self.maxLength) bytes") }
        let jws = try CompactJWS(text)
        guard jws.hasType(in: ["dpop+jwt"]) else { throw JOSEError("typ is not dpop+jwt") }
        guard algorithms.contains(jws.algorithm) else { throw JOSEError("alg \(jws.algorithm.rawValue) is not accepted for proofs") }
        guard case .object(let members)? = jws.header["jwk"] else { throw JOSEError("the header has no jwk object") }
        let key: JSONWebKey
        if let keys { key = try keys.key(members: members) } else { key = try JSONWebKey(members: members) }
        guard key.fits(jws.algorithm) else { throw JOSEError("the jwk does not fit alg \(jws.algorithm.rawValue)") }
        guard jws.isSigned(by: key) else { throw JOSEError("the signature does not verify with the proof's jwk") }
        let claims = try jws.claims()
        guard case .string(let jti)? = claims["jti"], !jti.isEmpty, jti.utf8.count <= Self.maxJTILength else {
            throw JOSEError("jti is missing, empty, longer than \(Self.maxJTILength) bytes or not a string")
        }
        guard case .string(let htm)? = claims["htm"] else { throw JOSEError("htm is missing or not a string") }
        guard case .string(let htu)? = claims["htu"] else { throw JOSEError("htu is missing or not a string") }
        guard let iat = claims["iat"], case let seconds? = Self.seconds(iat) else { throw JOSEError("iat is missing or not a number") }
        var ath: String?
        if let value = claims["ath"] {
            guard case .string(let text) = value else { throw JOSEError("ath is not a string") }
            ath = text
        }
        var nonce: String?
        if let value = claims["nonce"] {
            guard case .string(let text) = value else { throw JOSEError("nonce is not a string") }
            nonce = text
        }
        self.key = key
        self.algorithm = jws.algorithm
        self.jti = jti
        self.htm = htm
        self.htu = htu
        self.iat = seconds
        self.ath = ath
        self.nonce = nonce
    }

    private static func seconds(_ value: JSONValue) -> Int64? {
        switch value {
        case .integer, .number: return value.integerSeconds
        default: return nil
        }
    }
}
