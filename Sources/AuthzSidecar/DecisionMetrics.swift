import Metrics
import Synchronization
import Introspection

/// `authz_decisions_total{policy, outcome, reason}`, with bounded labels: configured policy
/// names (or `none`), three outcomes and the fixed reasons.
struct DecisionMetrics: Sendable {
    private let counters: [String: Counter]
    private let fallback: Counter

    init(policies: [String], factory: any MetricsFactory) {
        var counters: [String: Counter] = [:]
        let pairs = [("allow", "granted"), ("allow", "anonymous"), ("fault", "as_fault")] + DenialReason.allCases.map { ("deny", $0.rawValue) }
        for policy in policies + ["none"] {
            for (outcome, reason) in pairs {
                counters["\(policy)|\(outcome)|\(reason)"] = Counter(
                    label: "authz_decisions_total",
                    dimensions: [("policy", policy), ("outcome", outcome), ("reason", reason)],
                    factory: factory
                )
            }
        }
        self.counters = counters
        self.fallback = Counter(label: "authz_decisions_total", dimensions: [("policy", "other"), ("outcome", "other"), ("reason", "other")], factory: factory)
    }

    func count(policy: String, outcome: String, reason: String) {
        (counters["\(policy)|\(outcome)|\(reason)"] ?? fallback).increment()
    }
}

/// Logs at most one line per key and interval, telling how many were suppressed in between.
final class RateLimitedLog: Sendable {
    private let clock: any EpochClock
    private let interval: Double
    private let state = Mutex<[String: (last: Double, suppressed: Int)]>([:])

    init(clock: any EpochClock, interval: Double) {
        self.clock = clock
        self.interval = interval
    }

    func log(key: String, _ body: (_ suppressed: Int) -> Void) {
        let now = clock.now()
        let suppressed: Int? = state.withLock { entries in
            if let entry = entries[key], now - entry.last < interval {
                entries[key] = (entry.last, entry.suppressed + 1)
                return nil
            }
            let count = entries[key]?.suppressed ?? 0
            entries[key] = (now, 0)
            return count
        }
        if let suppressed { body(suppressed) }
    }
}
