import Crypto
import Introspection
import SwiftASN1

/// How the proxy encodes the client certificate in `certificate_header` (DESIGN.md §3).
public enum CertificateFormat: String, Sendable, CaseIterable {
    /// Detect from the value: XFCC, RFC 9440, PEM, URL-encoded PEM or base64 DER.
    case auto
    /// URL-encoded PEM: nginx `$ssl_client_escaped_cert`, Envoy's XFCC `Cert=`.
    case pemURLEncoded = "pem-urlencoded"
    /// PEM as it is (newlines may have been replaced by spaces).
    case pem
    /// base64 (or base64url) of the DER certificate.
    case derBase64 = "der-base64"
    /// Envoy's `x-forwarded-client-cert`.
    case xfcc
    /// RFC 9440 `Client-Cert`: a structured-field byte sequence `:base64 DER:`.
    case rfc9440
}

/// Why a certificate header could not be used. The text is for logs.
public struct CertificateError: Error, Equatable, Sendable, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// The SHA-256 of a DER certificate: what RFC 8705 `x5t#S256` names, in bytes.
public struct CertificateThumbprint: Equatable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]
    /// base64url without padding, as in a token's `cnf["x5t#S256"]`; computed once, since a
    /// thumbprint is remembered per certificate header and compared on every request.
    public let base64URL: String

    /// Thumbprint of DER bytes.
    public init(der: [UInt8]) {
        self.init(checked: Array(SHA256.hash(data: der)))
    }

    /// From 32 raw bytes (XFCC `Hash=`).
    init?(digest: [UInt8]) {
        guard digest.count == SHA256.byteCount else { return nil }
        self.init(checked: digest)
    }

    private init(checked bytes: [UInt8]) {
        self.bytes = bytes
        self.base64URL = Base64.encodeURLSafe(bytes)
    }

    public var description: String { base64URL }

    public static func == (lhs: Self, rhs: Self) -> Bool { lhs.bytes == rhs.bytes }

    /// Whether a token's `x5t#S256` names this certificate, in time independent of where they
    /// differ. The canonical form (RFC 8705: base64url, no padding) is compared as text; any
    /// other spelling of the same bytes is decoded first.
    public func matches(x5tS256 value: String) -> Bool {
        var value = value
        let canonical = value.withUTF8 { given in
            base64URL.utf8.withContiguousStorageIfAvailable { expected in
                guard given.count == expected.count else { return false }
                var difference: UInt8 = 0
                for i in 0..<given.count { difference |= given[i] ^ expected[i] }
                return difference == 0
            } ?? false
        }
        if canonical { return true }
        guard let decoded = Base64.decode(value.utf8), decoded.count == bytes.count else { return false }
        var difference: UInt8 = 0
        for i in 0..<bytes.count { difference |= decoded[i] ^ bytes[i] }
        return difference == 0
    }
}

/// Parses a certificate header into the thumbprint of the certificate it carries.
public enum ClientCertificate {
    /// Bound on a header value; longer ones are refused before any decoding.
    public static let maxHeaderLength = 32 * 1024

    /// The thumbprint of the one certificate in `value`, read as `format`.
    public static func thumbprint(header value: String, format: CertificateFormat, xfccElement: PolicyConfiguration.XFCCElement = .only) throws(CertificateError) -> CertificateThumbprint {
        guard value.utf8.count <= maxHeaderLength else { throw CertificateError("certificate header longer than \(maxHeaderLength) bytes") }
        let trimmed = value.trimmingSpaces
        guard !trimmed.isEmpty else { throw CertificateError("certificate header is empty") }
        switch format == .auto ? detect(trimmed) : format {
        case .auto, .pemURLEncoded:
            guard let pem = PercentDecoding.decode(trimmed) else { throw CertificateError("invalid percent-encoding in certificate header") }
            return try fromPEM(pem)
        case .pem:
            return try fromPEM(Array(trimmed.utf8))
        case .derBase64:
            guard let der = Base64.decode(trimmed.utf8) else { throw CertificateError("certificate header is not valid base64") }
            return try fromDER(der)
        case .rfc9440:
            let utf8 = trimmed.utf8
            guard utf8.count >= 2, utf8.first == UInt8(ascii: ":"), utf8.last == UInt8(ascii: ":"),
                let der = Base64.decode(utf8.dropFirst().dropLast())
            else { throw CertificateError("Client-Cert is not a :base64: byte sequence (RFC 9440)") }
            return try fromDER(der)
        case .xfcc:
            return try fromXFCC(trimmed, element: xfccElement)
        }
    }

    /// Guesses the format of a header value.
    static func detect(_ value: Substring) -> CertificateFormat {
        if value.hasPrefix(":") { return .rfc9440 }
        if value.hasPrefix("-----BEGIN%20") || value.hasPrefix("-----BEGIN%") { return .pemURLEncoded }
        if value.hasPrefix("-----BEGIN") { return .pem }
        if XFCC.looksLikeXFCC(value) { return .xfcc }
        if value.contains("%") { return .pemURLEncoded }
        return .derBase64
    }

    static func fromXFCC(_ value: Substring, element choice: PolicyConfiguration.XFCCElement) throws(CertificateError) -> CertificateThumbprint {
        let elements: [XFCC.Element]
        do {
            elements = try XFCC.parse(value)
        } catch {
            throw CertificateError("x-forwarded-client-cert: \(error.description)")
        }
        let element: XFCC.Element
        switch (choice, elements.count) {
        case (_, 0): throw CertificateError("x-forwarded-client-cert has no element")
        case (.only, 1), (.first, _): element = elements[0]
        case (.last, _): element = elements[elements.count - 1]
        case (.only, _): throw CertificateError("x-forwarded-client-cert has \(elements.count) elements and the policy trusts only one")
        }
        if let hash = element.value(for: "hash") {
            guard let digest = Hex.decode(hash), let thumbprint = CertificateThumbprint(digest: digest) else {
                throw CertificateError("x-forwarded-client-cert Hash is not 64 hex digits")
            }
            return thumbprint
        }
        if let cert = element.value(for: "cert") {
            guard let pem = PercentDecoding.decode(Substring(cert)) else { throw CertificateError("invalid percent-encoding in XFCC Cert") }
            return try fromPEM(pem)
        }
        throw CertificateError("x-forwarded-client-cert has neither Hash nor Cert")
    }

    /// Exactly one `CERTIFICATE` PEM block; its DER must be an X.509 certificate.
    static func fromPEM(_ pem: [UInt8]) throws(CertificateError) -> CertificateThumbprint {
        let begin = Array("-----BEGIN ".utf8)
        let end = Array("-----END ".utf8)
        guard let beginAt = pem.firstRange(of: begin) else { throw CertificateError("no PEM BEGIN line") }
        guard let labelEnd = pem[beginAt.upperBound...].firstRange(of: Array("-----".utf8)) else { throw CertificateError("truncated PEM BEGIN line") }
        let label = pem[beginAt.upperBound..<labelEnd.lowerBound]
        guard label.elementsEqual("CERTIFICATE".utf8) else {
            throw CertificateError("PEM block is \"\(String(decoding: label.prefix(40), as: UTF8.self))\", not a CERTIFICATE")
        }
        guard let endAt = pem[labelEnd.upperBound...].firstRange(of: end) else { throw CertificateError("truncated PEM: no END line") }
        guard pem[endAt.upperBound...].starts(with: Array("CERTIFICATE-----".utf8)) else { throw CertificateError("PEM END line does not match") }
        let rest = pem[(endAt.upperBound + 16)...]
        if rest.firstRange(of: begin) != nil {
            throw CertificateError("more than one PEM block: send only the client's own certificate")
        }
        guard rest.allSatisfy({ $0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09 }) else {
            throw CertificateError("data after the PEM END line")
        }
        guard let der = Base64.decode(pem[labelEnd.upperBound..<endAt.lowerBound]) else { throw CertificateError("PEM body is not valid base64") }
        return try fromDER(der)
    }

    /// Checks the outline of an X.509 certificate (RFC 5280 §4.1: SEQUENCE of tbsCertificate,
    /// signatureAlgorithm, signatureValue) and hashes it.
    static func fromDER(_ der: [UInt8]) throws(CertificateError) -> CertificateThumbprint {
        guard !der.isEmpty else { throw CertificateError("empty certificate") }
        do {
            let node = try DER.parse(der)
            guard node.identifier == .sequence, case .constructed(let children) = node.content else {
                throw CertificateError("DER is not an X.509 certificate")
            }
            var iterator = children.makeIterator()
            guard let tbs = iterator.next(), tbs.identifier == .sequence,
                let algorithm = iterator.next(), algorithm.identifier == .sequence,
                let signature = iterator.next(), signature.identifier == .bitString,
                iterator.next() == nil
            else {
                throw CertificateError("DER is not an X.509 certificate")
            }
        } catch let error as CertificateError {
            throw error
        } catch {
            throw CertificateError("certificate is not valid DER")
        }
        return CertificateThumbprint(der: der)
    }
}

/// Percent-decoding (RFC 3986 §2.1); `+` stays `+`.
enum PercentDecoding {
    static func decode(_ text: Substring) -> [UInt8]? {
        var out = [UInt8]()
        out.reserveCapacity(text.utf8.count)
        var iterator = text.utf8.makeIterator()
        while let byte = iterator.next() {
            if byte == UInt8(ascii: "%") {
                guard let hi = iterator.next().flatMap(Hex.value), let lo = iterator.next().flatMap(Hex.value) else { return nil }
                out.append(hi << 4 | lo)
            } else {
                out.append(byte)
            }
        }
        return out
    }
}

/// Hexadecimal digits.
enum Hex {
    static func value(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    static func decode(_ text: String) -> [UInt8]? {
        let utf8 = Array(text.utf8)
        guard utf8.count % 2 == 0 else { return nil }
        var out = [UInt8]()
        out.reserveCapacity(utf8.count / 2)
        var i = 0
        while i < utf8.count {
            guard let hi = value(utf8[i]), let lo = value(utf8[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }
}

extension StringProtocol {
    /// Without leading and trailing spaces and tabs.
    var trimmingSpaces: Substring {
        let s = Substring(self)
        guard let first = s.firstIndex(where: { $0 != " " && $0 != "\t" }) else { return "" }
        let last = s.lastIndex(where: { $0 != " " && $0 != "\t" })!
        return s[first...last]
    }
}
