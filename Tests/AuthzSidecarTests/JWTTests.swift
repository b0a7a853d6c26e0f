@testable import AuthzSidecar
import Crypto
import CryptoExtras
import Foundation
import HTTPTypes
import Introspection
import JOSE
import JWTValidation
import Metrics
import MetricsTestKit
import NIOConcurrencyHelpers
import Testing

@Suite("JOSE: base64url, JWK, JWS")
struct JOSETests {
    @Test("base64url is decoded strictly: one encoding per byte string")
    func base64url() {
        #expect(Base64URL.decode(Array("".utf8)) == [])
        #expect(Base64URL.decode(Array("AQAB".utf8)) == [1, 0, 1])
        #expect(Base64URL.decode(Array("-_8".utf8)) == [0xFB, 0xFF])
        for bad in ["AQAB=", "AQ==", "+/8", "A", "AQ AB", "AR", "AQ\n"] {
            #expect(Base64URL.decode(Array(bad.utf8)) == nil, "\(bad)")
        }
        for _ in 0..<200 {
            let bytes = (0..<Int.random(in: 0...40)).map { _ in UInt8.random(in: 0...255) }
            #expect(Base64URL.decode(Array(Base64URL.encode(bytes).utf8)) == bytes)
        }
    }

    @Test("RFC 7638 §3.1: the thumbprint of the example key")
    func thumbprint() throws {
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        let key = try JSONWebKey(members: ["kty": .string("RSA"), "n": .string(n), "e": .string("AQAB"), "alg": .string("RS256"), "kid": .string("2011-04-29")])
        #expect(key.thumbprint == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
        #expect(key.keyID == "2011-04-29")
    }

    static let signers: [(String, TestKeys.Private, TestKeys.Private)] = [
        ("RS256", TestKeys.rsa, TestKeys.rsaOther), ("RS384", TestKeys.rsa, TestKeys.rsaOther), ("RS512", TestKeys.rsa, TestKeys.rsaOther),
        ("PS256", TestKeys.rsa, TestKeys.rsaOther), ("PS384", TestKeys.rsa, TestKeys.rsaOther), ("PS512", TestKeys.rsa, TestKeys.rsaOther),
        ("ES256", TestKeys.p256, TestKeys.p256Other), ("ES384", TestKeys.p384, TestKeys.p256), ("EdDSA", TestKeys.ed25519, TestKeys.p256),
    ]

    @Test("every algorithm verifies its own signature and nothing else", arguments: signers.indices)
    func algorithms(_ index: Int) throws {
        let (alg, key, other) = Self.signers[index]
        let algorithm = try #require(JWSAlgorithm(rawValue: alg))
        let jwk = try JSONWebKey(members: Self.members(key))
        let token = TestKeys.token(alg: alg, kid: nil, claims: ["iss": "x"], key: key)
        let jws = try CompactJWS(token[...])
        #expect(jws.algorithm == algorithm)
        #expect(jws.isSigned(by: jwk))
        // Another key of the right kind, a flipped signature bit, another payload: all fail.
        if case .some(let otherKey) = try? JSONWebKey(members: Self.members(other)), otherKey.fits(algorithm) {
            #expect(!jws.isSigned(by: otherKey))
        }
        var parts = token.split(separator: ".").map(String.init)
        var signature = Base64URL.decode(Array(parts[2].utf8))!
        signature[signature.count / 2] ^= 0x01
        parts[2] = Base64URL.encode(signature)
        #expect(try !CompactJWS(parts.joined(separator: ".")[...]).isSigned(by: jwk))
        parts = token.split(separator: ".").map(String.init)
        parts[1] = Base64URL.encode(Array(#"{"iss":"y"}"#.utf8))
        #expect(try !CompactJWS(parts.joined(separator: ".")[...]).isSigned(by: jwk))
        // The key fits only its own family.
        for candidate in JWSAlgorithm.allCases where candidate != algorithm {
            let sameFamily = alg.hasPrefix("RS") || alg.hasPrefix("PS") ? (candidate.rawValue.hasPrefix("RS") || candidate.rawValue.hasPrefix("PS")) : false
            #expect(jwk.fits(candidate) == sameFamily, "\(alg) key fits \(candidate)")
        }
    }

    static func members(_ key: TestKeys.Private, alg: String? = nil) -> [String: JSONValue] {
        TestKeys.jwk(key, kid: "k", alg: alg).mapValues(JSONValue.string)
    }

    @Test("keys that are refused: private members, use enc, small RSA, off-curve points, unknown types")
    func refusedKeys() throws {
        var withPrivate = Self.members(TestKeys.p256)
        withPrivate["d"] = .string("AAAA")
        var encryption = Self.members(TestKeys.p256)
        encryption["use"] = .string("enc")
        var verifyOnly = Self.members(TestKeys.p256)
        verifyOnly["key_ops"] = .array([.string("encrypt")])
        let smallN = Base64URL.encode([0xC1] + (0..<127).map { _ in UInt8.random(in: 0...255) })
        var offCurve = Self.members(TestKeys.p256)
        offCurve["y"] = offCurve["x"]
        let rows: [(String, [String: JSONValue])] = [
            ("private d", withPrivate),
            ("use enc", encryption),
            ("key_ops without verify", verifyOnly),
            ("RSA 1024", ["kty": .string("RSA"), "n": .string(smallN), "e": .string("AQAB")]),
            ("off curve", offCurve),
            ("symmetric", ["kty": .string("oct"), "k": .string("c2VjcmV0")]),
            ("unknown kty", ["kty": .string("XYZ")]),
            ("X25519", ["kty": .string("OKP"), "crv": .string("X25519"), "x": .string(Base64URL.encode([UInt8](repeating: 9, count: 32)))]),
            ("kid not a string", Self.members(TestKeys.p256).merging(["kid": .integer(1)]) { $1 }),
            ("n with padding", ["kty": .string("RSA"), "n": .string(smallN + "="), "e": .string("AQAB")]),
        ]
        for (name, members) in rows {
            #expect(throws: JOSEError.self, "\(name)") { try JSONWebKey(members: members) }
        }
    }

    @Test("compact JWS form: anything but three base64url parts and a JSON header with a supported alg is refused")
    func compactForm() throws {
        let good = TestKeys.token(claims: ["iss": "x"])
        let parts = good.split(separator: ".").map(String.init)
        func header(_ json: String) -> String { Base64URL.encode(Array(json.utf8)) + "." + parts[1] + "." + parts[2] }
        let rows: [(String, String, String)] = [
            ("one part", "abc", "1 part"),
            ("two parts", parts[0] + "." + parts[1], "2 parts"),
            ("four parts", good + ".x", "4 parts"),
            ("JWE", "a.b.c.d.e", "JWE"),
            ("padding", parts[0] + "=." + parts[1] + "." + parts[2], "header is not base64url"),
            ("standard alphabet", parts[0] + "." + parts[1] + "." + parts[2].replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/") + (parts[2].contains("-") || parts[2].contains("_") ? "" : "+"), "not base64url"),
            ("header not JSON", header("nope"), "not JSON"),
            ("header an array", header(#"["RS256"]"#), "not a JSON object"),
            ("no alg", header(#"{"typ":"at+jwt"}"#), "no string \"alg\""),
            ("alg none", header(#"{"alg":"none"}"#), "never accepted"),
            ("alg HS256", header(#"{"alg":"HS256"}"#), "never accepted"),
            ("alg unknown", header(#"{"alg":"RS1"}"#), "not supported"),
            ("crit", header(#"{"alg":"RS256","crit":["exp"],"exp":1}"#), "crit"),
            ("crit empty", header(#"{"alg":"RS256","crit":[]}"#), "crit"),
            ("b64", header(#"{"alg":"RS256","b64":false}"#), "b64"),
            ("kid a number", header(#"{"alg":"RS256","kid":1}"#), "kid"),
            ("duplicate alg", header(#"{"alg":"none","alg":"RS256"}"#), "duplicate"),
            ("deep header", header(String(repeating: "[", count: 100) + String(repeating: "]", count: 100)), "not JSON"),
        ]
        for (name, text, expected) in rows {
            #expect(throws: JOSEError.self, "\(name)") { try CompactJWS(text[...]) }
            do {
                _ = try CompactJWS(text[...])
            } catch {
                #expect(error.description.contains(expected), "\(name): \(error.description)")
            }
        }
        #expect(try CompactJWS(good[...]).keyID == "rsa-1")
    }

    @Test("key choice: by kid; without kid only one fitting key; the key's own alg must agree")
    func keyChoice() throws {
        let set = try JSONWebKeySet(document: Array(TestKeys.jwks([
            TestKeys.jwk(TestKeys.rsa, kid: "a", alg: "RS256"),
            TestKeys.jwk(TestKeys.rsaOther, kid: "b"),
            TestKeys.jwk(TestKeys.p256, kid: "c"),
            TestKeys.jwk(TestKeys.p256, kid: "x", extra: ["use": "enc"]),
        ]).utf8))
        #expect(set.keys.count == 3 && set.skipped.count == 1)
        func match(_ kid: String?, _ alg: JWSAlgorithm) -> String {
            switch set.key(id: kid, for: alg) {
            case .key(let key): return key.keyID ?? "?"
            case .unknownKeyID: return "unknown"
            case .unfit: return "unfit"
            case .ambiguous: return "ambiguous"
            }
        }
        #expect(match("a", .rs256) == "a")
        #expect(match("a", .ps256) == "unfit")  // its own alg is RS256
        #expect(match("b", .ps256) == "b")
        #expect(match("c", .rs256) == "unfit")  // an EC key for an RSA algorithm
        #expect(match("x", .es256) == "unknown")  // skipped: an encryption key
        #expect(match("zz", .rs256) == "unknown")
        #expect(match(nil, .es256) == "c")
        #expect(match(nil, .ps256) == "b")
        #expect(match(nil, .rs256) == "ambiguous")
        #expect(match(nil, .edDSA) == "unfit")
    }

    @Test("key sets that are refused whole: not JSON, no keys array, too many keys, no usable key")
    func refusedSets() {
        let one = TestKeys.jwk(TestKeys.p256, kid: "k")
        let rows: [(String, String)] = [
            ("HTML", "<html>login</html>"),
            ("array", "[]"),
            ("no keys", #"{"keys":{}}"#),
            ("too many", TestKeys.jwks(Array(repeating: one, count: JSONWebKeySet.maxKeys + 1))),
            ("none usable", TestKeys.jwks([["kty": "oct", "k": "c2VjcmV0"]])),
            ("empty", #"{"keys":[]}"#),
        ]
        for (name, document) in rows {
            #expect(throws: JOSEError.self, "\(name)") { try JSONWebKeySet(document: Array(document.utf8)) }
        }
        #expect((try? JSONWebKeySet(document: Array(TestKeys.jwks(Array(repeating: one, count: JSONWebKeySet.maxKeys)).utf8)))?.keys.count == JSONWebKeySet.maxKeys)
    }
}
