import Metrics
import Synchronization
import Introspection
import NIOConcurrencyHelpers

/// `authz_decisions_total{policy, outcome, reason}`, with bounded labels: configured policy
/// names (or `none`), three outcomes and the fixed reasons. Every counter is made up front, so
/// counting a decision is two lookups and an atomic add, with no string built.
struct DecisionMetrics: Sendable {
    struct PolicyCounters: Sendable {
        let granted: Counter
        let anonymous: Counter
        let fault: Counter
        let denied: [DenialReason: Counter]
    }

    private let counters: [String: PolicyCounters]
    private let fallback: PolicyCounters

    init(policies: [String], factory: any MetricsFactory) {
        func make(_ policy: String) -> PolicyCounters {
            func counter(_ outcome: String, _ reason: String) -> Counter {
                Counter(label: "authz_decisions_total", dimensions: [("policy", policy), ("outcome", outcome), ("reason", reason)], factory: factory)
            }
            return PolicyCounters(
                granted: counter("allow", "granted"),
                anonymous: counter("allow", "anonymous"),
                fault: counter("fault", "as_fault"),
                denied: Dictionary(uniqueKeysWithValues: DenialReason.allCases.map { ($0, counter("deny", $0.rawValue)) })
            )
        }
        var counters: [String: PolicyCounters] = [:]
        for policy in policies + ["none"] { counters[policy] = make(policy) }
        self.counters = counters
        self.fallback = make("other")
    }

    private func of(_ policy: String) -> PolicyCounters { counters[policy] ?? fallback }

    func allowed(policy: String, anonymous: Bool) { (anonymous ? of(policy).anonymous : of(policy).granted).increment() }
    func denied(policy: String, reason: DenialReason) { of(policy).denied[reason]?.increment() }
    func faulted(policy: String) { of(policy).fault.increment() }
}

