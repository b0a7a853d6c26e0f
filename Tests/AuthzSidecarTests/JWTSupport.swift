@testable import AuthzSidecar
import Crypto
import CryptoExtras
import Foundation
import HTTPTypes
import Introspection
import JOSE
import JWTValidation
import NIOConcurrencyHelpers

/// Keys of a test issuer, and tokens signed with them by hand (every byte under the test's
/// control). Keys are made once per process: RSA generation is slow in a debug build.
enum TestKeys {
    enum Private: @unchecked Sendable, Equatable {
        static func == (lhs: Private, rhs: Private) -> Bool {
            switch (lhs, rhs) {
            case (.rsa(let a), .rsa(let b)): return a.derRepresentation == b.derRepresentation
            case (.p256(let a), .p256(let b)): return a.rawRepresentation == b.rawRepresentation
            case (.p384(let a), .p384(let b)): return a.rawRepresentation == b.rawRepresentation
            case (.ed25519(let a), .ed25519(let b)): return a.rawRepresentation == b.rawRepresentation
            default: return false
            }
        }

        case rsa(_RSA.Signing.PrivateKey)
        case p256(P256.Signing.PrivateKey)
        case p384(P384.Signing.PrivateKey)
        case ed25519(Curve25519.Signing.PrivateKey)
    }

    nonisolated(unsafe) static let rsa = Private.rsa(try! _RSA.Signing.PrivateKey(keySize: .bits2048))
    nonisolated(unsafe) static let rsaOther = Private.rsa(try! _RSA.Signing.PrivateKey(keySize: .bits2048))
    nonisolated(unsafe) static let p256 = Private.p256(P256.Signing.PrivateKey())
    nonisolated(unsafe) static let p256Other = Private.p256(P256.Signing.PrivateKey())
    nonisolated(unsafe) static let p384 = Private.p384(P384.Signing.PrivateKey())
    nonisolated(unsafe) static let ed25519 = Private.ed25519(Curve25519.Signing.PrivateKey())

    static func b64(_ bytes: some DataProtocol) -> String { Base64URL.encode(Array(bytes)) }

    /// The public JWK members of a key.
    static func jwk(_ key: Private, kid: String?, alg: String? = nil, extra: [String: String] = [:]) -> [String: String] {
        var members: [String: String]
        switch key {
        case .rsa(let k):
            let primitives = try! k.publicKey.getKeyPrimitives()
            members = ["kty": "RSA", "n": b64(primitives.modulus), "e": b64(primitives.publicExponent)]
        case .p256(let k):
            let raw = Array(k.publicKey.rawRepresentation)
            members = ["kty": "EC", "crv": "P-256", "x": b64(raw[0..<32]), "y": b64(raw[32..<64])]
        case .p384(let k):
            let raw = Array(k.publicKey.rawRepresentation)
            members = ["kty": "EC", "crv": "P-384", "x": b64(raw[0..<48]), "y": b64(raw[48..<96])]
        case .ed25519(let k):
            members = ["kty": "OKP", "crv": "Ed25519", "x": b64(k.publicKey.rawRepresentation)]
        }
        if let kid { members["kid"] = kid }
        if let alg { members["alg"] = alg }
        for (name, value) in extra { members[name] = value }
        return members
    }

    static func json(_ object: [String: Any]) -> String {
        String(decoding: try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
    }

    static func jwks(_ keys: [[String: String]]) -> String {
        json(["keys": keys])
    }

    static func sign(_ input: [UInt8], with key: Private, alg: String) -> [UInt8] {
        switch (key, alg) {
        case (.rsa(let k), "RS256"): return Array(try! k.signature(for: SHA256.hash(data: input), padding: .insecurePKCS1v1_5).rawRepresentation)
        case (.rsa(let k), "RS384"): return Array(try! k.signature(for: SHA384.hash(data: input), padding: .insecurePKCS1v1_5).rawRepresentation)
        case (.rsa(let k), "RS512"): return Array(try! k.signature(for: SHA512.hash(data: input), padding: .insecurePKCS1v1_5).rawRepresentation)
        case (.rsa(let k), "PS256"): return Array(try! k.signature(for: SHA256.hash(data: input), padding: .PSS).rawRepresentation)
        case (.rsa(let k), "PS384"): return Array(try! k.signature(for: SHA384.hash(data: input), padding: .PSS).rawRepresentation)
        case (.rsa(let k), "PS512"): return Array(try! k.signature(for: SHA512.hash(data: input), padding: .PSS).rawRepresentation)
        case (.p256(let k), _): return Array(try! k.signature(for: SHA256.hash(data: input)).rawRepresentation)
        case (.p384(let k), _): return Array(try! k.signature(for: SHA384.hash(data: input)).rawRepresentation)
        case (.ed25519(let k), _): return Array(try! k.signature(for: input))
        default: fatalError("no signer for \(alg)")
        }
    }

    /// A compact JWS: the header and claims as given (JSON text), signed with `key` under `alg`.
    static func token(header: String, claims: String, key: Private?, alg: String) -> String {
        let input = b64(Array(header.utf8)) + "." + b64(Array(claims.utf8))
        let signature = key.map { sign(Array(input.utf8), with: $0, alg: alg) } ?? []
        return input + "." + b64(signature)
    }

    static func token(alg: String = "RS256", kid: String? = "rsa-1", typ: String? = "at+jwt", claims: [String: Any], key: Private = rsa, headerExtra: [String: Any] = [:]) -> String {
        var header: [String: Any] = ["alg": alg]
        if let kid { header["kid"] = kid }
        if let typ { header["typ"] = typ }
        for (name, value) in headerExtra { header[name] = value }
        return token(header: json(header), claims: json(claims), key: key, alg: alg)
    }
}

/// A key set source the test controls: what it serves, whether it fails, and how often it was asked.
final class TestKeySource: Sendable {
    private let state = NIOLockedValueBox<(document: String, failing: Bool, fetches: Int)>(("", false, 0))

    init(_ document: String) { state.withLockedValue { $0.document = document } }

    var fetches: Int { state.withLockedValue { $0.fetches } }
    func serve(_ document: String) { state.withLockedValue { $0.document = document } }
    func fail(_ failing: Bool) { state.withLockedValue { $0.failing = failing } }

    func fetch() async throws(IntrospectionError) -> JSONWebKeySet {
        let (document, failing) = state.withLockedValue { state in
            state.fetches += 1
            return (state.document, state.failing)
        }
        if failing { throw .keysUnavailable("test: the key set is down") }
        do {
            return try JSONWebKeySet(document: Array(document.utf8))
        } catch {
            throw .keysUnavailable(error.description)
        }
    }

    var backends: IssuerBackends {
        IssuerBackends(keys: { () async throws(IntrospectionError) -> JSONWebKeySet in try await self.fetch() })
    }
}

enum JWTFixtures {
    static let issuer = "https://issuer.test/realms/r"
    static let standardKeys = TestKeys.jwks([
        TestKeys.jwk(TestKeys.rsa, kid: "rsa-1", alg: "RS256"),
        TestKeys.jwk(TestKeys.rsa, kid: "rsa-ps"),
        TestKeys.jwk(TestKeys.p256, kid: "ec-1"),
        TestKeys.jwk(TestKeys.p384, kid: "ec-384"),
        TestKeys.jwk(TestKeys.ed25519, kid: "ed-1"),
    ])

    static func claims(_ now: Double, _ changes: [String: Any] = [:], removing: [String] = []) -> [String: Any] {
        var claims: [String: Any] = [
            "iss": issuer, "exp": Int(now) + 600, "iat": Int(now), "aud": "api", "client_id": "device-1",
            "sub": "device-1", "scope": "read write", "jti": "j-1",
        ]
        for (name, value) in changes { claims[name] = value }
        for name in removing { claims.removeValue(forKey: name) }
        return claims
    }

    static func request(_ token: String?, path: String = "/api/x", scheme: String = "Bearer") -> AccessRequest {
        var headers = HTTPFields()
        if let token { headers[.authorization] = "\(scheme) \(token)" }
        return AccessRequest(front: .nginx, method: "GET", path: path, host: "h", headers: headers)
    }
}
