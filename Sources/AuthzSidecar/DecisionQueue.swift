import NIOConcurrencyHelpers
import NIOCore
import ServiceLifecycle

/// Runs the decisions that must wait for the authorization server (cache misses), each as a task
/// on the event loop of the connection that asked, and completes its promise there. Cache hits
/// never come here: the server answers them without suspending.
///
/// As a service it keeps the decisions in flight accountable: on graceful shutdown it refuses new
/// ones (503) and returns once every decision it started has answered.
public final class DecisionQueue: Service, Sendable {
    private struct State {
        var inFlight = 0
        var closed = false
        /// Resumed when `closed` and nothing is in flight.
        var drained: CheckedContinuation<Void, Never>?
    }

    private let state = NIOLockedValueBox(State())

    public init() {}

    /// Whether new decisions are refused (after graceful shutdown began).
    var isClosed: Bool { state.withLockedValue { $0.closed } }

    /// Decides `request` in the background; a queue that has stopped answers 503.
    func submit(_ request: AccessRequest, to authorizer: Authorizer, promise: EventLoopPromise<AuthzAnswer>) {
        let accepted = state.withLockedValue { state -> Bool in
            guard !state.closed else { return false }
            state.inFlight += 1
            return true
        }
        guard accepted else {
            promise.succeed(AuthzAnswer(outcome: .fault(.overloaded), policy: nil, front: request.front))
            return
        }
        // Started directly on the event loop that asked: no other thread is woken to hand the
        // job over, and the answer is written from where it is computed.
        Task(executorPreference: EventLoopTaskExecutor(promise.futureResult.eventLoop)) {
            promise.succeed(await authorizer.answer(request))
            self.finished()
        }
    }

    private func finished() {
        let drained = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
            state.inFlight -= 1
            guard state.closed, state.inFlight == 0 else { return nil }
            defer { state.drained = nil }
            return state.drained
        }
        drained?.resume()
    }

    public func run() async {
        try? await gracefulShutdown()
        // The listeners stop first (they are started after the queue); finish what is in flight.
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let done = state.withLockedValue { state -> Bool in
                state.closed = true
                guard state.inFlight > 0 else { return true }
                state.drained = continuation
                return false
            }
            if done { continuation.resume() }
        }
    }
}

/// Runs a task's jobs on a SwiftNIO event loop, so that a decision waiting for the AS resumes on
/// the loop that will write its answer.
final class EventLoopTaskExecutor: TaskExecutor {
    let loop: any EventLoop

    init(_ loop: any EventLoop) {
        self.loop = loop
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute {
            job.runSynchronously(on: self.asUnownedTaskExecutor())
        }
    }
}
