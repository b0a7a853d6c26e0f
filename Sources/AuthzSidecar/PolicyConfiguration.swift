import HTTPTypes
import Introspection

/// One entry of `policies:` (DESIGN.md §3): which requests it covers and what it demands.
public struct PolicyConfiguration: Sendable, Equatable {
    /// `all`: every required scope; `any`: at least one.
    public enum ScopeMatch: String, Sendable, CaseIterable {
        case all, any
    }

    /// Which element of a multi-element `x-forwarded-client-cert` to trust (DESIGN.md §7).
    public enum XFCCElement: String, Sendable, CaseIterable {
        /// Exactly one element, else the request is refused.
        case only
        /// The first element (set by the outermost proxy under APPEND_FORWARD).
        case first
        /// The last element (set by the proxy nearest the sidecar).
        case last
    }

    public var name: String
    public var pathPrefix: String
    /// Lowercased; empty = any host. An entry without a port matches the host on any port.
    public var hosts: [String]
    /// Uppercased; empty = any method.
    public var methods: [String]
    public var requiredScopes: [String]
    public var scopeMatch: ScopeMatch
    public var audiences: [String]
    /// Where the proxy puts the client certificate; nil = none (gRPC: the peer certificate).
    public var certificateHeader: String? {
        didSet { parsed.certificate = certificateHeader.flatMap { HTTPField.Name($0) } }
    }
    /// `certificateHeader`, parsed once.
    var certificateField: HTTPField.Name? { parsed.certificate }
    public var certificateFormat: CertificateFormat
    public var xfccElement: XFCCElement
    public var requireBoundToken: Bool
    /// Log every decision of this policy step by step (`debug_log`), at notice level.
    public var debugLog = false
    public var allowAnonymous: Bool
    public var forwardClaims: [String] {
        didSet { parsed.forwardClaims = Self.headers(for: forwardClaims) }
    }
    /// Each forwarded claim with its `X-Credential-*` header name, parsed once.
    var forwardClaimHeaders: [(String, HTTPField.Name)] { parsed.forwardClaims }
    /// Header names parsed once from `certificateHeader` and `forwardClaims`.
    private var parsed = ParsedNames()
    public var hideCredentials: Bool
    public var clockSkewSeconds: Int64
    public var proxyCacheSeconds: Int64
    /// Names of the issuers this policy accepts; empty = every issuer (DESIGN.md §9).
    public var issuers: [String]
    /// Claims the token must carry (DESIGN.md §9), each one of its values.
    public var requiredClaims: [RequiredClaim]
    /// DESIGN.md §10.
    public var dpop: DPoPMode
    public var dpopMaxAgeSeconds: Int64
    public var dpopIatLeewaySeconds: Int64
    public var dpopNonce: Bool
    /// `scheme://host[:port]`: the URL a proof's `htu` must name is built from it; nil: from the
    /// proxy's `X-Forwarded-Proto` and the original host.
    public var publicBaseURL: String?

    public init(
        name: String,
        pathPrefix: String = "/",
        hosts: [String] = [],
        methods: [String] = [],
        requiredScopes: [String] = [],
        scopeMatch: ScopeMatch = .all,
        audiences: [String] = [],
        certificateHeader: String? = nil,
        certificateFormat: CertificateFormat = .auto,
        xfccElement: XFCCElement = .only,
        requireBoundToken: Bool = false,
        allowAnonymous: Bool = false,
        forwardClaims: [String] = [],
        hideCredentials: Bool = false,
        clockSkewSeconds: Int64 = 0,
        proxyCacheSeconds: Int64 = 0,
        issuers: [String] = [],
        requiredClaims: [RequiredClaim] = [],
        dpop: DPoPMode = .allowed,
        dpopMaxAgeSeconds: Int64 = 60,
        dpopIatLeewaySeconds: Int64 = 5,
        dpopNonce: Bool = false,
        publicBaseURL: String? = nil
    ) {
        self.name = name
        self.pathPrefix = pathPrefix
        self.hosts = hosts.map(HostName.entry)
        self.methods = methods.map { $0.uppercased() }
        self.requiredScopes = requiredScopes
        self.scopeMatch = scopeMatch
        self.audiences = audiences
        self.certificateHeader = certificateHeader
        self.certificateFormat = certificateFormat
        self.xfccElement = xfccElement
        self.requireBoundToken = requireBoundToken
        self.allowAnonymous = allowAnonymous
        self.forwardClaims = forwardClaims
        self.parsed = ParsedNames(forwardClaims: Self.headers(for: forwardClaims), certificate: certificateHeader.flatMap { HTTPField.Name($0) })
        self.hideCredentials = hideCredentials
        self.clockSkewSeconds = clockSkewSeconds
        self.proxyCacheSeconds = proxyCacheSeconds
        self.issuers = issuers
        self.requiredClaims = requiredClaims
        self.dpop = dpop
        self.dpopMaxAgeSeconds = dpopMaxAgeSeconds
        self.dpopIatLeewaySeconds = dpopIatLeewaySeconds
        self.dpopNonce = dpopNonce
        self.publicBaseURL = publicBaseURL
    }

    static func headers(for claims: [String]) -> [(String, HTTPField.Name)] {
        claims.compactMap { claim in HTTPField.Name(HeaderName.credential(forClaim: claim)).map { (claim, $0) } }
    }

    /// Whether this policy covers a request (path prefix on the path without its query, host, method).
    public func matches(method: String, path: Substring, host: Substring) -> Bool {
        matches(method: method, path: path, host: HostKey(host))
    }

    /// The same, with the host normalised once per request (DESIGN.md §5.1).
    func matches(method: String, path: Substring, host: HostKey) -> Bool {
        guard path.utf8.starts(with: pathPrefix.utf8) else { return false }
        if !methods.isEmpty, !methods.contains(where: { $0.utf8.elementsEqual(method.utf8) }) {
            return false
        }
        if !hosts.isEmpty {
            guard hosts.contains(where: { entry in entry == host.bare || (host.withPort.map { withPort in entry == withPort } ?? false) }) else { return false }
        }
        return true
    }
}

/// One entry of `required_claims` (DESIGN.md §9): the claim must equal one of `values` (JSON
/// types compared as they are) or, when it is an array, contain one. `scope` is read as its
/// space-separated names; no other string claim is split.
public struct RequiredClaim: Sendable, Equatable {
    public var name: String
    /// Any of these.
    public var values: [JSONValue]

    public init(name: String, values: [JSONValue]) {
        self.name = name
        self.values = values
    }

    public func isSatisfied(by info: TokenInfo) -> Bool {
        if name == "scope" {
            return values.contains { value in value.stringValue.map(info.grants(scope:)) ?? false }
        }
        guard let claim = info.claim(name) else { return false }
        return values.contains { wanted in
            if claim == wanted { return true }
            if case .array(let items) = claim { return items.contains(wanted) }
            return false
        }
    }
}

/// A request's host as policies compare it: lower-cased, without one trailing dot, without the
/// port (`bare`) and with it (`withPort`, for `hosts:` entries that name a port).
struct HostKey: Sendable {
    var bare: Substring
    var withPort: Substring?

    /// For requests when no policy compares hosts (`matches` never reads it then).
    static let unused = HostKey(bare: "", withPort: nil)

    private init(bare: Substring, withPort: Substring?) {
        self.bare = bare
        self.withPort = withPort
    }

    init(_ host: Substring) {
        bare = HostName.normalized(host)
        if let colon = host.utf8.lastIndex(of: UInt8(ascii: ":")), host.utf8.index(after: colon) != host.utf8.endIndex,
            host.utf8[host.utf8.index(after: colon)...].allSatisfy({ $0 >= 0x30 && $0 <= 0x39 })
        {
            withPort = Substring("\(bare)\(host[colon...])")
        } else {
            withPort = nil
        }
    }
}

extension HostName {
    /// A `hosts:` entry as it is compared: lower-cased, one trailing dot removed from the name,
    /// a port kept (`Admin.Example.:8443` → `admin.example:8443`).
    static func entry(_ text: String) -> String {
        let key = HostKey(text[...])
        return String(key.withPort ?? key.bare)
    }
}

/// Header names derived from other fields of the policy. They take no part in equality: the
/// fields they are derived from do, so the synthesised `==` stays complete as fields are added.
struct ParsedNames: Sendable, Equatable {
    var forwardClaims: [(String, HTTPField.Name)] = []
    var certificate: HTTPField.Name?

    static func == (lhs: ParsedNames, rhs: ParsedNames) -> Bool { true }
}

extension Character {
    var isASCIIDigit: Bool { isASCII && isNumber }
}
