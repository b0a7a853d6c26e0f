// Fuzzes the JOSE parsers that read attacker-controlled bytes: a compact JWS (a JWT access
// token, a DPoP proof), a key set and a single key (what an issuer, or a proof's header,
// publishes), base64url, and the unverified-issuer peek that routes tokens. The first byte
// chooses the parser; the rest is its input.
import Introspection
import JOSE

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > 0 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    switch data[0] % 5 {
    case 0: fuzzJWS(bytes)
    case 1: fuzzKeySet(bytes)
    case 2: fuzzKey(bytes)
    case 3: fuzzProof(bytes)
    default: fuzzBase64(bytes)
    }
    return 0
}

func check(_ condition: Bool, _ message: String) {
    if !condition { fatalError(message) }
}

func fuzzJWS(_ bytes: [UInt8]) {
    let text = String(decoding: bytes, as: UTF8.self)
    let peeked = UnverifiedIssuer.of(text[...])
    guard let jws = try? CompactJWS(text[...]) else { return }
    // A parsed JWS is exactly three base64url parts whose first two are the signing input.
    let parts = text.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
    check(parts.count == 3, "a JWS of \(parts.count) parts was accepted")
    check(jws.signingInput == Array(text.utf8.prefix(parts[0].count + 1 + parts[1].count)), "signing input is not header.payload")
    check(Base64URL.encode(jws.signature) == String(decoding: parts[2], as: UTF8.self), "signature does not round-trip")
    check(jws.header["crit"] == nil, "crit accepted")
    check(!JWSAlgorithm.isForbidden(jws.algorithm.rawValue), "a forbidden alg parsed")
    _ = jws.hasType(in: ["at+jwt", "JWT"])
    if let claims = try? jws.claims(), case .string(let iss)? = claims["iss"] {
        check(peeked == iss, "the routing peek disagrees with the parsed iss")
    }
}

/// A fixed input no fuzzed key can have signed: every signature over it must be refused unless
/// the fuzzer forged one, which would be a bug in the verifier.
let message = Array("fuzz.message".utf8)

func fuzzKeySet(_ bytes: [UInt8]) {
    guard let set = try? JSONWebKeySet(document: bytes) else { return }
    check(!set.keys.isEmpty && set.keys.count <= JSONWebKeySet.maxKeys, "key set bounds")
    for key in set.keys { checkKey(key) }
    for algorithm in JWSAlgorithm.allCases {
        if case .key(let key) = set.key(id: nil, for: algorithm) { check(key.fits(algorithm), "chosen key does not fit") }
    }
}

func fuzzKey(_ bytes: [UInt8]) {
    guard case .object(let members)? = try? JSONParser.parse(bytes) else { return }
    guard let key = try? JSONWebKey(members: members) else { return }
    check(!members.keys.contains("d"), "a key with a private member was accepted")
    checkKey(key)
}

func checkKey(_ key: JSONWebKey) {
    check(key.thumbprint.utf8.count == 43 && Base64URL.decode(Array(key.thumbprint.utf8))?.count == 32, "thumbprint is not a base64url SHA-256")
    for algorithm in JWSAlgorithm.allCases {
        let signatureLength: Int
        switch algorithm {
        case .es256, .edDSA: signatureLength = 64
        case .es384: signatureLength = 96
        default: signatureLength = 256
        }
        check(!key.isValidSignature([UInt8](repeating: 0, count: signatureLength), for: message, algorithm: algorithm), "an all-zero signature verified")
        if !key.fits(algorithm) {
            check(!key.isValidSignature([UInt8](repeating: 1, count: signatureLength), for: message, algorithm: algorithm), "an unfit key verified")
        }
    }
}

/// A DPoP proof (RFC 9449): whatever parses was signed by the key it carries, has no private
/// member, and holds claims of the right types.
func fuzzProof(_ bytes: [UInt8]) {
    let text = String(decoding: bytes, as: UTF8.self)
    guard let proof = try? DPoPProof(text[...], algorithms: JWSAlgorithm.allCases) else { return }
    check(text.utf8.count <= DPoPProof.maxLength, "an overlong proof was accepted")
    check(!proof.jti.isEmpty && proof.jti.utf8.count <= DPoPProof.maxJTILength, "jti bounds")
    check(proof.key.fits(proof.algorithm), "the proof's key does not fit its alg")
    checkKey(proof.key)
    // Parsing is deterministic: the same text gives the same key and claims, also when its
    // header was remembered by the first parse.
    let again = try? DPoPProof(text[...], algorithms: JWSAlgorithm.allCases)
    check(again?.key.thumbprint == proof.key.thumbprint && again?.jti == proof.jti, "parse is not deterministic")
    let memo = DPoPProof.HeaderMemo()
    let first = try? DPoPProof(text[...], algorithms: JWSAlgorithm.allCases, headers: memo)
    let remembered = try? DPoPProof(text[...], algorithms: JWSAlgorithm.allCases, headers: memo)
    check(first?.jti == proof.jti && remembered?.jti == proof.jti && remembered?.key.thumbprint == proof.key.thumbprint, "the header memo changes the result")
}

func fuzzBase64(_ bytes: [UInt8]) {
    guard let decoded = Base64URL.decode(bytes) else { return }
    // Strict: the only accepted spelling is the canonical one.
    check(Array(Base64URL.encode(decoded).utf8) == bytes, "a non-canonical base64url was accepted")
}
