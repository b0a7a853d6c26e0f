import Glibc
import Hummingbird
import HummingbirdCore
import NIOPosix
import HummingbirdTLS
import Logging
import NIOCore
import NIOSSL
import ServiceLifecycle

/// What the fake AS received.
struct RecordedRequest: Sendable {
    var method: String
    var path: String
    var headers: HTTPFields
    var body: String

    /// The form body as decoded pairs (`+` is a space; `%XX` decoded).
    var form: [String: String] {
        var result: [String: String] = [:]
        for pair in body.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let decode = { (s: Substring) in String(s).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? "<bad>" }
            result[decode(parts[0])] = parts.count > 1 ? decode(parts[1]) : ""
        }
        return result
    }
}

/// What the fake AS answers.
enum FakeReply: Sendable {
    case json(status: Int = 200, String, contentType: String = "application/json")
    case hang(seconds: Double)
}

/// A Hummingbird app on a loopback port that plays the authorization server: each test row
/// decides what it answers and checks what it received.
enum FakeAuthorizationServer {
    /// Runs the fake AS for the duration of `body`, which receives its port.
    static func run<T: Sendable>(
        tls: TLSConfiguration? = nil,
        reply: @escaping @Sendable (RecordedRequest) async -> FakeReply,
        _ body: @Sendable (Int) async throws -> T
    ) async throws -> T {
        let router = Router()
        router.post("/introspect") { request, _ -> Response in
            let buffer = try await request.body.collect(upTo: 1 << 20)
            let recorded = RecordedRequest(method: request.method.rawValue, path: request.uri.path, headers: request.headers, body: String(buffer: buffer))
            switch await reply(recorded) {
            case .json(let status, let text, let contentType):
                var headers = HTTPFields()
                headers[.contentType] = contentType
                return Response(status: .init(code: status), headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
            case .hang(let seconds):
                try await Task.sleep(for: .seconds(seconds))
                return Response(status: .ok)
            }
        }
        let (ports, continuation) = AsyncStream.makeStream(of: Int.self)
        let server: HTTPServerBuilder = try tls.map { try .tls(.http1(), tlsConfiguration: $0) } ?? .http1()
        let app = Application(
            router: router,
            server: server,
            configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { channel in continuation.yield(channel.localAddress?.port ?? 0) },
            logger: Self.quietLogger
        )
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await app.runService(gracefulShutdownSignals: []) }
            var iterator = ports.makeAsyncIterator()
            guard let port = await iterator.next() else { throw CancellationError() }
            defer { group.cancelAll() }
            return try await body(port)
        }
    }

    static let quietLogger: Logger = {
        var logger = Logger(label: "fake-as")
        logger.logLevel = .critical
        return logger
    }()

    /// TLS for the fake AS: the fixture server certificate for 127.0.0.1.
    static func tlsConfiguration() throws -> TLSConfiguration {
        TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(Fixtures.path("server.pem")).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: Fixtures.path("server.key.pem"), format: .pem))
        )
    }

    /// A port on which nothing listens.
    /// Bound and closed with plain socket calls: awaiting a NIO future here drew ThreadSanitizer's
    /// report on the uninstrumented continuation hand-off (about once in 27 runs).
    static func closedPort() async throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return 1 }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { raw in
                bind(fd, raw, length) == 0 && getsockname(fd, raw, &length) == 0
            }
        }
        return bound ? Int(UInt16(bigEndian: address.sin_port)) : 1
    }
}
