@testable import AuthzSidecar
import NIOCore
import NIOHTTP1
import Testing

@Suite("HTTP1Response: the bytes the listener writes")
struct HTTP1ResponseTests {
    let response = HTTP1Response(
        status: 401,
        headers: ["WWW-Authenticate": "Bearer realm=\"r\"", "Content-Length": "2"],
        body: ByteBuffer(string: "{}")
    )

    func text(_ buffer: ByteBuffer) -> String { String(buffer: buffer) }

    @Test("HTTP/1.1 keep-alive: the stored bytes as they are")
    func keepAlive() {
        let bytes = response.bytes(version: .http1_1, keepAlive: true, isHEAD: false)
        #expect(text(bytes) == "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"r\"\r\nContent-Length: 2\r\n\r\n{}")
        #expect(bytes == response.bytes)
    }

    @Test("Connection: close, HTTP/1.0 with and without keep-alive, HEAD")
    func variants() {
        #expect(text(response.bytes(version: .http1_1, keepAlive: false, isHEAD: false))
            == "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"r\"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        #expect(text(response.bytes(version: .http1_0, keepAlive: false, isHEAD: false))
            == "HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"r\"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        #expect(text(response.bytes(version: .http1_0, keepAlive: true, isHEAD: false))
            == "HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"r\"\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}")
        #expect(text(response.bytes(version: .http1_1, keepAlive: true, isHEAD: true))
            == "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"r\"\r\nContent-Length: 2\r\n\r\n")
        // the stored bytes are not changed by building a variant
        #expect(text(response.bytes).hasPrefix("HTTP/1.1 401 "))
    }

    @Test("a header that could end its line early is never written; other statuses get their reason")
    func unsafeHeaders() {
        let response = HTTP1Response(status: 404, headers: ["X-A": "ok", "X-B": "a\r\nX-Injected: 1", "X-C\n": "v", "Content-Length": "0"])
        #expect(text(response.bytes) == "HTTP/1.1 404 Not Found\r\nX-A: ok\r\nContent-Length: 0\r\n\r\n")
    }

    @Test("an allow answer carries its bytes; gRPC answers none")
    func answers() throws {
        let allow = AuthzAnswer(outcome: .decision(.allow(Grant(token: nil))), policy: nil, front: .nginx)
        let wire = text(try #require(allow.http1).bytes)
        #expect(wire.hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(wire.contains("\r\nX-Anonymous: true\r\n"))
        #expect(wire.hasSuffix("Content-Length: 0\r\n\r\n"))
        #expect(AuthzAnswer(outcome: .decision(.allow(Grant(token: nil))), policy: nil, front: .envoyGRPC).http1 == nil)
    }
}
