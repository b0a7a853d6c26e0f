import NIOCore
import NIOPosix
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
        // The queue itself waits on an event loop too: handing it a job wakes no other thread.
        await withTaskExecutorPreference(EventLoopTaskExecutor(MultiThreadedEventLoopGroup.singleton.next())) {
            await self.serve()
        }
    }

    private func serve() async {
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                for await job in stream {
                    // On the event loop that asked: no hop to the global pool and back.
                    group.addTask(executorPreference: EventLoopTaskExecutor(job.promise.futureResult.eventLoop)) {
                        job.promise.succeed(await job.authorizer.answer(job.request))
                    }
                }
            }
        } onGracefulShutdown: {
            // The listeners stop first (they are started after the queue); finish what is queued.
            self.continuation.finish()
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
