import Metrics
import Tracing
import Synchronization

/// Whether the authorization server answered on the last attempt, for `/readyz`.
///
/// A timeout alone does not change it: a briefly slow AS must not take the sidecar out of
/// rotation, while a refused connection, a TLS failure or an error status does.
public final class ASReachability: Sendable {
    public enum State: UInt8, Sendable {
        case neverTried = 0, reachable = 1, unreachable = 2
    }

    private let state = Atomic<UInt8>(State.neverTried.rawValue)

    public init() {}

    public var current: State { State(rawValue: state.load(ordering: .relaxed)) ?? .neverTried }

    func record(_ result: Result<TokenInfo, IntrospectionError>) {
        switch result {
        case .success: state.store(State.reachable.rawValue, ordering: .relaxed)
        case .failure(.timeout), .failure(.overloaded): break
        case .failure: state.store(State.unreachable.rawValue, ordering: .relaxed)
        }
    }
}

/// Counts and times every call to the AS (`authz_introspection_calls_total{outcome}`,
/// `authz_introspection_duration_seconds`) and feeds `ASReachability`.
public struct InstrumentedTokenIntrospector: TokenIntrospector {
    private let upstream: any TokenIntrospector
    private let reachability: ASReachability
    private let clock = ContinuousClock()
    private let duration: Timer
    private let active: Counter
    private let inactive: Counter
    private let factory: any MetricsFactory

    /// The issuer's name, on the span of each call.
    private let issuer: String

    public init(_ upstream: any TokenIntrospector, reachability: ASReachability, metrics factory: any MetricsFactory = MetricsSystem.factory, issuer: String = "default") {
        self.issuer = issuer
        self.upstream = upstream
        self.reachability = reachability
        self.factory = factory
        self.duration = Timer(label: "authz_introspection_duration_seconds", preferredDisplayUnit: .seconds, factory: factory)
        self.active = Counter(label: "authz_introspection_calls_total", dimensions: [("outcome", "active")], factory: factory)
        self.inactive = Counter(label: "authz_introspection_calls_total", dimensions: [("outcome", "inactive")], factory: factory)
    }

    public func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        let start = clock.now
        let result: Result<TokenInfo, IntrospectionError>
        if ServiceContext.current != nil {
            // A decision's span is in force (tracing on): the AS call is its child.
            result = await withSpan("authz.introspect", ofKind: .client) { span in
                span.attributes["authz.issuer"] = issuer
                let result = await call(token)
                if case .failure(let error) = result { span.setStatus(SpanStatus(code: .error, message: error.label)) }
                return result
            }
        } else {
            result = await call(token)
        }
        duration.record(duration: clock.now - start)
        reachability.record(result)
        switch result {
        case .success(let info):
            (info.active ? active : inactive).increment()
        case .failure(let error):
            Counter(label: "authz_introspection_calls_total", dimensions: [("outcome", "fault_\(error.label)")], factory: factory).increment()
        }
        return try result.get()
    }

    private func call(_ token: String) async -> Result<TokenInfo, IntrospectionError> {
        do throws(IntrospectionError) {
            return .success(try await upstream.introspect(token))
        } catch {
            return .failure(error)
        }
    }
}
