import Introspection
import NIOConcurrencyHelpers

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
    /// - Parameter headers: where accepted headers are remembered by their encoded text: a client
    ///   signs every proof with the same key, so its proofs share one header, and decoding it and
    ///   building the key (point validation, thumbprint) is then done once. nil: every time.
    public init(_ text: Substring, algorithms: [JWSAlgorithm], headers: HeaderMemo? = nil) throws(JOSEError) {
        guard text.utf8.count <= Self.maxLength else { throw JOSEError("the proof is longer than \(Self.maxLength) bytes") }
        let key: JSONWebKey
        let algorithm: JWSAlgorithm
        let claims: [String: JSONValue]
        let firstDot = text.utf8.firstIndex(of: UInt8(ascii: "."))
        if let headers, let firstDot, let known = headers.lookup(text[..<firstDot]) {
            // The header was accepted before: only the signature and the claims are new.
            (key, algorithm) = known
            let bytes = Array(text.utf8)
            let headerLength = text.utf8.distance(from: text.utf8.startIndex, to: firstDot)
            guard let secondDot = bytes[(headerLength + 1)...].firstIndex(of: UInt8(ascii: ".")),
                !bytes[(secondDot + 1)...].contains(UInt8(ascii: "."))
            else { throw JOSEError("not a compact JWS of three parts") }
            guard let payload = Base64URL.decode(bytes[(headerLength + 1)..<secondDot]) else { throw JOSEError("the payload is not base64url") }
            guard let signature = Base64URL.decode(bytes[(secondDot + 1)...]) else { throw JOSEError("the signature is not base64url") }
            guard key.isValidSignature(signature, for: Array(bytes[..<secondDot]), algorithm: algorithm) else {
                throw JOSEError("the signature does not verify with the proof's jwk")
            }
            claims = try CompactJWS.claims(of: payload)
        } else {
            let jws = try CompactJWS(text)
            guard jws.hasType(in: ["dpop+jwt"]) else { throw JOSEError("typ is not dpop+jwt") }
            guard algorithms.contains(jws.algorithm) else { throw JOSEError("alg \(jws.algorithm.rawValue) is not accepted for proofs") }
            guard case .object(let members)? = jws.header["jwk"] else { throw JOSEError("the header has no jwk object") }
            key = try JSONWebKey(members: members)
            algorithm = jws.algorithm
            guard key.fits(algorithm) else { throw JOSEError("the jwk does not fit alg \(algorithm.rawValue)") }
            guard jws.isSigned(by: key) else { throw JOSEError("the signature does not verify with the proof's jwk") }
            claims = try jws.claims()
            // Only a header that passed every check (and whose key verified a signature) is kept.
            if let headers, let firstDot { headers.remember(text[..<firstDot], key: key, algorithm: algorithm) }
        }
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
        self.algorithm = algorithm
        self.jti = jti
        self.htm = htm
        self.htu = htu
        self.iat = seconds
        self.ath = ath
        self.nonce = nonce
    }

    /// Proof headers already accepted, by their base64url text (bounded: emptied when full).
    public final class HeaderMemo: Sendable {
        private let entries = NIOLockedValueBox<[Substring: (JSONWebKey, JWSAlgorithm)]>([:])
        private let capacity: Int

        public init(capacity: Int = 4096) {
            self.capacity = capacity
        }

        func lookup(_ header: Substring) -> (JSONWebKey, JWSAlgorithm)? {
            entries.withLockedValue { $0[header] }
        }

        func remember(_ header: Substring, key: JSONWebKey, algorithm: JWSAlgorithm) {
            let owned = Substring(String(header))
            entries.withLockedValue { entries in
                if entries.count >= capacity { entries.removeAll(keepingCapacity: true) }
                entries[owned] = (key, algorithm)
            }
        }
    }

    private static func seconds(_ value: JSONValue) -> Int64? {
        switch value {
        case .integer, .number: return value.integerSeconds
        default: return nil
        }
    }
}
