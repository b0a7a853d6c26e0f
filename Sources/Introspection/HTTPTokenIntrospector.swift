import AsyncHTTPClient
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization

/// RFC 7662 over AsyncHTTPClient: a form POST with client authentication, a deadline, a bounded
/// body, and every failure mapped to an `IntrospectionError`.
public final class HTTPTokenIntrospector: RawTokenIntrospector {
    private let client: HTTPClient
    /// The request's fixed part (URL parsed once, method, headers); each call adds its body.
    private let template: HTTPClient.Request?
    private let authorization: String?
    private let formCredentials: String
    private let deadline: TimeAmount
    private let maxResponseBytes: Int
    private let maxPending: Int
    private let pending = Atomic<Int>(0)
    private let logger: Logger

    /// - Parameters:
    ///   - client: the shared client (see `makeHTTPClient(for:)`); its owner shuts it down.
    public init(configuration: IntrospectionConfiguration, client: HTTPClient, logger: Logger = Logger(label: "authz.introspection")) {
        self.client = client
        self.deadline = .milliseconds(Int64(configuration.timeoutMilliseconds))
        self.maxResponseBytes = configuration.maxResponseBytes
        self.maxPending = max(1, configuration.maxConnections) * 16
        self.logger = logger
        let id = configuration.clientID ?? ""
        let secret = configuration.clientSecret?.value ?? ""
        switch configuration.authMethod {
        case .clientSecretBasic:
            // RFC 6749 §2.3.1: form-encode id and secret, then base64 "id:secret".
            let pair = FormEncoding.encode(id) + ":" + FormEncoding.encode(secret)
            self.authorization = "Basic " + Base64.encode(Array(pair.utf8))
            self.formCredentials = ""
        case .clientSecretPost:
            self.authorization = nil
            self.formCredentials = "&" + FormEncoding.encode([("client_id", id), ("client_secret", secret)])
        case .tlsClientAuth, .none:
            // RFC 8705 §2: the client_id identifies the client; the TLS certificate authenticates it.
            self.authorization = nil
            self.formCredentials = id.isEmpty ? "" : "&" + FormEncoding.encode([("client_id", id)])
        }
        // RFC 9701 §4: a signed answer is asked for with its media type.
        let accept = configuration.responseFormat == .jwt ? "application/token-introspection+jwt" : "application/json"
        var headers: HTTPHeaders = ["Content-Type": "application/x-www-form-urlencoded", "Accept": accept]
        if let authorization { headers.add(name: "Authorization", value: authorization) }
        // nil for an endpoint AsyncHTTPClient cannot parse: every call is then a transport fault.
        self.template = try? HTTPClient.Request(url: configuration.endpoint, method: .POST, headers: headers)
    }

    /// An HTTP client for the AS: verified TLS (with `ca_file` roots), the client certificate
    /// for `tls_client_auth`, pooled keep-alive connections, no redirects.
    public static func makeHTTPClient(for configuration: IntrospectionConfiguration, eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws -> HTTPClient {
        var tls = TLSConfiguration.makeClientConfiguration()
        if let caFile = configuration.caFile {
            tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile))
        }
        if !configuration.verifyTLS {
            tls.certificateVerification = .none
        }
        if configuration.authMethod == .tlsClientAuth, let certificateFile = configuration.clientCertificateFile, let keyFile = configuration.clientKeyFile {
            tls.certificateChain = try NIOSSLCertificate.fromPEMFile(certificateFile).map { .certificate($0) }
            tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: keyFile, format: .pem))
        }
        let timeout = TimeAmount.milliseconds(Int64(configuration.timeoutMilliseconds))
        var clientConfiguration = HTTPClient.Configuration(
            tlsConfiguration: tls,
            redirectConfiguration: .disallow,
            timeout: .init(connect: timeout, read: timeout),
            connectionPool: .init(idleTimeout: .seconds(55), concurrentHTTP1ConnectionsPerHostSoftLimit: max(1, configuration.maxConnections)),
            decompression: .disabled
        )
        clientConfiguration.httpVersion = .automatic
        // A refused connection is a fault now, not after timeout_ms of retries: a hard-down AS
        // must not cost every request the whole deadline (the next request tries again).
        clientConfiguration.connectionPool.retryConnectionEstablishment = false
        return HTTPClient(eventLoopGroup: eventLoopGroup, configuration: clientConfiguration)
    }

    public func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        let body = try await call(token)
        return try body.withUnsafeReadableBytes { raw throws(IntrospectionError) in
            try TokenInfo(jsonBody: raw)
        }
    }

    /// The body of the AS's 200 answer, unread (a signed RFC 9701 answer is verified elsewhere).
    public func introspectRaw(_ token: String) async throws(IntrospectionError) -> [UInt8] {
        let body = try await call(token)
        return Array(body.readableBytesView)
    }

    private func call(_ token: String) async throws(IntrospectionError) -> ByteBuffer {
        guard pending.add(1, ordering: .relaxed).newValue <= maxPending else {
            pending.subtract(1, ordering: .relaxed)
            throw .overloaded
        }
        defer { pending.subtract(1, ordering: .relaxed) }

        guard var request = template else { throw .transport("the endpoint is not a URL AsyncHTTPClient accepts") }
        let form = "token=" + FormEncoding.encode(token) + "&token_type_hint=access_token" + formCredentials
        request.body = .byteBuffer(ByteBuffer(string: form))

        do {
            // AsyncHTTPClient's future-based API: its async API starts an extra task per request
            // (to register the request for cancellation), which wakes a thread of the Swift
            // concurrency pool on every miss. Called from a decision running on an event loop,
            // the request is made on that same loop.
            let collector = BoundedResponse(maxBytes: maxResponseBytes)
            let response = try await client.execute(
                request: request, delegate: collector, deadline: .now() + deadline, logger: logger
            ).futureResult.get()
            guard response.status == .ok else {
                throw IntrospectionError.status(Int(response.status.code))
            }
            return response.body
        } catch let error as IntrospectionError {
            throw error
        } catch {
            throw Self.fault(from: error)
        }
    }

    /// Maps transport errors to the bounded fault kinds.
    public static func fault(from error: any Error) -> IntrospectionError {
        if let error = error as? HTTPClientError {
            switch error {
            case .deadlineExceeded, .readTimeout, .writeTimeout, .connectTimeout, .tlsHandshakeTimeout, .getConnectionFromPoolTimeout:
                return .timeout
            case .remoteConnectionClosed:
                return .connect("connection closed by the authorization server")
            case .cancelled:
                return .transport("cancelled")
            default:
                return .transport(error.shortDescription)
            }
        }
        if error is NIOSSLError || error is BoringSSLError || error is NIOSSLExtraError {
            return .tls(String(describing: error))
        }
        if error is NIOConnectionError || error is IOError || error is ChannelError {
            if case .connectTimeout? = error as? ChannelError {
                return .timeout
            }
            return .connect(String(describing: error))
        }
        if error is CancellationError {
            return .transport("cancelled")
        }
        return .transport(String(describing: type(of: error)))
    }
}

/// Collects an answer from the AS (introspection, discovery, key sets): its status, and its body
/// up to a bound. The body of any other status than 200 is read (so the connection can be
/// reused) and dropped.
///
/// AsyncHTTPClient calls a delegate on the request's event loop, one call at a time.
public final class BoundedResponse: HTTPClientResponseDelegate, @unchecked Sendable {
    public typealias Response = (status: HTTPResponseStatus, body: ByteBuffer)

    private let maxBytes: Int
    private var status: HTTPResponseStatus = .ok
    private var body = ByteBuffer()

    public init(maxBytes: Int) {
        self.maxBytes = maxBytes
    }

    public func didReceiveHead(task: HTTPClient.Task<Response>, _ head: HTTPResponseHead) -> EventLoopFuture<Void> {
        status = head.status
        return task.eventLoop.makeSucceededVoidFuture()
    }

    public func didReceiveBodyPart(task: HTTPClient.Task<Response>, _ buffer: ByteBuffer) -> EventLoopFuture<Void> {
        guard status == .ok else { return task.eventLoop.makeSucceededVoidFuture() }
        guard body.readableBytes + buffer.readableBytes <= maxBytes else {
            return task.eventLoop.makeFailedFuture(IntrospectionError.tooLarge(maxBytes))
        }
        var buffer = buffer
        body.writeBuffer(&buffer)
        return task.eventLoop.makeSucceededVoidFuture()
    }

    public func didFinishRequest(task: HTTPClient.Task<Response>) throws -> Response {
        (status, body)
    }
}

/// Standard base64 (RFC 4648 §4) and its URL-safe variant (§5), without Foundation.
public enum Base64 {
    private static let standard = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    private static let urlSafe = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

    /// Encodes with padding.
    public static func encode<Bytes: Collection<UInt8>>(_ bytes: Bytes) -> String {
        encode(bytes, alphabet: standard, pad: true)
    }

    /// base64url without padding (RFC 7515 §2, what `x5t#S256` uses).
    public static func encodeURLSafe<Bytes: Collection<UInt8>>(_ bytes: Bytes) -> String {
        encode(bytes, alphabet: urlSafe, pad: false)
    }

    private static func encode<Bytes: Collection<UInt8>>(_ bytes: Bytes, alphabet: [UInt8], pad: Bool) -> String {
        var out = [UInt8]()
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var iterator = bytes.makeIterator()
        while let b0 = iterator.next() {
            let b1 = iterator.next()
            let b2 = iterator.next()
            out.append(alphabet[Int(b0 >> 2)])
            out.append(alphabet[Int((b0 & 0x03) << 4 | (b1 ?? 0) >> 4)])
            if let b1 {
                out.append(alphabet[Int((b1 & 0x0F) << 2 | (b2 ?? 0) >> 6)])
            } else if pad {
                out.append(UInt8(ascii: "="))
            }
            if let b2 {
                out.append(alphabet[Int(b2 & 0x3F)])
            } else if pad {
                out.append(UInt8(ascii: "="))
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Decodes standard or URL-safe base64, padded or not; ASCII whitespace is skipped.
    /// Returns nil on any other character or a bad length.
    public static func decode<Bytes: Collection<UInt8>>(_ text: Bytes) -> [UInt8]? {
        var out = [UInt8]()
        out.reserveCapacity(text.count / 4 * 3 + 3)
        var accumulator: UInt32 = 0
        var bits = 0
        var padding = 0
        for c in text {
            let value: UInt32
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): value = UInt32(c - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): value = UInt32(c - UInt8(ascii: "a") + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): value = UInt32(c - UInt8(ascii: "0") + 52)
            case UInt8(ascii: "+"), UInt8(ascii: "-"): value = 62
            case UInt8(ascii: "/"), UInt8(ascii: "_"): value = 63
            case UInt8(ascii: "="):
                padding += 1
                continue
            case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"):
                continue
            default:
                return nil
            }
            guard padding == 0 else { return nil }  // data after padding
            accumulator = accumulator << 6 | value
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: accumulator >> UInt32(bits)))
            }
        }
        // 6 leftover bits can never form a valid encoding; 2 or 4 must be zero.
        guard bits < 6, padding <= 2, accumulator & ((1 << UInt32(bits)) - 1) == 0 else { return nil }
        return out
    }
}
