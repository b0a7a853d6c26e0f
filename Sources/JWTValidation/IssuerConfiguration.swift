import Introspection
import JOSE

/// One entry of `issuers:` (DESIGN.md §9): who issues tokens, how they are validated, and where
/// the keys and the introspection endpoint are.
public struct IssuerConfiguration: Sendable, Equatable {
    public enum Validation: String, Sendable, CaseIterable {
        case jwt
        case introspection
        case jwtThenIntrospect = "jwt_then_introspect"

        /// Whether tokens are verified locally (before any introspection).
        public var verifiesJWT: Bool { self != .introspection }
        public var introspects: Bool { self != .jwt }
    }

    /// The name policies use; `default` is the top-level `introspection:` block.
    public var name: String
    /// The exact `iss` of its tokens; nil only for an introspection issuer without one.
    public var issuer: String?
    public var validation: Validation
    /// A JWT's `aud` must hold one of these (RFC 9068 §4), unless `allowAnyAudience`; a policy's
    /// own `audiences` take their place.
    public var audiences: [String]
    public var allowAnyAudience: Bool
    /// nil: discovery.
    public var jwksURI: String?
    public var caFile: String?
    public var verifyTLS: Bool
    public var insecure: Bool
    /// Deadline of one discovery or key set fetch.
    public var timeoutMilliseconds: Int
    /// Larger discovery documents and key sets are a failed fetch.
    public var maxJWKSBytes: Int
    public var algorithms: [JWSAlgorithm]
    /// Accepted header `typ` values.
    public var tokenTypes: [String]
    public var jwksCacheSeconds: Double
    public var jwksMinRefetchSeconds: Double
    /// For the introspection modes.
    public var introspection: IntrospectionConfiguration?

    public init(
        name: String,
        issuer: String?,
        validation: Validation,
        audiences: [String] = [],
        allowAnyAudience: Bool = false,
        jwksURI: String? = nil,
        caFile: String? = nil,
        verifyTLS: Bool = true,
        insecure: Bool = false,
        timeoutMilliseconds: Int = 1500,
        maxJWKSBytes: Int = 1 << 20,
        algorithms: [JWSAlgorithm] = JWSAlgorithm.defaultAllowed,
        tokenTypes: [String] = ["at+jwt"],
        jwksCacheSeconds: Double = 300,
        jwksMinRefetchSeconds: Double = 30,
        introspection: IntrospectionConfiguration? = nil
    ) {
        self.name = name
        self.issuer = issuer
        self.validation = validation
        self.audiences = audiences
        self.allowAnyAudience = allowAnyAudience
        self.jwksURI = jwksURI
        self.caFile = caFile
        self.verifyTLS = verifyTLS
        self.insecure = insecure
        self.timeoutMilliseconds = timeoutMilliseconds
        self.maxJWKSBytes = maxJWKSBytes
        self.algorithms = algorithms
        self.tokenTypes = tokenTypes
        self.jwksCacheSeconds = jwksCacheSeconds
        self.jwksMinRefetchSeconds = jwksMinRefetchSeconds
        self.introspection = introspection
    }

    /// The top-level `introspection:` block as the issuer `default`.
    public static func `default`(_ introspection: IntrospectionConfiguration) -> IssuerConfiguration {
        IssuerConfiguration(
            name: "default", issuer: introspection.expectedIssuer, validation: .introspection,
            caFile: introspection.caFile, verifyTLS: introspection.verifyTLS, insecure: introspection.insecure,
            introspection: introspection
        )
    }

    /// Whether the issuer needs its key set: to verify JWTs, or signed introspection answers.
    public var needsKeys: Bool {
        validation.verifiesJWT || (validation.introspects && introspection?.responseFormat == .jwt)
    }

    /// The discovery documents to try, in order: OpenID Connect Discovery 1.0 §4, then RFC 8414
    /// §3 (the well-known part inserted between the host and the issuer's path).
    public var discoveryURLs: [String] {
        guard let issuer else { return [] }
        let bytes = Array(issuer.utf8)
        guard let colon = bytes.firstIndex(of: UInt8(ascii: ":")), bytes[colon...].starts(with: "://".utf8) else { return [] }
        let hostStart = colon + 3
        let pathStart = bytes[hostStart...].firstIndex(of: UInt8(ascii: "/")) ?? bytes.endIndex
        let origin = String(decoding: bytes[..<pathStart], as: UTF8.self)
        var path = String(decoding: bytes[pathStart...], as: UTF8.self)
        if path.hasSuffix("/") { path.removeLast() }
        return [origin + path + "/.well-known/openid-configuration", origin + "/.well-known/oauth-authorization-server" + path]
    }
}
