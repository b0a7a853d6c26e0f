// Fuzzes ClientCertificate.thumbprint: the first input byte selects the format (byte % 6, in
// CertificateFormat.allCases order: auto, pem-urlencoded, pem, der-base64, xfcc, rfc9440) and
// the XFCC element ((byte / 6) % 3: only, first, last); the rest is the header value.
import AuthzSidecar
import Introspection

typealias Element = PolicyConfiguration.XFCCElement
typealias Outcome = Result<CertificateThumbprint, CertificateError>

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 1 else { return 0 }
    let selector = Int(data[0])
    let format = CertificateFormat.allCases[selector % CertificateFormat.allCases.count]
    let element = Element.allCases[(selector / CertificateFormat.allCases.count) % Element.allCases.count]
    let header = String(decoding: UnsafeBufferPointer(start: data + 1, count: size - 1), as: UTF8.self)

    let outcome = thumbprint(header, format, element)
    check(outcome == thumbprint(header, format, element), "not deterministic")

    // Blanks around the value do not matter (when they cannot join a grapheme cluster).
    if header.utf8.count + 3 <= ClientCertificate.maxHeaderLength, let first = header.unicodeScalars.first, first.isASCII,
        let last = header.unicodeScalars.last, last.isASCII
    {
        check(thumbprint(" \t" + header + " ", format, element) == outcome, "surrounding blanks change the outcome")
    }

    switch outcome {
    case .failure(let error):
        check(!error.description.isEmpty, "error without a description")
    case .success(let t):
        checkThumbprint(t)
        checkAgreement(header, format, element, t)
    }
    return 0
}

func thumbprint(_ header: String, _ format: CertificateFormat, _ element: Element = .only) -> Outcome {
    do {
        return .success(try ClientCertificate.thumbprint(header: header, format: format, xfccElement: element))
    } catch {
        return .failure(error)
    }
}

func checkThumbprint(_ t: CertificateThumbprint) {
    check(t.bytes.count == 32, "thumbprint of \(t.bytes.count) bytes")
    check(t.base64URL.utf8.count == 43, "x5t#S256 of \(t.base64URL.utf8.count) characters")
    check(t.matches(x5tS256: t.base64URL), "does not match its own base64url")
    check(t.matches(x5tS256: Base64.encode(t.bytes)), "does not match its own padded base64")
    var other = t.bytes
    other[31] ^= 1
    check(!t.matches(x5tS256: Base64.encodeURLSafe(other)), "matches a different thumbprint")
    check(!t.matches(x5tS256: String(t.base64URL.dropLast())), "matches a truncated thumbprint")
}

/// An accepted certificate gives the same thumbprint through every other way of sending it.
func checkAgreement(_ header: String, _ format: CertificateFormat, _ element: Element, _ t: CertificateThumbprint) {
    let trimmed = trimBlanks(header)
    switch format {
    case .auto:
        let explicit = CertificateFormat.allCases.dropFirst().contains { thumbprint(header, $0, element) == .success(t) }
        check(explicit, "auto accepted what no explicit format gives the same thumbprint for")
    case .derBase64:
        guard let der = Base64.decode(trimmed.utf8) else { fatalError("der-base64 accepted invalid base64") }
        checkEncodings(der: der, t)
    case .rfc9440:
        let utf8 = Array(trimmed.utf8)
        guard utf8.count >= 2, utf8.first == UInt8(ascii: ":"), utf8.last == UInt8(ascii: ":"),
            let der = Base64.decode(utf8.dropFirst().dropLast())
        else { fatalError("rfc9440 accepted a value that is not :base64:") }
        checkEncodings(der: der, t)
    case .pem:
        // The same text percent-encoded, directly and as XFCC Cert=.
        let encoded = percentEncode(Array(trimmed.utf8))
        if encoded.utf8.count <= ClientCertificate.maxHeaderLength {
            check(thumbprint(encoded, .pemURLEncoded) == .success(t), "PEM accepted but its URL-encoding is not")
        }
        let xfcc = "By=spiffe://fuzz;Cert=\"" + encoded + "\""
        if xfcc.utf8.count <= ClientCertificate.maxHeaderLength {
            check(thumbprint(xfcc, .xfcc) == .success(t), "PEM accepted but XFCC Cert= of it is not")
        }
    case .pemURLEncoded:
        guard let pem = percentDecode(Array(trimmed.utf8)) else { fatalError("pem-urlencoded accepted invalid percent-encoding") }
        if let text = String(validating: pem, as: UTF8.self), text.utf8.count <= ClientCertificate.maxHeaderLength {
            check(thumbprint(text, .pem) == .success(t), "URL-encoded PEM accepted but the decoded PEM is not")
        }
    case .xfcc:
        let elements: [XFCC.Element]
        do {
            elements = try XFCC.parse(Substring(trimmed))
        } catch {
            fatalError("xfcc accepted a value XFCC.parse refuses: \(error)")
        }
        check(!elements.isEmpty, "xfcc accepted without elements")
        let chosen: XFCC.Element
        switch element {
        case .only:
            check(elements.count == 1, "xfcc .only accepted \(elements.count) elements")
            chosen = elements[0]
        case .first: chosen = elements[0]
        case .last: chosen = elements[elements.count - 1]
        }
        if let hash = chosen.value(for: "hash") {
            check(hexDecode(hash) == t.bytes, "XFCC Hash= differs from the thumbprint")
        } else if let cert = chosen.value(for: "cert") {
            check(thumbprint(cert, .pemURLEncoded) == .success(t), "XFCC Cert= accepted but the same value as pem-urlencoded is not")
        } else {
            fatalError("xfcc accepted an element without Hash or Cert")
        }
    }
}

/// Every encoding of an accepted DER certificate gives the same thumbprint.
func checkEncodings(der: [UInt8], _ t: CertificateThumbprint) {
    check(CertificateThumbprint(der: der) == t, "thumbprint is not the SHA-256 of the DER")
    let b64 = Base64.encode(der)
    var lines = ""
    var line = Substring(b64)
    while !line.isEmpty {
        lines += line.prefix(64) + "\n"
        line = line.dropFirst(64)
    }
    let pem = "-----BEGIN CERTIFICATE-----\n" + lines + "-----END CERTIFICATE-----\n"
    let urlPEM = percentEncode(Array(pem.utf8))
    let hex = t.bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    var candidates: [(String, [CertificateFormat])] = [
        (b64, [.derBase64, .auto]),
        (Base64.encodeURLSafe(der), [.derBase64, .auto]),
        (":" + b64 + ":", [.rfc9440, .auto]),
        (pem, [.pem, .auto]),
        (pem.replacingNewlines(), [.pem, .auto]),
        (urlPEM, [.pemURLEncoded, .auto]),
        ("By=spiffe://fuzz;Hash=" + hex.uppercased() + ";Subject=\"CN=fuzz,O=x\";URI=spiffe://client", [.xfcc, .auto]),
        ("By=spiffe://fuzz;Cert=\"" + urlPEM + "\";Subject=\"CN=fuzz\"", [.xfcc, .auto]),
        ("Hash=" + hex + ";Cert=\"" + urlPEM + "\"", [.xfcc, .auto]),
    ]
    candidates.removeAll { $0.0.utf8.count > ClientCertificate.maxHeaderLength }
    for (value, formats) in candidates {
        for format in formats {
            check(thumbprint(value, format) == .success(t), "DER accepted, but not as \(format.rawValue): \(value.prefix(80).debugDescription)")
        }
    }
}

func trimBlanks(_ s: String) -> Substring {
    let sub = Substring(s)
    guard let first = sub.firstIndex(where: { $0 != " " && $0 != "\t" }) else { return "" }
    return sub[first...sub.lastIndex(where: { $0 != " " && $0 != "\t" })!]
}

/// Percent-encodes everything but RFC 3986 unreserved characters (what nginx does to a PEM).
func percentEncode(_ bytes: [UInt8]) -> String {
    let hex = Array("0123456789ABCDEF".utf8)
    var out = [UInt8]()
    for b in bytes {
        switch b {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
            UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
            out.append(b)
        default:
            out += [UInt8(ascii: "%"), hex[Int(b >> 4)], hex[Int(b & 15)]]
        }
    }
    return String(decoding: out, as: UTF8.self)
}

func hexValue(_ c: UInt8) -> UInt8? {
    switch c {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - 48
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - 87
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - 55
    default: return nil
    }
}

func percentDecode(_ bytes: [UInt8]) -> [UInt8]? {
    var out = [UInt8]()
    var i = 0
    while i < bytes.count {
        if bytes[i] == UInt8(ascii: "%") {
            guard i + 2 < bytes.count, let hi = hexValue(bytes[i + 1]), let lo = hexValue(bytes[i + 2]) else { return nil }
            out.append(hi << 4 | lo)
            i += 3
        } else {
            out.append(bytes[i])
            i += 1
        }
    }
    return out
}

func hexDecode(_ text: String) -> [UInt8]? {
    let utf8 = Array(text.utf8)
    guard utf8.count % 2 == 0 else { return nil }
    var out = [UInt8]()
    for i in stride(from: 0, to: utf8.count, by: 2) {
        guard let hi = hexValue(utf8[i]), let lo = hexValue(utf8[i + 1]) else { return nil }
        out.append(hi << 4 | lo)
    }
    return out
}

extension String {
    /// nginx without `$ssl_client_escaped_cert` (or a proxy folding header lines) sends the PEM
    /// with spaces for newlines.
    func replacingNewlines() -> String {
        String(decoding: utf8.map { $0 == 0x0A ? 0x20 : $0 }, as: UTF8.self)
    }
}

@inline(never)
func check(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String, file: StaticString = #file, line: UInt = #line) {
    if !condition() { fatalError("invariant violated: \(message())", file: file, line: line) }
}
