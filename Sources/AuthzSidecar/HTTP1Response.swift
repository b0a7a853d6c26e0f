import NIOCore
import NIOHTTP1

/// HTTP/1.x responses as the listener writes them: status line, header lines and body in one
/// buffer. Every answer the sidecar gives is small and carries its `Content-Length`, so the
/// listener writes these bytes itself instead of going through SwiftNIO's response encoder,
/// header validator and pipelining handler: on a cache hit those cost more than the decision.
enum HTTP1Response {
    /// `Name: value\r\n` for each header, in order. A header whose name or value could end the
    /// line early (CR, LF, NUL) is left out: answers never hold one, this keeps it that way.
    static func headerLines(_ headers: HTTPHeaders, extraCapacity: Int = 0) -> ByteBuffer {
        var size = extraCapacity
        for (name, value) in headers { size += name.utf8.count + value.utf8.count + 4 }
        var buffer = ByteBufferAllocator().buffer(capacity: size)
        for (name, value) in headers {
            append(name: name, value: value, to: &buffer)
        }
        return buffer
    }

    static func append(name: String, value: String, to buffer: inout ByteBuffer) {
        guard isSafe(name), isSafe(value) else { return }
        buffer.writeString(name)
        buffer.writeStaticString(": ")
        buffer.writeString(value)
        buffer.writeStaticString("\r\n")
    }

    private static func isSafe(_ text: String) -> Bool {
        !text.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0x00 })
    }

    /// `HTTP/1.1 200 OK\r\n` (or `HTTP/1.0 …` for a 1.0 request).
    static func writeStatusLine(version: HTTPVersion, status: Int, to buffer: inout ByteBuffer) {
        buffer.writeStaticString(version.major == 1 && version.minor == 0 ? "HTTP/1.0 " : "HTTP/1.1 ")
        switch status {
        case 200: buffer.writeStaticString("200 OK\r\n")
        case 401: buffer.writeStaticString("401 Unauthorized\r\n")
        case 403: buffer.writeStaticString("403 Forbidden\r\n")
        case 503: buffer.writeStaticString("503 Service Unavailable\r\n")
        default:
            let status = HTTPResponseStatus(statusCode: status)
            buffer.writeString("\(status.code) \(status.reasonPhrase)\r\n")
        }
    }
}
