import AsyncHTTPClient
import Introspection
import JOSE
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// Fetches an issuer's key set over AsyncHTTPClient (DESIGN.md §9): from `jwks_uri`, or from the
/// `jwks_uri` its discovery document names (OpenID Connect Discovery, else RFC 8414). Every fetch
/// has the issuer's deadline and body bound; any failure is an `IntrospectionError`. A discovered
/// `jwks_uri` is remembered until a key set fetch from it fails.
public final class HTTPKeySetFetcher: Sendable {
    private let configuration: IssuerConfiguration
    private let client: HTTPClient
    private let logger: Logger
    private let discovered = NIOLockedValueBox<String?>(nil)

    public init(configuration: IssuerConfiguration, client: HTTPClient, logger: Logger = Logger(label: "authz.jwks")) {
        self.configuration = configuration
        self.client = client
        self.logger = logger
    }

    /// An HTTP client with the issuer's TLS rules (the same as for introspection: `ca_file`,
    /// `verify_tls`), its deadline, no redirects.
    public static func makeHTTPClient(for configuration: IssuerConfiguration) throws -> HTTPClient {
        try HTTPTokenIntrospector.makeHTTPClient(for: IntrospectionConfiguration(
            endpoint: configuration.jwksURI ?? configuration.issuer ?? "",
            caFile: configuration.caFile,
            verifyTLS: configuration.verifyTLS,
            insecure: configuration.insecure,
            timeoutMilliseconds: configuration.timeoutMilliseconds,
            maxConnections: 2
        ))
    }

    public func fetch() async throws(IntrospectionError) -> JSONWebKeySet {
        let uri = try await jwksURI()
        do throws(IntrospectionError) {
            let body = try await get(uri)
            do {
                return try JSONWebKeySet(document: body.readableBytesView)
            } catch {
                throw IntrospectionError.keysUnavailable("\(uri): \(error.description)")
            }
        } catch {
            discovered.withLockedValue { $0 = nil }
            if case .keysUnavailable = error { throw error }
            throw .keysUnavailable("\(uri): \(error.description)")
        }
    }

    private func jwksURI() async throws(IntrospectionError) -> String {
        if let configured = configuration.jwksURI { return configured }
        if let known = discovered.withLockedValue({ $0 }) { return known }
        var problems: [String] = []
        for url in configuration.discoveryURLs {
            do throws(IntrospectionError) {
                let body = try await get(url)
                guard case .object(let document)? = try? JSONParser.parse(body.readableBytesView) else {
                    problems.append("\(url): not a JSON object")
                    continue
                }
                if let issuer = configuration.issuer, document["issuer"]?.stringValue != issuer {
                    // OpenID Connect Discovery §4.3, RFC 8414 §3.3: the document must name the issuer.
                    problems.append("\(url): its \"issuer\" is not \(issuer)")
                    continue
                }
                guard case .string(let uri)? = document["jwks_uri"] else {
                    problems.append("\(url): no \"jwks_uri\"")
                    continue
                }
                // The same rule as for a configured URL: https, or plain http to loopback only
                // (unless `insecure`), so that no one on the network path can hand us keys.
                guard uri.hasPrefix("https://") || (uri.hasPrefix("http://") && (configuration.insecure || Self.isLoopbackURL(uri))) else {
                    problems.append("\(url): its jwks_uri is not https (plain http only to loopback, or with insecure: true)")
                    continue
                }
                discovered.withLockedValue { $0 = uri }
                return uri
            } catch {
                problems.append("\(url): \(error.description)")
            }
        }
        throw .keysUnavailable("discovery failed: " + problems.joined(separator: "; "))
    }

    /// Whether an `http://` URL names a loopback host (127.0.0.0/8, ::1, localhost).
    static func isLoopbackURL(_ url: String) -> Bool {
        guard url.hasPrefix("http://") else { return false }
        var rest = url.dropFirst("http://".count)
        if let end = rest.firstIndex(where: { $0 == "/" || $0 == "?" || $0 == "#" }) { rest = rest[..<end] }
        if let at = rest.lastIndex(of: "@") { rest = rest[rest.index(after: at)...] }
        let host: Substring
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { return false }
            host = rest[rest.index(after: rest.startIndex)..<close]
        } else {
            host = rest.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        }
        if host.lowercased() == "localhost" || host == "::1" { return true }
        let octets = host.split(separator: ".", omittingEmptySubsequences: false)
        return octets.count == 4 && octets[0] == "127" && octets.allSatisfy { UInt8($0) != nil }
    }

    private func get(_ url: String) async throws(IntrospectionError) -> ByteBuffer {
        let request: HTTPClient.Request
        do {
            request = try HTTPClient.Request(url: url, method: .GET, headers: ["Accept": "application/json"])
        } catch {
            throw .transport("\(url) is not a URL AsyncHTTPClient accepts")
        }
        do {
            let collector = BoundedResponse(maxBytes: configuration.maxJWKSBytes)
            let response = try await client.execute(
                request: request, delegate: collector,
                deadline: .now() + .milliseconds(Int64(configuration.timeoutMilliseconds)), logger: logger
            ).futureResult.get()
            guard response.status == .ok else { throw IntrospectionError.status(Int(response.status.code)) }
            return response.body
        } catch let error as IntrospectionError {
            throw error
        } catch {
            throw HTTPTokenIntrospector.fault(from: error)
        }
    }
}
