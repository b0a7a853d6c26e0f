@testable import AuthzSidecar
import Foundation
import Testing

@Suite("ClientCertificate: every header format to an x5t#S256 thumbprint")
struct ClientCertificateTests {
    let client1 = Fixtures.thumbprint("client1.pem")

    @Test("nginx $ssl_client_escaped_cert (URL-encoded PEM), explicit and detected")
    func urlEncoded() throws {
        let value = Fixtures.escaped("client1.pem")
        #expect(try ClientCertificate.thumbprint(header: value, format: .pemURLEncoded).base64URL == client1)
        #expect(try ClientCertificate.thumbprint(header: value, format: .auto).base64URL == client1)
    }

    @Test("PEM as is, and with newlines turned into spaces")
    func pem() throws {
        let pem = Fixtures.pem("client1.pem")
        #expect(try ClientCertificate.thumbprint(header: pem, format: .pem).base64URL == client1)
        let spaced = pem.replacingOccurrences(of: "\n", with: " ")
            .replacingOccurrences(of: "BEGIN CERTIFICATE-----", with: "BEGIN CERTIFICATE-----")
        #expect(try ClientCertificate.thumbprint(header: spaced, format: .auto).base64URL == client1)
    }

    @Test("base64 DER and RFC 9440 Client-Cert")
    func der() throws {
        let body = Fixtures.pem("client1.pem").split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()
        #expect(try ClientCertificate.thumbprint(header: body, format: .derBase64).base64URL == client1)
        #expect(try ClientCertificate.thumbprint(header: body, format: .auto).base64URL == client1)
        #expect(try ClientCertificate.thumbprint(header: ":\(body):", format: .rfc9440).base64URL == client1)
        #expect(try ClientCertificate.thumbprint(header: ":\(body):", format: .auto).base64URL == client1)
    }

    @Test("XFCC: Hash= compared without PEM, Cert= when no Hash")
    func xfcc() throws {
        let hash = Fixtures.hexHash("client1.pem")
        let cert = Fixtures.escaped("client1.pem")
        let withHash = "By=spiffe://example.test/ns/edge/sa/envoy;Hash=\(hash);Cert=\"\(cert)\";Subject=\"CN=client1,O=x\";URI=spiffe://x;DNS=a.example"
        #expect(try ClientCertificate.thumbprint(header: withHash, format: .xfcc).base64URL == client1)
        #expect(try ClientCertificate.thumbprint(header: withHash, format: .auto).base64URL == client1)
        let certOnly = "By=spiffe://x;Cert=\"\(cert)\";Subject=\"CN=client1\""
        #expect(try ClientCertificate.thumbprint(header: certOnly, format: .xfcc).base64URL == client1)
    }

    @Test("XFCC with several elements: refused unless the policy names one")
    func xfccElements() throws {
        let forged = "Hash=\(Fixtures.hexHash("client2.pem"))"
        let real = "Hash=\(Fixtures.hexHash("client1.pem"))"
        let value = "\(forged),\(real)"
        #expect(throws: CertificateError.self) { try ClientCertificate.thumbprint(header: value, format: .xfcc) }
        #expect(try ClientCertificate.thumbprint(header: value, format: .xfcc, xfccElement: .last).base64URL == client1)
        #expect(try ClientCertificate.thumbprint(header: value, format: .xfcc, xfccElement: .first).base64URL == Fixtures.thumbprint("client2.pem"))
    }

    @Test("a ;Cert= or ,Hash= smuggled inside a quoted Subject is text, not a pair")
    func smuggling() throws {
        let real = Fixtures.hexHash("client1.pem")
        let evil = Fixtures.hexHash("client2.pem")
        let value = "Subject=\"CN=x;Hash=\(evil),Hash=\(evil)\";Hash=\(real)"
        #expect(try ClientCertificate.thumbprint(header: value, format: .xfcc).base64URL == client1)
        let elements = try XFCC.parse(Substring(value))
        #expect(elements.count == 1)
        #expect(elements[0].value(for: "subject") == "CN=x;Hash=\(evil),Hash=\(evil)")
    }

    @Test("XFCC parser: escapes, case-insensitive keys, Envoy's real shapes")
    func xfccParser() throws {
        let elements = try XFCC.parse(#"by=a;HASH=ab;Subject="CN=client3 \"q\"\;semi=x,O=Example Test";URI=spiffe://e/ns/a;DNS=d1;DNS=d2"#)
        #expect(elements.count == 1)
        let element = elements[0]
        #expect(element.value(for: "hash") == "ab")
        #expect(element.value(for: "subject") == #"CN=client3 "q"\;semi=x,O=Example Test"#)
        #expect(element.pairs.filter { $0.key == "dns" }.map(\.value) == ["d1", "d2"])
    }

    @Test("refused certificate headers", arguments: [
        ("", CertificateFormat.auto),
        ("garbage", .auto),
        ("-----BEGIN CERTIFICATE-----\nMIIB\n", .pem),
        ("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", .pem),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", .pem),
        ("-----BEGIN%20CERTIFICATE-----%0AMII%ZZ", .pemURLEncoded),
        ("%%%", .pemURLEncoded),
        ("@@@@", .derBase64),
        (":abc", .rfc9440),
        ("Hash=1234", .xfcc),
        ("Hash=zz" + String(repeating: "0", count: 62), .xfcc),
        ("Hash=\"abc", .xfcc),
        ("Subject=\"x\"y;Hash=00", .xfcc),
        ("By=x;Subject=\"y\"", .xfcc),
        ("Hash=00;Hash=11", .xfcc),
        ("By=x,", .xfcc),
        (String(repeating: "A", count: 1 << 20), .auto),
    ])
    func refused(value: String, format: CertificateFormat) {
        #expect(throws: CertificateError.self) { try ClientCertificate.thumbprint(header: value, format: format) }
    }

    @Test("a chain of two certificates is refused, and so is a private key")
    func chainAndKey() {
        let chain = Fixtures.pem("client1.pem") + Fixtures.pem("ca.pem")
        #expect(throws: CertificateError.self) { try ClientCertificate.thumbprint(header: chain, format: .pem) }
        let key = Fixtures.pem("client1.key.pem")
        #expect(throws: CertificateError.self) { try ClientCertificate.thumbprint(header: key, format: .pem) }
    }

    @Test("thumbprint comparison: equal only for the same certificate and a well-formed value")
    func comparison() throws {
        let presented = try ClientCertificate.thumbprint(header: Fixtures.pem("client1.pem"), format: .pem)
        #expect(presented.matches(x5tS256: client1))
        #expect(!presented.matches(x5tS256: Fixtures.thumbprint("client2.pem")))
        #expect(!presented.matches(x5tS256: String(client1.dropLast())))
        #expect(!presented.matches(x5tS256: ""))
        #expect(!presented.matches(x5tS256: "not base64 !"))
        // The canonical form is compared as text; other spellings of the same bytes still match.
        let standardAlphabet = client1.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        #expect(presented.matches(x5tS256: standardAlphabet + "="))
        #expect(presented.matches(x5tS256: client1 + "="))
        #expect(!presented.matches(x5tS256: String(client1.dropLast()) + "A="))
        #expect(presented.base64URL == client1)
    }
}

@Suite("ThumbprintCache: a bounded memo of header decoding, never of decisions")
struct ThumbprintCacheTests {
    @Test("the same answers as decoding, per format; failures are not remembered; bounded")
    func memo() throws {
        let cache = ThumbprintCache(capacity: 8, shardCount: 1)
        let header = Fixtures.escaped("client1.pem")
        let direct = try ClientCertificate.thumbprint(header: header, format: .auto)
        #expect(try cache.thumbprint(header: header, format: .auto, element: .only) == direct)
        #expect(try cache.thumbprint(header: header, format: .auto, element: .only) == direct)
        // the same text read as another format is another key, and here an error
        #expect(throws: CertificateError.self) { try cache.thumbprint(header: header, format: .derBase64, element: .only) }
        #expect(throws: CertificateError.self) { try cache.thumbprint(header: "garbage%", format: .auto, element: .only) }
        // many distinct headers: still correct, and the memo stays within its bound
        let other = Fixtures.escaped("client2.pem")
        for i in 0..<50 {
            let value = i.isMultiple(of: 2) ? header + String(repeating: " ", count: i) : other + String(repeating: " ", count: i)
            let expected = i.isMultiple(of: 2) ? direct.base64URL : Fixtures.thumbprint("client2.pem")
            #expect(try cache.thumbprint(header: value, format: .auto, element: .only).base64URL == expected)
        }
        #expect(cache.count <= 8)
    }
}
