import ArgumentParser
import AuthzSidecar
import Foundation

/// `authz-sidecar check-config`: validates and prints the effective configuration.
struct CheckConfig: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-config",
        abstract: "Validate a configuration and print it as it will be used, secrets redacted.",
        discussion: "Exits 0 when valid; otherwise lists every problem, each naming its key, and exits 1."
    )

    @OptionGroup var options: ConfigOption

    func run() throws {
        do {
            let configuration = try SidecarConfiguration.load(path: try options.path())
            print(configuration.effectiveYAML, terminator: "")
        } catch let error as ConfigurationError {
            FileHandle.standardError.write(Data((error.description + "\n").utf8))
            throw ExitCode(1)
        }
    }
}
