#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// A plain blocking TCP client for tests that must put exact bytes on the socket: HTTP clients
/// normalise paths, drop control characters and refuse odd headers before sending.
struct RawConnection {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    let fd: Int32

    /// Connects to 127.0.0.1:port with send and receive timeouts.
    init(port: Int, timeoutSeconds: Int = 10) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket() failed") }
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else {
            Glibc.close(fd)
            throw Failure(description: "connect to port \(port) failed")
        }
    }

    func close() { _ = Glibc.close(fd) }

    /// Sends every byte; returns how many were sent before a timeout or error.
    @discardableResult
    func send(_ bytes: [UInt8]) -> Int {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return sent }
            sent += n
        }
        return sent
    }

    func send(_ text: String) { send(Array(text.utf8)) }

    /// Reads one HTTP/1.1 response with a Content-Length body: (status, headers, body).
    func readResponse() throws -> (status: Int, headers: [(String, String)], body: String) {
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        func fill() throws {
            let n = recv(fd, &chunk, chunk.count, 0)
            guard n > 0 else { throw Failure(description: "connection closed or timed out before a whole response") }
            buffer.append(contentsOf: chunk[..<n])
        }
        let separator: [UInt8] = Array("\r\n\r\n".utf8)
        var headEnd: Int?
        while headEnd == nil {
            try fill()
            if buffer.count >= 4 {
                headEnd = (0...(buffer.count - 4)).first { buffer[$0..<($0 + 4)].elementsEqual(separator) }
            }
        }
        let head = String(decoding: buffer[..<headEnd!], as: UTF8.self)
        var lines = head.components(separatedBy: "\r\n")
        let statusLine = lines.removeFirst().split(separator: " ")
        guard statusLine.count >= 2, let status = Int(statusLine[1]) else { throw Failure(description: "bad status line") }
        let headers: [(String, String)] = lines.compactMap { line in
            guard let colon = line.firstIndex(of: ":") else { return nil }
            return (String(line[..<colon]), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces))
        }
        let length = headers.first { $0.0.lowercased() == "content-length" }.flatMap { Int($0.1) } ?? 0
        let bodyStart = headEnd! + 4
        while buffer.count < bodyStart + length { try fill() }
        return (status, headers, String(decoding: buffer[bodyStart..<(bodyStart + length)], as: UTF8.self))
    }

    /// One request, one response, on a fresh connection.
    static func exchange(port: Int, _ request: [UInt8]) throws -> (status: Int, headers: [(String, String)], body: String) {
        let connection = try RawConnection(port: port)
        defer { connection.close() }
        connection.send(request)
        return try connection.readResponse()
    }
}

extension Array where Element == (String, String) {
    func value(_ name: String) -> String? { first { $0.0.lowercased() == name.lowercased() }?.1 }
}
