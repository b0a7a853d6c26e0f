import HTTPTypes
import Logging
import NIOCore
import NIOExtras
import NIOHTTP1
import NIOPosix
import ServiceLifecycle
import Synchronization

/// An HTTP/1.1 listener on SwiftNIO: the decision endpoints (`/authz`, `/authz/**`) and/or the
/// admin endpoints. A cache hit is decided and answered on the event loop without a hop to the
/// Swift concurrency pool; a miss goes to the `DecisionQueue`. Graceful shutdown stops accepting,
/// lets in-flight requests finish and closes idle keep-alive connections.
public struct DecisionServer: Service {
    /// What this listener serves.
    struct Routes: Sendable {
        var decisions: AuthorizerSlot?
        var admin: AdminEndpoints?
    }

    let address: ListenAddress
    let routes: Routes
    let queue: DecisionQueue
    let logger: Logger
    let idleTimeoutSeconds: Int
    let onBound: @Sendable (Int?) -> Void

    init(
        address: ListenAddress, routes: Routes, queue: DecisionQueue, logger: Logger, idleTimeoutSeconds: Int = 75,
        onBound: @escaping @Sendable (Int?) -> Void = { _ in }
    ) {
        self.address = address
        self.idleTimeoutSeconds = idleTimeoutSeconds
        self.routes = routes
        self.queue = queue
        self.logger = logger
        self.onBound = onBound
    }

    public func run() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let quiesce = ServerQuiescingHelper(group: group)
        let routes = routes
        let queue = queue
        let idleTimeout = TimeAmount.seconds(Int64(idleTimeoutSeconds))
        var bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(quiesce.makeServerChannelHandler(channel: channel))
                }
            }
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(DecisionHandler(routes: routes, queue: queue, idleTimeout: idleTimeout))
                }
            }
        let channel: any Channel
        switch address {
        case .tcp(let host, let port):
            bootstrap = bootstrap.childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            channel = try await bootstrap.bind(host: host, port: port).get()
        case .unix(let path):
            channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
        }
        onBound(channel.localAddress?.port)
        logger.info("listening", metadata: ["authz.listen": "\(address)", "authz.serves": "\(routes.decisions == nil ? "admin" : routes.admin == nil ? "decisions" : "decisions+admin")"])

        let stopped = channel.eventLoop.makePromise(of: Void.self)
        let initiated = Atomic<Bool>(false)
        let shutdown: @Sendable () -> Void = {
            if !initiated.exchange(true, ordering: .relaxed) { quiesce.initiateShutdown(promise: stopped) }
        }
        try await withTaskCancellationHandler {
            try await withGracefulShutdownHandler {
                try await stopped.futureResult.get()
            } onGracefulShutdown: {
                shutdown()
            }
        } onCancel: {
            shutdown()
        }
    }
}

/// One connection's requests: routes each to the decision, the admin endpoints or 404. It reads
/// SwiftNIO's HTTP/1 parts as they are (no conversion to HTTP types: a cache hit is a few
/// microseconds, and converting every header both ways cost about a third of that).
final class DecisionHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    /// Admin request bodies (purge) are small; larger ones are cut off and refused.
    static let maxBodyBytes = 16 * 1024

    private let routes: DecisionServer.Routes
    private let queue: DecisionQueue
    private let idleTimeout: TimeAmount
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    /// Since when the connection has waited for a complete request head (nil while a request is
    /// being read or answered). Unless one arrives within the idle timeout, counted from the
    /// connection's start or the previous answer, the connection is closed: that ends idle
    /// keep-alive connections and clients that trickle a request byte by byte alike.
    private var waitingSince: NIODeadline?
    /// One timer per connection, re-armed lazily from `waitingSince`, not per request.
    private var idleTimer: Scheduled<Void>?

    init(routes: DecisionServer.Routes, queue: DecisionQueue, idleTimeout: TimeAmount) {
        self.routes = routes
        self.queue = queue
        self.idleTimeout = idleTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { startWaiting(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        startWaiting(context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        idleTimer?.cancel()
        idleTimer = nil
        waitingSince = nil
        context.fireChannelInactive()
    }

    private func startWaiting(context: ChannelHandlerContext) {
        let now = NIODeadline.now()
        waitingSince = now
        if idleTimer == nil { armIdleTimer(at: now + idleTimeout, context: context) }
    }

    private func armIdleTimer(at deadline: NIODeadline, context: ChannelHandlerContext) {
        idleTimer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            self.idleTimer = nil
            // A request in progress: its answer starts the wait (and the timer) again.
            guard let since = self.waitingSince else { return }
            let due = since + self.idleTimeout
            if due <= .now() {
                context.close(promise: nil)
            } else {
                self.armIdleTimer(at: due, context: context)
            }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let request):
            waitingSince = nil
            head = request
            body = nil
        case .body(var chunk):
            if (body?.readableBytes ?? 0) + chunk.readableBytes <= Self.maxBodyBytes {
                body.setOrWriteBuffer(&chunk)
            }
        case .end:
            guard let request = head else { return }
            head = nil
            respond(to: request, context: context)
        }
    }

    private func respond(to request: HTTPRequestHead, context: ChannelHandlerContext) {
        let target = request.uri
        if let authorizer = routes.decisions?.current,
            let access = AccessRequest(
                method: request.method.rawValue, target: target, headers: request.headers,
                trustPolicyHeader: authorizer.configuration.server.trustPolicyHeader
            )
        {
            if let answer = authorizer.answerWithoutSuspending(access) {
                write(answer, to: request, context: context)
                return
            }
            let promise = context.eventLoop.makePromise(of: AuthzAnswer.self)
            queue.submit(access, to: authorizer, promise: promise)
            promise.futureResult.assumeIsolated().whenSuccess { answer in
                self.write(answer, to: request, context: context)
            }
            return
        }
        if let admin = routes.admin, let method = HTTPTypes.HTTPRequest.Method(request.method.rawValue),
            let reply = admin.respond(method: method, path: target, body: body)
        {
            var headers = HTTPHeaders(reply.headers.map { ($0.name.rawName, $0.value) })
            headers.add(name: "Content-Length", value: String(reply.body.readableBytes))
            write(status: HTTPResponseStatus(statusCode: reply.status.code), headers: headers, body: reply.body, to: request, context: context)
            return
        }
        write(status: .notFound, headers: ["Content-Length": "0"], body: nil, to: request, context: context)
    }

    private func write(_ answer: AuthzAnswer, to request: HTTPRequestHead, context: ChannelHandlerContext) {
        let body = answer.body.isEmpty ? nil : context.channel.allocator.buffer(string: answer.body)
        write(status: HTTPResponseStatus(statusCode: answer.status), headers: answer.headers, body: body, to: request, context: context)
    }

    /// Writes an answer whose headers already hold its `Content-Length`.
    private func write(status: HTTPResponseStatus, headers: HTTPHeaders, body: ByteBuffer?, to request: HTTPRequestHead, context: ChannelHandlerContext) {
        var headers = headers
        let keepAlive = request.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
        if let body, body.readableBytes > 0 {
            context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        }
        if keepAlive {
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            startWaiting(context: context)
        } else {
            context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
        }
    }
}
