#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Which hosts are this machine's loopback: the IPv4 literals of `127.0.0.0/8`, the IPv6 literal
/// `::1` (any spelling, brackets allowed) and the name `localhost`. Names are never resolved and
/// never matched by prefix: `127.attacker.example` is a DNS name like any other.
public enum Loopback {
    public static func isLoopback(host: String) -> Bool {
        var host = host
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if host.lowercased() == "localhost" || host.lowercased() == "localhost." { return true }
        var v4 = in_addr()
        if host.contains("."), inet_pton(AF_INET, host, &v4) == 1 {
            // s_addr is in network byte order: the first octet is the lowest byte in memory.
            return withUnsafeBytes(of: &v4.s_addr) { $0[0] } == 127
        }
        var v6 = in6_addr()
        if host.contains(":"), inet_pton(AF_INET6, host, &v6) == 1 {
            return withUnsafeBytes(of: &v6) { bytes in
                bytes.prefix(15).allSatisfy { $0 == 0 } && bytes[15] == 1
            }
        }
        return false
    }

    /// Whether a listener is reachable only from this machine: a unix socket, or a TCP socket on
    /// a loopback address (`0.0.0.0` and `::` are every address, so not loopback).
    public static func isLocalOnly(_ address: ListenAddress) -> Bool {
        switch address {
        case .unix: return true
        case .tcp(let host, _): return isLoopback(host: host)
        }
    }
}
