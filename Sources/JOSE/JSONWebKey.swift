import Crypto
import CryptoExtras
import Introspection

/// A public JSON Web Key (RFC 7517) the sidecar can verify with: RSA (≥ 2048 bits), EC P-256 and
/// P-384, or OKP Ed25519. A key with any private member is refused: a public key set that
/// publishes one is misconfigured, and a DPoP proof that carries one is malformed (RFC 9449 §4.2).
public struct JSONWebKey: Sendable {
    public enum Material: Sendable {
        case rsa(_RSA.Signing.PublicKey)
        case p256(P256.Signing.PublicKey)
        case p384(P384.Signing.PublicKey)
        case ed25519(Curve25519.Signing.PublicKey)
    }

    public let material: Material
    /// `kid`, when the key has one.
    public let keyID: String?
    /// The key's own `alg`, when it names one: it must then equal the header's.
    public let algorithm: String?
    /// RFC 7638 JWK SHA-256 thumbprint, base64url: what a DPoP-bound token's `cnf.jkt` holds.
    public let thumbprint: String

    /// Members that only a private key has (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
    static let privateMembers: Set<String> = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"]

    /// Reads a JWK object. `use`, when present, must be `sig`; `key_ops`, when present, must
    /// include `verify`.
    public init(members: [String: JSONValue]) throws(JOSEError) {
        if let member = members.keys.first(where: Self.privateMembers.contains) {
            throw JOSEError("the key has the private member \"\(member)\"")
        }
        guard case .string(let kty)? = members["kty"] else { throw JOSEError("the key has no \"kty\"") }
        switch members["kid"] {
        case nil: keyID = nil
        case .string(let kid)?: keyID = kid
        default: throw JOSEError("the key's \"kid\" is not a string")
        }
        switch members["alg"] {
        case nil: algorithm = nil
        case .string(let alg)?: algorithm = alg
        default: throw JOSEError("the key's \"alg\" is not a string")
        }
        switch members["use"] {
        case nil, .string("sig")?: break
        default: throw JOSEError("the key's \"use\" is not \"sig\"")
        }
        if let operations = members["key_ops"] {
            guard case .array(let items) = operations, items.contains(.string("verify")) else {
                throw JOSEError("the key's \"key_ops\" does not include \"verify\"")
            }
        }
        var canonical: [(String, String)]
        switch kty {
        case "RSA":
            let n = try Self.bytes(members, "n")
            let e = try Self.bytes(members, "e")
            guard n.first != 0, !e.isEmpty, e.first != 0 else { throw JOSEError("the RSA key's \"n\" or \"e\" has leading zeros") }
            do {
                material = .rsa(try _RSA.Signing.PublicKey(n: n, e: e))
            } catch {
                throw JOSEError("the RSA key is not usable (smaller than 2048 bits, or invalid)")
            }
            canonical = [("e", try Self.text(members, "e")), ("kty", kty), ("n", try Self.text(members, "n"))]
        case "EC":
            guard case .string(let crv)? = members["crv"] else { throw JOSEError("the EC key has no \"crv\"") }
            let x = try Self.bytes(members, "x")
            let y = try Self.bytes(members, "y")
            do {
                switch crv {
                case "P-256":
                    guard x.count == 32, y.count == 32 else { throw JOSEError("the P-256 key's coordinates are not 32 bytes") }
                    material = .p256(try P256.Signing.PublicKey(rawRepresentation: x + y))
                case "P-384":
                    guard x.count == 48, y.count == 48 else { throw JOSEError("the P-384 key's coordinates are not 48 bytes") }
                    material = .p384(try P384.Signing.PublicKey(rawRepresentation: x + y))
                default:
                    throw JOSEError("the EC curve \"\(crv.prefix(16))\" is not supported")
                }
            } catch let error as JOSEError {
                throw error
            } catch {
                throw JOSEError("the EC key is not a point on its curve")
            }
            canonical = [("crv", crv), ("kty", kty), ("x", try Self.text(members, "x")), ("y", try Self.text(members, "y"))]
        case "OKP":
            guard case .string("Ed25519")? = members["crv"] else { throw JOSEError("the OKP key is not Ed25519") }
            let x = try Self.bytes(members, "x")
            guard x.count == 32, let key = try? Curve25519.Signing.PublicKey(rawRepresentation: x) else {
                throw JOSEError("the Ed25519 key is not 32 bytes")
            }
            material = .ed25519(key)
            canonical = [("crv", "Ed25519"), ("kty", kty), ("x", try Self.text(members, "x"))]
        default:
            throw JOSEError("the key type \"\(kty.prefix(16))\" is not supported")
        }
        // RFC 7638 §3: the required members in lexicographic order, no whitespace.
        var json = "{"
        for (index, (name, value)) in canonical.enumerated() {
            if index > 0 { json += "," }
            JSONValue.writeString(name, into: &json)
            json += ":"
            JSONValue.writeString(value, into: &json)
        }
        json += "}"
        thumbprint = Base64URL.encode(Array(SHA256.hash(data: Array(json.utf8))))
    }

    private static func text(_ members: [String: JSONValue], _ name: String) throws(JOSEError) -> String {
        guard case .string(let value)? = members[name] else { throw JOSEError("the key has no string \"\(name)\"") }
        return value
    }

    private static func bytes(_ members: [String: JSONValue], _ name: String) throws(JOSEError) -> [UInt8] {
        guard let bytes = Base64URL.decode(try text(members, name).utf8) else {
            throw JOSEError("the key's \"\(name)\" is not base64url")
        }
        return bytes
    }

    /// Whether this key may verify a signature made with `algorithm`: its type and curve fit, and
    /// its own `alg`, when present, is the same algorithm.
    public func fits(_ algorithm: JWSAlgorithm) -> Bool {
        if let own = self.algorithm, own != algorithm.rawValue { return false }
        switch (material, algorithm) {
        case (.rsa, .rs256), (.rsa, .rs384), (.rsa, .rs512), (.rsa, .ps256), (.rsa, .ps384), (.rsa, .ps512): return true
        case (.p256, .es256), (.p384, .es384), (.ed25519, .edDSA): return true
        default: return false
        }
    }

    /// Whether `signature` is a valid `algorithm` signature of `input` by this key. A key that
    /// does not fit the algorithm verifies nothing.
    public func isValidSignature(_ signature: [UInt8], for input: [UInt8], algorithm: JWSAlgorithm) -> Bool {
        guard fits(algorithm) else { return false }
        switch (material, algorithm) {
        case (.rsa(let key), _):
            let rsaSignature = _RSA.Signing.RSASignature(rawRepresentation: signature)
            switch algorithm {
            case .rs256: return key.isValidSignature(rsaSignature, for: SHA256.hash(data: input), padding: .insecurePKCS1v1_5)
            case .rs384: return key.isValidSignature(rsaSignature, for: SHA384.hash(data: input), padding: .insecurePKCS1v1_5)
            case .rs512: return key.isValidSignature(rsaSignature, for: SHA512.hash(data: input), padding: .insecurePKCS1v1_5)
            case .ps256: return key.isValidSignature(rsaSignature, for: SHA256.hash(data: input), padding: .PSS)
            case .ps384: return key.isValidSignature(rsaSignature, for: SHA384.hash(data: input), padding: .PSS)
            case .ps512: return key.isValidSignature(rsaSignature, for: SHA512.hash(data: input), padding: .PSS)
            default: return false
            }
        case (.p256(let key), .es256):
            // RFC 7518 §3.4: R || S, each exactly 32 bytes (never DER).
            guard signature.count == 64, let ecdsa = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(ecdsa, for: SHA256.hash(data: input))
        case (.p384(let key), .es384):
            guard signature.count == 96, let ecdsa = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(ecdsa, for: SHA384.hash(data: input))
        case (.ed25519(let key), .edDSA):
            guard signature.count == 64 else { return false }
            return key.isValidSignature(signature, for: input)
        default:
            return false
        }
    }
}

/// A key set (RFC 7517 §5) as the issuer publishes it: the usable keys, and why the others were
/// skipped (a key of a type the sidecar does not verify with is not an error; a set with no
/// usable key is).
public struct JSONWebKeySet: Sendable {
    public static let maxKeys = 100

    public let keys: [JSONWebKey]
    /// One line per skipped key, for the log.
    public let skipped: [String]

    public init(keys: [JSONWebKey], skipped: [String] = []) {
        self.keys = keys
        self.skipped = skipped
    }

    /// Parses a JWKS document. Throws when it is not a JSON object with a `keys` array, holds more
    /// than `maxKeys` keys, or has no usable key.
    public init<Bytes: Collection<UInt8>>(document: Bytes) throws(JOSEError) {
        let parsed: JSONValue
        do {
            parsed = try JSONParser.parse(document)
        } catch {
            throw JOSEError("the key set is not JSON (\(error.description))")
        }
        guard case .object(let members) = parsed, case .array(let items)? = members["keys"] else {
            throw JOSEError("the key set is not an object with a \"keys\" array")
        }
        guard items.count <= Self.maxKeys else {
            throw JOSEError("the key set has \(items.count) keys (at most \(Self.maxKeys) are accepted)")
        }
        var keys: [JSONWebKey] = []
        var skipped: [String] = []
        for (index, item) in items.enumerated() {
            guard case .object(let key) = item else {
                skipped.append("key \(index): not an object")
                continue
            }
            do {
                keys.append(try JSONWebKey(members: key))
            } catch {
                skipped.append("key \(index): \(error.description)")
            }
        }
        guard !keys.isEmpty else {
            throw JOSEError("the key set has no usable key" + (skipped.isEmpty ? "" : " (\(skipped.prefix(3).joined(separator: "; ")))"))
        }
        self.keys = keys
        self.skipped = skipped
    }

    /// The key for a JWS header: by `kid` when the header names one; without `kid`, the one key
    /// that fits the algorithm (none or several is no key).
    public func key(id: String?, for algorithm: JWSAlgorithm) -> KeyMatch {
        if let id {
            let named = keys.filter { $0.keyID == id }
            guard !named.isEmpty else { return .unknownKeyID }
            let fitting = named.filter { $0.fits(algorithm) }
            return fitting.count == 1 ? .key(fitting[0]) : (fitting.isEmpty ? .unfit : .ambiguous)
        }
        let fitting = keys.filter { $0.fits(algorithm) }
        return fitting.count == 1 ? .key(fitting[0]) : (fitting.isEmpty ? .unfit : .ambiguous)
    }

    public enum KeyMatch: Sendable {
        case key(JSONWebKey)
        /// No key has that `kid`: the set may have been rotated since it was fetched.
        case unknownKeyID
        /// The key's type, curve or own `alg` does not fit the header's `alg`.
        case unfit
        /// More than one key fits (no `kid`, or a `kid` the set repeats).
        case ambiguous
    }
}

