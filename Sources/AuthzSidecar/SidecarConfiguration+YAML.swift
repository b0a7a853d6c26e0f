import Foundation
import Introspection
import Yams

extension SidecarConfiguration {
    /// The environment variable that may hold the introspection client secret (DESIGN.md §2).
    public static let clientSecretEnvironmentVariable = "AUTHZ_INTROSPECTION_CLIENT_SECRET"

    /// Reads and validates a configuration file; every problem is reported, each naming its key.
    public static func load(path: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> SidecarConfiguration {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ConfigurationError(problems: ["\(path): cannot read the configuration file"])
        }
        return try parse(yaml: text, environment: environment)
    }

    /// Reads and validates configuration text (see `load(path:environment:)`).
    public static func parse(yaml: String, environment: [String: String] = [:]) throws -> SidecarConfiguration {
        let problems = ConfigProblems()
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch {
            throw ConfigurationError(problems: [syntaxProblem(error)])
        }
        guard let root, let top = MappingReader.make(root, path: "", problems: problems) else {
            throw ConfigurationError(problems: problems.messages.isEmpty ? ["the configuration is empty"] : problems.messages)
        }
        let server = readServer(top.mapping("server"), problems: problems)
        let introspection = readIntrospection(top.mapping("introspection"), environment: environment, problems: problems)
        let cache = readCache(top.mapping("cache"))
        let policies = readPolicies(top.node("policies"), problems: problems)
        let logging = readLogging(top.mapping("logging"))
        top.reportUnknownKeys()
        guard problems.messages.isEmpty, let introspection else {
            throw ConfigurationError(problems: problems.messages)
        }
        return SidecarConfiguration(server: server, introspection: introspection, cache: cache, policies: policies, logging: logging)
    }

    /// A YAML syntax error as position and libyaml's own words, never the source line: Yams's
    /// description quotes the line, and the line may hold the client secret (DESIGN.md §8).
    static func syntaxProblem(_ error: any Error) -> String {
        func at(_ mark: Mark) -> String { "line \(mark.line), column \(mark.column)" }
        func context(_ context: YamlError.Context?) -> String {
            context.map { "\($0.text) (from \(at($0.mark))): " } ?? ""
        }
        guard let error = error as? YamlError else { return "YAML syntax error" }
        switch error {
        case .scanner(let ctx, let problem, let mark, _), .parser(let ctx, let problem, let mark, _), .composer(let ctx, let problem, let mark, _):
            return "YAML syntax error at \(at(mark)): \(context(ctx))\(problem)"
        case .reader(let problem, let offset, _, _):
            return "YAML cannot be read at byte \(offset.map(String.init) ?? "?"): \(problem)"
        case .duplicatedKeysInMapping(let duplicates, let ctx):
            let names = duplicates.filter(MappingReader.nameable).sorted()
            return "YAML duplicate key\(names.isEmpty ? "" : " " + names.joined(separator: ", ")) in the mapping at \(at(ctx.mark))"
        default:
            return "YAML syntax error"
        }
    }

    private static func listenAddress(_ reader: MappingReader, _ name: String) -> ListenAddress? {
        guard let text = reader.string(name) else { return nil }
        guard let address = ListenAddress(text) else {
            reader.problems.add(reader.key(name), "must be host:port or unix:/absolute/path")
            return nil
        }
        return address
    }

    private static func readServer(_ reader: MappingReader?, problems: ConfigProblems) -> ServerConfiguration {
        var server = ServerConfiguration()
        guard let reader else { return server }
        if let listen = listenAddress(reader, "listen") { server.listen = listen }
        server.adminListen = listenAddress(reader, "admin_listen")
        server.grpcListen = listenAddress(reader, "grpc_listen")
        server.trustPolicyHeader = reader.bool("trust_policy_header", default: false)
        // Up to 1 MiB: the listener raises SwiftNIO's own 80 KiB parser limit to match.
        server.maxHeaderBytes = reader.int("max_header_bytes", default: 16384, range: 1024...1_048_576)
        server.idleTimeoutSeconds = reader.int("idle_timeout_seconds", default: 75, range: 1...3600)
        if let file = reader.string("admin_token_file") {
            server.adminTokenFile = file
            if let text = try? String(contentsOfFile: file, encoding: .utf8) {
                let token = text.trimmingCharacters(in: .whitespacesAndNewlines)
                if token.utf8.count < 16 || token.utf8.contains(where: { $0 < 0x21 || $0 > 0x7E }) {
                    problems.add(reader.key("admin_token_file"), "the token must be at least 16 printable ASCII characters without spaces")
                } else {
                    server.adminToken = Secret(token)
                }
            } else {
                problems.add(reader.key("admin_token_file"), "cannot read the file it names")
            }
        }
        reader.reportUnknownKeys()
        return server
    }

    private static func readIntrospection(_ reader: MappingReader?, environment: [String: String], problems: ConfigProblems) -> IntrospectionConfiguration? {
        guard let reader else {
            problems.add("introspection", "is required")
            return nil
        }
        var configuration = IntrospectionConfiguration(endpoint: "")
        configuration.clientID = reader.string("client_id")
        configuration.authMethod = reader.choice("auth_method", default: .clientSecretBasic)
        configuration.clientCertificateFile = reader.string("client_certificate_file")
        configuration.clientKeyFile = reader.string("client_key_file")
        configuration.caFile = reader.string("ca_file")
        configuration.verifyTLS = reader.bool("verify_tls", default: true)
        configuration.insecure = reader.bool("insecure", default: false)
        configuration.timeoutMilliseconds = reader.int("timeout_ms", default: 1500, range: 1...60_000)
        configuration.maxConnections = reader.int("max_connections", default: 64, range: 1...4096)
        configuration.maxResponseBytes = reader.int("max_response_bytes", default: 65536, range: 1024...16_777_216)
        configuration.expectedIssuer = reader.string("expected_issuer")

        // The secret: inline, from a file, or from the environment (in that order).
        let inline = reader.string("client_secret")
        let file = reader.string("client_secret_file")
        if inline != nil, file != nil {
            problems.add(reader.key("client_secret_file"), "set either client_secret or client_secret_file, not both")
        }
        if let inline {
            configuration.clientSecret = Secret(inline)
        } else if let file {
            if let text = try? String(contentsOfFile: file, encoding: .utf8) {
                configuration.clientSecret = Secret(text.trimmingCharacters(in: .whitespacesAndNewlines))
            } else {
                problems.add(reader.key("client_secret_file"), "cannot read the file it names")
            }
        } else if let fromEnvironment = environment[clientSecretEnvironmentVariable], !fromEnvironment.isEmpty {
            configuration.clientSecret = Secret(fromEnvironment)
        }

        if let endpoint = reader.string("endpoint") {
            configuration.endpoint = endpoint
            validateEndpoint(endpoint, configuration: configuration, key: reader.key("endpoint"), problems: problems)
        } else {
            problems.add(reader.key("endpoint"), "is required")
        }
        if !configuration.verifyTLS, !configuration.insecure {
            problems.add(reader.key("verify_tls"), "false requires insecure: true")
        }
        switch configuration.authMethod {
        case .clientSecretBasic, .clientSecretPost:
            if configuration.clientID?.isEmpty ?? true {
                problems.add(reader.key("client_id"), "is required for \(configuration.authMethod.rawValue)")
            }
            if configuration.clientSecret == nil {
                problems.add(reader.key("client_secret"), "is required for \(configuration.authMethod.rawValue) (or client_secret_file, or \(clientSecretEnvironmentVariable))")
            }
        case .tlsClientAuth:
            if configuration.clientCertificateFile == nil {
                problems.add(reader.key("client_certificate_file"), "is required for tls_client_auth")
            }
            if configuration.clientKeyFile == nil {
                problems.add(reader.key("client_key_file"), "is required for tls_client_auth")
            }
        case .none:
            break
        }
        for (name, file) in [("client_certificate_file", configuration.clientCertificateFile), ("client_key_file", configuration.clientKeyFile), ("ca_file", configuration.caFile)] {
            if let file, !FileManager.default.isReadableFile(atPath: file) {
                problems.add(reader.key(name), "cannot read the file it names")
            }
        }
        reader.reportUnknownKeys()
        return configuration
    }

    /// An absolute http(s) URL; plain http only to a loopback host unless `insecure`.
    private static func validateEndpoint(_ endpoint: String, configuration: IntrospectionConfiguration, key: String, problems: ConfigProblems) {
        guard let components = URLComponents(string: endpoint), let scheme = components.scheme?.lowercased(),
            let host = components.host, !host.isEmpty
        else {
            problems.add(key, "must be an absolute http(s) URL")
            return
        }
        switch scheme {
        case "https":
            break
        case "http":
            if !Loopback.isLoopback(host: host), !configuration.insecure {
                problems.add(key, "plain http to a non-loopback host requires insecure: true")
            }
        default:
            problems.add(key, "must use https (or http to loopback), not \(scheme)")
        }
    }

    private static func readCache(_ reader: MappingReader?) -> CacheConfiguration {
        var cache = CacheConfiguration()
        guard let reader else { return cache }
        cache.ttlSeconds = reader.number("ttl_seconds", default: 30, range: 0...86_400)
        cache.negativeTTLSeconds = reader.number("negative_ttl_seconds", default: 5, range: 0...3_600)
        cache.maxEntries = reader.int("max_entries", default: 100_000, range: 1...50_000_000)
        cache.staleIfErrorSeconds = reader.number("stale_if_error_seconds", default: 0, range: 0...86_400)
        if reader.node("max_negative_entries") != nil {
            cache.maxNegativeEntries = reader.int("max_negative_entries", default: cache.effectiveMaxNegativeEntries, range: 1...50_000_000)
        }
        reader.reportUnknownKeys()
        return cache
    }

    private static func readLogging(_ reader: MappingReader?) -> LoggingConfiguration {
        var logging = LoggingConfiguration()
        guard let reader else { return logging }
        let level = reader.string("level", default: "info")
        let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
        if levels.contains(level) {
            logging.level = level
        } else {
            reader.problems.add(reader.key("level"), "must be one of \(levels.joined(separator: " | "))")
        }
        logging.format = reader.choice("format", default: .text)
        reader.reportUnknownKeys()
        return logging
    }

    private static func readPolicies(_ node: Node?, problems: ConfigProblems) -> [PolicyConfiguration] {
        guard let node else {
            problems.add("policies", "at least one policy is required")
            return []
        }
        guard let sequence = node.sequence else {
            problems.add("policies", "must be a list")
            return []
        }
        var policies: [PolicyConfiguration] = []
        for (i, item) in sequence.enumerated() {
            guard let reader = MappingReader.make(item, path: "policies[\(i)]", problems: problems) else {
                problems.add("policies[\(i)]", "must be a mapping")
                continue
            }
            if let policy = readPolicy(reader) {
                if let earlier = policies.firstIndex(where: { $0.name == policy.name }) {
                    problems.add(reader.key("name"), "is the name of policies[\(earlier)] too")
                }
                policies.append(policy)
            }
        }
        if policies.isEmpty, sequence.isEmpty {
            problems.add("policies", "at least one policy is required")
        }
        return policies
    }

    private static func readPolicy(_ reader: MappingReader) -> PolicyConfiguration? {
        guard let name = reader.string("name"), !name.isEmpty else {
            reader.problems.add(reader.key("name"), "is required")
            reader.reportUnknownKeys()
            return nil
        }
        var policy = PolicyConfiguration(name: name)
        if let match = reader.mapping("match") {
            let prefix = match.string("path_prefix", default: "/")
            if !prefix.hasPrefix("/") {
                match.problems.add(match.key("path_prefix"), "must start with /")
            }
            policy.pathPrefix = prefix
            policy.hosts = match.stringList("hosts").map(HostName.entry)
            policy.methods = match.stringList("methods").map { $0.uppercased() }
            match.reportUnknownKeys()
        }
        policy.requiredScopes = reader.stringList("required_scopes")
        for (i, scope) in policy.requiredScopes.enumerated() where scope.isEmpty || scope.contains(" ") {
            reader.problems.add("\(reader.key("required_scopes"))[\(i)]", "a scope is one non-empty word")
        }
        policy.scopeMatch = reader.choice("scope_match", default: .all)
        policy.audiences = reader.stringList("audiences")
        if let header = reader.string("certificate_header") {
            if HeaderName.isValid(header) {
                policy.certificateHeader = header
            } else {
                reader.problems.add(reader.key("certificate_header"), "is not a valid header name (letters, digits, - _ . only)")
            }
        }
        policy.certificateFormat = reader.choice("certificate_format", default: .auto)
        policy.xfccElement = reader.choice("xfcc_element", default: .only)
        policy.requireBoundToken = reader.bool("require_bound_token", default: false)
        policy.allowAnonymous = reader.bool("allow_anonymous", default: false)
        policy.forwardClaims = reader.stringList("forward_claims")
        var headerOwners: [String: Int] = [:]
        for (i, claim) in policy.forwardClaims.enumerated() {
            guard HeaderName.isValid(claim) else {
                reader.problems.add("\(reader.key("forward_claims"))[\(i)]", "cannot become a header name (letters, digits, - _ . only)")
                continue
            }
            // tenant_id and tenant-id both become X-Credential-Tenant-Id: which would the upstream see?
            let header = HeaderName.credential(forClaim: claim).lowercased()
            if let earlier = headerOwners[header] {
                // Named by index: a value is never echoed (it may be a secret in the wrong place).
                reader.problems.add(
                    "\(reader.key("forward_claims"))[\(i)]",
                    "becomes the same X-Credential-* header as \(reader.key("forward_claims"))[\(earlier)] (_ . and - all become -)"
                )
            } else {
                headerOwners[header] = i
            }
        }
        policy.hideCredentials = reader.bool("hide_credentials", default: false)
        policy.clockSkewSeconds = Int64(reader.int("clock_skew_seconds", default: 0, range: 0...3_600))
        policy.proxyCacheSeconds = Int64(reader.int("proxy_cache_seconds", default: 0, range: 0...3_600))
        reader.reportUnknownKeys()
        return policy
    }
}
