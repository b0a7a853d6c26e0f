import Introspection
import JOSE

/// RFC 9701 signed introspection answers (`introspection.response_format: jwt`): the AS's answer
/// is a JWS signed with its keys; it is believed only once the signature, `typ`, `iss`, `aud` and
/// `iat` are checked. An answer that fails any check is an AS fault (503), never an allow and
/// never a refusal: the sidecar could not learn what the AS said.
///
/// Glewlwyd 2.7 deviates: its `aud` is the token's own audience rather than the resource
/// server's client id (so its answers fail the `aud` check), and it answers an unknown or inactive
/// token with HTTP 400 and an empty body instead of a signed `active: false` (a fault here).
public struct SignedIntrospection: TokenIntrospector {
    /// How far `iat` may be from now, either way.
    public static let maxClockDifference: Int64 = 300

    private let raw: any RawTokenIntrospector
    private let keys: IssuerKeys
    private let issuer: String
    private let audience: String
    private let algorithms: [JWSAlgorithm]
    private let clock: any EpochClock

    /// - Parameters:
    ///   - audience: the sidecar's own client id at the AS (RFC 9701 §5: the answer's `aud`).
    public init(raw: any RawTokenIntrospector, keys: IssuerKeys, issuer: String, audience: String, algorithms: [JWSAlgorithm], clock: any EpochClock = SystemEpochClock()) {
        self.raw = raw
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.clock = clock
    }

    public func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        let body = try await raw.introspectRaw(token)
        let text = String(decoding: body, as: UTF8.self).trimmingASCIIWhitespace
        let jws: CompactJWS
        let claims: [String: JSONValue]
        do {
            jws = try CompactJWS(text)
            claims = try jws.claims()
        } catch {
            throw .malformed("signed introspection response: \(error.description)")
        }
        guard algorithms.contains(jws.algorithm) else { throw .malformed("signed introspection response: alg \(jws.algorithm.rawValue) is not allowed") }
        guard jws.hasType(in: ["token-introspection+jwt"]) else {
            throw .malformed("signed introspection response: typ is not token-introspection+jwt")
        }
        let key: JSONWebKey
        switch try await keys.key(id: jws.keyID, for: jws.algorithm) {
        case .key(let found): key = found
        case .unknownKeyID, .unfit, .ambiguous: throw .malformed("signed introspection response: no key of the issuer verifies it")
        }
        guard jws.isSigned(by: key) else { throw .malformed("signed introspection response: the signature does not verify") }
        guard claims["iss"]?.stringValue == issuer else { throw .malformed("signed introspection response: iss is not \(issuer)") }
        let audiences: [String]
        switch claims["aud"] {
        case .string(let one)?: audiences = [one]
        case .array(let many)?: audiences = many.compactMap(\.stringValue)
        default: audiences = []
        }
        guard audiences.contains(audience) else { throw .malformed("signed introspection response: aud does not name this client (\(audience))") }
        guard let iat = claims["iat"]?.integerSeconds, abs(iat - Int64(clock.now())) <= Self.maxClockDifference else {
            throw .malformed("signed introspection response: iat is missing or more than \(Self.maxClockDifference) s from now")
        }
        guard case .object(let members)? = claims["token_introspection"] else {
            throw .malformed("signed introspection response: no token_introspection object")
        }
        return try TokenInfo(members: members)
    }
}

extension String {
    var trimmingASCIIWhitespace: Substring {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\n" || $0 == "\r" || $0 == "\t" }
        guard let start = firstIndex(where: { !isSpace($0) }), let end = lastIndex(where: { !isSpace($0) }) else { return "" }
        return self[start...end]
    }
}
