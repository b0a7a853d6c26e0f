import Introspection
import Synchronization

/// A clock that moves only when a test moves it.
final class TestClock: EpochClock {
    private let seconds: Mutex<Double>

    init(_ start: Double = 1_800_000_000) {
        seconds = Mutex(start)
    }

    func now() -> Double { seconds.withLock { $0 } }

    func advance(by delta: Double) {
        seconds.withLock { $0 += delta }
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
