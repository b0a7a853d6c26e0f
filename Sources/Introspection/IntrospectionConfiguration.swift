/// How to reach the authorization server's introspection endpoint (DESIGN.md §3 `introspection`).
public struct IntrospectionConfiguration: Sendable, Equatable {
    /// How the sidecar authenticates to the AS (RFC 7662 §2.1, RFC 6749 §2.3.1, RFC 8705 §2).
    public enum AuthMethod: String, Sendable, CaseIterable {
        case clientSecretBasic = "client_secret_basic"
        case clientSecretPost = "client_secret_post"
        case tlsClientAuth = "tls_client_auth"
        case none
    }

    /// The RFC 7662 endpoint, `https://…` (or `http://` to loopback, or with `insecure`).
    public var endpoint: String
    public var clientID: String?
    public var clientSecret: Secret?
    public var authMethod: AuthMethod
    /// PEM certificate chain and key for `tls_client_auth`.
    public var clientCertificateFile: String?
    public var clientKeyFile: String?
    /// PEM trust roots for the AS; nil = the system's roots.
    public var caFile: String?
    public var verifyTLS: Bool
    /// Acknowledges `verify_tls: false` or plain http to a non-loopback AS.
    public var insecure: Bool
    /// Deadline for one introspection call, connect to last body byte.
    public var timeoutMilliseconds: Int
    /// Pooled keep-alive connections to the AS, which also bounds concurrent calls.
    public var maxConnections: Int
    /// Larger response bodies are a fault.
    public var maxResponseBytes: Int
    /// When set, an active token's `iss` must equal it.
    public var expectedIssuer: String?
    /// `json` (RFC 7662) or `jwt` (RFC 9701 signed answers, verified with the issuer's keys).
    public var responseFormat: ResponseFormat

    public enum ResponseFormat: String, Sendable, CaseIterable {
        case json, jwt
    }

    public init(
        endpoint: String,
        clientID: String? = nil,
        clientSecret: Secret? = nil,
        authMethod: AuthMethod = .clientSecretBasic,
        clientCertificateFile: String? = nil,
        clientKeyFile: String? = nil,
        caFile: String? = nil,
        verifyTLS: Bool = true,
        insecure: Bool = false,
        timeoutMilliseconds: Int = 1500,
        maxConnections: Int = 64,
        maxResponseBytes: Int = 64 * 1024,
        expectedIssuer: String? = nil,
        responseFormat: ResponseFormat = .json
    ) {
        self.endpoint = endpoint
        self.clientID = clientID
        self.clientSecret = clientSecret
        self.authMethod = authMethod
        self.clientCertificateFile = clientCertificateFile
        self.clientKeyFile = clientKeyFile
        self.caFile = caFile
        self.verifyTLS = verifyTLS
        self.insecure = insecure
        self.timeoutMilliseconds = timeoutMilliseconds
        self.maxConnections = maxConnections
        self.maxResponseBytes = maxResponseBytes
        self.expectedIssuer = expectedIssuer
        self.responseFormat = responseFormat
    }
}

/// How long answers are kept (DESIGN.md §3 `cache`).
public struct CacheConfiguration: Sendable, Equatable {
    /// Lifetime of an active answer; never beyond the token's `exp`. 0 disables caching.
    public var ttlSeconds: Double
    /// Lifetime of an inactive answer.
    public var negativeTTLSeconds: Double
    /// Bound on entries; the least recently used goes first.
    public var maxEntries: Int
    /// During an AS fault, an active answer whose TTL ran out at most this long ago (and whose
    /// `exp` has not passed) may still be served.
    public var staleIfErrorSeconds: Double
    /// Bound on inactive answers, kept apart from active ones so that a flood of junk tokens
    /// cannot evict the answers real clients use; nil = a tenth of `maxEntries` (at least 1).
    public var maxNegativeEntries: Int?

    public init(ttlSeconds: Double = 30, negativeTTLSeconds: Double = 5, maxEntries: Int = 100_000, staleIfErrorSeconds: Double = 0, maxNegativeEntries: Int? = nil) {
        self.ttlSeconds = ttlSeconds
        self.negativeTTLSeconds = negativeTTLSeconds
        self.maxEntries = maxEntries
        self.staleIfErrorSeconds = staleIfErrorSeconds
        self.maxNegativeEntries = maxNegativeEntries
    }

    /// `maxNegativeEntries`, or its default.
    public var effectiveMaxNegativeEntries: Int {
        maxNegativeEntries ?? max(1, maxEntries / 10)
    }
}
