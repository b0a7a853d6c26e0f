import Foundation
import Introspection

/// Where the store is: `redis://[[user]:password@]host[:port][/db]` or `rediss://…` (TLS).
public struct StoreEndpoint: Sendable, Equatable {
    public var host: String
    public var port: Int
    public var database: Int
    public var tls: Bool
    public var username: String?
    /// From the URL or `password_file`; never printed.
    public var password: Secret?

    /// The name TLS verifies: the host, unless it is an IP address (then the certificate must name
    /// the address, which NIOSSL checks without SNI).
    var serverHostname: String? {
        host.contains(":") || host.allSatisfy({ $0.isNumber || $0 == "." }) ? nil : host
    }

    /// Parses a store URL; nil with a reason in `problem` when it is not one.
    public static func parse(_ url: String) -> Result<StoreEndpoint, StoreURLProblem> {
        guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased() else {
            return .failure(StoreURLProblem("must be a redis:// or rediss:// URL"))
        }
        guard scheme == "redis" || scheme == "rediss" else {
            return .failure(StoreURLProblem("must use redis:// or rediss://, not \(scheme)://"))
        }
        guard var host = components.host, !host.isEmpty else { return .failure(StoreURLProblem("has no host")) }
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        let port = components.port ?? 6379
        guard (1...65_535).contains(port) else { return .failure(StoreURLProblem("port out of range")) }
        var database = 0
        let path = components.path.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
        if !path.isEmpty {
            guard let number = Int(path), (0...1_000).contains(number) else {
                return .failure(StoreURLProblem("the path must be a database number (/0 … /1000)"))
            }
            database = number
        }
        guard components.query == nil, components.fragment == nil else {
            return .failure(StoreURLProblem("takes no query or fragment"))
        }
        let user = components.user.flatMap { $0.isEmpty ? nil : $0.removingPercentEncoding ?? $0 }
        let password = components.password.flatMap { $0.isEmpty ? nil : Secret($0.removingPercentEncoding ?? $0) }
        return .success(StoreEndpoint(host: host, port: port, database: database, tls: scheme == "rediss", username: user, password: password))
    }

    /// The URL without its password, for logs and `check-config`.
    public var redacted: String {
        let credentials = password == nil ? (username.map { "\($0)@" } ?? "") : "\(username ?? ""):<redacted>@"
        let hostPart = host.contains(":") ? "[\(host)]" : host
        return "\(tls ? "rediss" : "redis")://\(credentials)\(hostPart):\(port)/\(database)"
    }
}

public struct StoreURLProblem: Error, Sendable, Equatable {
    public let reason: String
    init(_ reason: String) { self.reason = reason }
}
