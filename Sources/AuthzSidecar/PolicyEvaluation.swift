import HTTPTypes
import Introspection

/// The decision proper (DESIGN.md §5 steps 4–7): a pure function of the token's introspection,
/// the request, the policy and the time.
///
/// A class: the authorizer picks one per request, and a reference costs one retain where a copy
/// of the policy costs one per field.
public final class PolicyEvaluation: Sendable {
    public let policy: PolicyConfiguration
    /// For `decide` without an issuer: the `iss` an answer must carry.
    public let expectedIssuer: String?
    /// Where the policy sends a token (DESIGN.md §9).
    let route: IssuerRoute
    /// Where decoded certificate headers are remembered; nil decodes every time.
    let thumbprints: ThumbprintCache?

    public convenience init(policy: PolicyConfiguration, expectedIssuer: String? = nil) {
        self.init(policy: policy, expectedIssuer: expectedIssuer, route: .none, thumbprints: nil)
    }

    convenience init(policy: PolicyConfiguration, route: IssuerRoute, thumbprints: ThumbprintCache?) {
        self.init(policy: policy, expectedIssuer: nil, route: route, thumbprints: thumbprints)
    }

    private init(policy: PolicyConfiguration, expectedIssuer: String?, route: IssuerRoute, thumbprints: ThumbprintCache?) {
        self.policy = policy
        self.expectedIssuer = expectedIssuer
        self.route = route
        self.thumbprints = thumbprints
    }

    /// Decides for a token as its issuer validated it (introspection or a verified JWT).
    /// `dpopKey`: the thumbprint of the key of a verified DPoP proof, when the token came with the
    /// DPoP scheme.
    func decide(token info: TokenInfo, request: AccessRequest, now: Double, issuer: Issuer, dpopKey: String? = nil, trace: DecisionTrace? = nil) -> Decision {
        decide(token: info, request: request, now: now, expectedIssuer: issuer.expectedIssuer, issuerAudiences: issuer.audiences, dpopKey: dpopKey, trace: trace)
    }

    /// Decides for an introspected token.
    public func decide(token info: TokenInfo, request: AccessRequest, now: Double, dpopKey: String? = nil) -> Decision {
        decide(token: info, request: request, now: now, expectedIssuer: expectedIssuer, issuerAudiences: [], dpopKey: dpopKey)
    }

    private func decide(
        token info: TokenInfo, request: AccessRequest, now: Double, expectedIssuer: String?, issuerAudiences: [String], dpopKey: String?,
        trace: DecisionTrace? = nil
    ) -> Decision {
        // 4. active, time window, issuer, audience
        guard info.active else {
            trace?.add("active", "no: the token is not active" + (info.rejection.map { " (\($0))" } ?? ""))
            if let rejection = info.rejection { return .deny(Denial(.jwtInvalid, detail: rejection)) }
            return .deny(Denial(.inactive))
        }
        let skew = Double(policy.clockSkewSeconds)
        if let exp = info.exp, Double(exp) + skew <= now {
            trace?.add("time window", "expired: exp \(exp) + clock_skew \(policy.clockSkewSeconds) s <= now \(Int64(now))")
            return .deny(Denial(.expired))
        }
        if let nbf = info.nbf, Double(nbf) - skew > now {
            trace?.add("time window", "not yet valid: nbf \(nbf) - clock_skew \(policy.clockSkewSeconds) s > now \(Int64(now))")
            return .deny(Denial(.notYetValid))
        }
        trace?.add("time window", "ok: exp \(info.exp.map(String.init) ?? "none"), nbf \(info.nbf.map(String.init) ?? "none"), now \(Int64(now))")
        if let expectedIssuer, info.iss != expectedIssuer {
            trace?.add("issuer", "mismatch: expected \(expectedIssuer), the token says \(info.iss ?? "nothing")")
            return .deny(Denial(.issuerMismatch))
        }
        // A policy's audiences take the place of its issuer's (RFC 9068 §4 for JWTs).
        let audiences = policy.audiences.isEmpty ? issuerAudiences : policy.audiences
        if !audiences.isEmpty, !info.aud.contains(where: audiences.contains) {
            trace?.add("audience", "mismatch: one of [\(audiences.joined(separator: ", "))] required, the token has [\(info.aud.prefix(5).joined(separator: ", "))]")
            return .deny(Denial(.audienceMismatch))
        }
        trace?.add("issuer and audience", "ok" + (expectedIssuer.map { ": iss \($0)" } ?? "") + (audiences.isEmpty ? "" : "; aud one of [\(audiences.joined(separator: ", "))]"))
        // only access tokens pass (§5.4)
        if let kind = info.refusedKind {
            trace?.add("token kind", "refused: \(kind.prefix(32)) is not an access token")
            return .deny(Denial(.tokenKind, detail: "token_type/typ \"\(kind.prefix(32))\" is not an access token"))
        }

        // 5. a binding is never ignored: a DPoP key binding needs the proof by that key (RFC 9449
        // §7.1), and one the sidecar cannot check refuses the token
        if let jkt = info.jwkThumbprint {
            trace?.add("binding cnf.jkt", dpopKey == nil ? "no DPoP proof came with the token" : jkt == dpopKey ? "match: the proof's key is \(jkt)" : "mismatch: bound to \(jkt), the proof's key is \(dpopKey ?? "")")
            guard let dpopKey else {
                return .deny(Denial(.unsupportedBinding, detail: "token is DPoP-bound (cnf.jkt) but came as Bearer, without a DPoP proof"))
            }
            guard jkt == dpopKey else {
                return .deny(Denial(.bindingMismatch, detail: "the DPoP proof's key \(dpopKey) is not the one the token is bound to"))
            }
        } else if dpopKey != nil {
            trace?.add("binding cnf.jkt", "the token is not bound to a key, but came with the DPoP scheme")
            return .deny(Denial(.dpopUnbound, detail: "Authorization: DPoP with a token that is not bound to a key (no cnf.jkt)"))
        }
        if let other = info.otherConfirmation {
            trace?.add("binding", "cnf.\(other.prefix(32)): a binding the sidecar cannot check")
            return .deny(Denial(.unsupportedBinding, detail: "token has a cnf member the sidecar cannot check: \(other.prefix(32))"))
        }

        // certificate binding (RFC 8705 §3), on every request
        if let bound = info.certificateThumbprint {
            let thumbprint: CertificateThumbprint
            switch certificate(of: request) {
            case .none:
                trace?.add("binding cnf.x5t#S256", "bound to \(bound.prefix(64)), but no certificate came (\(policy.certificateHeader.map { "header \($0)" } ?? "peer certificate"))")
                return .deny(Denial(.certificateMissing, detail: "token is certificate-bound but no certificate was presented"))
            case .failure(let error):
                trace?.add("binding cnf.x5t#S256", "the certificate cannot be read: \(error.description)")
                return .deny(Denial(.certificateInvalid, detail: error.description))
            case .success(let presented):
                thumbprint = presented
            }
            trace?.add(
                "binding cnf.x5t#S256",
                thumbprint.matches(x5tS256: bound) ? "match: certificate \(thumbprint.base64URL)" : "mismatch: bound to \(bound.prefix(64)), certificate \(thumbprint.base64URL)"
            )
            guard thumbprint.matches(x5tS256: bound) else {
                return .deny(Denial(.bindingMismatch, detail: "certificate \(thumbprint.base64URL) is not the one the token is bound to"))
            }
        } else if policy.requireBoundToken, info.jwkThumbprint == nil {
            trace?.add("binding", "the token is bound to nothing, and the policy has require_bound_token")
            return .deny(Denial(.unboundToken))
        } else if info.jwkThumbprint == nil {
            trace?.add("binding", "the token is bound to nothing (the policy does not require a binding)")
        }

        // 6. scopes
        if !policy.requiredScopes.isEmpty {
            let satisfied: Bool
            switch policy.scopeMatch {
            case .all: satisfied = policy.requiredScopes.allSatisfy(info.grants(scope:))
            case .any: satisfied = policy.requiredScopes.contains(where: info.grants(scope:))
            }
            trace?.add(
                "scopes", "\(satisfied ? "ok" : "insufficient"): \(policy.scopeMatch == .all ? "all" : "any") of [\(policy.requiredScopes.joined(separator: " "))] required, granted \"\((info.scope ?? "").prefix(256))\""
            )
            guard satisfied else { return .deny(Denial(.insufficientScope)) }
        } else {
            trace?.add("scopes", "none required")
        }
        // 6b. required claims (DESIGN.md §9)
        for claim in policy.requiredClaims where !claim.isSatisfied(by: info) {
            trace?.add("claims", "claim \(claim.name.prefix(64)) is missing or has none of the required values")
            return .deny(Denial(.claims, detail: "claim \(claim.name.prefix(64)) is missing or has none of the required values"))
        }

        // 7. allow; a proxy may cache it no longer than the token lives
        // A proof is good once: an answer to a DPoP request is never cached by the proxy.
        var cacheSeconds: Int64 = 0
        if policy.proxyCacheSeconds > 0, dpopKey == nil {
            let remaining = info.exp.map { $0 - Int64(now.rounded(.up)) } ?? policy.proxyCacheSeconds
            cacheSeconds = max(0, min(policy.proxyCacheSeconds, remaining))
        }
        if !policy.requiredClaims.isEmpty { trace?.add("claims", "ok: \(policy.requiredClaims.map(\.name).joined(separator: ", "))") }
        return .allow(Grant(token: info, cacheSeconds: cacheSeconds, dpopKey: dpopKey))
    }

    /// The certificate from the one source the policy names: its header, or else (gRPC) the peer
    /// certificate. nil when none was presented.
    func certificate(of request: AccessRequest) -> Result<CertificateThumbprint, CertificateError>? {
        let value: String
        var format = policy.certificateFormat
        if let headerName = policy.certificateHeader {
            guard let name = policy.certificateField else { return nil }
            let values = request.headers.values(name)
            guard let first = values.first else { return nil }
            let count = values.count
            guard count == 1 else { return .failure(CertificateError("\(headerName) appears \(count) times")) }
            value = first
        } else if let peer = request.peerCertificate {
            value = peer
            format = .pemURLEncoded
        } else {
            return nil
        }
        let element = policy.xfccElement
        return Result { () throws(CertificateError) in
            if let thumbprints {
                return try thumbprints.thumbprint(header: value, format: format, element: element)
            }
            return try ClientCertificate.thumbprint(header: value, format: format, xfccElement: element)
        }
    }
}
