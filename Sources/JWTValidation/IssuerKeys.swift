import Introspection
import JOSE
import Logging
import Tracing
import Metrics
import NIOConcurrencyHelpers

/// An issuer's signing keys (DESIGN.md §9): fetched when first needed, refreshed in the background
/// once `jwks_cache_seconds` old, fetched again for an unknown `kid` at most once per
/// `jwks_min_refetch_seconds` since the last fetch of any kind, one fetch at a time (callers that
/// need it wait for the one in flight). The last good set is kept until a fetch replaces it, so
/// an AS outage does not stop tokens signed by known keys.
public final class IssuerKeys: Sendable {
    public typealias Fetch = @Sendable () async throws(IntrospectionError) -> JSONWebKeySet

    /// While no key set was ever obtained, fetches are retried at most this often (a request
    /// arriving in between is a 503 at once), so an AS that is down cannot be hammered.
    static let retryWhileEmptySeconds = 1.0

    private struct State {
        var keys: JSONWebKeySet?
        /// Uptime of the last successful fetch.
        var fetchedAt: Double?
        /// Uptime of the last fetch started, successful or not.
        var attemptedAt: Double?
        var lastError: IntrospectionError?
        var flight: Task<Result<JSONWebKeySet, IntrospectionError>, Never>?
    }

    private let state = NIOLockedValueBox(State())
    private let fetch: Fetch
    /// The issuer's name, for spans.
    private let issuer: String
    private let cacheSeconds: Double
    private let minRefetchSeconds: Double
    private let clock: any EpochClock
    private let logger: Logger
    private let fetchedOK: Counter
    private let fetchFailed: Counter

    public init(
        issuer name: String,
        cacheSeconds: Double,
        minRefetchSeconds: Double,
        clock: any EpochClock = SystemEpochClock(),
        logger: Logger = Logger(label: "authz.jwks"),
        metrics factory: any MetricsFactory = MetricsSystem.factory,
        fetch: @escaping Fetch
    ) {
        self.fetch = fetch
        self.cacheSeconds = cacheSeconds
        self.minRefetchSeconds = minRefetchSeconds
        self.clock = clock
        self.logger = logger
        self.issuer = name
        self.fetchedOK = Counter(label: "authz_jwks_fetches_total", dimensions: [("issuer", name), ("outcome", "ok")], factory: factory)
        self.fetchFailed = Counter(label: "authz_jwks_fetches_total", dimensions: [("issuer", name), ("outcome", "error")], factory: factory)
    }

    /// The key that verifies a JWS with this `kid` and `alg`. Throws `keysUnavailable` when no key
    /// set was ever obtained, or when the refetch an unknown `kid` calls for fails.
    public func key(id: String?, for algorithm: JWSAlgorithm) async throws(IntrospectionError) -> JSONWebKeySet.KeyMatch {
        let now = clock.uptime()
        enum Plan {
            case use(JSONWebKeySet, refreshInBackground: Bool, mayRefetch: Bool)
            case wait(Task<Result<JSONWebKeySet, IntrospectionError>, Never>)
            case fail(IntrospectionError)
        }
        let plan: Plan = state.withLockedValue { state in
            if let keys = state.keys {
                let stale = now - (state.fetchedAt ?? now) >= cacheSeconds
                let mayFetch = state.flight != nil || now - (state.attemptedAt ?? -.infinity) >= minRefetchSeconds
                if !mayFetch, let lastError = state.lastError, case .unknownKeyID = keys.key(id: id, for: algorithm) {
                    // The last fetch failed: the kid may well be in the set the AS could not
                    // give. Not a refusal, a fault, until a fetch succeeds.
                    return .fail(.keysUnavailable("kid not in the last good key set, and the last fetch failed: \(lastError.description)"))
                }
                return .use(keys, refreshInBackground: stale && mayFetch, mayRefetch: mayFetch)
            }
            if let flight = state.flight { return .wait(flight) }
            if let attempted = state.attemptedAt, now - attempted < Self.retryWhileEmptySeconds {
                return .fail(.keysUnavailable("no key set obtained yet; the last fetch failed: \(state.lastError?.description ?? "unknown")"))
            }
            return .wait(startFlight(&state, now: now))
        }
        switch plan {
        case .fail(let error):
            throw error
        case .wait(let flight):
            let keys = try await Self.keys(from: flight)
            return keys.key(id: id, for: algorithm)
        case .use(let keys, let refreshInBackground, let mayRefetch):
            let match = keys.key(id: id, for: algorithm)
            if case .unknownKeyID = match, mayRefetch {
                // The set may have been rotated: fetch it again (or join the fetch in flight).
                let flight = state.withLockedValue { state in state.flight ?? startFlight(&state, now: now) }
                let fresh = try await Self.keys(from: flight)
                return fresh.key(id: id, for: algorithm)
            }
            if refreshInBackground {
                state.withLockedValue { state in
                    if state.flight == nil { _ = startFlight(&state, now: now) }
                }
            }
            return match
        }
    }

    /// The key for a JWS without suspending, when the set in hand decides it: nil when no set was
    /// obtained yet, or when the `kid` is unknown and a refetch is due (use `key(id:for:)`). A set
    /// past `jwks_cache_seconds` is used while a refresh starts in the background.
    public func keyWithoutSuspending(id: String?, for algorithm: JWSAlgorithm) -> JSONWebKeySet.KeyMatch? {
        let now = clock.uptime()
        return state.withLockedValue { state in
            guard let keys = state.keys else { return nil }
            let mayFetch = state.flight != nil || now - (state.attemptedAt ?? -.infinity) >= minRefetchSeconds
            let match = keys.key(id: id, for: algorithm)
            if case .unknownKeyID = match, mayFetch || state.lastError != nil { return nil }
            if state.flight == nil, mayFetch, now - (state.fetchedAt ?? now) >= cacheSeconds {
                _ = startFlight(&state, now: now)
            }
            return match
        }
    }

    /// Fetches the key set when none was obtained yet (at start, and while the AS is down), so
    /// that the first token does not wait for it and readiness can tell. Waits for the fetch.
    public func prefetch() async {
        let now = clock.uptime()
        let flight: Task<Result<JSONWebKeySet, IntrospectionError>, Never>? = state.withLockedValue { state in
            guard state.keys == nil else { return nil }
            if let flight = state.flight { return flight }
            if let attempted = state.attemptedAt, now - attempted < Self.retryWhileEmptySeconds { return nil }
            return startFlight(&state, now: now)
        }
        _ = await flight?.value
    }

    /// Why the issuer cannot verify anything yet: nil once a key set was obtained, or before the
    /// first fetch ended; else the last fetch's fault (for `/readyz`).
    public var unavailable: IntrospectionError? {
        state.withLockedValue { state in state.keys == nil ? state.lastError : nil }
    }

    /// The key set now, if one was obtained (for tests and `check-config`).
    public var current: JSONWebKeySet? { state.withLockedValue { $0.keys } }

    private static func keys(from flight: Task<Result<JSONWebKeySet, IntrospectionError>, Never>) async throws(IntrospectionError) -> JSONWebKeySet {
        try await flight.value.get()
    }

    /// Starts the one fetch; called under the lock.
    private func startFlight(_ state: inout State, now: Double) -> Task<Result<JSONWebKeySet, IntrospectionError>, Never> {
        state.attemptedAt = now
        // The task inherits the requester's trace context: a fetch a decision waits for is a
        // child span of that decision (DESIGN.md §12).
        let task = Task { [self] () -> Result<JSONWebKeySet, IntrospectionError> in
            let result: Result<JSONWebKeySet, IntrospectionError>
            if ServiceContext.current != nil {
                result = await withSpan("authz.jwks_fetch", ofKind: .client) { span in
                    span.attributes["authz.issuer"] = issuer
                    let result = await fetchOnce()
                    if case .failure(let error) = result { span.setStatus(SpanStatus(code: .error, message: error.label)) }
                    return result
                }
            } else {
                result = await fetchOnce()
            }
            finish(result)
            return result
        }
        state.flight = task
        return task
    }

    private func fetchOnce() async -> Result<JSONWebKeySet, IntrospectionError> {
        do throws(IntrospectionError) {
            return .success(try await fetch())
        } catch {
            return .failure(error)
        }
    }

    private func finish(_ result: Result<JSONWebKeySet, IntrospectionError>) {
        let now = clock.uptime()
        let hadKeys: Bool = state.withLockedValue { state in
            state.flight = nil
            let had = state.keys != nil
            switch result {
            case .success(let keys):
                state.keys = keys
                state.fetchedAt = now
                state.lastError = nil
            case .failure(let error):
                state.lastError = error
            }
            return had
        }
        switch result {
        case .success(let keys):
            fetchedOK.increment()
            var fields: Logger.Metadata = ["authz.keys": "\(keys.keys.map { $0.keyID ?? "-" }.joined(separator: ","))"]
            if !keys.skipped.isEmpty { fields["authz.skipped"] = "\(keys.skipped.joined(separator: "; "))" }
            logger.info("issuer key set fetched", metadata: fields)
        case .failure(let error):
            fetchFailed.increment()
            logger.warning(
                hadKeys ? "issuer key set fetch failed; the last good set stays" : "issuer key set fetch failed; no keys yet",
                metadata: ["authz.fault": "\(error.label)", "authz.detail": "\(error.description)"]
            )
        }
    }
}
