import JOSE
import JWTValidation
import Introspection
import SharedCache

/// Where a listener binds: `host:port` or `unix:/path`.
public enum ListenAddress: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)

    /// Parses `127.0.0.1:9191`, `[::1]:9191`, `localhost:9191` or `unix:/run/authz.sock`.
    public init?(_ text: String) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard path.hasPrefix("/") else { return nil }
            self = .unix(path: path)
            return
        }
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            return nil
        }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { return nil }
        self = .tcp(host: host, port: port)
    }

    public var description: String {
        switch self {
        case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): return "unix:\(path)"
        }
    }
}

/// `server:` (DESIGN.md §3).
public struct ServerConfiguration: Sendable, Equatable {
    public var listen: ListenAddress
    /// nil = the admin endpoints share `listen`.
    public var adminListen: ListenAddress?
    /// nil = no gRPC listener.
    public var grpcListen: ListenAddress?
    public var trustPolicyHeader: Bool
    /// Accept `X-Authz-Debug` (any value) from the proxy: that request's decision is logged step
    /// by step. Only where every request comes through a proxy that strips it from clients.
    public var trustDebugHeader = false
    public var maxHeaderBytes: Int
    /// A connection is closed when no complete request head arrives within this many seconds of
    /// its start or of the previous answer (above nginx's 60 s upstream keepalive_timeout).
    public var idleTimeoutSeconds: Int
    /// `admin_token_file`: where the admin bearer token was read from, and the token. With it,
    /// `/admin/*` needs `Authorization: Bearer <token>` on every listener; without it, `/admin/*`
    /// is served only on a loopback or unix listener (DESIGN.md §4).
    public var adminTokenFile: String?
    public var adminToken: Secret?
    /// DESIGN.md §10: proof algorithms, the replay memory's bound, how long a nonce is good,
    /// and the nonce key (from `dpop_nonce_key_file`; nil: random per process).
    public var dpopAlgorithms: [JWSAlgorithm] = DPoPVerifier.defaultAlgorithms
    public var dpopReplayEntries: Int = 100_000
    public var dpopNonceSeconds: Int = 60
    public var dpopNonceKeyFile: String?
    public var dpopNonceKey: Secret?

    public init(
        listen: ListenAddress = .tcp(host: "127.0.0.1", port: 9191),
        adminListen: ListenAddress? = nil,
        grpcListen: ListenAddress? = nil,
        trustPolicyHeader: Bool = false,
        maxHeaderBytes: Int = 16384,
        idleTimeoutSeconds: Int = 75,
        adminTokenFile: String? = nil,
        adminToken: Secret? = nil
    ) {
        self.listen = listen
        self.adminListen = adminListen
        self.grpcListen = grpcListen
        self.trustPolicyHeader = trustPolicyHeader
        self.maxHeaderBytes = maxHeaderBytes
        self.idleTimeoutSeconds = idleTimeoutSeconds
        self.adminTokenFile = adminTokenFile
        self.adminToken = adminToken
    }
}

/// `logging:` (an extension of DESIGN.md §3).
public struct LoggingConfiguration: Sendable, Equatable {
    public enum Format: String, Sendable, CaseIterable {
        case text, json
    }

    public var level: String
    public var format: Format

    public init(level: String = "info", format: Format = .text) {
        self.level = level
        self.format = format
    }
}

/// The whole configuration file, validated.
public struct SidecarConfiguration: Sendable, Equatable {
    public var server: ServerConfiguration
    /// The top-level block: the issuer `default` (DESIGN.md §9); optional with `issuers:`.
    public var introspection: IntrospectionConfiguration?
    /// `issuers:`, without `default`.
    public var issuers: [IssuerConfiguration]
    public var cache: CacheConfiguration
    /// `cache.shared`: the store replicas share (DESIGN.md §11); nil = off.
    public var sharedCache: SharedCacheConfiguration?
    public var policies: [PolicyConfiguration]
    public var logging: LoggingConfiguration
    /// `tracing` (DESIGN.md §12): spans per decision, exported over OTLP; off by default.
    public var tracing = TracingConfiguration()

    public init(
        server: ServerConfiguration = ServerConfiguration(),
        introspection: IntrospectionConfiguration?,
        issuers: [IssuerConfiguration] = [],
        cache: CacheConfiguration = CacheConfiguration(),
        policies: [PolicyConfiguration],
        logging: LoggingConfiguration = LoggingConfiguration()
    ) {
        self.server = server
        self.introspection = introspection
        self.issuers = issuers
        self.cache = cache
        self.policies = policies
        self.logging = logging
    }

    /// Every issuer: `default` (the top-level `introspection:`) first, then `issuers:`.
    public var allIssuers: [IssuerConfiguration] {
        (introspection.map { [IssuerConfiguration.default($0)] } ?? []) + issuers
    }
}

/// `tracing` (DESIGN.md §12).
public struct TracingConfiguration: Sendable, Equatable {
    /// OTLP/HTTP collector, e.g. `http://127.0.0.1:4318` (spans go to `<endpoint>/v1/traces`);
    /// nil = off: no span is made, on any path.
    public var otlpEndpoint: String?
    /// The share of decisions without a parent that are sampled; a parent's sampled flag (the
    /// proxy's `traceparent`) is followed.
    public var samplingRatio: Double = 1.0
    public var serviceName: String = "authz-sidecar"
    public var resourceAttributes: [String: String] = [:]

    public init(otlpEndpoint: String? = nil, samplingRatio: Double = 1.0, serviceName: String = "authz-sidecar", resourceAttributes: [String: String] = [:]) {
        self.otlpEndpoint = otlpEndpoint
        self.samplingRatio = samplingRatio
        self.serviceName = serviceName
        self.resourceAttributes = resourceAttributes
    }
}
