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
        /// The listener is loopback or unix: `/admin/*` may be served without a token (§4).
        var localOnly = true
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
        var routes = routes
        routes.localOnly = Loopback.isLocalOnly(address)
        let queue = queue
        let idleTimeout = TimeAmount.seconds(Int64(idleTimeoutSeconds))
        // SwiftNIO's parser refuses more than 80 KiB of headers by itself; a larger
        // max_header_bytes raises its limit, so the sidecar's own bound is the one that applies.
        var limits = NIOHTTPDecoderLimitConfiguration()
        let maxHeaderBytes = routes.decisions?.current.configuration.server.maxHeaderBytes ?? 0
        limits.maxHeaderListSize = max(limits.maxHeaderListSize, maxHeaderBytes + 8192)
        limits.maxHeaderFieldSize = max(limits.maxHeaderFieldSize, maxHeaderBytes + 8192)
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
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, informationalResponseStrategy: .drop, limitConfiguration: limits))
                    )
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
        if let admin = routes.admin, !routes.localOnly, admin.slot.current.configuration.server.adminToken == nil {
            logger.warning(
                "this listener is not loopback: /admin/* is refused here (set server.admin_token_file, or use a loopback admin_listen)",
                metadata: ["authz.listen": "\(address)"]
            )
        }

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
/// SwiftNIO's HTTP/1 request parts as they are and writes each answer as finished bytes
/// (`HTTP1Response`): a cache hit is a few microseconds, and the generic HTTP handlers around it
/// (response encoder, header validator, pipelining and error handlers) cost more than that.
/// What those handlers did for us is done here:
/// - pipelined requests are answered in order: while one waits for the AS, the ones behind it
///   wait in `queued` and no more is read from the socket;
/// - a request the parser rejects gets a 400 and the connection is closed;
/// - on graceful shutdown an idle connection is closed at once, a busy one after its answer;
/// - `Connection: close` and HTTP/1.0 keep-alive are honoured; a HEAD answer has no body;
/// - a client that does not read its answers cannot grow the sidecar's memory: while the
///   channel is not writable (its outbound buffer above NIO's high-water mark) nothing more is
///   read or answered, requests already parsed wait in `queued` (at most `maxQueued`, then the
///   connection is cut), and a connection that stays unwritable for the idle timeout is closed;
/// - an admin request body over `maxBodyBytes` is refused with a 400, never cut and parsed.
final class DecisionHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = Never
    typealias OutboundOut = ByteBuffer

    /// Admin request bodies (purge) are small; larger ones are refused (400).
    static let maxBodyBytes = 16 * 1024
    /// Pipelined requests held while an earlier one waits for the AS. Proxies do not pipeline;
    /// a client that sends more than this is cut off.
    static let maxQueued = 64
    static let notFound = HTTP1Response(status: 404, headers: ["Content-Length": "0"])
    static let badRequest = HTTP1Response(status: 400, headers: ["Content-Length": "0"])
    static let bodyTooLarge: HTTP1Response = {
        let body = #"{"error":"request body larger than 16384 bytes"}"#
        return HTTP1Response(
            status: 400, headers: ["Content-Type": "application/json", "Content-Length": "\(body.utf8.count)"], body: ByteBuffer(string: body)
        )
    }()

    private let routes: DecisionServer.Routes
    private let queue: DecisionQueue
    private let idleTimeout: TimeAmount
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    /// The body of the request being read went over `maxBodyBytes`.
    private var bodyTooLarge = false
    /// A request's answer is awaited from the `DecisionQueue`.
    private var answering = false
    /// Complete requests that arrived behind the one being answered.
    private var queued = CircularBuffer<(head: HTTPRequestHead, body: ByteBuffer?, tooLarge: Bool)>(initialCapacity: 2)
    /// A `read` held back while answering, passed on once the answer is written.
    private var readHeld = false
    /// The next answer is the last: graceful shutdown, or a parse error behind it.
    private var closeAfterAnswer = false
    /// Nothing more is answered on this connection.
    private var closing = false
    /// Since when the connection has waited for a complete request, head and body (nil while a
    /// request is being answered). Unless one arrives within the idle timeout, counted from the
    /// connection's start or the previous answer, the connection is closed: that ends idle
    /// keep-alive connections and clients that trickle a request or its body byte by byte alike.
    private var waitingSince: NIODeadline?
    /// One timer per connection, re-armed lazily from `waitingSince`, not per request.
    private var idleTimer: Scheduled<Void>?
    /// Closes the connection if it is still unwritable when it fires.
    private var unwritableTimer: Scheduled<Void>?

    /// Whether an answer may be written now: not while the client leaves earlier ones unread.
    private func mayAnswer(_ context: ChannelHandlerContext) -> Bool {
        !answering && context.channel.isWritable
    }

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
        unwritableTimer?.cancel()
        unwritableTimer = nil
        waitingSince = nil
        closing = true
        queued.removeAll()
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
        guard !closing else { return }
        switch unwrapInboundIn(data) {
        case .head(let request):
            head = request
            body = nil
            bodyTooLarge = false
        case .body(var chunk):
            if (body?.readableBytes ?? 0) + chunk.readableBytes <= Self.maxBodyBytes {
                body.setOrWriteBuffer(&chunk)
            } else {
                bodyTooLarge = true
                body = nil
            }
        case .end:
            guard let request = head else { return }
            head = nil
            let requestBody = body
            let tooLarge = bodyTooLarge
            body = nil
            bodyTooLarge = false
            if !mayAnswer(context) {
                guard queued.count < Self.maxQueued else {
                    closing = true
                    context.close(promise: nil)
                    return
                }
                queued.append((request, requestBody, tooLarge))
            } else {
                serve(request, body: requestBody, bodyTooLarge: tooLarge, context: context)
            }
        }
    }

    func read(context: ChannelHandlerContext) {
        if !mayAnswer(context) {
            readHeld = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            unwritableTimer?.cancel()
            unwritableTimer = nil
            serveQueued(context: context)
        } else if unwritableTimer == nil {
            // The client does not read its answers: give it the idle timeout to start again.
            unwritableTimer = context.eventLoop.assumeIsolated().scheduleTask(in: idleTimeout) {
                self.unwritableTimer = nil
                if !context.channel.isWritable {
                    self.closing = true
                    context.close(promise: nil)
                }
            }
        }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is ChannelShouldQuiesceEvent else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        if answering || head != nil {
            closeAfterAnswer = true
        } else {
            closing = true
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard error is HTTPParserError, !closing else {
            context.close(promise: nil)
            return
        }
        if answering {
            // Garbage behind a request in progress: answer that one, then close.
            closeAfterAnswer = true
            return
        }
        // Like SwiftNIO's HTTPServerProtocolErrorHandler: a request that cannot be parsed gets a
        // 400, and the connection is closed.
        closeAfterAnswer = true
        write(Self.badRequest, to: HTTPRequestHead(version: .http1_1, method: .GET, uri: "/"), context: context)
    }

    private func serve(_ request: HTTPRequestHead, body: ByteBuffer?, bodyTooLarge: Bool = false, context: ChannelHandlerContext) {
        waitingSince = nil  // being answered; the answer starts the next wait
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
            answering = true
            let promise = context.eventLoop.makePromise(of: AuthzAnswer.self)
            queue.submit(access, to: authorizer, promise: promise)
            promise.futureResult.assumeIsolated().whenSuccess { answer in
                self.answering = false
                self.write(answer, to: request, context: context)
                self.serveQueued(context: context)
            }
            return
        }
        if routes.admin != nil, bodyTooLarge {
            write(Self.bodyTooLarge, to: request, context: context)
            return
        }
        if let admin = routes.admin, let method = HTTPTypes.HTTPRequest.Method(request.method.rawValue),
            let answer = admin.answer(
                method: method, path: target, body: body, authorization: request.headers.first(.authorization), localListener: routes.localOnly
            )
        {
            switch answer {
            case .now(let reply):
                write(Self.response(reply), to: request, context: context)
            case .later(let work):
                // A purge the shared store propagates: answered once the store acknowledged it;
                // requests behind it on this connection wait, as behind a decision.
                answering = true
                let promise = context.eventLoop.makePromise(of: AdminEndpoints.Reply.self)
                promise.completeWithTask { await work() }
                promise.futureResult.assumeIsolated().whenSuccess { reply in
                    self.answering = false
                    self.write(Self.response(reply), to: request, context: context)
                    self.serveQueued(context: context)
                }
            }
            return
        }
        write(Self.notFound, to: request, context: context)
    }

    static func response(_ reply: AdminEndpoints.Reply) -> HTTP1Response {
        var headers = HTTPHeaders(reply.headers.map { ($0.name.rawName, $0.value) })
        headers.add(name: "Content-Length", value: String(reply.body.readableBytes))
        return HTTP1Response(status: reply.status.code, headers: headers, body: reply.body)
    }

    /// Answers the requests that waited behind an answer from the queue, until one must wait too.
    private func serveQueued(context: ChannelHandlerContext) {
        while mayAnswer(context), !closing, let next = queued.popFirst() {
            serve(next.head, body: next.body, bodyTooLarge: next.tooLarge, context: context)
        }
        if mayAnswer(context), readHeld {
            readHeld = false
            context.read()
        }
    }

    private func write(_ answer: AuthzAnswer, to request: HTTPRequestHead, context: ChannelHandlerContext) {
        // Answers for the HTTP front ends always carry their HTTP/1 bytes.
        let response = answer.http1 ?? HTTP1Response(status: answer.status, headers: answer.headers, body: ByteBuffer(string: answer.body))
        write(response, to: request, context: context)
    }

    private func write(_ response: HTTP1Response, to request: HTTPRequestHead, context: ChannelHandlerContext) {
        guard !closing else { return }
        let keepAlive = request.isKeepAlive && !closeAfterAnswer
        let buffer = response.bytes(version: request.version, keepAlive: keepAlive, isHEAD: request.method == .HEAD)
        if keepAlive {
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
            startWaiting(context: context)
        } else {
            closing = true
            queued.removeAll()
            context.writeAndFlush(wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
        }
    }
}
