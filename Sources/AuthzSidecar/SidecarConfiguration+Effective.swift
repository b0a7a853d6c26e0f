import Introspection
import SharedCache
import JWTValidation

extension SidecarConfiguration {
    /// The configuration as it will be used, defaults filled in, the secret redacted: what
    /// `check-config` prints. It is itself a valid configuration file (with the secret to supply).
    public var effectiveYAML: String {
        var out = ""
        func line(_ indent: Int, _ key: String, _ value: String) {
            out += String(repeating: " ", count: indent) + key + ": " + value + "\n"
        }
        let quoted = Self.quoted
        func list(_ items: [String]) -> String { "[" + items.map { quoted($0) }.joined(separator: ", ") + "]" }

        out += "server:\n"
        line(2, "listen", quoted(server.listen.description))
        line(2, "admin_listen", quoted(server.adminListen?.description))
        line(2, "grpc_listen", quoted(server.grpcListen?.description))
        line(2, "trust_policy_header", "\(server.trustPolicyHeader)")
        line(2, "trust_debug_header", "\(server.trustDebugHeader)")
        line(2, "max_header_bytes", "\(server.maxHeaderBytes)")
        line(2, "idle_timeout_seconds", "\(server.idleTimeoutSeconds)")
        line(2, "admin_token_file", quoted(server.adminTokenFile))
        line(2, "dpop_algorithms", list(server.dpopAlgorithms.map(\.rawValue)))
        line(2, "dpop_replay_entries", "\(server.dpopReplayEntries)")
        line(2, "dpop_nonce_seconds", "\(server.dpopNonceSeconds)")
        line(2, "dpop_nonce_key_file", quoted(server.dpopNonceKeyFile))
        if let introspection {
            out += "introspection:\n"
            writeIntrospection(introspection, indent: 2, into: &out)
        }
        if !issuers.isEmpty {
            out += "issuers:\n"
            for issuer in issuers {
                line(2, "- name", quoted(issuer.name))
                line(4, "issuer", quoted(issuer.issuer))
                line(4, "validation", issuer.validation.rawValue)
                line(4, "audiences", list(issuer.audiences))
                line(4, "allow_any_audience", "\(issuer.allowAnyAudience)")
                line(4, "jwks_uri", quoted(issuer.jwksURI))
                line(4, "ca_file", quoted(issuer.caFile))
                line(4, "verify_tls", "\(issuer.verifyTLS)")
                line(4, "insecure", "\(issuer.insecure)")
                line(4, "timeout_ms", "\(issuer.timeoutMilliseconds)")
                line(4, "max_jwks_bytes", "\(issuer.maxJWKSBytes)")
                line(4, "algorithms", list(issuer.algorithms.map(\.rawValue)))
                line(4, "token_types", list(issuer.tokenTypes))
                line(4, "jwks_cache_seconds", "\(issuer.jwksCacheSeconds)")
                line(4, "jwks_min_refetch_seconds", "\(issuer.jwksMinRefetchSeconds)")
                if let introspection = issuer.introspection {
                    out += "    introspection:\n"
                    writeIntrospection(introspection, indent: 6, into: &out)
                } else {
                    line(4, "introspection", "null")
                }
            }
        }
        out += "cache:\n"
        line(2, "ttl_seconds", "\(cache.ttlSeconds)")
        line(2, "negative_ttl_seconds", "\(cache.negativeTTLSeconds)")
        line(2, "max_entries", "\(cache.maxEntries)")
        // null = a tenth of max_entries (printed as null so that the output reads back the same)
        line(2, "max_negative_entries", cache.maxNegativeEntries.map { "\($0)" } ?? "null")
        line(2, "stale_if_error_seconds", "\(cache.staleIfErrorSeconds)")
        if let shared = sharedCache {
            out += "  shared:\n"
            // The password never appears (a password in the url prints as <redacted>).
            line(4, "url", quoted(shared.endpoint.redacted))
            line(4, "password_file", quoted(shared.passwordFile))
            line(4, "ca_file", quoted(shared.caFile))
            line(4, "verify_tls", "\(shared.verifyTLS)")
            line(4, "insecure", "\(shared.insecure)")
            line(4, "key_prefix", quoted(shared.keyPrefix))
            line(4, "timeout_ms", "\(shared.timeoutMilliseconds)")
            line(4, "seal_key_file", quoted(shared.sealKeyFile))
            line(4, "degraded_ttl_seconds", "\(shared.degradedTTLSeconds)")
        } else {
            line(2, "shared", "null")
        }
        out += "tracing:\n"
        line(2, "otlp_endpoint", quoted(tracing.otlpEndpoint))
        line(2, "sampling_ratio", "\(tracing.samplingRatio)")
        line(2, "service_name", quoted(tracing.serviceName))
        if tracing.resourceAttributes.isEmpty {
            line(2, "resource_attributes", "{}")
        } else {
            out += "  resource_attributes:\n"
            for (name, value) in tracing.resourceAttributes.sorted(by: { $0.key < $1.key }) { line(4, quoted(name), quoted(value)) }
        }
        out += "logging:\n"
        line(2, "level", logging.level)
        line(2, "format", logging.format.rawValue)
        out += "policies:\n"
        for policy in policies {
            line(2, "- name", quoted(policy.name))
            out += "    match:\n"
            line(6, "path_prefix", quoted(policy.pathPrefix))
            line(6, "hosts", list(policy.hosts))
            line(6, "methods", list(policy.methods))
            line(4, "required_scopes", list(policy.requiredScopes))
            line(4, "scope_match", policy.scopeMatch.rawValue)
            line(4, "audiences", list(policy.audiences))
            line(4, "certificate_header", quoted(policy.certificateHeader))
            line(4, "certificate_format", policy.certificateFormat.rawValue)
            line(4, "xfcc_element", policy.xfccElement.rawValue)
            line(4, "require_bound_token", "\(policy.requireBoundToken)")
            line(4, "debug_log", "\(policy.debugLog)")
            line(4, "allow_anonymous", "\(policy.allowAnonymous)")
            line(4, "forward_claims", list(policy.forwardClaims))
            line(4, "hide_credentials", "\(policy.hideCredentials)")
            line(4, "clock_skew_seconds", "\(policy.clockSkewSeconds)")
            line(4, "proxy_cache_seconds", "\(policy.proxyCacheSeconds)")
            line(4, "issuers", list(policy.issuers))
            line(4, "dpop", policy.dpop.rawValue)
            line(4, "dpop_max_age_seconds", "\(policy.dpopMaxAgeSeconds)")
            line(4, "dpop_iat_leeway_seconds", "\(policy.dpopIatLeewaySeconds)")
            line(4, "dpop_nonce", "\(policy.dpopNonce)")
            line(4, "public_base_url", quoted(policy.publicBaseURL))
            if policy.requiredClaims.isEmpty {
                line(4, "required_claims", "{}")
            } else {
                out += "    required_claims:\n"
                for claim in policy.requiredClaims {
                    line(6, quoted(claim.name), "[" + claim.values.map(\.compactJSON).joined(separator: ", ") + "]")
                }
            }
        }
        return out
    }

    /// A YAML (JSON) string, or null.
    private static func quoted(_ s: String?) -> String {
        guard let s else { return "null" }
        var escaped = ""
        JSONValue.writeString(s, into: &escaped)
        return escaped
    }

    private func writeIntrospection(_ introspection: IntrospectionConfiguration, indent: Int, into out: inout String) {
        func line(_ key: String, _ value: String) {
            out += String(repeating: " ", count: indent) + key + ": " + value + "\n"
        }
        let quoted = Self.quoted
        line("endpoint", quoted(introspection.endpoint))
        line("client_id", quoted(introspection.clientID))
        line("client_secret", introspection.clientSecret == nil ? "null" : quoted("<redacted>"))
        line("auth_method", introspection.authMethod.rawValue)
        line("client_certificate_file", quoted(introspection.clientCertificateFile))
        line("client_key_file", quoted(introspection.clientKeyFile))
        line("ca_file", quoted(introspection.caFile))
        line("verify_tls", "\(introspection.verifyTLS)")
        line("insecure", "\(introspection.insecure)")
        line("timeout_ms", "\(introspection.timeoutMilliseconds)")
        line("max_connections", "\(introspection.maxConnections)")
        line("max_response_bytes", "\(introspection.maxResponseBytes)")
        line("expected_issuer", quoted(introspection.expectedIssuer))
        line("response_format", introspection.responseFormat.rawValue)
    }
}
