#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Wall-clock time in seconds since the Unix epoch: the scale of `exp`, `iat` and `nbf`.
///
/// Injected everywhere time matters, so tests advance a clock instead of sleeping.
public protocol EpochClock: Sendable {
    /// Seconds since 1970-01-01T00:00:00Z.
    func now() -> Double

    /// Seconds on a clock that never steps (CLOCK_MONOTONIC): what cache lifetimes are counted
    /// on, so that an NTP step back cannot extend them. `exp` and `nbf` stay on `now()`.
    func uptime() -> Double
}

extension EpochClock {
    /// Clocks that move only when told to (tests) count lifetimes on `now()`.
    public func uptime() -> Double { now() }
}

/// The system's real-time clock.
public struct SystemEpochClock: EpochClock {
    public init() {}

    @inlinable
    public func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1_000_000_000
    }

    @inlinable
    public func uptime() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1_000_000_000
    }
}
