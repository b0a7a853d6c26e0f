import NIOCore
import ServiceLifecycle

/// Runs the decisions that must wait for the authorization server (cache misses) as child
/// tasks of one long-lived service, and completes each request's promise on its event loop.
/// Cache hits never come here: the server answers them without suspending.
public final class DecisionQueue: Service, Sendable {
    struct Job: Sendable {
        let request: AccessRequest
        let authorizer: Authorizer
        let promise: EventLoopPromise<AuthzAnswer>
    }

    private let stream: AsyncStream<Job>
    private let continuation: AsyncStream<Job>.Continuation

    public init() {
        (stream, continuation) = AsyncStream.makeStream(of: Job.self)
    }

    /// Decides `request` in the background; a queue that has stopped answers 503.
    func submit(_ request: AccessRequest, to authorizer: Authorizer, promise: EventLoopPromise<AuthzAnswer>) {
        if case .terminated = continuation.yield(Job(request: request, authorizer: authorizer, promise: promise)) {
            promise.succeed(AuthzAnswer(outcome: .fault(.overloaded), policy: nil, front: request.front))
        }
    }

    public func run() async {
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                for await job in stream {
                    group.addTask { job.promise.succeed(await job.authorizer.answer(job.request)) }
                }
            }
        } onGracefulShutdown: {
            // The listeners stop first (they are started after the queue); finish what is queued.
            self.continuation.finish()
        }
    }
}
