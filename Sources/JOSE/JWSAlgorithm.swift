/// The JWS signature algorithms the sidecar verifies (RFC 7518 §3, RFC 8037 §3.1). Every one is
/// asymmetric: `none` and the HMAC family are not representable, so no configuration and no
/// token header can select them.
public enum JWSAlgorithm: String, Sendable, CaseIterable, Hashable {
    case rs256 = "RS256", rs384 = "RS384", rs512 = "RS512"
    case ps256 = "PS256", ps384 = "PS384", ps512 = "PS512"
    case es256 = "ES256", es384 = "ES384"
    case edDSA = "EdDSA"

    /// The default allow-list (DESIGN.md §9).
    public static let defaultAllowed: [JWSAlgorithm] = [.rs256, .ps256, .es256, .edDSA]

    /// Whether a name is one of the symmetric or unsigned algorithms that must never be accepted
    /// (for a clear configuration error rather than "unknown algorithm").
    public static func isForbidden(_ name: String) -> Bool {
        let upper = name.uppercased()
        return upper == "NONE" || upper.hasPrefix("HS")
    }
}
