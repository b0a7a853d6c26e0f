import Foundation
import Introspection
import SharedCache
import JOSE
import JWTValidation
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
        let issuersNode = top.node("issuers")
        let introspectionReader = top.mapping("introspection")
        if introspectionReader == nil, issuersNode == nil {
            problems.add("introspection", "is required (or issuers:)")
        }
        let introspection = introspectionReader.map { readIntrospection($0, environment: environment, problems: problems) }
        if let introspection, introspection.responseFormat == .jwt, introspection.expectedIssuer == nil {
            problems.add("introspection.expected_issuer", "is required for response_format: jwt (the signed answers' iss, and where the keys are discovered)")
        }
        let issuers = readIssuers(issuersNode, reserveDefault: introspection != nil, problems: problems)
        let (cache, sharedCache) = readCache(top.mapping("cache"), environment: environment, problems: problems)
        let policies = readPolicies(top.node("policies"), problems: problems)
        let logging = readLogging(top.mapping("logging"))
        let tracing = readTracing(top.mapping("tracing"), problems: problems)
        top.reportUnknownKeys()
        var configuration = SidecarConfiguration(server: server, introspection: introspection, issuers: issuers, cache: cache, policies: policies, logging: logging)
        configuration.sharedCache = sharedCache
        configuration.tracing = tracing
        validateRouting(configuration, problems: problems)
        guard problems.messages.isEmpty else {
            throw ConfigurationError(problems: problems.messages)
        }
        return configuration
    }

    /// DESIGN.md §9: every issuer a policy names exists, and a policy never leaves a token two
    /// places to go: at most one introspection issuer, and one JWT issuer per `iss`.
    private static func validateRouting(_ configuration: SidecarConfiguration, problems: ConfigProblems) {
        let all = configuration.allIssuers
        if all.isEmpty, !configuration.issuers.isEmpty || configuration.introspection != nil { return }
        for (i, policy) in configuration.policies.enumerated() {
            let key = "policies[\(i)].issuers"
            var accepted: [IssuerConfiguration] = []
            for (j, name) in policy.issuers.enumerated() {
                if let issuer = all.first(where: { $0.name == name }) {
                    accepted.append(issuer)
                } else {
                    problems.add("\(key)[\(j)]", "names no issuer (known: \(all.map(\.name).joined(separator: ", ")))")
                }
            }
            if policy.issuers.isEmpty { accepted = all }
            let introspecting = accepted.filter { $0.validation == .introspection }
            if introspecting.count > 1 {
                problems.add(policy.issuers.isEmpty ? "policies[\(i)]" : key, "accepts the introspection issuers \(introspecting.map(\.name).joined(separator: " and ")): a token without a JWT issuer would have two places to go; name one in issuers:")
            }
            var seen: [String: String] = [:]
            for issuer in accepted where issuer.validation.verifiesJWT {
                guard let iss = issuer.issuer else { continue }
                if let earlier = seen[iss] {
                    problems.add(policy.issuers.isEmpty ? "policies[\(i)]" : key, "accepts the JWT issuers \(earlier) and \(issuer.name) with the same issuer URL")
                }
                seen[iss] = issuer.name
            }
        }
    }

    private static func readIssuers(_ node: Node?, reserveDefault: Bool, problems: ConfigProblems) -> [IssuerConfiguration] {
        guard let node else { return [] }
        guard let sequence = node.sequence else {
            problems.add("issuers", "must be a list")
            return []
        }
        var issuers: [IssuerConfiguration] = []
        for (i, item) in sequence.enumerated() {
            guard let reader = MappingReader.make(item, path: "issuers[\(i)]", problems: problems) else {
                problems.add("issuers[\(i)]", "must be a mapping")
                continue
            }
            guard let issuer = readIssuer(reader) else { continue }
            if reserveDefault, issuer.name == "default" {
                problems.add(reader.key("name"), "default is the top-level introspection block's name")
            } else if let earlier = issuers.firstIndex(where: { $0.name == issuer.name }) {
                problems.add(reader.key("name"), "is the name of issuers[\(earlier)] too")
            }
            issuers.append(issuer)
        }
        if sequence.isEmpty { problems.add("issuers", "must name at least one issuer (or be left out)") }
        return issuers
    }

    private static func readIssuer(_ reader: MappingReader) -> IssuerConfiguration? {
        guard let name = reader.string("name"), name.utf8.count <= 64, HeaderName.isValid(name) else {
            reader.problems.add(reader.key("name"), "is required: letters, digits, - _ . (at most 64)")
            reader.reportUnknownKeys()
            return nil
        }
        var issuer = IssuerConfiguration(name: name, issuer: reader.string("issuer"), validation: reader.choice("validation", default: .jwt))
        issuer.audiences = reader.stringList("audiences")
        issuer.allowAnyAudience = reader.bool("allow_any_audience", default: false)
        issuer.jwksURI = reader.string("jwks_uri")
        issuer.caFile = reader.string("ca_file")
        issuer.verifyTLS = reader.bool("verify_tls", default: true)
        issuer.insecure = reader.bool("insecure", default: false)
        issuer.timeoutMilliseconds = reader.int("timeout_ms", default: 1500, range: 1...60_000)
        issuer.maxJWKSBytes = reader.int("max_jwks_bytes", default: 1 << 20, range: 1024...16_777_216)
        if reader.node("algorithms") != nil {
            var algorithms: [JWSAlgorithm] = []
            for (i, name) in reader.stringList("algorithms").enumerated() {
                if let algorithm = JWSAlgorithm(rawValue: name) {
                    algorithms.append(algorithm)
                } else if JWSAlgorithm.isForbidden(name) {
                    reader.problems.add("\(reader.key("algorithms"))[\(i)]", "none and HS* are never accepted: a JWT access token is verified with the issuer's public key")
                } else {
                    reader.problems.add("\(reader.key("algorithms"))[\(i)]", "must be one of \(JWSAlgorithm.allCases.map(\.rawValue).joined(separator: " | "))")
                }
            }
            if algorithms.isEmpty { reader.problems.add(reader.key("algorithms"), "must name at least one algorithm") }
            issuer.algorithms = algorithms
        }
        if reader.node("token_types") != nil { issuer.tokenTypes = reader.stringList("token_types") }
        issuer.jwksCacheSeconds = reader.number("jwks_cache_seconds", default: 300, range: 1...86_400)
        issuer.jwksMinRefetchSeconds = reader.number("jwks_min_refetch_seconds", default: 30, range: 0...3_600)
        if let nested = reader.mapping("introspection") {
            issuer.introspection = readIntrospection(nested, environment: [:], problems: reader.problems)
        }
        if issuer.introspection?.responseFormat == .jwt, issuer.issuer == nil {
            reader.problems.add(reader.key("issuer"), "is required for introspection.response_format: jwt (the signed answers' iss)")
        }
        if issuer.validation.introspects, issuer.introspection == nil {
            reader.problems.add(reader.key("introspection"), "is required for validation: \(issuer.validation.rawValue)")
        }
        if issuer.validation.verifiesJWT {
            if let url = issuer.issuer {
                validateURL(url, insecure: issuer.insecure, key: reader.key("issuer"), problems: reader.problems)
            } else {
                reader.problems.add(reader.key("issuer"), "is required for validation: \(issuer.validation.rawValue) (the exact iss of its tokens)")
            }
            if issuer.audiences.isEmpty, !issuer.allowAnyAudience {
                reader.problems.add(reader.key("audiences"), "is required for JWT validation (RFC 9068 §4), or allow_any_audience: true")
            }
            if let jwksURI = issuer.jwksURI {
                validateURL(jwksURI, insecure: issuer.insecure, key: reader.key("jwks_uri"), problems: reader.problems)
            }
        }
        if !issuer.verifyTLS, !issuer.insecure {
            reader.problems.add(reader.key("verify_tls"), "false requires insecure: true")
        }
        if let file = issuer.caFile, !FileManager.default.isReadableFile(atPath: file) {
            reader.problems.add(reader.key("ca_file"), "cannot read the file it names")
        }
        reader.reportUnknownKeys()
        return issuer
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
        server.trustDebugHeader = reader.bool("trust_debug_header", default: false)
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
        if reader.node("dpop_algorithms") != nil {
            var algorithms: [JWSAlgorithm] = []
            for (i, name) in reader.stringList("dpop_algorithms").enumerated() {
                if let algorithm = JWSAlgorithm(rawValue: name) {
                    algorithms.append(algorithm)
                } else {
                    problems.add("\(reader.key("dpop_algorithms"))[\(i)]", JWSAlgorithm.isForbidden(name) ? "none and HS* are never accepted" : "must be one of \(JWSAlgorithm.allCases.map(\.rawValue).joined(separator: " | "))")
                }
            }
            if algorithms.isEmpty { problems.add(reader.key("dpop_algorithms"), "must name at least one algorithm") }
            server.dpopAlgorithms = algorithms
        }
        server.dpopReplayEntries = reader.int("dpop_replay_entries", default: 100_000, range: 1...50_000_000)
        server.dpopNonceSeconds = reader.int("dpop_nonce_seconds", default: 60, range: 1...86_400)
        if let file = reader.string("dpop_nonce_key_file") {
            server.dpopNonceKeyFile = file
            if let data = FileManager.default.contents(atPath: file) {
                let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                if text.utf8.count < 32 {
                    problems.add(reader.key("dpop_nonce_key_file"), "the key must be at least 32 bytes")
                } else {
                    server.dpopNonceKey = Secret(text)
                }
            } else {
                problems.add(reader.key("dpop_nonce_key_file"), "cannot read the file it names")
            }
        }
        reader.reportUnknownKeys()
        return server
    }

    private static func readIntrospection(_ reader: MappingReader, environment: [String: String], problems: ConfigProblems) -> IntrospectionConfiguration {
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
        configuration.responseFormat = reader.choice("response_format", default: .json)

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
            validateURL(endpoint, insecure: configuration.insecure, key: reader.key("endpoint"), problems: problems)
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
    private static func validateURL(_ endpoint: String, insecure: Bool, key: String, problems: ConfigProblems) {
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
            if !Loopback.isLoopback(host: host), !insecure {
                problems.add(key, "plain http to a non-loopback host requires insecure: true")
            }
        default:
            problems.add(key, "must use https (or http to loopback), not \(scheme)")
        }
    }

    /// The environment variable that may hold the shared store's password.
    public static let sharedCachePasswordEnvironmentVariable = "AUTHZ_CACHE_SHARED_PASSWORD"

    private static func readCache(_ reader: MappingReader?, environment: [String: String], problems: ConfigProblems) -> (CacheConfiguration, SharedCacheConfiguration?) {
        var cache = CacheConfiguration()
        guard let reader else { return (cache, nil) }
        let shared = reader.mapping("shared").flatMap { readSharedCache($0, environment: environment, problems: problems) }
        cache.ttlSeconds = reader.number("ttl_seconds", default: 30, range: 0...86_400)
        cache.negativeTTLSeconds = reader.number("negative_ttl_seconds", default: 5, range: 0...3_600)
        cache.maxEntries = reader.int("max_entries", default: 100_000, range: 1...50_000_000)
        cache.staleIfErrorSeconds = reader.number("stale_if_error_seconds", default: 0, range: 0...86_400)
        if reader.node("max_negative_entries") != nil {
            cache.maxNegativeEntries = reader.int("max_negative_entries", default: cache.effectiveMaxNegativeEntries, range: 1...50_000_000)
        }
        reader.reportUnknownKeys()
        return (cache, shared)
    }

    /// `cache.shared` (DESIGN.md §11); nil when `url` is null or absent (off).
    private static func readSharedCache(_ reader: MappingReader, environment: [String: String], problems: ConfigProblems) -> SharedCacheConfiguration? {
        let url = reader.string("url")
        let passwordFile = reader.string("password_file")
        let caFile = reader.string("ca_file")
        let verifyTLS = reader.bool("verify_tls", default: true)
        let insecure = reader.bool("insecure", default: false)
        let keyPrefix = reader.string("key_prefix", default: "authz:")
        let timeout = reader.int("timeout_ms", default: 50, range: 1...10_000)
        let sealKeyFile = reader.string("seal_key_file")
        let degraded = reader.number("degraded_ttl_seconds", default: 5, range: 0...3_600)
        reader.reportUnknownKeys()
        guard let url else { return nil }
        var endpoint: StoreEndpoint
        switch StoreEndpoint.parse(url) {
        case .success(let parsed): endpoint = parsed
        case .failure(let problem):
            problems.add(reader.key("url"), problem.reason)
            return nil
        }
        if keyPrefix.isEmpty || keyPrefix.utf8.count > 64 || keyPrefix.contains(where: { $0.isWhitespace }) {
            problems.add(reader.key("key_prefix"), "must be 1 to 64 characters without spaces")
        }
        if !verifyTLS, !insecure {
            problems.add(reader.key("verify_tls"), "false requires insecure: true")
        }
        if !endpoint.tls, !Loopback.isLoopback(host: endpoint.host), !insecure {
            problems.add(reader.key("url"), "plain redis:// to a non-loopback host requires insecure: true (use rediss://)")
        }
        if let passwordFile {
            if endpoint.password != nil {
                problems.add(reader.key("password_file"), "the url already holds a password: set one or the other")
            } else if let text = try? String(contentsOfFile: passwordFile, encoding: .utf8) {
                endpoint.password = Secret(text.trimmingCharacters(in: .newlines))
            } else {
                problems.add(reader.key("password_file"), "cannot read the file it names")
            }
        } else if endpoint.password == nil, let fromEnvironment = environment[sharedCachePasswordEnvironmentVariable], !fromEnvironment.isEmpty {
            endpoint.password = Secret(fromEnvironment)
        }
        guard let sealKeyFile else {
            problems.add(reader.key("seal_key_file"), "is required with url: 32 bytes (raw, 64 hex digits or base64), e.g. head -c 32 /dev/urandom | base64 > seal.key")
            return nil
        }
        guard let contents = FileManager.default.contents(atPath: sealKeyFile) else {
            problems.add(reader.key("seal_key_file"), "cannot read the file it names")
            return nil
        }
        guard let sealKey = SealKey.parse(Array(contents)) else {
            problems.add(reader.key("seal_key_file"), "must hold 32 bytes: raw, as 64 hex digits, or as base64")
            return nil
        }
        return SharedCacheConfiguration(
            endpoint: endpoint, sealKey: sealKey, sealKeyFile: sealKeyFile, passwordFile: passwordFile, caFile: caFile,
            verifyTLS: verifyTLS, insecure: insecure, keyPrefix: keyPrefix, timeoutMilliseconds: timeout, degradedTTLSeconds: degraded
        )
    }

    /// `tracing` (DESIGN.md §12).
    private static func readTracing(_ reader: MappingReader?, problems: ConfigProblems) -> TracingConfiguration {
        var tracing = TracingConfiguration()
        guard let reader else { return tracing }
        tracing.otlpEndpoint = reader.string("otlp_endpoint")
        tracing.samplingRatio = reader.number("sampling_ratio", default: 1.0, range: 0...1)
        tracing.serviceName = reader.string("service_name", default: "authz-sidecar")
        if let attributes = reader.mapping("resource_attributes") {
            for name in attributes.keys {
                if let value = attributes.string(name) { tracing.resourceAttributes[name] = value }
            }
            attributes.reportUnknownKeys()
        }
        reader.reportUnknownKeys()
        if let endpoint = tracing.otlpEndpoint {
            if let components = URLComponents(string: endpoint), let scheme = components.scheme?.lowercased(), scheme == "http" || scheme == "https",
                let host = components.host, !host.isEmpty
            {
                if components.path.hasSuffix("/v1/traces") {
                    problems.add(reader.key("otlp_endpoint"), "give the collector's base URL: /v1/traces is added")
                }
            } else {
                problems.add(reader.key("otlp_endpoint"), "must be an http(s) URL of an OTLP/HTTP collector, e.g. http://127.0.0.1:4318")
            }
        }
        if tracing.serviceName.isEmpty { problems.add(reader.key("service_name"), "must not be empty") }
        return tracing
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
        policy.debugLog = reader.bool("debug_log", default: false)
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
        policy.issuers = reader.stringList("issuers")
        policy.requiredClaims = readRequiredClaims(reader.mapping("required_claims"))
        policy.dpop = reader.choice("dpop", default: .allowed)
        policy.dpopMaxAgeSeconds = Int64(reader.int("dpop_max_age_seconds", default: 60, range: 1...3_600))
        policy.dpopIatLeewaySeconds = Int64(reader.int("dpop_iat_leeway_seconds", default: 5, range: 0...300))
        policy.dpopNonce = reader.bool("dpop_nonce", default: false)
        if let base = reader.string("public_base_url") {
            if let origin = DPoPURL.origin(base) {
                policy.publicBaseURL = origin
            } else {
                reader.problems.add(reader.key("public_base_url"), "must be scheme://host[:port] (http or https), with no path, query or fragment")
            }
        }
        reader.reportUnknownKeys()
        return policy
    }

    /// `required_claims: { name: value | [values] }`: plain scalars keep their YAML type (`1` is a
    /// number, `"1"` a string, `true` a boolean), so that they compare with JSON claims as such.
    private static func readRequiredClaims(_ reader: MappingReader?) -> [RequiredClaim] {
        guard let reader else { return [] }
        var claims: [RequiredClaim] = []
        for name in reader.keys {
            guard let node = reader.node(name) else {
                reader.problems.add(reader.key(name), "needs a value or a list of values")
                continue
            }
            let items = node.sequence.map(Array.init) ?? [node]
            var values: [JSONValue] = []
            for (i, item) in items.enumerated() {
                guard let value = jsonScalar(item) else {
                    reader.problems.add(node.sequence == nil ? reader.key(name) : "\(reader.key(name))[\(i)]", "must be a string, number or boolean")
                    continue
                }
                values.append(value)
            }
            if values.isEmpty, items.isEmpty { reader.problems.add(reader.key(name), "needs at least one value") }
            claims.append(RequiredClaim(name: name, values: values))
        }
        return claims
    }

    private static func jsonScalar(_ node: Node) -> JSONValue? {
        guard let scalar = node.scalar else { return nil }
        guard scalar.style == .plain else { return .string(scalar.string) }
        if let bool = node.bool { return .bool(bool) }
        if let int = node.int { return .integer(Int64(int)) }
        if let float = node.float, float.isFinite { return .number(float) }
        if node.null != nil { return nil }
        return .string(scalar.string)
    }
}
