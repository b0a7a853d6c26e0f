import Crypto
import Foundation
import Introspection
import JOSE
import NIOConcurrencyHelpers

/// `policies[].dpop` (DESIGN.md §10).
public enum DPoPMode: String, Sendable, CaseIterable {
    /// `Authorization: DPoP` is refused (`invalid_request`); a `jkt`-bound token never passes.
    case disabled
    /// DPoP and Bearer tokens are both accepted; a `jkt`-bound token needs its proof.
    case allowed
    /// Only DPoP: a Bearer token is refused with the DPoP challenge.
    case required
}

/// Checks DPoP proofs against the request (RFC 9449 §4.3), with the replay memory and the server
/// nonces, which outlive configuration reloads.
public final class DPoPVerifier: Sendable {
    /// Why a proof was refused.
    public enum Failure: Error, Sendable, Equatable {
        /// `invalid_dpop_proof`, with the reason for the log.
        case proof(String)
        /// `use_dpop_nonce`: a nonce is required and the proof has none or a stale one.
        case nonce(String)
    }

    private let algorithms: [JWSAlgorithm]
    private let nonceSeconds: Double
    private let nonceKey: SymmetricKey
    /// `jkt.jti` of proofs seen, each until its `iat` window has passed: sharded, bounded.
    private let replay: [NIOLockedValueBox<TTLCache<String, Bool>>]
    /// Proof headers already accepted (a client signs every proof with the same key).
    private let headers = DPoPProof.HeaderMemo()

    /// The algorithms, as the challenge's `algs` parameter lists them.
    public let challengeAlgorithms: String

    public init(algorithms: [JWSAlgorithm] = DPoPVerifier.defaultAlgorithms, replayEntries: Int = 100_000, nonceSeconds: Int = 60, nonceKey: [UInt8]? = nil) {
        self.algorithms = algorithms
        self.challengeAlgorithms = algorithms.map(\.rawValue).joined(separator: " ")
        self.nonceSeconds = Double(max(1, nonceSeconds))
        self.nonceKey = nonceKey.map { SymmetricKey(data: $0) } ?? SymmetricKey(size: .bits256)
        let shards = 16
        let perShard = max(1, (replayEntries + shards - 1) / shards)
        self.replay = (0..<shards).map { _ in NIOLockedValueBox(TTLCache(capacity: perShard)) }
    }

    public static let defaultAlgorithms: [JWSAlgorithm] = [.es256, .ps256, .rs256, .edDSA]

    /// The verifier `server:` describes.
    public convenience init(server: ServerConfiguration) {
        self.init(
            algorithms: server.dpopAlgorithms, replayEntries: server.dpopReplayEntries, nonceSeconds: server.dpopNonceSeconds,
            nonceKey: server.dpopNonceKey.map { Array($0.value.utf8) }
        )
    }

    /// A proof that passed every check but the replay check, which `consume` makes.
    public struct Verified: Sendable {
        /// RFC 7638 thumbprint of the proof's key (which the token's `cnf.jkt` must equal).
        public var thumbprint: String
        var replayKey: String
        var windowSeconds: Double
    }

    /// Verifies the request's one `DPoP` header for `token` (RFC 9449 §4.3), all but the replay
    /// check: the caller `consume`s the proof once it decides on it, so that a request asked
    /// twice (without suspending, then with) does not replay its own proof.
    public func verify(
        proofs: [String], token: TokenDigest, method: String, expectedURL: String?,
        maxAgeSeconds: Int64, leewaySeconds: Int64, requireNonce: Bool, now: Double
    ) -> Result<Verified, Failure> {
        guard proofs.count == 1, let text = proofs.first else {
            return .failure(.proof(proofs.isEmpty ? "no DPoP header" : "\(proofs.count) DPoP headers"))
        }
        let proof: DPoPProof
        do {
            proof = try DPoPProof(text[...], algorithms: algorithms, headers: headers)
        } catch {
            return .failure(.proof(error.description))
        }
        guard proof.htm == method else { return .failure(.proof("htm \(proof.htm.prefix(16)) is not the request's method \(method)")) }
        guard let expectedURL, let expected = DPoPURL.normalized(expectedURL) else {
            return .failure(.proof("the request's URL cannot be built: the original host or scheme is not valid"))
        }
        guard let htu = DPoPURL.normalized(proof.htu), htu == expected else {
            return .failure(.proof("htu \(proof.htu.prefix(200)) is not the request's URL \(expectedURL.prefix(200))"))
        }
        let seconds = Int64(now.rounded(.down))
        guard proof.iat >= seconds - maxAgeSeconds else { return .failure(.proof("iat is older than \(maxAgeSeconds) s")) }
        guard proof.iat <= seconds + leewaySeconds else { return .failure(.proof("iat is more than \(leewaySeconds) s ahead")) }
        guard let ath = proof.ath else { return .failure(.proof("ath is missing")) }
        // The token's digest is its SHA-256 already (the cache key): ath is its base64url.
        guard Base64URL.decode(Array(ath.utf8)) == token.bytes else { return .failure(.proof("ath is not the hash of this access token")) }
        if requireNonce {
            guard let nonce = proof.nonce else { return .failure(.nonce("the proof has no nonce")) }
            guard isValid(nonce: nonce, now: now) else { return .failure(.nonce("the nonce is unknown or stale")) }
        }
        return .success(Verified(thumbprint: proof.key.thumbprint, replayKey: proof.key.thumbprint + "." + proof.jti, windowSeconds: Double(maxAgeSeconds + leewaySeconds) + 1))
    }

    /// The replay check (RFC 9449 §11.1): true the first time the pair (key, `jti`) is seen
    /// within the window in which its proof is acceptable, false for a replay.
    public func consume(_ proof: Verified, uptime: Double) -> Bool {
        let shard = replay[Int(UInt(bitPattern: proof.replayKey.hashValue) % UInt(replay.count))]
        let until = uptime + proof.windowSeconds
        return shard.withLockedValue { cache in
            if case .fresh = cache.lookup(proof.replayKey, now: uptime) { return false }
            _ = cache.insert(proof.replayKey, value: true, freshUntil: until, staleUntil: until, now: uptime)
            return true
        }
    }

    // MARK: nonces (stateless: the time window's number, MACed with the shared key)

    /// The nonce of the current window.
    public func currentNonce(now: Double) -> String {
        nonce(window: Int64((now / nonceSeconds).rounded(.down)))
    }

    /// A nonce of the current or the previous window: accepted for `nonce_seconds` to twice that.
    public func isValid(nonce: String, now: Double) -> Bool {
        let window = Int64((now / nonceSeconds).rounded(.down))
        return nonce == self.nonce(window: window) || nonce == self.nonce(window: window - 1)
    }

    private func nonce(window: Int64) -> String {
        var bytes = [UInt8](repeating: 0, count: 8)
        for i in 0..<8 { bytes[i] = UInt8(truncatingIfNeeded: UInt64(bitPattern: window) >> (56 - 8 * UInt64(i))) }
        let mac = HMAC<SHA256>.authenticationCode(for: bytes, using: nonceKey)
        return Base64URL.encode(bytes + Array(mac).prefix(16))
    }
}

/// URLs as RFC 9449 §4.3 compares `htu`: RFC 3986 §6.2.2–6.2.3 normalised, without query and
/// fragment.
enum DPoPURL {
    /// scheme and host lower-cased, userinfo dropped, the default port dropped, unreserved
    /// percent-escapes decoded and the others upper-cased, dot segments removed, an empty path
    /// read as `/`; nil for anything that is not an absolute http(s) URL with a valid host.
    static func normalized(_ url: String) -> String? {
        alreadyNormal(url) ?? fullyNormalized(url)
    }

    /// The normalisation itself (`normalized` skips it for URLs already in normal form).
    static func fullyNormalized(_ url: String) -> String? {
        var text = Substring(url)
        if let cut = text.firstIndex(where: { $0 == "?" || $0 == "#" }) { text = text[..<cut] }
        guard let schemeEnd = text.range(of: "://") else { return nil }
        let scheme = text[..<schemeEnd.lowerBound].lowercased()
        guard scheme == "https" || scheme == "http" else { return nil }
        var rest = text[schemeEnd.upperBound...]
        let authorityEnd = rest.firstIndex(of: "/") ?? rest.endIndex
        var authority = rest[..<authorityEnd]
        rest = rest[authorityEnd...]
        if let at = authority.lastIndex(of: "@") { authority = authority[authority.index(after: at)...] }
        guard let host = hostAndPort(authority, scheme: scheme) else { return nil }
        guard let path = normalizedPath(String(rest)) else { return nil }
        return scheme + "://" + host + path
    }

    /// The fast path: a URL already in normal form (what clients and this sidecar build), up to
    /// its query or fragment; nil when it may need any change (then the full normalisation runs).
    static func alreadyNormal(_ url: String) -> String? {
        var url = url
        return url.withUTF8 { bytes -> String? in
            var i: Int
            if bytes.starts(with: "https://".utf8) { i = 8 } else if bytes.starts(with: "http://".utf8) { i = 7 } else { return nil }
            let https = i == 8
            let hostStart = i
            while i < bytes.count, (bytes[i] >= 0x61 && bytes[i] <= 0x7A) || (bytes[i] >= 0x30 && bytes[i] <= 0x39) || bytes[i] == 0x2D || bytes[i] == 0x2E {
                i += 1
            }
            guard i > hostStart else { return nil }
            if i < bytes.count, bytes[i] == UInt8(ascii: ":") {
                let portStart = i + 1
                i += 1
                while i < bytes.count, bytes[i] >= 0x30, bytes[i] <= 0x39 { i += 1 }
                let digits = i - portStart
                guard digits > 0, digits <= 5, bytes[portStart] != 0x30 else { return nil }
                var port = 0
                for j in portStart..<i { port = port * 10 + Int(bytes[j] - 0x30) }
                guard port <= 65535, port != (https ? 443 : 80) else { return nil }
            }
            guard i < bytes.count, bytes[i] == UInt8(ascii: "/") else { return nil }
            // The path: printable ASCII without escapes or dot segments.
            var segmentStart = i + 1
            var end = bytes.count
            while i < bytes.count {
                let c = bytes[i]
                if c == UInt8(ascii: "?") || c == UInt8(ascii: "#") {
                    end = i
                    break
                }
                guard c > 0x20, c < 0x7F, c != UInt8(ascii: "%"), c != UInt8(ascii: "\\") else { return nil }
                if c == UInt8(ascii: "/") {
                    let length = i - segmentStart
                    if (length == 1 && bytes[segmentStart] == 0x2E) || (length == 2 && bytes[segmentStart] == 0x2E && bytes[segmentStart + 1] == 0x2E) { return nil }
                    segmentStart = i + 1
                }
                i += 1
            }
            let last = end - segmentStart
            if last > 0, (last == 1 && bytes[segmentStart] == 0x2E) || (last == 2 && bytes[segmentStart] == 0x2E && bytes[segmentStart + 1] == 0x2E) { return nil }
            return String(decoding: UnsafeBufferPointer(rebasing: bytes[..<end]), as: UTF8.self)
        }
    }

    /// `scheme://host[:port]` normalised, for `public_base_url`; nil when the text has a path
    /// (other than `/`), a query or a fragment, or is not an http(s) URL.
    static func origin(_ text: String) -> String? {
        guard !text.contains("?"), !text.contains("#"), let url = normalized(text), let schemeEnd = url.range(of: "://") else { return nil }
        let rest = url[schemeEnd.upperBound...]
        guard rest.firstIndex(of: "/") == rest.index(before: rest.endIndex) else { return nil }
        return String(url.dropLast())
    }

    /// `host[:port]` lower-cased, the scheme's default port dropped; nil when invalid.
    static func hostAndPort(_ authority: Substring, scheme: String) -> String? {
        var host: Substring
        var port: Substring?
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { return nil }
            host = authority[...close]
            let after = authority[authority.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { return nil }
                port = after.dropFirst()
            }
        } else {
            let parts = authority.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            host = parts[0]
            if parts.count == 2 { port = parts[1] }
        }
        // A reg-name or IPv4 (letters, digits, - . _ ~ and percent-escapes are not accepted
        // here), or a bracketed IPv6 literal: nothing that could end the authority early.
        let valid: Bool
        if host.hasPrefix("[") {
            valid = host.count > 2 && host.dropFirst().dropLast().utf8.allSatisfy { c in
                (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66) || c == UInt8(ascii: ":") || c == UInt8(ascii: ".")
            }
        } else {
            valid = host.utf8.allSatisfy { c in
                (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2D || c == 0x2E || c == 0x5F || c == 0x7E
            }
        }
        guard !host.isEmpty, valid else { return nil }
        var result = host.lowercased()
        if let port {
            guard !port.isEmpty, port.count <= 5, port.allSatisfy(\.isASCIIDigit), let number = Int(port), number <= 65535 else {
                return port.isEmpty ? result : nil
            }
            let isDefault = (scheme == "https" && number == 443) || (scheme == "http" && number == 80)
            if !isDefault { result += ":\(number)" }
        }
        return result
    }

    /// Percent-escapes normalised, dot segments removed (RFC 3986 §5.2.4), `/` for an empty path.
    static func normalizedPath(_ path: String) -> String? {
        let bytes = Array(path.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            let c = bytes[i]
            if c == UInt8(ascii: "%") {
                guard i + 2 < bytes.count, let hi = hex(bytes[i + 1]), let lo = hex(bytes[i + 2]) else { return nil }
                let decoded = hi << 4 | lo
                if isUnreserved(decoded) {
                    out.append(decoded)
                } else {
                    out += [UInt8(ascii: "%"), upperHex(hi), upperHex(lo)]
                }
                i += 3
            } else {
                guard c > 0x20, c < 0x7F else { return nil }
                out.append(c)
                i += 1
            }
        }
        var segments: [Substring] = []
        let text = String(decoding: out, as: UTF8.self)
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        for (index, part) in parts.enumerated() {
            if index == 0 { continue }  // the part before the leading "/"
            switch part {
            case ".": if index == parts.count - 1 { segments.append("") }
            case "..":
                if !segments.isEmpty { segments.removeLast() }
                if index == parts.count - 1 { segments.append("") }
            default: segments.append(part)
            }
        }
        return "/" + segments.joined(separator: "/")
    }

    private static func hex(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    private static func upperHex(_ v: UInt8) -> UInt8 { v < 10 ? UInt8(ascii: "0") + v : UInt8(ascii: "A") + v - 10 }

    private static func isUnreserved(_ c: UInt8) -> Bool {
        (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || (c >= 0x30 && c <= 0x39) || c == 0x2D || c == 0x2E || c == 0x5F || c == 0x7E
    }
}
