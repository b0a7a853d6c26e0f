@testable import AuthzSidecar
import Introspection
import Testing

@Suite("Configuration: YAML per DESIGN.md §3, every problem named")
struct ConfigurationTests {
    static let minimal = """
        introspection:
          endpoint: https://idp.example/introspect
          client_id: introspection-client
          client_secret: s3cret
        policies:
          - name: token-mtls
            match: { path_prefix: /token-mtls/ }
            required_scopes: [system-access]
            certificate_header: X-Client-Cert
        """

    @Test("defaults fill in what the file leaves out")
    func defaults() throws {
        let configuration = try SidecarConfiguration.parse(yaml: Self.minimal)
        #expect(configuration.server.listen == .tcp(host: "127.0.0.1", port: 9191))
        #expect(configuration.server.adminListen == nil)
        #expect(configuration.server.maxHeaderBytes == 16384)
        #expect(configuration.introspection?.authMethod == .clientSecretBasic)
        #expect(configuration.introspection?.timeoutMilliseconds == 1500)
        #expect(configuration.introspection?.verifyTLS == true)
        #expect(configuration.cache == CacheConfiguration(ttlSeconds: 30, negativeTTLSeconds: 5, maxEntries: 100_000, staleIfErrorSeconds: 0))
        let policy = try #require(configuration.policies.first)
        #expect(policy.pathPrefix == "/token-mtls/")
        #expect(policy.requiredScopes == ["system-access"])
        #expect(policy.scopeMatch == .all)
        #expect(policy.certificateFormat == .auto)
        #expect(!policy.allowAnonymous)
    }

    @Test("the full DESIGN.md example parses")
    func designExample() throws {
        let yaml = """
            server:
              listen: 127.0.0.1:9191
              admin_listen: null
              grpc_listen: null
              trust_policy_header: false
              max_header_bytes: 16384
            introspection:
              endpoint: https://idp.example/realms/test/protocol/openid-connect/token/introspect
              client_id: introspection-client
              client_secret: secret
              auth_method: client_secret_basic
              client_certificate_file: null
              client_key_file: null
              ca_file: null
              verify_tls: true
              insecure: false
              timeout_ms: 1500
              max_connections: 64
              expected_issuer: null
            cache:
              ttl_seconds: 30
              negative_ttl_seconds: 5
              max_entries: 100000
              stale_if_error_seconds: 0
            policies:
              - name: token-mtls
                match: { path_prefix: /token-mtls/, hosts: [], methods: [] }
                required_scopes: [system-access]
                scope_match: all
                audiences: []
                certificate_header: X-Client-Cert
                certificate_format: auto
                require_bound_token: false
                allow_anonymous: false
                forward_claims: []
                hide_credentials: false
                clock_skew_seconds: 0
                proxy_cache_seconds: 0
            """
        let configuration = try SidecarConfiguration.parse(yaml: yaml)
        #expect(configuration.policies.count == 1)
        // check-config's output is itself a valid configuration that reads back the same
        let reread = try SidecarConfiguration.parse(yaml: configuration.effectiveYAML.replacingOccurrences(of: "\"<redacted>\"", with: "secret"))
        #expect(reread == configuration)
    }

    @Test("problems are all reported, each naming its key", arguments: [
        ("server: { listen: nowhere }\n" + minimal, "server.listen"),
        ("server: { colour: blue }\n" + minimal, "server.colour: unknown key"),
        ("server: { max_header_bytes: lots }\n" + minimal, "server.max_header_bytes: must be an integer"),
        ("server: { trust_policy_header: \"yes please\" }\n" + minimal, "server.trust_policy_header"),
        ("cache: { ttl_seconds: -1 }\n" + minimal, "cache.ttl_seconds"),
        ("cache: { max_entries: \"10\" }\n" + minimal, "cache.max_entries: must be an integer"),
        (minimal.replacingOccurrences(of: "https://idp.example/introspect", with: "not a url"), "introspection.endpoint"),
        (minimal.replacingOccurrences(of: "https://idp.example/introspect", with: "ftp://idp.example/x"), "introspection.endpoint"),
        (minimal.replacingOccurrences(of: "https://idp.example/introspect", with: "http://idp.example/x"), "introspection.endpoint: plain http to a non-loopback host requires insecure: true"),
        (minimal.replacingOccurrences(of: "  client_secret: s3cret\n", with: ""), "introspection.client_secret: is required"),
        (minimal.replacingOccurrences(of: "  client_secret: s3cret\n", with: "  client_secret: s3cret\n  verify_tls: false\n"), "introspection.verify_tls: false requires insecure: true"),
        (minimal.replacingOccurrences(of: "  client_secret: s3cret\n", with: "  client_secret: s3cret\n  ca_file: /nonexistent/ca.pem\n"), "introspection.ca_file: cannot read the file it names"),
        (minimal.replacingOccurrences(of: "  client_secret: s3cret\n", with: "  client_secret: s3cret\n  auth_method: magic\n"), "introspection.auth_method: must be one of"),
        (minimal.replacingOccurrences(of: "  client_secret: s3cret\n", with: "  client_secret: s3cret\n  auth_method: tls_client_auth\n"), "introspection.client_certificate_file: is required for tls_client_auth"),
        (minimal.replacingOccurrences(of: "  client_secret: s3cret\n", with: "  client_secret: s3cret\n  timeout_ms: 0\n"), "introspection.timeout_ms: must be between"),
        (minimal.replacingOccurrences(of: "/token-mtls/ }", with: "token-mtls/ }"), "policies[0].match.path_prefix: must start with /"),
        (minimal.replacingOccurrences(of: "X-Client-Cert", with: "X Client Cert"), "policies[0].certificate_header"),
        (minimal.replacingOccurrences(of: "    required_scopes", with: "    required_scope"), "policies[0].required_scope: unknown key"),
        (minimal + "\n  - name: token-mtls\n", "policies[1].name: is the name of policies[0] too"),
        (minimal + "\n    certificate_format: base65\n", "policies[0].certificate_format: must be one of"),
        (minimal + "\n    forward_claims: [\"a b\"]\n", "policies[0].forward_claims[0]"),
        ("introspection: { endpoint: https://x/i, client_id: c, client_secret: s }\n", "policies: at least one policy is required"),
        ("- a list\n", "must be a mapping"),
        ("policies: [\n", "YAML syntax"),
    ])
    func invalid(yaml: String, expected: String) {
        do {
            _ = try SidecarConfiguration.parse(yaml: yaml)
            Issue.record("expected a problem naming \(expected)")
        } catch let error as ConfigurationError {
            #expect(error.problems.contains { $0.contains(expected) }, "\(error.problems)")
        } catch {
            Issue.record("unexpected \(error)")
        }
    }

    @Test("several problems at once are all listed")
    func several() {
        let yaml = "server: { listen: x, colour: blue }\ncache: { ttl_seconds: -1 }\npolicies: []\n"
        var problems: [String] = []
        do {
            _ = try SidecarConfiguration.parse(yaml: yaml)
        } catch let error as ConfigurationError {
            problems = error.problems
        } catch {}
        #expect(problems.count >= 5, "\(problems)")
    }

    @Test("the secret comes from the file, then the environment; it never prints")
    func secrets() throws {
        let withoutSecret = Self.minimal.replacingOccurrences(of: "  client_secret: s3cret\n", with: "")
        let fromEnvironment = try SidecarConfiguration.parse(yaml: withoutSecret, environment: ["AUTHZ_INTROSPECTION_CLIENT_SECRET": "from-env"])
        #expect(fromEnvironment.introspection?.clientSecret == Secret("from-env"))
        let path = "/tmp/authz-sidecar-test-secret-\(UInt32.random(in: 0...UInt32.max))"
        try "from-file\n".write(toFile: path, atomically: true, encoding: .utf8)
        let fromFile = try SidecarConfiguration.parse(
            yaml: withoutSecret.replacingOccurrences(of: "  client_id: introspection-client\n", with: "  client_id: introspection-client\n  client_secret_file: \(path)\n"),
            environment: ["AUTHZ_INTROSPECTION_CLIENT_SECRET": "from-env"]
        )
        #expect(fromFile.introspection?.clientSecret == Secret("from-file"))
        let inline = try SidecarConfiguration.parse(yaml: Self.minimal)
        #expect(!inline.effectiveYAML.contains("s3cret"))
        #expect(inline.effectiveYAML.contains("<redacted>"))
        #expect(!"\(inline)".contains("s3cret"))
    }

    @Test("listen addresses", arguments: [
        ("127.0.0.1:9191", ListenAddress.tcp(host: "127.0.0.1", port: 9191)),
        ("[::1]:80", .tcp(host: "::1", port: 80)),
        ("localhost:0", .tcp(host: "localhost", port: 0)),
        ("unix:/run/authz.sock", .unix(path: "/run/authz.sock")),
    ])
    func listen(text: String, expected: ListenAddress) {
        #expect(ListenAddress(text) == expected)
    }

    @Test("bad listen addresses", arguments: ["9191", ":9191", "host:99999", "unix:relative", "host:port"])
    func badListen(text: String) {
        #expect(ListenAddress(text) == nil)
    }
}
