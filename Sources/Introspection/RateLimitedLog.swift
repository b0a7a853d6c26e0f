import NIOConcurrencyHelpers

/// Logs at most one line per key and interval, telling how many were suppressed in between.
public final class RateLimitedLog: Sendable {
    private let clock: any EpochClock
    private let interval: Double
    private let state = NIOLockedValueBox<[String: (last: Double, suppressed: Int)]>([:])

    public init(clock: any EpochClock, interval: Double) {
        self.clock = clock
        self.interval = interval
    }

    public func log(key: String, _ body: (_ suppressed: Int) -> Void) {
        let now = clock.now()
        let suppressed: Int? = state.withLockedValue { entries in
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
