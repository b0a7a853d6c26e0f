import NIOCore
import Testing

@testable import SharedCache

@Suite("RESP: a strict, bounded reader")
struct RESPTests {
    let parser = RESPParser(limits: .init(maxBulkBytes: 1024, maxArrayElements: 16, maxDepth: 3, maxLineBytes: 64))

    func parse(_ text: String) throws(RESPError) -> RESPValue? {
        var buffer = ByteBuffer(string: text)
        return try parser.parse(&buffer)
    }

    @Test("well-formed replies", arguments: [
        ("+OK\r\n", RESPValue.simpleString("OK")),
        ("-ERR wrong\r\n", .error("ERR wrong")),
        (":42\r\n", .integer(42)),
        (":-3\r\n", .integer(-3)),
        ("$5\r\nhello\r\n", .bulkString(Array("hello".utf8))),
        ("$0\r\n\r\n", .bulkString([])),
        ("$-1\r\n", .bulkString(nil)),
        ("*-1\r\n", .array(nil)),
        ("*2\r\n$1\r\na\r\n$-1\r\n", .array([.bulkString(Array("a".utf8)), .bulkString(nil)])),
        ("*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$3\r\nd x\r\n", .array([.bulkString(Array("message".utf8)), .bulkString(Array("c".utf8)), .bulkString(Array("d x".utf8))])),
        ("$4\r\na\r\nb\r\n", .bulkString(Array("a\r\nb".utf8))),  // binary-safe
    ])
    func wellFormed(text: String, expected: RESPValue) throws {
        var buffer = ByteBuffer(string: text)
        #expect(try parser.parse(&buffer) == expected)
        #expect(buffer.readableBytes == 0)
    }

    @Test("every strict prefix of a reply asks for more, consuming nothing")
    func prefixes() throws {
        let whole = "*2\r\n$5\r\nhello\r\n*1\r\n:7\r\n"
        let bytes = Array(whole.utf8)
        for cut in 0..<bytes.count {
            var buffer = ByteBuffer(bytes: bytes[..<cut])
            #expect(try parser.parse(&buffer) == nil, "prefix of \(cut) bytes")
            #expect(buffer.readableBytes == cut)
        }
    }

    @Test("two replies in one buffer come out one at a time")
    func pipelined() throws {
        var buffer = ByteBuffer(string: "+OK\r\n:1\r\n$-1\r\n")
        #expect(try parser.parse(&buffer) == .simpleString("OK"))
        #expect(try parser.parse(&buffer) == .integer(1))
        #expect(try parser.parse(&buffer) == .bulkString(nil))
        #expect(try parser.parse(&buffer) == nil)
    }

    @Test("hostile replies are refused before anything is allocated for them", arguments: [
        "$99999999999\r\n",  // huge bulk length
        "$2000\r\n",  // over the bound
        "$-2\r\n",  // negative length
        "*-5\r\n",
        "*17\r\n",  // too many elements
        "*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",  // nested deeper than 3
        ":12a\r\n",
        ":\r\n",
        ":1234567890123456789\r\n",  // more digits than fit
        "$3\r\nabcXY",  // bulk not followed by CRLF
        "%1\r\n",  // RESP3 map: not spoken
        "_\r\n",
        "+OK\n",  // LF without CR
        "+OK\rX",
        "+" + String(repeating: "x", count: 100),  // a line without end, past the bound
    ])
    func hostile(text: String) {
        #expect(throws: RESPError.self) { try parse(text) }
    }

    @Test("a command is an array of bulk strings, binary-safe")
    func command() {
        let command = RESPCommand("SET", [Array("k".utf8), [0, 13, 10, 255], Array("NX".utf8)])
        #expect(Array(command.bytes.readableBytesView) == Array("*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\n".utf8) + [0, 13, 10, 255] + Array("\r\n$2\r\nNX\r\n".utf8))
    }

    @Test("a cluster redirection is named as such")
    func redirection() {
        #expect(RESPChannelHandler.redirection("MOVED 3999 127.0.0.1:6381")?.contains("Redis Cluster is not supported") == true)
        #expect(RESPChannelHandler.redirection("ASK 3999 127.0.0.1:6381") != nil)
        #expect(RESPChannelHandler.redirection("ERR unknown command") == nil)
    }
}

@Suite("Store URLs")
struct StoreEndpointTests {
    @Test("redis and rediss URLs")
    func urls() throws {
        let plain = try StoreEndpoint.parse("redis://127.0.0.1:6380/2").get()
        #expect(plain.host == "127.0.0.1" && plain.port == 6380 && plain.database == 2 && !plain.tls && plain.password == nil)
        let secure = try StoreEndpoint.parse("rediss://user:p%40ss@cache.example").get()
        #expect(secure.tls && secure.port == 6379 && secure.database == 0 && secure.username == "user" && secure.password?.value == "p@ss")
        #expect(secure.redacted == "rediss://user:<redacted>@cache.example:6379/0")
        #expect(!secure.redacted.contains("p@ss"))
        #expect(try StoreEndpoint.parse("redis://:secret@[::1]:7000").get().host == "::1")
    }

    @Test("what is not a store URL", arguments: ["http://x", "redis://", "redis://h/x", "redis://h/9999", "redis://h:0", "redis://h?db=1", "h:6379"])
    func refused(url: String) {
        if case .success = StoreEndpoint.parse(url) { Issue.record("\(url) accepted") }
    }
}
