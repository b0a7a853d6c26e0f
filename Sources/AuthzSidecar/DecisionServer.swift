import HTTPTypes
import Logging
import NIOCore
import NIOExtras
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
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
                    try channel.pipeline.syncOperations.addHandler(HTTP1ToHTTPServerCodec(secure: false))
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

/// One connection's requests: routes each to the decision, the admin endpoints or 404.
final class DecisionHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias OutboundOut = HTTPResponsePart

    /// Admin request bodies (purge) are small; larger ones are cut off and refused.
    static let maxBodyBytes = 16 * 1024

    private let routes: DecisionServer.Routes
    private let queue: DecisionQueue
    private let idleTimeout: TimeAmount
    private var head: HTTPRequest?
    private var body: ByteBuffer?
    /// Closes the connection unless a complete request head arrives in time, counted from the
    /// connection's start or the previous answer: ends idle keep-alive connections and clients
    /// that trickle a request byte by byte alike.
    private var headDeadline: Scheduled<Void>?

    init(routes: DecisionServer.Routes, queue: DecisionQueue, idleTimeout: TimeAmount) {
        self.routes = routes
        self.queue = queue
        self.idleTimeout = idleTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { armHeadDeadline(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        armHeadDeadline(context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        headDeadline?.cancel()
        headDeadline = nil
        context.fireChannelInactive()
    }

    private func armHeadDeadline(context: ChannelHandlerContext) {
        headDeadline?.cancel()
        headDeadline = context.eventLoop.assumeIsolated().scheduleTask(in: idleTimeout) {
            context.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let request):
            headDeadline?.cancel()
            headDeadline = nil
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

    private func respond(to request: HTTPRequest, context: ChannelHandlerContext) {
        let target = request.path ?? "/"
        if let authorizer = routes.decisions?.current,
            let access = AccessRequest(
                method: request.method.rawValue, target: target, authority: request.authority, headers: request.headerFields,
                trustPolicyHeader: authorizer.configuration.server.trustPolicyHeader
            )
        {
            if let answer = authorizer.answerWithoutSuspending(access) {
                write(answer, context: context)
                return
            }
            let promise = context.eventLoop.makePromise(of: AuthzAnswer.self)
            queue.submit(access, to: authorizer, promise: promise)
            promise.futureResult.assumeIsolated().whenSuccess { answer in
                self.write(answer, context: context)
            }
            return
        }
        if let admin = routes.admin, let reply = admin.respond(method: request.method, path: target, body: body) {
            write(status: reply.status, headers: reply.headers, body: reply.body, context: context)
            return
        }
        write(status: .notFound, headers: HTTPFields(), body: nil, context: context)
    }

    private func write(_ answer: AuthzAnswer, context: ChannelHandlerContext) {
        let body = answer.body.isEmpty ? nil : context.channel.allocator.buffer(string: answer.body)
        write(status: HTTPResponse.Status(code: answer.status), headers: answer.headers, body: body, context: context)
    }

    private func write(status: HTTPResponse.Status, headers: HTTPFields, body: ByteBuffer?, context: ChannelHandlerContext) {
        var fields = headers
        fields[.contentLength] = String(body?.readableBytes ?? 0)
        context.write(wrapOutboundOut(.head(HTTPResponse(status: status, headerFields: fields))), promise: nil)
        if let body, body.readableBytes > 0 {
            context.write(wrapOutboundOut(.body(body)), promise: nil)
        }
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        armHeadDeadline(context: context)
    }
}
