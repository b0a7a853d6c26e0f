import Introspection
import Synchronization
import NIOConcurrencyHelpers

/// A clock that moves only when a test moves it.
final class TestClock: EpochClock {
    private let seconds: NIOLockedValueBox<Double>

    init(_ start: Double = 1_800_000_000) {
        seconds = NIOLockedValueBox(start)
    }

    func now() -> Double { seconds.withLockedValue { $0 } }

    func advance(by delta: Double) {
        seconds.withLockedValue { $0 += delta }
    }
}

/// Paths of the shared test fixtures (Tests/Fixtures).
enum Fixtures {
    static func path(_ name: String) -> String {
        var components = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        components.removeLast(3)  // Support/TestClock.swift, IntrospectionTests
        return components.joined(separator: "/") + "/Fixtures/" + name
    }
}
