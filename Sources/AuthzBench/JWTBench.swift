import ArgumentParser
import Crypto
import CryptoExtras
import Foundation
import Introspection
import JOSE

/// `jwt-fixtures`: an issuer's keys (RSA-2048 and P-256), its key set, and pools of distinct
/// signed access tokens for the JWT rows of scripts/bench.sh — bound to a certificate like the
/// introspection rows' token.
struct JWTFixtures: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "jwt-fixtures")

    @Option var dir: String
    @Option var issuer: String
    @Option var audience = "api"
    @Option var scope = "system-access"
    @Option(help: "cnf.x5t#S256 of the client certificate the tokens are bound to.") var thumbprint: String
    @Option(help: "Distinct tokens per algorithm.") var count = 5000

    func run() throws {
        let rsa = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let ec = P256.Signing.PrivateKey()
        let primitives = try rsa.publicKey.getKeyPrimitives()
        let raw = Array(ec.publicKey.rawRepresentation)
        let keys: [[String: String]] = [
            ["kty": "RSA", "kid": "bench-rsa", "alg": "RS256", "n": Base64URL.encode(Array(primitives.modulus)), "e": Base64URL.encode(Array(primitives.publicExponent))],
            ["kty": "EC", "kid": "bench-ec", "crv": "P-256", "x": Base64URL.encode(raw[0..<32]), "y": Base64URL.encode(raw[32..<64])],
        ]
        let url = URL(fileURLWithPath: dir)
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        try JSONSerialization.data(withJSONObject: ["keys": keys]).write(to: url.appendingPathComponent("jwks.json"))
        let now = Int(Date().timeIntervalSince1970)
        for (alg, kid) in [("RS256", "bench-rsa"), ("ES256", "bench-ec")] {
            var lines: [String] = []
            lines.reserveCapacity(count)
            for i in 0..<count {
                let header = #"{"alg":"\#(alg)","kid":"\#(kid)","typ":"at+jwt"}"#
                let claims = #"{"iss":"\#(issuer)","aud":"\#(audience)","client_id":"bench-client","sub":"bench-client","scope":"\#(scope)","iat":\#(now),"exp":\#(now + 86_400),"jti":"bench-\#(alg)-\#(i)","cnf":{"x5t#S256":"\#(thumbprint)"}}"#
                let input = Base64URL.encode(Array(header.utf8)) + "." + Base64URL.encode(Array(claims.utf8))
                let signature: [UInt8] =
                    alg == "RS256"
                    ? Array(try rsa.signature(for: SHA256.hash(data: Array(input.utf8)), padding: .insecurePKCS1v1_5).rawRepresentation)
                    : Array(try ec.signature(for: SHA256.hash(data: Array(input.utf8))).rawRepresentation)
                lines.append(input + "." + Base64URL.encode(signature))
            }
            try (lines.joined(separator: "\n") + "\n").write(to: url.appendingPathComponent("tokens-\(alg).txt"), atomically: true, encoding: .utf8)
        }
        print("wrote \(dir)/jwks.json and \(count) tokens per algorithm")
    }
}

/// `jwt-verify`: the bare cost of verifying one JWT's signature with the sidecar's own verifier
/// (parse the compact JWS, choose the key, verify), in a loop on one thread: the figure the
/// first-sight JWT rows are compared with. Prints CPU µs per verification.
struct JWTVerify: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "jwt-verify")

    @Option var dir: String
    @Option var alg = "RS256"
    @Option var seconds = 2.0

    func run() throws {
        let keys = try JSONWebKeySet(document: Array(try Data(contentsOf: URL(fileURLWithPath: dir).appendingPathComponent("jwks.json"))))
        let tokens = try String(contentsOfFile: "\(dir)/tokens-\(alg).txt", encoding: .utf8).split(separator: "\n").prefix(1000).map(String.init)
        guard !tokens.isEmpty else { throw ValidationError("no tokens for \(alg)") }
        func cpu() -> Double {
            var usage = rusage()
            getrusage(RUSAGE_SELF.rawValue, &usage)
            return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
        }
        var verified = 0
        var failed = 0
        let wallStart = Date()
        let cpuStart = cpu()
        while Date().timeIntervalSince(wallStart) < seconds {
            for token in tokens {
                let jws = try CompactJWS(token[...])
                guard case .key(let key) = keys.key(id: jws.keyID, for: jws.algorithm), jws.isSigned(by: key) else {
                    failed += 1
                    continue
                }
                verified += 1
            }
        }
        let perVerification = (cpu() - cpuStart) / Double(verified + failed) * 1e6
        guard failed == 0 else { throw ValidationError("\(failed) tokens did not verify") }
        print(String(format: "%.2f", perVerification))
    }
}
