import NIOCore

/// One RESP2 value (the Redis serialization protocol): what a Redis-compatible server answers.
public enum RESPValue: Sendable, Equatable {
    case simpleString(String)
    case error(String)
    case integer(Int64)
    /// nil: the null bulk string (`$-1`), a missing key.
    case bulkString([UInt8]?)
    /// nil: the null array (`*-1`).
    case array([RESPValue]?)

    /// The bytes of a bulk or simple string.
    public var bytes: [UInt8]? {
        switch self {
        case .bulkString(let bytes): return bytes
        case .simpleString(let string): return Array(string.utf8)
        default: return nil
        }
    }

    public var string: String? { bytes.map { String(decoding: $0, as: UTF8.self) } }
}

/// Why a reply could not be read: the connection is then closed (answers are matched to commands
/// by order, so nothing after a bad reply can be trusted).
public struct RESPError: Error, Sendable, Equatable, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// A strict, bounded RESP2 reader. Every length is checked before anything is allocated for it,
/// nesting is limited, and lines are bounded, so a hostile or broken server costs at most the
/// limits below.
public struct RESPParser: Sendable {
    public struct Limits: Sendable {
        /// Largest bulk string (entries are a few kilobytes).
        public var maxBulkBytes: Int
        /// Most elements in one array.
        public var maxArrayElements: Int
        /// Deepest nesting of arrays.
        public var maxDepth: Int
        /// Longest simple string, error or number line.
        public var maxLineBytes: Int

        public init(maxBulkBytes: Int = 1 << 20, maxArrayElements: Int = 1024, maxDepth: Int = 4, maxLineBytes: Int = 8 * 1024) {
            self.maxBulkBytes = maxBulkBytes
            self.maxArrayElements = maxArrayElements
            self.maxDepth = maxDepth
            self.maxLineBytes = maxLineBytes
        }
    }

    public let limits: Limits

    public init(limits: Limits = Limits()) {
        self.limits = limits
    }

    /// Reads one whole value from the front of `buffer`, consuming it; nil (consuming nothing)
    /// when more bytes are needed; throws on a value that breaks the protocol or the limits.
    public func parse(_ buffer: inout ByteBuffer) throws(RESPError) -> RESPValue? {
        var view = buffer
        guard let value = try parseValue(&view, depth: 0) else { return nil }
        buffer = view
        return value
    }

    private func parseValue(_ buffer: inout ByteBuffer, depth: Int) throws(RESPError) -> RESPValue? {
        guard let type: UInt8 = buffer.getInteger(at: buffer.readerIndex) else { return nil }
        switch type {
        case UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: ":"), UInt8(ascii: "$"), UInt8(ascii: "*"):
            break
        default:
            throw RESPError("unexpected type byte \(type)")
        }
        var probe = buffer
        probe.moveReaderIndex(forwardBy: 1)
        guard let line = try readLine(&probe) else { return nil }
        switch type {
        case UInt8(ascii: "+"):
            buffer = probe
            return .simpleString(String(decoding: line, as: UTF8.self))
        case UInt8(ascii: "-"):
            buffer = probe
            return .error(String(decoding: line, as: UTF8.self))
        case UInt8(ascii: ":"):
            buffer = probe
            return .integer(try Self.integer(line))
        case UInt8(ascii: "$"):
            let length = try Self.integer(line)
            if length == -1 {
                buffer = probe
                return .bulkString(nil)
            }
            guard length >= 0, length <= limits.maxBulkBytes else { throw RESPError("bulk string length \(length) out of bounds") }
            guard probe.readableBytes >= Int(length) + 2 else { return nil }
            let bytes = probe.readBytes(length: Int(length))!
            guard probe.readInteger(as: UInt8.self) == UInt8(ascii: "\r"), probe.readInteger(as: UInt8.self) == UInt8(ascii: "\n") else {
                throw RESPError("bulk string not followed by CRLF")
            }
            buffer = probe
            return .bulkString(bytes)
        default:  // "*"
            let count = try Self.integer(line)
            if count == -1 {
                buffer = probe
                return .array(nil)
            }
            guard count >= 0, count <= limits.maxArrayElements else { throw RESPError("array length \(count) out of bounds") }
            guard depth + 1 <= limits.maxDepth else { throw RESPError("arrays nested deeper than \(limits.maxDepth)") }
            // Each element needs at least 3 bytes: a cheap early "need more" for huge counts.
            guard probe.readableBytes >= Int(count) * 3 else { return nil }
            var elements: [RESPValue] = []
            elements.reserveCapacity(Int(count))
            for _ in 0..<count {
                guard let element = try parseValue(&probe, depth: depth + 1) else { return nil }
                elements.append(element)
            }
            buffer = probe
            return .array(elements)
        }
    }

    /// The bytes up to CRLF (consumed with it); nil when no CRLF has arrived yet.
    private func readLine(_ buffer: inout ByteBuffer) throws(RESPError) -> ArraySlice<UInt8>? {
        let view = buffer.readableBytesView
        let limit = min(view.count, limits.maxLineBytes + 2)
        var index = view.startIndex
        let end = view.startIndex + limit
        while index < end {
            if view[index] == UInt8(ascii: "\r") {
                guard index + 1 < view.endIndex else { return nil }
                guard view[index + 1] == UInt8(ascii: "\n") else { throw RESPError("CR not followed by LF") }
                let line = ArraySlice(view[view.startIndex..<index])
                buffer.moveReaderIndex(forwardBy: line.count + 2)
                return line
            }
            if view[index] == UInt8(ascii: "\n") { throw RESPError("LF without CR") }
            index += 1
        }
        if view.count > limits.maxLineBytes + 1 { throw RESPError("line longer than \(limits.maxLineBytes) bytes") }
        return nil
    }

    /// A decimal integer, strictly: an optional minus and 1 to 18 digits.
    static func integer(_ line: ArraySlice<UInt8>) throws(RESPError) -> Int64 {
        var digits = line[...]
        var negative = false
        if digits.first == UInt8(ascii: "-") {
            negative = true
            digits = digits.dropFirst()
        }
        guard !digits.isEmpty, digits.count <= 18 else { throw RESPError("bad integer") }
        var value: Int64 = 0
        for byte in digits {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { throw RESPError("bad integer") }
            value = value * 10 + Int64(byte - UInt8(ascii: "0"))
        }
        return negative ? -value : value
    }
}

/// A command as RESP: an array of bulk strings.
public struct RESPCommand: Sendable {
    public let name: String
    let bytes: ByteBuffer

    public init(_ name: String, _ arguments: [[UInt8]]) {
        self.name = name
        var buffer = ByteBuffer()
        buffer.reserveCapacity(16 + name.utf8.count + arguments.reduce(0) { $0 + $1.count + 16 })
        buffer.writeString("*\(arguments.count + 1)\r\n$\(name.utf8.count)\r\n\(name)\r\n")
        for argument in arguments {
            buffer.writeString("$\(argument.count)\r\n")
            buffer.writeBytes(argument)
            buffer.writeString("\r\n")
        }
        self.bytes = buffer
    }

    public init(_ name: String, _ arguments: String...) {
        self.init(name, arguments.map { Array($0.utf8) })
    }
}
