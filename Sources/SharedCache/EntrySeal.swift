import Crypto
import Foundation
import Introspection

/// The key that seals entries (AES-256-GCM): 32 bytes, shared by the replicas of a deployment.
public struct SealKey: Sendable, Equatable, CustomStringConvertible {
    let bytes: [UInt8]

    public var description: String { "<redacted>" }

    /// Reads a key file's contents: 32 raw bytes, or 64 hex digits, or base64 of 32 bytes; one
    /// trailing newline (LF or CRLF) is ignored. nil for anything else.
    public static func parse(_ contents: [UInt8]) -> SealKey? {
        var data = contents[...]
        if data.count != 32 {
            if data.last == UInt8(ascii: "\n") { data = data.dropLast() }
            if data.last == UInt8(ascii: "\r") { data = data.dropLast() }
        }
        if data.count == 32 { return SealKey(bytes: Array(data)) }
        let text = String(decoding: data, as: UTF8.self)
        if text.utf8.count == 64, let bytes = hex(text) { return SealKey(bytes: bytes) }
        if let decoded = Data(base64Encoded: text), decoded.count == 32 { return SealKey(bytes: Array(decoded)) }
        return nil
    }

    public init(bytes: [UInt8]) {
        precondition(bytes.count == 32, "a seal key is 32 bytes")
        self.bytes = bytes
    }

    private static func hex(_ text: String) -> [UInt8]? {
        var bytes: [UInt8] = []
        var high: UInt8?
        for unit in text.utf8 {
            let nibble: UInt8
            switch unit {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): nibble = unit - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): nibble = unit - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): nibble = unit - UInt8(ascii: "A") + 10
            default: return nil
            }
            if let h = high {
                bytes.append(h << 4 | nibble)
                high = nil
            } else {
                high = nibble
            }
        }
        return bytes
    }
}

/// One stored answer: what the AS said, until when it may be used, and the purge epoch it was
/// learned under. Sealed with AES-GCM, the store key as associated data, so an entry opens only
/// under the key it was written to, and only with the seal key: a reader of the store learns no
/// claims, and a writer without the seal key cannot make an entry that opens.
public struct SealedEntry: Sendable, Equatable {
    public var info: TokenInfo
    /// Unix seconds after which the entry is not used.
    public var until: Double
    public var epoch: SharedEpoch

    /// The value that marks a purged token (written over its entry, for a while).
    public static let tombstone: [UInt8] = Array("tombstone".utf8)

    /// Bound on what is opened at all.
    static let maxSealedBytes = 256 * 1024

    public init(info: TokenInfo, until: Double, epoch: SharedEpoch) {
        self.info = info
        self.until = until
        self.epoch = epoch
    }

    /// nonce (12) ‖ ciphertext ‖ tag (16) of the entry's JSON.
    public func seal(key: SealKey, storeKey: String) -> [UInt8]? {
        var payload: [String: JSONValue] = [
            "v": .integer(1),
            "e": .integer(epoch.value),
            "u": .integer(Int64((until * 1000).rounded(.down))),
            "i": .object(info.introspectionMembers),
        ]
        if let rejection = info.rejection { payload["r"] = .string(rejection) }
        let plaintext = Array(JSONValue.object(payload).compactJSON.utf8)
        guard let box = try? AES.GCM.seal(plaintext, using: SymmetricKey(data: key.bytes), authenticating: Array(storeKey.utf8)),
            let combined = box.combined
        else { return nil }
        return Array(combined)
    }

    /// Opens a stored value; nil when it does not open under this key and store key, or holds
    /// anything but a well-formed entry.
    public static func open(_ sealed: [UInt8], key: SealKey, storeKey: String) -> SealedEntry? {
        guard sealed.count >= 12 + 16 + 2, sealed.count <= maxSealedBytes,
            let box = try? AES.GCM.SealedBox(combined: sealed),
            let plaintext = try? AES.GCM.open(box, using: SymmetricKey(data: key.bytes), authenticating: Array(storeKey.utf8)),
            case .object(let payload)? = try? JSONParser.parse(Array(plaintext)),
            case .integer(1)? = payload["v"],
            case .integer(let epoch)? = payload["e"],
            case .integer(let untilMilliseconds)? = payload["u"],
            case .object(let members)? = payload["i"],
            var info = try? TokenInfo(members: members)
        else { return nil }
        if case .string(let rejection)? = payload["r"], !info.active { info.rejection = rejection }
        return SealedEntry(info: info, until: Double(untilMilliseconds) / 1000, epoch: SharedEpoch(epoch))
    }
}
