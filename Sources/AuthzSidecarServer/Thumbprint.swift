import ArgumentParser
import AuthzSidecar
import Foundation

/// `authz-sidecar thumbprint`: the RFC 8705 `x5t#S256` of a PEM certificate.
struct Thumbprint: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the x5t#S256 thumbprint of a PEM certificate.",
        discussion: """
            This is base64url(SHA-256(DER)): what a certificate-bound token's cnf["x5t#S256"] must hold \
            for a client presenting this certificate. Compare it with the introspection response when \
            a bound token is refused with binding_mismatch.
            """
    )

    @Argument(help: ArgumentHelp("A PEM certificate file, or - for standard input.", valueName: "file"))
    var file: String = "-"

    func run() throws {
        let data: Data
        if file == "-" {
            data = FileHandle.standardInput.readDataToEndOfFile()
        } else {
            guard let read = FileManager.default.contents(atPath: file) else {
                throw ValidationError("cannot read \(file)")
            }
            data = read
        }
        do {
            print(try ClientCertificate.thumbprint(header: String(decoding: data, as: UTF8.self), format: .pem).base64URL)
        } catch {
            FileHandle.standardError.write(Data("\(file): \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}
