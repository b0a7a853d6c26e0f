import Foundation
import Introspection
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Testing

@testable import SharedCache

/// A TCP server that answers every chunk it reads with what `reply` says (nil: silence).
final class ScriptedStoreServer: Sendable {
    let channel: any Channel
    let closed = NIOLockedValueBox<Int>(0)

    init(reply: @escaping @Sendable (ByteBuffer) -> ByteBuffer?) async throws {
        let closed = self.closed
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Handler(reply: reply, closed: closed))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    var port: Int { channel.localAddress!.port! }

    func stop() async { try? await channel.close() }

    final class Handler: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let reply: @Sendable (ByteBuffer) -> ByteBuffer?
        let closed: NIOLockedValueBox<Int>
        init(reply: @escaping @Sendable (ByteBuffer) -> ByteBuffer?, closed: NIOLockedValueBox<Int>) {
            self.reply = reply
            self.closed = closed
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if let answer = reply(unwrapInboundIn(data)) { context.writeAndFlush(wrapOutboundOut(answer), promise: nil) }
        }
        func channelInactive(context: ChannelHandlerContext) {
            closed.withLockedValue { $0 += 1 }
        }
    }
}

@Suite("The store client against a scripted server: deadlines, redirections, hostile replies")
struct RedisClientTests {
    func client(port: Int, timeoutMilliseconds: Int64 = 50, backoff: TimeAmount = .milliseconds(100)) -> RedisClient {
        RedisClient(
            endpoint: try! StoreEndpoint.parse("redis://127.0.0.1:\(port)").get(), tls: nil, timeout: .milliseconds(timeoutMilliseconds), connections: 1,
            backoff: backoff
        )
    }

    @Test("a silent server: each command times out and closes its connection; one slow answer costs no back-off, two in a row do")
    func silence() async throws {
        let server = try await ScriptedStoreServer { _ in nil }
        // A long back-off, so that a slow machine cannot outlast it between the commands.
        let client = client(port: server.port, backoff: .seconds(30))
        await #expect(throws: StoreFailure.timeout) { try await client.send(RESPCommand("PING")) }
        for _ in 0..<1000 where server.closed.withLockedValue({ $0 }) == 0 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(server.closed.withLockedValue { $0 } == 1, "the connection with an unanswered command must be closed")
        // The first timeout is no outage: the next command connects again (and times out too);
        // after that, failures in a row put the slot in back-off, where a command fails at once
        // without a new connection. (On a slow machine a connect can outlast the deadline, which
        // counts as a failure without a closed connection: hence "within a few commands".)
        var refused = false
        for _ in 0..<6 where !refused {
            do {
                _ = try await client.send(RESPCommand("PING"))
                Issue.record("a silent server answered")
            } catch StoreFailure.connect("waiting before the next attempt") {
                refused = true
            } catch {
                #expect(error == .timeout)
            }
        }
        #expect(refused, "failures in a row must put the client in back-off")
        client.shutdown()
        await server.stop()
    }

    @Test("answers are matched to pipelined commands in order")
    func pipelining() async throws {
        // Echoes each ECHO command's argument, in order, several per chunk when they come so.
        let pending = NIOLockedValueBox(ByteBuffer())
        let server = try await ScriptedStoreServer { chunk in
            var chunk = chunk
            return pending.withLockedValue { buffer in
                buffer.writeBuffer(&chunk)
                var out = ByteBuffer()
                while let command = try? RESPParser().parse(&buffer), case .array(let parts?) = command, parts.count == 2, let word = parts[1].bytes {
                    out.writeString("$\(word.count)\r\n")
                    out.writeBytes(word)
                    out.writeString("\r\n")
                }
                return out.readableBytes > 0 ? out : nil
            }
        }
        let client = client(port: server.port, timeoutMilliseconds: 2000)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for n in 0..<200 {
                group.addTask {
                    let reply = try await client.send(RESPCommand("ECHO", "word-\(n)"))
                    #expect(reply.string == "word-\(n)")
                }
            }
            try await group.waitForAll()
        }
        client.shutdown()
        await server.stop()
    }

    @Test("a cluster redirection is refused with a clear reason", arguments: ["-MOVED 3999 10.0.0.2:6379\r\n", "-ASK 3999 10.0.0.2:6379\r\n"])
    func redirected(reply: String) async throws {
        let server = try await ScriptedStoreServer { _ in ByteBuffer(string: reply) }
        let client = client(port: server.port, timeoutMilliseconds: 2000)
        do {
            _ = try await client.send(RESPCommand("GET", "k"))
            Issue.record("a redirection was taken as an answer")
        } catch {
            guard case .refused(let why) = error else { Issue.record("\(error)"); return }
            #expect(why.contains("Redis Cluster is not supported"))
        }
        client.shutdown()
        await server.stop()
    }

    @Test("hostile replies are a protocol failure and close the connection", arguments: [
        "$99999999999\r\n", "*2000000\r\n", "*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", "$-7\r\n", "!oops\r\n",
    ])
    func hostile(reply: String) async throws {
        let server = try await ScriptedStoreServer { _ in ByteBuffer(string: reply) }
        let client = client(port: server.port, timeoutMilliseconds: 2000)
        do {
            _ = try await client.send(RESPCommand("GET", "k"))
            Issue.record("a hostile reply was taken as an answer")
        } catch {
            guard case .protocolError = error else { Issue.record("\(error)"); return }
        }
        for _ in 0..<1000 where server.closed.withLockedValue({ $0 }) == 0 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(server.closed.withLockedValue { $0 } == 1)
        client.shutdown()
        await server.stop()
    }

    @Test("nothing listening: a connect failure, at once")
    func refusedConnection() async throws {
        let server = try await ScriptedStoreServer { _ in nil }
        let port = server.port
        await server.stop()
        let client = client(port: port, timeoutMilliseconds: 1000)
        await #expect(throws: StoreFailure.self) { try await client.send(RESPCommand("PING")) }
        client.shutdown()
    }
}

/// A real redis-server on loopback (Debian's), for the tests that need one.
final class RedisServerProcess {
    let process: Process
    let port: Int

    /// Debian's redis-server is built with TLS (`--tls-port`).
    static var supportsTLS: Bool { binary != nil }

    static var binary: String? {
        ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Whether the server listens with TLS (`rediss://`), with Tests/Fixtures/server.pem.
    let tls: Bool

    init?(tls: Bool = false) async throws {
        self.tls = tls
        guard let binary = Self.binary else { return nil }
        // Three attempts, each on a free port (bind one, release it, use it): a port another
        // process took meanwhile makes the server exit, and the next attempt takes another.
        for _ in 0..<3 {
            let probe = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: 0).get()
            let port = probe.localAddress!.port!
            try await probe.close()
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", NSTemporaryDirectory()]
                + (tls
                    ? ["--port", "0", "--tls-port", "\(port)", "--tls-cert-file", Fixtures.path("server.pem"), "--tls-key-file", Fixtures.path("server.key.pem"),
                        "--tls-ca-cert-file", Fixtures.path("ca.pem"), "--tls-auth-clients", "no"]
                    : ["--port", "\(port)"])
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            // Up to 20 s for the server to answer (a loaded machine starts it slowly), each try
            // on a new client so that no back-off stretches the wait.
            for _ in 0..<100 where process.isRunning {
                let client = RedisClient(
                    endpoint: try StoreEndpoint.parse("\(tls ? "rediss" : "redis")://localhost:\(port)").get(), tls: tls ? try Self.tlsContext(ca: "ca.pem") : nil,
                    timeout: .milliseconds(1000), connections: 1
                )
                let answer = try? await client.send(RESPCommand("PING"))
                client.shutdown()
                if answer == .simpleString("PONG") {
                    self.process = process
                    self.port = port
                    return
                }
                try await Task.sleep(for: .milliseconds(100))
            }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
        return nil
    }

    static func tlsContext(ca: String) throws -> NIOSSLContext? {
        let configuration = SharedCacheConfiguration(
            endpoint: try StoreEndpoint.parse("rediss://localhost:1").get(), sealKey: SealKey(bytes: Array(repeating: 0, count: 32)), caFile: Fixtures.path(ca)
        )
        return try configuration.makeTLSContext()
    }

    /// Stops the server (Foundation's waitUntilExit can hang in an async test: poll instead).
    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        for _ in 0..<200 where process.isRunning { usleep(10_000) }
    }
}

@Suite("The shared store on a real redis-server", .enabled(if: RedisServerProcess.binary != nil, "redis-server is not installed"))
struct SharedTokenStoreTests {
    let key = SealKey(bytes: Array(repeating: 1, count: 32))
    let info = TokenInfo(active: true, scope: "a", clientID: "c", exp: Int64(Date().timeIntervalSince1970) + 3600)

    func store(_ redis: RedisServerProcess, key: SealKey? = nil, prefix: String = "t:") throws -> SharedTokenStore {
        let configuration = SharedCacheConfiguration(
            endpoint: try StoreEndpoint.parse("redis://127.0.0.1:\(redis.port)").get(), sealKey: key ?? self.key, keyPrefix: prefix, timeoutMilliseconds: 500
        )
        return try SharedTokenStore(configuration: configuration, logger: Logger(label: "test"))
    }

    @Test("entries are shared, set-if-absent, ignored under another key or when forged, and tombstoned by a purge")
    func entries() async throws {
        guard let redis = try await RedisServerProcess() else { Issue.record("redis-server did not start"); return }
        defer { redis.stop() }
        let a = try store(redis), b = try store(redis)
        let other = try store(redis, key: SealKey(bytes: Array(repeating: 2, count: 32)))
        defer { a.shutdown(); b.shutdown(); other.shutdown() }
        let digest = TokenDigest(token: "t1")
        let until = Date().timeIntervalSince1970 + 60
        guard case .miss(let epoch) = await a.view(issuer: "default").load(digest) else { Issue.record("expected a miss"); return }
        #expect(epoch == SharedEpoch(0))
        a.view(issuer: "default").save(digest, info: info, until: until, epoch: epoch)
        var found = false
        for _ in 0..<50 where !found {
            if case .hit(let got, let gotUntil) = await b.view(issuer: "default").load(digest) {
                #expect(got.scope == "a" && abs(gotUntil - until) < 0.002)
                found = true
            } else {
                try await Task.sleep(for: .milliseconds(10))
            }
        }
        #expect(found, "replica b must find what replica a stored")
        // Another issuer's key space is apart.
        guard case .miss = await b.view(issuer: "other").load(digest) else { Issue.record("issuers must not share entries"); return }
        // Another seal key: a miss, and its save does not replace the entry.
        guard case .miss = await other.view(issuer: "default").load(digest) else { Issue.record("another seal key must miss"); return }
        other.view(issuer: "default").save(digest, info: TokenInfo(active: true, scope: "admin"), until: until, epoch: SharedEpoch(0))
        try await Task.sleep(for: .milliseconds(100))
        guard case .hit(let still, _) = await b.view(issuer: "default").load(digest) else { Issue.record("the entry was replaced"); return }
        #expect(still.scope == "a")
        // A forged entry written straight into the store: a miss.
        let forged = TokenDigest(token: "forged")
        _ = try await a.client.send(RESPCommand("SET", "t:default:\(forged.hex)", #"{"active":true,"scope":"admin"}"#))
        guard case .miss = await b.view(issuer: "default").load(forged) else { Issue.record("a forged entry was used"); return }
        // A purge tombstones the entry; a save after it (an answer fetched before) is refused.
        let before = try await a.client.send(RESPCommand("GET", "t:default:\(digest.hex)"))
        let propagation = await a.purge(digest, issuers: ["default"])
        #expect(propagation.propagated)
        guard case .miss = await b.view(issuer: "default").load(digest) else { Issue.record("a purged entry was served"); return }
        b.view(issuer: "default").save(digest, info: info, until: until, epoch: SharedEpoch(0))
        try await Task.sleep(for: .milliseconds(100))
        guard case .miss = await b.view(issuer: "default").load(digest) else { Issue.record("a save overwrote the tombstone"); return }
        // The entry from before the purge, put back over its tombstone by someone who can write
        // to the store: a replica that knows of the purge does not use it.
        _ = try await a.client.send(RESPCommand("SET", [Array("t:default:\(digest.hex)".utf8), try #require(before.bytes)]))
        guard case .miss = await a.view(issuer: "default").load(digest) else { Issue.record("a replayed pre-purge entry was served"); return }
        // A purge of everything: entries of the older epoch are ignored.
        let d2 = TokenDigest(token: "t2")
        a.view(issuer: "default").save(d2, info: info, until: until, epoch: SharedEpoch(0))
        try await Task.sleep(for: .milliseconds(100))
        guard case .hit = await b.view(issuer: "default").load(d2) else { Issue.record("expected a hit before purging all"); return }
        #expect(await a.purgeAll().propagated)
        guard case .miss(let newEpoch) = await b.view(issuer: "default").load(d2) else { Issue.record("an entry of an older epoch was served"); return }
        #expect(newEpoch == SharedEpoch(1))
    }

    @Test("rediss://: verified against ca_file; a server the CA did not sign is refused", .enabled(if: RedisServerProcess.supportsTLS))
    func tls() async throws {
        guard let redis = try await RedisServerProcess(tls: true) else { Issue.record("redis-server with TLS did not start"); return }
        defer { redis.stop() }
        let trusted = RedisClient(
            endpoint: try StoreEndpoint.parse("rediss://localhost:\(redis.port)").get(), tls: try RedisServerProcess.tlsContext(ca: "ca.pem"), timeout: .seconds(2)
        )
        defer { trusted.shutdown() }
        #expect(try await trusted.send(RESPCommand("PING")) == .simpleString("PONG"))
        let untrusted = RedisClient(
            endpoint: try StoreEndpoint.parse("rediss://localhost:\(redis.port)").get(), tls: try RedisServerProcess.tlsContext(ca: "other-ca.pem"), timeout: .seconds(2)
        )
        defer { untrusted.shutdown() }
        await #expect(throws: StoreFailure.self) { try await untrusted.send(RESPCommand("PING")) }
        // The whole store over TLS: an entry stored and found again.
        let configuration = SharedCacheConfiguration(
            endpoint: try StoreEndpoint.parse("rediss://localhost:\(redis.port)").get(), sealKey: key, caFile: Fixtures.path("ca.pem"), timeoutMilliseconds: 2000
        )
        let store = try SharedTokenStore(configuration: configuration, logger: Logger(label: "test"))
        defer { store.shutdown() }
        let digest = TokenDigest(token: "tls")
        store.view(issuer: "default").save(digest, info: info, until: Date().timeIntervalSince1970 + 60, epoch: SharedEpoch(0))
        var found = false
        for _ in 0..<100 where !found {
            if case .hit = await store.view(issuer: "default").load(digest) { found = true } else { try await Task.sleep(for: .milliseconds(20)) }
        }
        #expect(found)
    }

    @Test("a DPoP proof is consumed once across replicas; a store that is gone cannot tell")
    func proofs() async throws {
        guard let redis = try await RedisServerProcess() else { Issue.record("redis-server did not start"); return }
        defer { redis.stop() }
        let a = try store(redis), b = try store(redis)
        defer { a.shutdown(); b.shutdown() }
        #expect(await a.firstUse(ofProof: "thumb.jti-1", windowSeconds: 60) == true)
        #expect(await b.firstUse(ofProof: "thumb.jti-1", windowSeconds: 60) == false)
        #expect(await b.firstUse(ofProof: "thumb.jti-2", windowSeconds: 60) == true)
        #expect(await a.firstUse(ofProof: "other.jti-1", windowSeconds: 60) == true)
        redis.stop()
        #expect(await a.firstUse(ofProof: "thumb.jti-3", windowSeconds: 60) == nil)
    }

    @Test("a purge broadcast reaches the caches of another replica; a lost subscription caps local lifetimes")
    func broadcast() async throws {
        guard let redis = try await RedisServerProcess() else { Issue.record("redis-server did not start"); return }
        defer { redis.stop() }
        let a = try store(redis), b = try store(redis)
        defer { a.shutdown(); b.shutdown() }
        let cache = CachingTokenIntrospector(
            upstream: ClosureTokenIntrospector { _ in TokenInfo(active: true, scope: "a") }, configuration: .init(ttlSeconds: 300), shared: b.view(issuer: "default")
        )
        b.attach(caches: { [cache] })
        let subscription = Task { await b.runSubscription() }
        defer { subscription.cancel() }
        for _ in 0..<1000 where !b.isSubscribed { try await Task.sleep(for: .milliseconds(10)) }
        #expect(b.isSubscribed)
        _ = try await cache.lookup(token: "t", digest: TokenDigest(token: "t"))
        #expect(cache.cached(TokenDigest(token: "t")) != nil)
        let propagation = await a.purge(TokenDigest(token: "t"), issuers: ["default"])
        #expect(propagation == PurgePropagation(propagated: true, receivers: 1))
        for _ in 0..<1000 where cache.cached(TokenDigest(token: "t")) != nil { try await Task.sleep(for: .milliseconds(5)) }
        #expect(cache.cached(TokenDigest(token: "t")) == nil)
        // The subscription lost (the server gone): local entries are capped to the degraded lifetime.
        #expect(b.view(issuer: "default").localLifetimeCap == nil)
        redis.stop()
        for _ in 0..<1000 where b.isSubscribed { try await Task.sleep(for: .milliseconds(10)) }
        #expect(!b.isSubscribed)
        #expect(b.view(issuer: "default").localLifetimeCap == 5)
    }
}

/// Paths of the shared test fixtures (Tests/Fixtures).
enum Fixtures {
    static func path(_ name: String) -> String {
        var components = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        components.removeLast(2)  // StoreTests.swift, SharedCacheTests
        return components.joined(separator: "/") + "/Fixtures/" + name
    }
}
