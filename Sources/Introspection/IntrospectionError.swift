/// An authorization-server fault: the AS could not tell us whether a token is active.
///
/// Never an "inactive" answer, never cached. `label` is bounded and feeds logs and metrics; the
/// associated detail goes to debug logs only.
public enum IntrospectionError: Error, Sendable, Equatable, CustomStringConvertible {
    /// TCP connect refused, reset or failed.
    case connect(String)
    /// No complete answer within `timeout_ms`.
    case timeout
    /// TLS handshake or certificate verification failed.
    case tls(String)
    /// HTTP status other than 200 (a 401 means our own client credentials are wrong).
    case status(Int)
    /// Body is not JSON, not an object, or has no boolean `active`.
    case malformed(String)
    /// Body larger than the configured bound.
    case tooLarge(Int)
    /// Too many calls waiting for the AS.
    case overloaded
    /// Any other transport failure.
    case transport(String)
    /// The issuer's signing keys could not be obtained (discovery or key set fetch failed, or the
    /// set has no usable key), so a JWT can be neither accepted nor refused (DESIGN.md §9).
    case keysUnavailable(String)

    /// A bounded label for metrics and logs.
    public var label: String {
        switch self {
        case .connect: return "connect"
        case .timeout: return "timeout"
        case .tls: return "tls"
        case .status(let code): return code == 401 ? "status_401" : (400..<500).contains(code) ? "status_4xx" : "status_5xx"
        case .malformed: return "malformed"
        case .tooLarge: return "too_large"
        case .overloaded: return "overloaded"
        case .transport: return "transport"
        case .keysUnavailable: return "keys_unavailable"
        }
    }

    public var description: String {
        switch self {
        case .connect(let detail): return "cannot connect to the authorization server: \(detail)"
        case .timeout: return "the authorization server did not answer in time"
        case .tls(let detail): return "TLS with the authorization server failed: \(detail)"
        case .status(let code):
            return code == 401
                ? "the authorization server answered 401: check the introspection client credentials"
                : "the authorization server answered HTTP \(code)"
        case .malformed(let detail): return "malformed introspection response: \(detail)"
        case .tooLarge(let limit): return "introspection response larger than \(limit) bytes"
        case .overloaded: return "too many introspection calls waiting"
        case .transport(let detail): return "introspection failed: \(detail)"
        case .keysUnavailable(let detail): return "the issuer's signing keys are unavailable: \(detail)"
        }
    }
}
