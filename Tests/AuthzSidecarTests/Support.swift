import Crypto
import Foundation
import Introspection
import Synchronization
@testable import AuthzSidecar
import NIOConcurrencyHelpers

/// Paths and contents of the shared test fixtures (Tests/Fixtures).
enum Fixtures {
    static func path(_ name: String) -> String {
        var components = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        components.removeLast(2)  // Support.swift, AuthzSidecarTests
        return components.joined(separator: "/") + "/Fixtures/" + name
    }

    static func pem(_ name: String) -> String {
        (try? String(contentsOfFile: path(name), encoding: .utf8)) ?? ""
    }

    /// base64url(SHA-256(DER)) computed independently of the code under test (Foundation's
    /// base64 decoder over the PEM body).
    static func thumbprint(_ name: String) -> String {
        let body = pem(name).split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()
        let der = Data(base64Encoded: body) ?? Data()
        return Data(SHA256.hash(data: der)).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }

    /// Lowercase hex SHA-256 of the DER (what Envoy's XFCC `Hash=` holds).
    static func hexHash(_ name: String) -> String {
        let body = pem(name).split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()
        let der = Data(base64Encoded: body) ?? Data()
        return SHA256.hash(data: der).map { String(format: "%02x", $0) }.joined()
    }

    /// The PEM percent-encoded as nginx's `$ssl_client_escaped_cert` and Envoy's XFCC `Cert=`.
    static func escaped(_ name: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert("-")
        return pem(name).addingPercentEncoding(withAllowedCharacters: allowed) ?? ""
    }
}

/// A clock tests move by hand.
final class TestClock: EpochClock {
    private let seconds: NIOLockedValueBox<Double>
    init(_ start: Double = 1_800_000_000) { seconds = NIOLockedValueBox(start) }
    func now() -> Double { seconds.withLockedValue { $0 } }
    func advance(by delta: Double) { seconds.withLockedValue { $0 += delta } }
}
