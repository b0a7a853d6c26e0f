import AsyncHTTPClient
import AuthzSidecar
import Introspection
import JOSE
import JWTValidation
import Logging

/// The HTTP clients of the issuers of `issuers:`, by name: each issuer's introspection client and
/// key set client, with the backends built on them. The reloader owns them and shuts down the
/// ones a reload replaced.
struct IssuerConnections {
    struct Entry {
        var configuration: IssuerConfiguration
        var backends: IssuerBackends
        var clients: [HTTPClient]
    }

    private(set) var entries: [String: Entry] = [:]

    /// Connections for every issuer of `issuers:`.
    static func make(for issuers: [IssuerConfiguration], logger: Logger) throws -> IssuerConnections {
        var connections = IssuerConnections()
        for issuer in issuers {
            connections.entries[issuer.name] = try makeEntry(issuer, logger: logger)
        }
        return connections
    }

    var backends: [String: IssuerBackends] { entries.mapValues(\.backends) }

    var allClients: [HTTPClient] { entries.values.flatMap(\.clients) }

    /// The connections for `issuers`: unchanged issuers keep theirs. Returns the backends that are
    /// new (for `Sidecar.reload`) and the clients no longer used.
    mutating func update(to issuers: [IssuerConfiguration], logger: Logger) throws -> (changed: [String: IssuerBackends], retired: [HTTPClient]) {
        var next: [String: Entry] = [:]
        var changed: [String: IssuerBackends] = [:]
        var made: [HTTPClient] = []
        do {
            for issuer in issuers {
                if let existing = entries[issuer.name], existing.configuration == issuer {
                    next[issuer.name] = existing
                } else {
                    let entry = try Self.makeEntry(issuer, logger: logger)
                    made += entry.clients
                    next[issuer.name] = entry
                    changed[issuer.name] = entry.backends
                }
            }
        } catch {
            for client in made { shutdownSoon(client) }
            throw error
        }
        let kept = Set(next.values.flatMap(\.clients).map(ObjectIdentifier.init))
        let retired = entries.values.flatMap(\.clients).filter { !kept.contains(ObjectIdentifier($0)) }
        entries = next
        return (changed, retired)
    }

    private static func makeEntry(_ issuer: IssuerConfiguration, logger: Logger) throws -> Entry {
        var logger = logger
        logger[metadataKey: "authz.issuer"] = "\(issuer.name)"
        var backends = IssuerBackends()
        var clients: [HTTPClient] = []
        if issuer.validation.introspects, let introspection = issuer.introspection {
            let client = try HTTPTokenIntrospector.makeHTTPClient(for: introspection)
            clients.append(client)
            backends.introspector = HTTPTokenIntrospector(configuration: introspection, client: client, logger: logger)
        }
        if issuer.needsKeys {
            let client = try HTTPKeySetFetcher.makeHTTPClient(for: issuer)
            clients.append(client)
            let fetcher = HTTPKeySetFetcher(configuration: issuer, client: client, logger: logger)
            backends.keys = { () async throws(IntrospectionError) -> JOSE.JSONWebKeySet in try await fetcher.fetch() }
        }
        return Entry(configuration: issuer, backends: backends, clients: clients)
    }
}

/// Shuts a client down without waiting for it (used when setting up a reload fails half-way).
private func shutdownSoon(_ client: HTTPClient) {
    client.shutdown { _ in }
}
