import Introspection

/// The outcome of a decision: allow with a grant, or a denial. A fault is not a decision: it
/// travels as an `IntrospectionError`.
public enum Decision: Sendable, Equatable {
    case allow(Grant)
    case deny(Denial)
}

/// What an allowed request carries upstream.
public struct Grant: Sendable, Equatable {
    /// nil for anonymous access.
    public var token: TokenInfo?
    /// Seconds the proxy may cache this answer (0 = not at all).
    public var cacheSeconds: Int64
    /// The DPoP proof key's thumbprint, when the token was presented with a valid proof.
    public var dpopKey: String?

    public init(token: TokenInfo?, cacheSeconds: Int64 = 0, dpopKey: String? = nil) {
        self.token = token
        self.cacheSeconds = cacheSeconds
        self.dpopKey = dpopKey
    }
}

/// Why a request is refused; bounded, used as a metric label and in logs.
public enum DenialReason: String, Sendable, CaseIterable {
    case noPolicy = "no_policy"
    /// The readings of the path select different policies, climb above the root, or the path
    /// holds a control character (DESIGN.md §5.1).
    case ambiguousPath = "ambiguous_path"
    /// An nginx-form question without `X-Original-URI`: a proxy misconfiguration.
    case missingOriginalURI = "missing_original_uri"
    case noToken = "no_token"
    case malformedToken = "malformed_token"
    /// `Authorization: DPoP …` under `dpop: disabled`: never "no token", never accepted.
    case dpopUnsupported = "dpop_unsupported"
    /// The DPoP proof is missing, repeated, malformed, or does not fit the request (RFC 9449 §4.3).
    case dpopProof = "dpop_proof"
    /// A server nonce is required and the proof has none, or a stale one.
    case dpopNonce = "dpop_nonce"
    /// A Bearer token on a `dpop: required` policy.
    case dpopRequired = "dpop_required"
    /// `Authorization: DPoP` with a token that is not bound to a key (no `cnf.jkt`).
    case dpopUnbound = "dpop_unbound"
    case requestTooLarge = "request_too_large"
    case inactive
    /// A JWT refused by local validation (form, algorithm, key, type, signature, issuer, claims).
    case jwtInvalid = "jwt_invalid"
    /// No issuer the policy accepts takes the token (DESIGN.md §9 routing).
    case noIssuer = "no_issuer"
    case expired
    case notYetValid = "not_yet_valid"
    case issuerMismatch = "issuer_mismatch"
    case audienceMismatch = "audience_mismatch"
    /// A refresh, offline, ID or logout token (DESIGN.md §5.4): only access tokens pass.
    case tokenKind = "token_kind"
    case certificateMissing = "certificate_missing"
    case certificateInvalid = "certificate_invalid"
    case bindingMismatch = "binding_mismatch"
    case unboundToken = "unbound_token"
    /// A `cnf` binding the sidecar cannot check (`jkt` sent as Bearer, or an unknown member).
    case unsupportedBinding = "unsupported_binding"
    case insufficientScope = "insufficient_scope"
    /// A `required_claims` entry is not met (DESIGN.md §9).
    case claims
}

/// A refusal: 401 or 403, with the RFC 6750 §3.1 error code that goes with it.
public struct Denial: Sendable, Equatable {
    /// RFC 6750 §3.1 error codes.
    public enum ErrorCode: String, Sendable {
        case invalidRequest = "invalid_request"
        case invalidToken = "invalid_token"
        case insufficientScope = "insufficient_scope"
        /// RFC 9449 §7.1.
        case invalidDPoPProof = "invalid_dpop_proof"
        case useDPoPNonce = "use_dpop_nonce"
    }

    public var reason: DenialReason
    /// Detail for the log line (never a token).
    public var detail: String?

    public init(_ reason: DenialReason, detail: String? = nil) {
        self.reason = reason
        self.detail = detail
    }

    /// 403 when the token is good but not for this route; 401 otherwise.
    public var status: Int {
        switch reason {
        case .insufficientScope, .claims, .noPolicy, .ambiguousPath, .missingOriginalURI: return 403
        default: return 401
        }
    }

    /// The RFC 6750 error code; none when no bearer token was sent (§3.1) or no policy matched.
    public var errorCode: ErrorCode? {
        switch reason {
        case .noToken, .noPolicy, .ambiguousPath, .missingOriginalURI, .dpopRequired: return nil
        case .dpopProof: return .invalidDPoPProof
        case .dpopNonce: return .useDPoPNonce
        case .malformedToken, .requestTooLarge, .dpopUnsupported: return .invalidRequest
        case .insufficientScope, .claims: return .insufficientScope
        default: return .invalidToken
        }
    }

    /// The Kong-style message.
    public var message: String {
        reason == .noToken ? "Unauthenticated." : "The resource owner or authorization server denied the request."
    }
}
