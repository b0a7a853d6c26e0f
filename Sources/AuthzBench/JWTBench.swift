import ArgumentParser
import Crypto
import CryptoExtras
import Foundation
import Introspection
import JOSE
import JWTValidation

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
    @Option(help: "With it: a DPoP-bound token and a pool of `count` ES256 proofs for this URL (GET).") var dpopHTU: String?

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
        if let dpopHTU {
            // A client key, a token bound to it (cnf.jkt), and one fresh proof per request to come.
            let client = P256.Signing.PrivateKey()
            let clientRaw = Array(client.publicKey.rawRepresentation)
            let jwk = #"{"crv":"P-256","kty":"EC","x":"\#(Base64URL.encode(clientRaw[0..<32]))","y":"\#(Base64URL.encode(clientRaw[32..<64]))"}"#
            let jkt = Base64URL.encode(Array(SHA256.hash(data: Array(jwk.utf8))))
            let header = #"{"alg":"RS256","kid":"bench-rsa","typ":"at+jwt"}"#
            let claims = #"{"iss":"\#(issuer)","aud":"\#(audience)","client_id":"bench-dpop","sub":"bench-dpop","scope":"\#(scope)","iat":\#(now),"exp":\#(now + 86_400),"jti":"bench-dpop","cnf":{"jkt":"\#(jkt)"}}"#
            let input = Base64URL.encode(Array(header.utf8)) + "." + Base64URL.encode(Array(claims.utf8))
            let token = input + "." + Base64URL.encode(Array(try rsa.signature(for: SHA256.hash(data: Array(input.utf8)), padding: .insecurePKCS1v1_5).rawRepresentation))
            try (token + "\n").write(to: url.appendingPathComponent("dpop-token.txt"), atomically: true, encoding: .utf8)
            let ath = Base64URL.encode(Array(SHA256.hash(data: Array(token.utf8))))
            let proofHeader = Base64URL.encode(Array(#"{"typ":"dpop+jwt","alg":"ES256","jwk":\#(jwk)}"#.utf8))
            var proofs: [String] = []
            proofs.reserveCapacity(count)
            for i in 0..<count {
                let body = #"{"jti":"bench-\#(i)-\#(UInt32.random(in: 0...UInt32.max))","htm":"GET","htu":"\#(dpopHTU)","iat":\#(now),"ath":"\#(ath)"}"#
                let signingInput = proofHeader + "." + Base64URL.encode(Array(body.utf8))
                let signature = try client.signature(for: SHA256.hash(data: Array(signingInput.utf8))).rawRepresentation
                proofs.append(signingInput + "." + Base64URL.encode(Array(signature)))
            }
            try (proofs.joined(separator: "\n") + "\n").write(to: url.appendingPathComponent("proofs-ES256.txt"), atomically: true, encoding: .utf8)
        }
        print("wrote \(dir)/jwks.json and \(count) tokens per algorithm")
    }
}

/// `jwt-verify`: the bare cost of verifying one JWT with the sidecar's own code, in a loop on one
/// thread, in CPU µs: `signature` = parse the compact JWS, choose the key, verify the signature;
/// `verifier` = the whole JWT verifier (also the checks and the claims read into the token
/// model), as the sidecar calls it on a miss. The first-sight rows are compared with these.
struct JWTVerify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "jwt-verify")

    @Option var dir: String
    @Option var alg = "RS256"
    @Option var issuer: String
    @Option var seconds = 2.0

    func run() async throws {
        let document = Array(try Data(contentsOf: URL(fileURLWithPath: dir).appendingPathComponent("jwks.json")))
        let keys = try JSONWebKeySet(document: document)
        let tokens = try String(contentsOfFile: "\(dir)/tokens-\(alg).txt", encoding: .utf8).split(separator: "\n").prefix(1000).map(String.init)
        guard !tokens.isEmpty else { throw ValidationError("no tokens for \(alg)") }
        let issuerKeys = IssuerKeys(issuer: "bench", cacheSeconds: 86_400, minRefetchSeconds: 86_400, fetch: { () async throws(IntrospectionError) -> JSONWebKeySet in keys })
        let verifier = JWTAccessTokenVerifier(
            configuration: IssuerConfiguration(name: "bench", issuer: issuer, validation: .jwt, audiences: ["api"]), keys: issuerKeys
        )
        guard try await verifier.introspect(tokens[0]).active else { throw ValidationError("the first token does not verify") }

        let signature = try measure(tokens) { token in
            let jws = try CompactJWS(token[...])
            guard case .key(let key) = keys.key(id: jws.keyID, for: jws.algorithm) else { return false }
            return jws.isSigned(by: key)
        }
        let whole = try measure(tokens) { token in verifier.introspectWithoutSuspending(token)?.active == true }
        print(String(format: "%.2f %.2f", signature, whole))
    }

    private func measure(_ tokens: [String], _ body: (String) throws -> Bool) throws -> Double {
        func cpu() -> Double {
            var usage = rusage()
            getrusage(RUSAGE_SELF.rawValue, &usage)
            return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
        }
        var done = 0
        let wallStart = Date()
        let cpuStart = cpu()
        while Date().timeIntervalSince(wallStart) < seconds {
            for token in tokens {
                guard try body(token) else { throw ValidationError("a token did not verify") }
                done += 1
            }
        }
        return (cpu() - cpuStart) / Double(done) * 1e6
    }
}
