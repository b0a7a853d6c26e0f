import ArgumentParser
import Foundation
import Introspection
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// Bench-only tools for scripts/bench.sh: the reference HTTP server, a fake AS with a fixed
/// latency, and the cache memory probe. Not part of the product.
@main
struct AuthzBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "authz-bench",
        abstract: "Benchmark helpers for scripts/bench.sh (not part of the product).",
        subcommands: [Reference.self, FakeAS.self, CacheMemory.self, JWTFixtures.self, JWTVerify.self]
    )
}

/// `reference`: the cost of HTTP itself — a minimal SwiftNIO HTTP/1.1 server answering 200 with
/// two small headers.
/// With `--sidecar-answer`, it answers the nine headers a sidecar allow carries instead: the cost
/// of the bigger answer alone, without any decision. With `--raw` as well, it writes that answer
/// as finished bytes behind NIO's request parser, as the sidecar's listener does: the sidecar's
/// own HTTP layer without the decision, so the two differ by the decision's cost alone.
struct Reference: AsyncParsableCommand {
    @Option var host = "127.0.0.1"
    @Option var port = 9301
    @Flag(help: "Answer with the same headers as a sidecar allow (X-Credential-*, Cache-Control).") var sidecarAnswer = false
    @Flag(help: "Write the answer as finished bytes (no NIO response encoder), as the sidecar does.") var raw = false

    func run() async throws {
        let headers =
            sidecarAnswer
            ? [
                ("X-Credential-Scope", "system-access"), ("X-Credential-Client-ID", "system-client-mtls"),
                ("X-Credential-Token-Type", "bearer"), ("X-Credential-Exp", "1796062449"), ("X-Credential-Iat", "1795976049"),
                ("X-Credential-Sub", "svc"), ("X-Credential-Iss", "https://as.example"),
                ("X-Credential-Jti", "a1b2c3d4-e5f6-7890-abcd-ef0123456789"), ("Cache-Control", "no-store"),
            ]
            : [("X-Credential-Scope", "system-access"), ("X-Credential-Sub", "svc")]
        let channel: any Channel
        if raw {
            var response = ByteBuffer(string: "HTTP/1.1 200 OK\r\n")
            for (name, value) in headers + [("Content-Length", "0")] { response.writeString("\(name): \(value)\r\n") }
            response.writeString("\r\n")
            channel = try await HTTPBenchServer.bindRaw(host: host, port: port, response: response)
        } else {
            channel = try await HTTPBenchServer.bind(host: host, port: port) { _, _ in
                (.ok, headers, "", .zero)
            }
        }
        print("reference listening on \(host):\(port)")
        try await channel.closeFuture.get()
    }
}

/// `fake-as`: an RFC 7662 endpoint answering every token as active, bound to one thumbprint,
/// after a fixed latency; `GET /calls` tells how many introspections it answered.
struct FakeAS: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "fake-as")

    @Option var host = "127.0.0.1"
    @Option var port = 9302
    @Option(help: "Answer latency in milliseconds.") var latencyMs = 2
    @Option(help: "The x5t#S256 every token is bound to.") var thumbprint = ""
    @Option(help: "Scope of every token.") var scope = "system-access"

    func run() async throws {
        let calls = Counter()
        let exp = Int(Date().timeIntervalSince1970) + 86_400
        let body = #"{"active":true,"scope":"\#(scope)","client_id":"system-client-mtls","token_type":"bearer","exp":\#(exp),"iat":\#(exp - 86_400),"sub":"svc","iss":"https://as.example","jti":"a1b2c3d4-e5f6-7890-abcd-ef0123456789","cnf":{"x5t#S256":"\#(thumbprint)"}}"#
        let latency = TimeAmount.milliseconds(Int64(latencyMs))
        let channel = try await HTTPBenchServer.bind(host: host, port: port) { head, _ in
            if head.uri == "/calls" {
                return (.ok, [("Content-Type", "text/plain")], "\(calls.value)\n", .zero)
            }
            calls.increment()
            return (.ok, [("Content-Type", "application/json")], body, latency)
        }
        print("fake AS listening on \(host):\(port), latency \(latencyMs) ms")
        try await channel.closeFuture.get()
    }
}

/// `cache-memory`: RSS growth per cached token, measured by filling the real cache.
struct CacheMemory: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cache-memory")

    @Option(parsing: .upToNextOption, help: "Entry counts to measure.") var entries: [Int] = [10_000, 100_000, 1_000_000]

    func run() async throws {
        print("| cached tokens | RSS before | RSS after | bytes per entry |")
        print("|---:|---:|---:|---:|")
        for count in entries {
            let exp = Int64(Date().timeIntervalSince1970) + 3600
            // What Glewlwyd/Keycloak send for a client-credentials token, with per-token jti.
            let upstream = ClosureTokenIntrospector { token in
                TokenInfo(
                    active: true, scope: "system-access", clientID: "system-client-mtls", tokenType: "bearer",
                    exp: exp, iat: exp - 3600, sub: "service-account-system-client-mtls", iss: "https://127.0.0.1:4594/api/oidc",
                    jti: "jti-" + token, certificateThumbprint: "3dfd895e69c2a99776f93b5ace1fff193dfd895e69c"
                )
            }
            // Headroom: each of the 16 shards holds max_entries/16, so an uneven spread of digests
            // would start evicting just before `count`.
            let cache = CachingTokenIntrospector(upstream: upstream, configuration: .init(ttlSeconds: 3600, maxEntries: count + count / 8))
            let before = residentBytes()
            for i in 0..<count {
                _ = try await cache.introspect(String(format: "eyJhbGciOiJSUzI1NiJ9.token-%08d", i))
            }
            let after = residentBytes()
            let held = cache.count
            print("| \(held) | \(before / 1024) KiB | \(after / 1024) KiB | \((after - before) / max(1, held)) |")
            withExtendedLifetime(cache) {}
        }
    }

    func residentBytes() -> Int {
        let statm = (try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8)) ?? "0 0"
        let pages = Int(statm.split(separator: " ")[1]) ?? 0
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}

final class Counter: Sendable {
    private let count = Atomic<Int>(0)
    func increment() { count.add(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

/// A minimal NIO HTTP/1.1 server: one handler closure, keep-alive, optional answer delay.
enum HTTPBenchServer {
    typealias Answer = (HTTPResponseStatus, [(String, String)], String, TimeAmount)

    static func bind(host: String, port: Int, answer: @escaping @Sendable (HTTPRequestHead, ByteBuffer?) -> Answer) async throws -> any Channel {
        try await bind(host: host, port: port) { pipeline in
            try pipeline.configureHTTPServerPipeline(withErrorHandling: true)
            try pipeline.addHandler(Handler(answer: answer))
        }
    }

    /// NIO's request parser and one fixed response written as bytes per request (keep-alive).
    static func bindRaw(host: String, port: Int, response: ByteBuffer) async throws -> any Channel {
        try await bind(host: host, port: port) { pipeline in
            try pipeline.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes)))
            try pipeline.addHandler(RawHandler(response: response))
        }
    }

    private static func bind(
        host: String, port: Int, handlers: @escaping @Sendable (ChannelPipeline.SynchronousOperations) throws -> Void
    ) async throws -> any Channel {
        try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try handlers(channel.pipeline.syncOperations) }
            }
            .bind(host: host, port: port).get()
    }

    final class RawHandler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = ByteBuffer
        let response: ByteBuffer

        init(response: ByteBuffer) {
            self.response = response
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if case .end = unwrapInboundIn(data) {
                context.writeAndFlush(wrapOutboundOut(response), promise: nil)
            }
        }
    }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let answer: @Sendable (HTTPRequestHead, ByteBuffer?) -> Answer
        var head: HTTPRequestHead?

        init(answer: @escaping @Sendable (HTTPRequestHead, ByteBuffer?) -> Answer) {
            self.answer = answer
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head): self.head = head
            case .body: break
            case .end:
                guard let head else { return }
                let (status, fields, body, delay) = answer(head, nil)
                var headers = HTTPHeaders(fields)
                headers.add(name: "Content-Length", value: "\(body.utf8.count)")
                let keepAlive = head.isKeepAlive
                let respond = { [context] in
                    context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
                    if !body.isEmpty {
                        context.write(self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
                    }
                    context.writeAndFlush(self.wrapOutboundOut(.end(nil))).whenComplete { _ in
                        if !keepAlive { context.close(promise: nil) }
                    }
                }
                if delay == .zero {
                    respond()
                } else {
                    context.eventLoop.assumeIsolated().scheduleTask(in: delay) { respond() }
                }
            }
        }
    }
}
