// Fuzzes what the shared store (DESIGN.md §11) reads from a Redis-compatible server it does not
// control: RESP replies, fed whole and in two chunks (the answer must not depend on how TCP cut
// the bytes), and stored values opened as sealed entries (nothing but a sealed entry opens).
// The first byte chooses the reader; the rest is its input.
import Introspection
import NIOCore
import SharedCache

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > 0 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    switch data[0] % 3 {
    case 0, 1: fuzzReplies(bytes, cut: Int(data[0]))
    default: fuzzEntry(bytes)
    }
    return 0
}

func check(_ condition: Bool, _ message: String) {
    if !condition { fatalError(message) }
}

let parser = RESPParser(limits: .init(maxBulkBytes: 4096, maxArrayElements: 64, maxDepth: 4, maxLineBytes: 256))

/// Every reply in `bytes`, or where reading stopped.
func readAll(_ chunks: [[UInt8]]) -> (values: [RESPValue], failed: Bool) {
    var buffer = ByteBuffer()
    var values: [RESPValue] = []
    for chunk in chunks {
        buffer.writeBytes(chunk)
        do {
            while let value = try parser.parse(&buffer) {
                values.append(value)
                check(values.count <= 65_536, "more replies than bytes")
            }
        } catch {
            return (values, true)
        }
    }
    return (values, false)
}

func fuzzReplies(_ bytes: [UInt8], cut: Int) {
    let whole = readAll([bytes])
    let split = bytes.isEmpty ? 0 : (cut * 7919) % (bytes.count + 1)
    let chunked = readAll([Array(bytes[..<split]), Array(bytes[split...])])
    if !whole.failed, !chunked.failed {
        check(whole.values == chunked.values, "the replies depend on where the bytes were cut")
    }
    for value in whole.values {
        check(depth(value) <= 4, "nesting past the bound")
        if case .bulkString(let b?) = value { check(b.count <= 4096, "a bulk string past the bound") }
    }
}

func depth(_ value: RESPValue) -> Int {
    if case .array(let items?) = value { return 1 + (items.map(depth).max() ?? 0) }
    return 0
}

let key = SealKey(bytes: Array(repeating: 0x5A, count: 32))

func fuzzEntry(_ bytes: [UInt8]) {
    // Without the seal key no input opens (a forgery would need to break AES-GCM).
    check(SealedEntry.open(bytes, key: key, storeKey: "authz:default:00") == nil, "arbitrary bytes opened as a sealed entry")
    _ = SealKey.parse(bytes)
    _ = StoreEndpoint.parse(String(decoding: bytes, as: UTF8.self))
}
