import Introspection

/// A JWS in compact serialization (RFC 7515 §7.1), parsed but not yet verified: exactly three
/// base64url parts, a header that is a JSON object naming an algorithm the sidecar verifies with.
/// Everything read from it before `verify` is attacker-controlled.
public struct CompactJWS: Sendable {
    /// The protected header's members.
    public let header: [String: JSONValue]
    public let algorithm: JWSAlgorithm
    /// The decoded payload bytes.
    public let payload: [UInt8]
    /// ASCII(BASE64URL(header) || '.' || BASE64URL(payload)): what the signature covers.
    public let signingInput: [UInt8]
    public let signature: [UInt8]

    /// Header parameters the sidecar understands; any of them in `crit` is still refused, since
    /// none of them is an extension (RFC 7515 §4.1.11).
    public var keyID: String? { header["kid"]?.stringValue }
    public var type: String? { header["typ"]?.stringValue }

    /// Parses the text. Throws for anything but three base64url parts, a header that is not a
    /// JSON object, a missing or non-string `alg`, an `alg` that is not asymmetric and supported,
    /// or a `crit` member (no extension is understood, RFC 7515 §4.1.11).
    public init(_ text: Substring) throws(JOSEError) {
        // One contiguous copy of the text; the parts are found and decoded in place.
        let bytes = Array(text.utf8)
        var dots: (Int, Int) = (-1, -1)
        var count = 0
        for index in bytes.indices where bytes[index] == UInt8(ascii: ".") {
            count += 1
            if count == 1 { dots.0 = index } else if count == 2 { dots.1 = index }
        }
        guard count == 2 else {
            throw JOSEError(count == 4 ? "a JWE (5 parts), not a JWS" : "not a compact JWS: \(count + 1) part\(count == 0 ? "" : "s")")
        }
        guard let headerBytes = Base64URL.decode(bytes[..<dots.0]) else { throw JOSEError("the header is not base64url") }
        guard let payload = Base64URL.decode(bytes[(dots.0 + 1)..<dots.1]) else { throw JOSEError("the payload is not base64url") }
        guard let signature = Base64URL.decode(bytes[(dots.1 + 1)...]) else { throw JOSEError("the signature is not base64url") }
        let document: JSONValue
        do {
            document = try JSONParser.parse(headerBytes)
        } catch {
            throw JOSEError("the header is not JSON (\(error.description))")
        }
        guard case .object(let header) = document else { throw JOSEError("the header is not a JSON object") }
        guard case .string(let name)? = header["alg"] else { throw JOSEError("the header has no string \"alg\"") }
        guard let algorithm = JWSAlgorithm(rawValue: name) else {
            throw JOSEError(JWSAlgorithm.isForbidden(name) ? "alg \"\(name.prefix(16))\" is never accepted" : "alg \"\(name.prefix(16))\" is not supported")
        }
        if header["crit"] != nil { throw JOSEError("the header has \"crit\": no extension is understood") }
        if header["b64"] != nil { throw JOSEError("the header has \"b64\" (RFC 7797), which is not supported") }
        for member in ["kid", "typ", "cty"] {
            if let value = header[member], value.stringValue == nil { throw JOSEError("the header's \"\(member)\" is not a string") }
        }
        self.header = header
        self.algorithm = algorithm
        self.payload = payload
        self.signingInput = Array(bytes[..<dots.1])
        self.signature = signature
    }

    /// The payload as a JSON object (a JWT claims set).
    public func claims() throws(JOSEError) -> [String: JSONValue] {
        try Self.claims(of: payload)
    }

    /// A decoded payload as a JSON object.
    static func claims(of payload: [UInt8]) throws(JOSEError) -> [String: JSONValue] {
        let document: JSONValue
        do {
            document = try JSONParser.parse(payload)
        } catch {
            throw JOSEError("the payload is not JSON (\(error.description))")
        }
        guard case .object(let claims) = document else { throw JOSEError("the payload is not a JSON object") }
        return claims
    }

    /// Whether the signature verifies with `key` under the header's algorithm.
    public func isSigned(by key: JSONWebKey) -> Bool {
        key.isValidSignature(signature, for: signingInput, algorithm: algorithm)
    }

    /// Whether `typ` is one of `accepted`, compared case-insensitively with an optional
    /// `application/` prefix (RFC 7515 §4.1.9). An empty list accepts any `typ`, or none.
    public func hasType(in accepted: [String]) -> Bool {
        guard !accepted.isEmpty else { return true }
        guard let type else { return false }
        let normalized = Self.normalizedType(type)
        return accepted.contains { Self.normalizedType($0) == normalized }
    }

    static func normalizedType(_ type: String) -> String {
        let lower = type.lowercased()
        return lower.hasPrefix("application/") ? String(lower.dropFirst("application/".count)) : lower
    }
}

/// The unverified `iss` of a token that looks like a JWT, for routing it to its issuer
/// (DESIGN.md §9): three base64url parts, a header that is a JSON object with a string `alg`
/// (any, so that a forgery with `alg: none` still reaches the issuer it names and is refused
/// there), and a payload that is a JSON object with a string `iss`. nil for anything else.
public enum UnverifiedIssuer {
    public static func of(_ token: Substring) -> String? {
        let parts = token.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 3,
            let headerBytes = Base64URL.decode(parts[0]),
            case .object(let header)? = try? JSONParser.parse(headerBytes),
            header["alg"]?.stringValue != nil,
            let payload = Base64URL.decode(parts[1]),
            case .object(let claims)? = try? JSONParser.parse(payload)
        else { return nil }
        return claims["iss"]?.stringValue
    }
}
