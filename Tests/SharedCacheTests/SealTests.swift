import Foundation
import Introspection
import Testing

@testable import SharedCache

@Suite("Sealed entries: a reader learns nothing, a writer grants nothing")
struct SealTests {
    let key = SealKey(bytes: Array(repeating: 7, count: 32))
    let info = TokenInfo(active: true, scope: "system-access", clientID: "device-1", exp: 1_900_000_000, certificateThumbprint: "abc")

    @Test("an entry opens under its key and store key, and reads back the same answer")
    func roundTrip() throws {
        let entry = SealedEntry(info: info, until: 1_800_000_123.456, epoch: SharedEpoch(3))
        let sealed = try #require(entry.seal(key: key, storeKey: "authz:default:aa"))
        let opened = try #require(SealedEntry.open(sealed, key: key, storeKey: "authz:default:aa"))
        #expect(opened.info.scope == "system-access" && opened.info.clientID == "device-1" && opened.info.certificateThumbprint == "abc")
        #expect(opened.epoch == SharedEpoch(3))
        #expect(opened.until == 1_800_000_123.456)
        // No claim is readable in the stored bytes.
        let text = String(decoding: sealed, as: UTF8.self)
        #expect(!text.contains("system-access") && !text.contains("device-1"))
        // Two seals of one entry differ (a fresh nonce each time).
        #expect(entry.seal(key: key, storeKey: "authz:default:aa") != sealed)
    }

    @Test("another seal key, another store key, a flipped bit, a truncation or garbage do not open")
    func refusals() throws {
        let sealed = try #require(SealedEntry(info: info, until: 1, epoch: SharedEpoch(0)).seal(key: key, storeKey: "authz:default:aa"))
        #expect(SealedEntry.open(sealed, key: SealKey(bytes: Array(repeating: 8, count: 32)), storeKey: "authz:default:aa") == nil)
        // Copied to another token's key: refused (the store key is the associated data).
        #expect(SealedEntry.open(sealed, key: key, storeKey: "authz:default:bb") == nil)
        for index in [0, 12, sealed.count / 2, sealed.count - 1] {
            var tampered = sealed
            tampered[index] ^= 0x01
            #expect(SealedEntry.open(tampered, key: key, storeKey: "authz:default:aa") == nil)
        }
        #expect(SealedEntry.open(Array(sealed.dropLast()), key: key, storeKey: "authz:default:aa") == nil)
        #expect(SealedEntry.open(Array("{\"active\":true,\"scope\":\"admin\"}".utf8), key: key, storeKey: "authz:default:aa") == nil)
        #expect(SealedEntry.open(SealedEntry.tombstone, key: key, storeKey: "authz:default:aa") == nil)
        #expect(SealedEntry.open([], key: key, storeKey: "authz:default:aa") == nil)
    }

    @Test("a sealed payload that is not an entry does not open")
    func wrongPayloads() throws {
        // Sealed correctly, but not what the sidecar writes: refused all the same.
        for payload in ["{}", "[]", "{\"v\":2,\"e\":0,\"u\":1,\"i\":{\"active\":true}}", "{\"v\":1,\"e\":0,\"u\":1,\"i\":{\"active\":\"yes\"}}", "not json"] {
            let box = try AES_GCM_seal(Array(payload.utf8), key: key, storeKey: "k")
            #expect(SealedEntry.open(box, key: key, storeKey: "k") == nil, "\(payload)")
        }
    }

    @Test("seal key files: raw, hex, base64, a trailing newline; anything else refused")
    func keyFiles() {
        let raw = (0..<32).map { UInt8($0) }
        #expect(SealKey.parse(raw) == SealKey(bytes: raw))
        let hex = raw.map { String(format: "%02x", $0) }.joined()
        #expect(SealKey.parse(Array((hex + "\n").utf8)) == SealKey(bytes: raw))
        #expect(SealKey.parse(Array((Data(raw).base64EncodedString() + "\r\n").utf8)) == SealKey(bytes: raw))
        #expect(SealKey.parse(Array(raw.prefix(31))) == nil)
        #expect(SealKey.parse(Array(String(hex.dropLast(2)).utf8)) == nil)
        #expect(SealKey.parse(Array("secret".utf8)) == nil)
        #expect("\(SealKey(bytes: raw))" == "<redacted>")
    }
}

import Crypto

/// Seals arbitrary bytes as an entry would be sealed.
func AES_GCM_seal(_ plaintext: [UInt8], key: SealKey, storeKey: String) throws -> [UInt8] {
    Array(try AES.GCM.seal(plaintext, using: SymmetricKey(data: key.bytes), authenticating: Array(storeKey.utf8)).combined!)
}
