import Introspection
import JOSE
import JWTValidation
import Logging
import Metrics
import SharedCache

/// One issuer at run time (DESIGN.md §9): its configuration, its key set (JWT modes) and its own
/// cache, whose upstream verifies the JWT, introspects the token, or both in that order.
public final class Issuer: Sendable {
    public let configuration: IssuerConfiguration
    public let cache: CachingTokenIntrospector
    public let keys: IssuerKeys?

    init(configuration: IssuerConfiguration, cache: CachingTokenIntrospector, keys: IssuerKeys?) {
        self.configuration = configuration
        self.cache = cache
        self.keys = keys
    }

    public var name: String { configuration.name }

    /// The audiences a token must hold (one of) when the policy names none: a JWT issuer's
    /// `audiences`; none for introspection (the AS vouched for the token).
    var audiences: [String] { configuration.validation.verifiesJWT ? configuration.audiences : [] }

    /// The `iss` an introspection answer must carry, when configured (`expected_issuer`). A
    /// verified JWT's `iss` was checked before its claims were cached (and under
    /// `jwt_then_introspect`, before the AS was asked).
    var expectedIssuer: String? {
        configuration.validation == .introspection ? configuration.issuer ?? configuration.introspection?.expectedIssuer : nil
    }

    /// An issuer whose upstream is `upstream` as it is: the top-level introspection block in
    /// tests and benches, which build the cache themselves.
    public convenience init(default introspection: IntrospectionConfiguration?, cache: CachingTokenIntrospector) {
        self.init(
            configuration: introspection.map(IssuerConfiguration.default) ?? IssuerConfiguration(name: "default", issuer: nil, validation: .introspection),
            cache: cache, keys: nil
        )
    }

    /// Wires an issuer to its backends: the AS client (introspection modes) and the key set
    /// source (JWT modes). A missing backend is a fault on every call, never an allow.
    static func make(
        _ configuration: IssuerConfiguration,
        backends: IssuerBackends,
        cache cacheConfiguration: CacheConfiguration,
        reachability: ASReachability,
        clock: any EpochClock,
        logger: Logger,
        metrics factory: any MetricsFactory,
        shared: SharedTokenStore? = nil
    ) -> Issuer {
        var logger = logger
        logger[metadataKey: "authz.issuer"] = "\(configuration.name)"
        var keys: IssuerKeys?
        if configuration.needsKeys {
            // (not `??`: an autoclosure of a typed-throws function type crashes Swift 6.3's IRGen)
            let fetch: IssuerKeys.Fetch
            if let source = backends.keys { fetch = source } else { fetch = Self.noKeySource }
            keys = IssuerKeys(
                issuer: configuration.name, cacheSeconds: configuration.jwksCacheSeconds, minRefetchSeconds: configuration.jwksMinRefetchSeconds,
                clock: clock, logger: logger, metrics: factory, fetch: fetch
            )
        }
        var client: any TokenIntrospector =
            backends.introspector ?? ClosureTokenIntrospector { _ throws(IntrospectionError) in throw .transport("no introspection client for issuer \(configuration.name)") }
        if let introspection = configuration.introspection, introspection.responseFormat == .jwt, let keys {
            // RFC 9701: the answer is verified with the issuer's keys before it is read.
            if let raw = client as? any RawTokenIntrospector {
                client = SignedIntrospection(
                    raw: raw, keys: keys, issuer: configuration.issuer ?? "", audience: introspection.clientID ?? "",
                    algorithms: configuration.algorithms, clock: clock
                )
            } else {
                client = ClosureTokenIntrospector { _ throws(IntrospectionError) in throw .transport("the introspection client cannot give signed answers") }
            }
        }
        let introspector: any TokenIntrospector = InstrumentedTokenIntrospector(client, reachability: reachability, metrics: factory, issuer: configuration.name)
        let upstream: any TokenIntrospector
        if configuration.validation.verifiesJWT, let issuerKeys = keys {
            let verifier = JWTAccessTokenVerifier(configuration: configuration, keys: issuerKeys, metrics: factory)
            upstream = configuration.validation == .jwt ? verifier : VerifiedThenIntrospected(verifier: verifier, introspector: introspector)
        } else {
            upstream = introspector
        }
        // Only answers that cost an AS call are shared; a JWT is verified locally in microseconds.
        let sharedView = configuration.validation.introspects ? shared?.view(issuer: configuration.name) : nil
        let cache = CachingTokenIntrospector(upstream: upstream, configuration: cacheConfiguration, clock: clock, metrics: factory, shared: sharedView)
        return Issuer(configuration: configuration, cache: cache, keys: keys)
    }
}

extension Issuer {
    @Sendable static func noKeySource() async throws(IntrospectionError) -> JSONWebKeySet {
        throw .keysUnavailable("no key set source for this issuer")
    }
}

/// What the sidecar needs to reach one issuer: its introspection client and where its key set
/// comes from. The server builds these over HTTP; tests pass closures.
public struct IssuerBackends: Sendable {
    public var introspector: (any TokenIntrospector)?
    public var keys: IssuerKeys.Fetch?

    public init(introspector: (any TokenIntrospector)? = nil, keys: IssuerKeys.Fetch? = nil) {
        self.introspector = introspector
        self.keys = keys
    }
}

/// Where a policy sends a token (DESIGN.md §9 routing), decided once per configuration.
enum IssuerRoute: Sendable {
    /// The policy accepts one issuer: every token goes there (one that is not its own is
    /// refused there, as routing would refuse it).
    case only(Issuer)
    /// Several: a JWT by its unverified `iss`, anything else to the introspection issuer.
    case byToken(jwt: [String: Issuer], introspection: Issuer?)
    /// No issuer at all (a configuration without any: only anonymous policies decide).
    case none

    init(accepting issuers: [Issuer]) {
        if issuers.count == 1 {
            self = .only(issuers[0])
        } else if issuers.isEmpty {
            self = .none
        } else {
            var jwt: [String: Issuer] = [:]
            for issuer in issuers where issuer.configuration.validation.verifiesJWT {
                if let iss = issuer.configuration.issuer, jwt[iss] == nil { jwt[iss] = issuer }
            }
            self = .byToken(jwt: jwt, introspection: issuers.first { $0.configuration.validation == .introspection })
        }
    }

    /// The issuer for a token, nil when none accepts it.
    func issuer(for token: String) -> Issuer? {
        switch self {
        case .only(let issuer):
            return issuer
        case .byToken(let jwt, let introspection):
            if let iss = UnverifiedIssuer.of(token[...]), let issuer = jwt[iss] { return issuer }
            return introspection
        case .none:
            return nil
        }
    }
}
