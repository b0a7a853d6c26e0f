import ArgumentParser
import AuthzSidecar
import Foundation
import Introspection
import Logging
import NIOHTTP1

/// `authz-sidecar explain`: "why was I denied?" Runs the real decision for one request (the real
/// introspection or JWT verification, in a cache of its own that dies with the command; nothing
/// is written to a shared store) and prints each step of DESIGN.md §5 with its result.
struct Explain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Decide one request as the sidecar would, and print every step of the decision.",
        discussion: """
            The request is built as nginx sends it (X-Original-URI, X-Original-Method, Host, \
            X-Forwarded-Proto from --url; the certificate in every certificate_header the policies \
            name). The token is never printed: it appears as the prefix of its SHA-256.
            Exit status: 0 allow, 1 deny, 2 a fault (the AS or the keys unreachable, or a bad configuration).
            """
    )

    @OptionGroup var options: ConfigOption

    @Option(help: "The client's method.")
    var method: String = "GET"

    @Option(help: ArgumentHelp("The URL the client asked for, e.g. https://api.example/things/1.", valueName: "url"))
    var url: String

    @Option(help: ArgumentHelp("The access token (prefer --token-file: a command line is visible to other users).", valueName: "token"))
    var token: String?

    @Option(help: ArgumentHelp("A file holding the access token.", valueName: "file"))
    var tokenFile: String?

    @Option(help: ArgumentHelp("The client certificate (PEM file).", valueName: "file"))
    var cert: String?

    @Option(help: ArgumentHelp("An x-forwarded-client-cert value, as Envoy would send it.", valueName: "value"))
    var xfcc: String?

    @Option(help: ArgumentHelp("A DPoP proof: the token is then sent with the DPoP scheme.", valueName: "jwt"))
    var dpop: String?

    @Option(name: .customLong("header"), help: ArgumentHelp("Another request header, \"Name: value\" (repeatable).", valueName: "header"))
    var headers: [String] = []

    static func urlEncoded(_ pem: String) -> String {
        pem.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? pem
    }

    /// A PEM certificate as a proxy would send it in a header of this format.
    static func certificate(_ pem: String, as format: CertificateFormat) throws -> String {
        let der: Data? = {
            let body = pem.components(separatedBy: "\n").filter { !$0.hasPrefix("-----") }.joined()
            return Data(base64Encoded: body)
        }()
        switch format {
        case .pem:
            return pem.replacingOccurrences(of: "\n", with: " ")
        case .derBase64:
            guard let der else { throw ValidationError("--cert: not a PEM certificate") }
            return der.base64EncodedString()
        case .rfc9440:
            guard let der else { throw ValidationError("--cert: not a PEM certificate") }
            return ":" + der.base64EncodedString() + ":"
        case .xfcc:
            return "Cert=\"" + urlEncoded(pem) + "\""
        default:
            return urlEncoded(pem)
        }
    }

    func run() async throws {
        let configuration: SidecarConfiguration
        do {
            configuration = try SidecarConfiguration.load(path: try options.path())
        } catch let error as ConfigurationError {
            FileHandle.standardError.write(Data((error.description + "\n").utf8))
            throw ExitCode(2)
        }
        guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased(), let host = components.host, !host.isEmpty else {
            throw ValidationError("--url must be an absolute URL, e.g. https://api.example/path")
        }
        var token = self.token
        if let tokenFile {
            // "-": standard input (keeps the token out of the command line and off the disk).
            let data = tokenFile == "-" ? FileHandle.standardInput.readDataToEndOfFile() : (FileManager.default.contents(atPath: tokenFile) ?? (try? FileHandle(forReadingFrom: URL(fileURLWithPath: tokenFile)).readToEnd()) ?? nil)
            guard let data else { throw ValidationError("cannot read \(tokenFile)") }
            token = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        }

        var request = HTTPHeaders()
        let authority = components.port.map { "\(host):\($0)" } ?? host
        let target = (components.percentEncodedPath.isEmpty ? "/" : components.percentEncodedPath) + (components.percentEncodedQuery.map { "?\($0)" } ?? "")
        request.add(name: "Host", value: authority)
        request.add(name: "X-Original-URI", value: target)
        request.add(name: "X-Original-Method", value: method.uppercased())
        request.add(name: "X-Forwarded-Proto", value: scheme)
        if let token { request.add(name: "Authorization", value: (dpop == nil ? "Bearer " : "DPoP ") + token) }
        if let dpop { request.add(name: "DPoP", value: dpop) }
        var peerCertificate: String?
        if let cert {
            guard let pem = try? String(contentsOfFile: cert, encoding: .utf8) else { throw ValidationError("cannot read \(cert)") }
            // In every header a policy reads a certificate from, in that policy's format (the first
            // policy naming a header decides its format); and as the peer certificate for policies
            // without a header (Envoy's gRPC mode).
            var written = Set<String>()
            for policy in configuration.policies {
                guard let name = policy.certificateHeader else { continue }
                guard written.insert(name.lowercased()).inserted else { continue }
                request.add(name: name, value: try Self.certificate(pem, as: policy.certificateFormat))
            }
            peerCertificate = Self.urlEncoded(pem)
        }
        if let xfcc { request.add(name: "x-forwarded-client-cert", value: xfcc) }
        for header in headers {
            guard let colon = header.firstIndex(of: ":") else { throw ValidationError("--header takes \"Name: value\", not \(header)") }
            request.add(name: String(header[..<colon]).trimmingCharacters(in: .whitespaces), value: String(header[header.index(after: colon)...]).trimmingCharacters(in: .whitespaces))
        }
        guard var access = AccessRequest(method: "GET", target: "/authz", headers: request, trustPolicyHeader: configuration.server.trustPolicyHeader) else {
            throw ValidationError("cannot build the request")
        }
        access.peerCertificate = peerCertificate

        // The real backends, a cache of this command's own, no shared store, quiet logs.
        var logger = Logger(label: "authz")
        logger.logLevel = .critical
        let connections: IssuerConnections
        do {
            connections = try IssuerConnections.make(for: configuration.allIssuers, logger: logger)
        } catch {
            FileHandle.standardError.write(Data("cannot set up the authorization server clients: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let sidecar = Sidecar(configuration: configuration, introspector: nil, backends: connections.backends, logger: logger)
        let explanation = await sidecar.authorizer.explain(access)
        for client in connections.allClients { try? await client.shutdown() }

        print("request: \(method.uppercased()) \(url)")
        for step in explanation.steps { print("\(step.name): \(step.result)") }
        let answer = explanation.answer
        print("answer: \(answer.status)")
        for (name, value) in answer.headers where name.lowercased() != "content-length" { print("  \(name): \(value)") }
        if !answer.body.isEmpty { print("  body: \(answer.body)") }
        switch explanation.outcome {
        case .decision(.allow): return
        case .decision(.deny): throw ExitCode(1)
        case .fault: throw ExitCode(2)
        }
    }
}
