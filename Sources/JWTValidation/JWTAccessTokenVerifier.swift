import Introspection
import JOSE
import Metrics

/// Validates JWT access tokens (RFC 9068) locally with the issuer's keys and reads their claims
/// into the token model introspection fills, so every rule of DESIGN.md §5 and header of §6
/// applies unchanged. A token that fails a check is an inactive answer with the reason
/// (`TokenInfo.rejected`, a 401); only keys that cannot be obtained are a fault (a 503).
///
/// What is checked here depends on the token alone (and so may be cached with it): the JWS
/// form, `alg`, key, `typ`, `crit`, signature, `iss`, and that `exp` is present. What depends on
/// the time or the route (`exp`, `nbf`, `aud`, binding, scopes) is the decision's.
public struct JWTAccessTokenVerifier: SynchronousTokenIntrospector {
    private let configuration: IssuerConfiguration
    private let keys: IssuerKeys
    private let valid: Counter
    private let invalid: Counter

    public init(configuration: IssuerConfiguration, keys: IssuerKeys, metrics factory: any MetricsFactory = MetricsSystem.factory) {
        self.configuration = configuration
        self.keys = keys
        self.valid = Counter(label: "authz_jwt_verifications_total", dimensions: [("issuer", configuration.name), ("outcome", "valid")], factory: factory)
        self.invalid = Counter(label: "authz_jwt_verifications_total", dimensions: [("issuer", configuration.name), ("outcome", "invalid")], factory: factory)
    }

    public func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        switch check(token) {
        case .done(let info):
            return counted(info)
        case .needsKey(let jws, let claims):
            return counted(finish(jws, claims, try await keys.key(id: jws.keyID, for: jws.algorithm)))
        }
    }

    /// The answer when the keys in hand decide it (the usual case): no task, no suspension.
    public func introspectWithoutSuspending(_ token: String) -> TokenInfo? {
        switch check(token) {
        case .done(let info):
            return counted(info)
        case .needsKey(let jws, let claims):
            guard let match = keys.keyWithoutSuspending(id: jws.keyID, for: jws.algorithm) else { return nil }
            return counted(finish(jws, claims, match))
        }
    }

    private func counted(_ info: TokenInfo) -> TokenInfo {
        (info.active ? valid : invalid).increment()
        return info
    }

    private enum Step {
        case done(TokenInfo)
        case needsKey(CompactJWS, [String: JSONValue])
    }

    /// Every check that needs no key.
    private func check(_ token: String) -> Step {
        let jws: CompactJWS
        let claims: [String: JSONValue]
        do {
            jws = try CompactJWS(token[...])
            claims = try jws.claims()
        } catch {
            return .done(.rejected(error.description))
        }
        guard configuration.algorithms.contains(jws.algorithm) else {
            return .done(.rejected("alg \(jws.algorithm.rawValue) is not on the issuer's allow-list"))
        }
        guard jws.hasType(in: configuration.tokenTypes) else {
            return .done(.rejected("typ \"\((jws.type ?? "(none)").prefix(32))\" is not one of \(configuration.tokenTypes)"))
        }
        // The issuer is checked before any key is looked up: a token of another issuer must not
        // make this one fetch its key set.
        guard case .string(let issuer)? = claims["iss"] else { return .done(.rejected("the claims have no string \"iss\"")) }
        guard issuer == configuration.issuer else { return .done(.rejected("iss \"\(issuer.prefix(100))\" is not this issuer's")) }
        guard let exp = claims["exp"], exp.integerSeconds != nil else { return .done(.rejected("the claims have no numeric \"exp\"")) }
        return .needsKey(jws, claims)
    }

    /// The signature with the chosen key, then the claims read into the token model.
    private func finish(_ jws: CompactJWS, _ claims: [String: JSONValue], _ match: JSONWebKeySet.KeyMatch) -> TokenInfo {
        let key: JSONWebKey
        switch match {
        case .key(let found): key = found
        case .unknownKeyID: return .rejected("kid \"\((jws.keyID ?? "").prefix(64))\" is not in the issuer's key set")
        case .unfit: return .rejected("no key of the issuer fits alg \(jws.algorithm.rawValue)\(jws.keyID.map { " with kid \"\($0.prefix(64))\"" } ?? "")")
        case .ambiguous: return .rejected("several keys fit alg \(jws.algorithm.rawValue) and the token names no single one")
        }
        guard jws.isSigned(by: key) else { return .rejected("the signature does not verify") }

        var info: TokenInfo
        do throws(IntrospectionError) {
            info = try TokenInfo(verifiedClaims: claims)
        } catch {
            return .rejected("claims: \(error.description)")
        }
        // X-Credential-Token-Type is the scheme that was verified (DESIGN.md §9), unless the
        // claims name a kind that is refused anyway (§5.4).
        if info.refusedKind == nil { info.tokenType = "Bearer" }
        return info
    }
}

/// `jwt_then_introspect` (DESIGN.md §9): verified first, so a forgery never reaches the AS, then
/// introspected so that revocation is seen; the introspection answer decides.
public struct VerifiedThenIntrospected: TokenIntrospector {
    private let verifier: JWTAccessTokenVerifier
    private let introspector: any TokenIntrospector

    public init(verifier: JWTAccessTokenVerifier, introspector: any TokenIntrospector) {
        self.verifier = verifier
        self.introspector = introspector
    }

    public func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        let verified = try await verifier.introspect(token)
        guard verified.active else { return verified }
        var answer = try await introspector.introspect(token)
        guard answer.active else { return answer }
        // The AS decides, but what the signed token proves is never dropped: an introspection
        // answer that leaves out the binding or the audience keeps the JWT's (a binding left out
        // must not make a bound token a bearer one).
        if answer.certificateThumbprint == nil { answer.certificateThumbprint = verified.certificateThumbprint }
        if answer.jwkThumbprint == nil { answer.jwkThumbprint = verified.jwkThumbprint }
        if answer.otherConfirmation == nil { answer.otherConfirmation = verified.otherConfirmation }
        if answer.aud.isEmpty { answer.aud = verified.aud }
        if answer.iss == nil { answer.iss = verified.iss }
        // X-Credential-Token-Type is the scheme that was verified (DESIGN.md §9).
        if answer.refusedKind == nil { answer.tokenType = "Bearer" }
        return answer
    }
}
