import ArgumentParser
import AuthzSidecar

/// `authz-sidecar`: serve, check-config, thumbprint (DESIGN.md §2).
@main
struct AuthzSidecarCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "authz-sidecar",
        abstract: "Authorization sidecar for nginx auth_request and Envoy ext_authz.",
        discussion: """
            Decides for every proxied API request whether it may pass: introspects the bearer token \
            at the authorization server (RFC 7662, cached), checks certificate binding (RFC 8705) \
            and the route's scopes, and answers 200 with X-Credential-* headers or 401/403 with a \
            JSON body.

            Start with:  authz-sidecar check-config --config sidecar.yaml
            Then run:    authz-sidecar serve --config sidecar.yaml
            """,
        version: SidecarVersion.current,
        subcommands: [Serve.self, CheckConfig.self, Thumbprint.self, Explain.self],
        defaultSubcommand: Serve.self
    )
}

/// The `--config` option shared by the commands that read a configuration.
struct ConfigOption: ParsableArguments {
    @Option(name: .shortAndLong, help: ArgumentHelp("The YAML configuration file (default: $AUTHZ_CONFIG).", valueName: "file"))
    var config: String?

    func path() throws -> String {
        if let config { return config }
        if let fromEnvironment = Environment.value("AUTHZ_CONFIG"), !fromEnvironment.isEmpty { return fromEnvironment }
        throw ValidationError("no configuration: pass --config FILE or set AUTHZ_CONFIG")
    }
}
