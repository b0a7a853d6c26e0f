import NIOCore
import NIOHTTP1

/// An HTTP/1.x response as the listener writes it: status line, header lines and body as finished
/// bytes. Every answer the sidecar gives is small and carries its `Content-Length`, so the
/// listener writes these bytes itself instead of going through SwiftNIO's response encoder,
/// header validator and pipelining handler: on a cache hit those cost more than the decision.
///
/// The bytes are those for an HTTP/1.1 keep-alive request, what proxies send; they are built once
/// with the answer, so a remembered allow is written as it is. Other requests get a copy with
/// the version, a `Connection` header, or (for HEAD) no body.
struct HTTP1Response: Sendable {
    /// Status line, header lines, the blank line, the body.
    let bytes: ByteBuffer
    /// Offset of the blank line that ends the head.
    private let headEnd: Int

    init(status: Int, headers: HTTPHeaders, body: ByteBuffer? = nil) {
        var size = 32 + (body?.readableBytes ?? 0)
        for (name, value) in headers { size += name.utf8.count + value.utf8.count + 4 }
        var buffer = ByteBufferAllocator().buffer(capacity: size)
        Self.writeStatusLine(status, to: &buffer)
        for (name, value) in headers {
            Self.append(name: name, value: value, to: &buffer)
        }
        headEnd = buffer.writerIndex
        buffer.writeStaticString("\r\n")
        if let body { buffer.writeImmutableBuffer(body) }
        bytes = buffer
    }

    /// The bytes for a request: `bytes` themselves for an HTTP/1.1 keep-alive request that is not
    /// HEAD, else a copy adjusted for it.
    func bytes(version: HTTPVersion, keepAlive: Bool, isHEAD: Bool) -> ByteBuffer {
        let isHTTP10 = version.major == 1 && version.minor == 0
        guard isHTTP10 || !keepAlive || isHEAD else { return bytes }
        var buffer = ByteBufferAllocator().buffer(capacity: bytes.readableBytes + 32)
        buffer.writeImmutableBuffer(bytes.getSlice(at: bytes.readerIndex, length: headEnd)!)
        if isHTTP10 {
            buffer.setInteger(UInt8(ascii: "0"), at: 7)  // "HTTP/1.1" → "HTTP/1.0"
        }
        if !keepAlive {
            buffer.writeStaticString("Connection: close\r\n")
        } else if isHTTP10 {
            buffer.writeStaticString("Connection: keep-alive\r\n")
        }
        buffer.writeStaticString("\r\n")
        if !isHEAD {
            buffer.writeImmutableBuffer(bytes.getSlice(at: bytes.readerIndex + headEnd + 2, length: bytes.readableBytes - headEnd - 2)!)
        }
        return buffer
    }

    /// `Name: value\r\n`. A header whose name or value could end the line early (CR, LF, NUL) is
    /// left out: answers never hold one, this keeps it that way.
    private static func append(name: String, value: String, to buffer: inout ByteBuffer) {
        guard isSafe(name), isSafe(value) else { return }
        buffer.writeString(name)
        buffer.writeStaticString(": ")
        buffer.writeString(value)
        buffer.writeStaticString("\r\n")
    }

    private static func isSafe(_ text: String) -> Bool {
        !text.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0x00 })
    }

    private static func writeStatusLine(_ status: Int, to buffer: inout ByteBuffer) {
        switch status {
        case 200: buffer.writeStaticString("HTTP/1.1 200 OK\r\n")
        case 401: buffer.writeStaticString("HTTP/1.1 401 Unauthorized\r\n")
        case 403: buffer.writeStaticString("HTTP/1.1 403 Forbidden\r\n")
        case 503: buffer.writeStaticString("HTTP/1.1 503 Service Unavailable\r\n")
        default:
            let status = HTTPResponseStatus(statusCode: status)
            buffer.writeString("HTTP/1.1 \(status.code) \(status.reasonPhrase)\r\n")
        }
    }
}
