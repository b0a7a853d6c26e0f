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
            guard let text = try? String(contentsOfFile: tokenFile, encoding: .utf8) else { throw ValidationError("cannot read \(tokenFile)") }
            token = text.trimmingCharacters(in: .whitespacesAndNewlines)
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
        if let cert {
            guard let pem = try? String(contentsOfFile: cert, encoding: .utf8) else { throw ValidationError("cannot read \(cert)") }
            // As nginx's $ssl_client_escaped_cert, in every header a policy reads it from.
            let escaped = pem.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? pem
            for name in Set(configuration.policies.compactMap(\.certificateHeader)) { request.add(name: name, value: escaped) }
        }
        if let xfcc { request.add(name: "x-forwarded-client-cert", value: xfcc) }
        for header in headers {
            guard let colon = header.firstIndex(of: ":") else { throw ValidationError("--header takes \"Name: value\", not \(header)") }
            request.add(name: String(header[..<colon]).trimmingCharacters(in: .whitespaces), value: String(header[header.index(after: colon)...]).trimmingCharacters(in: .whitespaces))
        }
        guard let access = AccessRequest(method: "GET", target: "/authz", headers: request, trustPolicyHeader: configuration.server.trustPolicyHeader) else {
            throw ValidationError("cannot build the request")
        }

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
