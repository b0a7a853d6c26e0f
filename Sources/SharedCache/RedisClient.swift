import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// Commands to a Redis-compatible store over a small pool of pipelined connections, each with a
/// deadline: a command not answered in time fails with `timeout` and closes its connection (the
/// answers of a connection match its commands by order, so a late one would be misread). A
/// connection that fails is made again on demand, no sooner than a back-off that doubles from
/// 100 ms to 5 s while attempts fail; in between, commands fail at once (a down store costs a
/// request nothing).
public final class RedisClient: Sendable {
    private final class Slot: Sendable {
        struct State {
            var connection: RedisConnection?
            var connecting: EventLoopFuture<RedisConnection>?
            /// Failures (refused connections, timeouts) since the last answer.
            var failures = 0
            var retryAt: NIODeadline?
        }
        let state = NIOLockedValueBox(State())
    }

    let endpoint: StoreEndpoint
    let group: any EventLoopGroup
    let tls: NIOSSLContext?
    let timeout: TimeAmount
    private let slots: [Slot]
    private let next = Atomic<Int>(0)
    private let backoff: TimeAmount

    static let maxBackoff = TimeAmount.seconds(5)

    /// - Parameters:
    ///   - connections: pipelined connections in the pool (one per event loop is plenty).
    ///   - backoff: the wait after a first failure, doubling per failure up to `maxBackoff`.
    public init(
        endpoint: StoreEndpoint, tls: NIOSSLContext?, timeout: TimeAmount, connections: Int = 2, backoff: TimeAmount = .milliseconds(100),
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) {
        self.endpoint = endpoint
        self.backoff = backoff
        self.tls = tls
        self.timeout = timeout
        self.group = group
        self.slots = (0..<max(1, connections)).map { _ in Slot() }
    }

    /// Sends one command and waits at most the deadline for its answer.
    public func send(_ command: RESPCommand) async throws(StoreFailure) -> RESPValue {
        do {
            return try await send(command).get()
        } catch let failure as StoreFailure {
            throw failure
        } catch {
            throw .protocolError("\(error)")
        }
    }

    /// Sends one command; the future fails with `StoreFailure` (and never outlives the deadline).
    public func send(_ command: RESPCommand) -> EventLoopFuture<RESPValue> {
        let slot = slots[next.wrappingAdd(1, ordering: .relaxed).oldValue % slots.count]
        let loop = group.next()
        let promise = loop.makePromise(of: RESPValue.self)
        let done = NIOLockedValueBox<Bool>(false)
        let used = NIOLockedValueBox<RedisConnection?>(nil)
        let deadline = loop.scheduleTask(in: timeout) {
            guard done.withLockedValue({ let was = $0; $0 = true; return !was }) else { return }
            // Whatever the connection answers next belongs to this command: close it.
            if let connection = used.withLockedValue({ $0 }) {
                self.retire(connection, from: slot)
            } else {
                slot.state.withLockedValue { self.failed(&$0) }
            }
            promise.fail(StoreFailure.timeout)
        }
        connection(slot).flatMap { connection -> EventLoopFuture<RESPValue> in
            // The deadline passed while connecting: the command is not sent at all.
            if done.withLockedValue({ $0 }) { return connection.channel.eventLoop.makeFailedFuture(StoreFailure.timeout) }
            used.withLockedValue { $0 = connection }
            return connection.send(command)
        }.whenComplete { result in
            guard done.withLockedValue({ let was = $0; $0 = true; return !was }) else { return }
            deadline.cancel()
            switch result {
            case .success(let value):
                self.answered(slot)
                promise.succeed(value)
            case .failure(let error): promise.fail(error as? StoreFailure ?? StoreFailure.protocolError("\(error)"))
            }
        }
        return promise.futureResult
    }

    /// The slot's connection, connecting when it has none (unless backing off).
    private func connection(_ slot: Slot) -> EventLoopFuture<RedisConnection> {
        enum Step {
            case use(RedisConnection)
            case wait(EventLoopFuture<RedisConnection>)
            case refuse
            case connect(EventLoopPromise<RedisConnection>)
        }
        let step: Step = slot.state.withLockedValue { state in
            if let connection = state.connection, connection.isActive { return .use(connection) }
            state.connection = nil
            if let connecting = state.connecting { return .wait(connecting) }
            if let retryAt = state.retryAt, NIODeadline.now() < retryAt { return .refuse }
            let promise = group.next().makePromise(of: RedisConnection.self)
            state.connecting = promise.futureResult
            return .connect(promise)
        }
        switch step {
        case .use(let connection):
            return group.next().makeSucceededFuture(connection)
        case .wait(let future):
            return future
        case .refuse:
            return group.next().makeFailedFuture(StoreFailure.connect("waiting before the next attempt"))
        case .connect(let promise):
            RedisConnection.connect(to: endpoint, group: group, tls: tls, timeout: max(timeout, .milliseconds(250))).whenComplete { result in
                slot.state.withLockedValue { state in
                    state.connecting = nil
                    switch result {
                    case .success(let connection): state.connection = connection
                    case .failure: self.failed(&state)
                    }
                }
                promise.completeWith(result)
            }
            return promise.futureResult
        }
    }

    /// A failure: the next attempt waits `backoff`, doubling per failure up to `maxBackoff`; the
    /// first failure after an answer waits nothing (one slow answer is no outage).
    private func failed(_ state: inout Slot.State) {
        state.failures += 1
        guard state.failures > 1 else {
            state.retryAt = nil
            return
        }
        let wait = min(backoff * (1 << Int64(min(state.failures - 2, 10))), max(backoff, Self.maxBackoff))
        state.retryAt = .now() + wait
    }

    /// Closes a connection that can no longer be trusted (a command timed out on it); the next
    /// command connects again, after the back-off.
    private func retire(_ connection: RedisConnection, from slot: Slot) {
        slot.state.withLockedValue { state in
            if state.connection === connection { state.connection = nil }
            failed(&state)
        }
        connection.close()
    }

    private func answered(_ slot: Slot) {
        slot.state.withLockedValue { state in
            state.failures = 0
            state.retryAt = nil
        }
    }

    /// Closes every connection.
    public func shutdown() {
        for slot in slots {
            slot.state.withLockedValue { state in
                state.connection?.close()
                state = Slot.State()
            }
        }
    }
}
