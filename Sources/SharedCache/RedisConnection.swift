import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL

/// Why a store command did not get an answer. Every one of them is a miss to the caller.
public enum StoreFailure: Error, Sendable, Equatable, CustomStringConvertible {
    /// No answer within the deadline (the connection was closed: answers match commands by order).
    case timeout
    /// Could not connect, or waiting out the back-off after a failed attempt.
    case connect(String)
    /// The connection closed, or the server broke the protocol.
    case protocolError(String)
    /// The server answered with an error (`-ERR …`), or a cluster redirection (`MOVED`/`ASK`).
    case refused(String)

    public var description: String {
        switch self {
        case .timeout: "timeout"
        case .connect(let why): "cannot connect: \(why)"
        case .protocolError(let why): "protocol: \(why)"
        case .refused(let why): "refused: \(why)"
        }
    }

    /// The metrics and log label of the cause.
    public var cause: String {
        switch self {
        case .timeout: "timeout"
        case .connect: "connect"
        case .protocolError: "protocol"
        case .refused: "refused"
        }
    }
}

/// A command on its way out, with the promise its answer completes (nil: no answer is awaited,
/// as for PING and SUBSCRIBE on a subscribed connection, whose answers arrive as pushes).
struct OutboundCommand {
    var bytes: ByteBuffer
    var promise: EventLoopPromise<RESPValue>?
}

/// Pipelining on one connection: commands are written in order and their answers arrive in that
/// order, so each answer completes the oldest waiting promise. Values that no command waits for
/// (pub/sub messages, PING answers on a subscribed connection) go to `onPush`.
final class RESPChannelHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = OutboundCommand
    typealias OutboundOut = ByteBuffer

    private let parser: RESPParser
    private var buffer = ByteBuffer()
    private var waiting = CircularBuffer<EventLoopPromise<RESPValue>>()
    private let onPush: (@Sendable (RESPValue) -> Void)?

    init(parser: RESPParser = RESPParser(), onPush: (@Sendable (RESPValue) -> Void)?) {
        self.parser = parser
        self.onPush = onPush
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let command = unwrapOutboundIn(data)
        if let answer = command.promise { waiting.append(answer) }
        context.write(wrapOutboundOut(command.bytes), promise: promise)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        buffer.writeBuffer(&incoming)
        do {
            while let value = try parser.parse(&buffer) {
                if let promise = waiting.popFirst() {
                    switch value {
                    case .error(let message):
                        promise.fail(StoreFailure.refused(Self.redirection(message) ?? message))
                    default:
                        promise.succeed(value)
                    }
                } else if let onPush {
                    onPush(value)
                } else {
                    throw RESPError("an answer nobody asked for")
                }
            }
            buffer.discardReadBytes()
        } catch {
            failAll(.protocolError("\(error)"))
            context.close(promise: nil)
        }
    }

    /// Cluster mode is not supported: a redirection names the problem plainly.
    static func redirection(_ message: String) -> String? {
        guard message.hasPrefix("MOVED ") || message.hasPrefix("ASK ") else { return nil }
        return "the store redirects (\(message.prefix(40))): Redis Cluster is not supported, point cache.shared.url at a standalone server or a proxy"
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll(.protocolError("connection closed"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failAll(.protocolError("\(error)"))
        context.close(promise: nil)
    }

    private func failAll(_ failure: StoreFailure) {
        while let promise = waiting.popFirst() { promise.fail(failure) }
    }
}

/// One connection to the store.
final class RedisConnection: Sendable {
    let channel: any Channel

    init(channel: any Channel) {
        self.channel = channel
    }

    var isActive: Bool { channel.isActive }

    /// Sends a command; its answer completes the future (on the channel's event loop).
    func send(_ command: RESPCommand) -> EventLoopFuture<RESPValue> {
        let promise = channel.eventLoop.makePromise(of: RESPValue.self)
        channel.writeAndFlush(OutboundCommand(bytes: command.bytes, promise: promise)).whenFailure { error in
            promise.fail(StoreFailure.protocolError("write failed: \(error)"))
        }
        return promise.futureResult
    }

    /// Sends a command whose answer arrives as a push.
    func sendWithoutAnswer(_ command: RESPCommand) {
        channel.writeAndFlush(OutboundCommand(bytes: command.bytes, promise: nil), promise: nil)
    }

    func close() {
        channel.close(promise: nil)
    }

    /// Connects, then authenticates and selects the database before anything else is sent.
    static func connect(
        to endpoint: StoreEndpoint, group: any EventLoopGroup, tls: NIOSSLContext?, timeout: TimeAmount,
        onPush: (@Sendable (RESPValue) -> Void)? = nil
    ) -> EventLoopFuture<RedisConnection> {
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(timeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        let handler = try NIOSSLClientHandler(context: tls, serverHostname: endpoint.serverHostname)
                        try channel.pipeline.syncOperations.addHandler(handler)
                    }
                    try channel.pipeline.syncOperations.addHandler(RESPChannelHandler(onPush: onPush))
                }
            }
        return bootstrap.connect(host: endpoint.host, port: endpoint.port).flatMap { channel in
            let connection = RedisConnection(channel: channel)
            var setup: [EventLoopFuture<RESPValue>] = []
            if let password = endpoint.password {
                setup.append(connection.send(endpoint.username.map { RESPCommand("AUTH", $0, password.value) } ?? RESPCommand("AUTH", password.value)))
            }
            if endpoint.database != 0 {
                setup.append(connection.send(RESPCommand("SELECT", String(endpoint.database))))
            }
            return EventLoopFuture.andAllSucceed(setup, on: channel.eventLoop).map { connection }.flatMapErrorThrowing { error in
                channel.close(promise: nil)
                throw error
            }
        }.flatMapErrorThrowing { error in
            if let failure = error as? StoreFailure { throw failure }
            throw StoreFailure.connect("\(error)")
        }
    }
}
