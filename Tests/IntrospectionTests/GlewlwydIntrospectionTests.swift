import Crypto
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Introspection
import Testing

/// Runs a command with posix_spawn and waitpid, returning its exit status and output (through a
/// file). Foundation's Process is not used: on Linux it waits for a descriptor that a daemon left
/// running by the command (Glewlwyd) inherits and keeps open.
func run(_ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
    let outputPath = FileManager.default.temporaryDirectory.appendingPathComponent("authz-run-\(UUID().uuidString).out").path
    defer { try? FileManager.default.removeItem(atPath: outputPath) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    let argv = (["/usr/bin/env"] + arguments).map { strdup($0) } + [nil]
    let merged = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    let envp = merged.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
        argv.forEach { free($0) }
        envp.forEach { free($0) }
    }
    var pid: pid_t = 0
    let spawned = posix_spawn(&pid, "/usr/bin/env", &actions, nil, argv, envp)
    guard spawned == 0 else { throw POSIXError(POSIXErrorCode(rawValue: spawned) ?? .EIO) }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0, errno == EINTR {}
    let exitStatus = (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
    return (exitStatus, (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "")
}

/// Whether this machine can run the real authorization server (CI installs it; scripts/test.sh
/// sets AUTHZ_REQUIRE_IDP=1 so that a missing server fails instead of skipping).
enum Glewlwyd {
    static var available: Bool {
        FileManager.default.isExecutableFile(atPath: "/usr/bin/glewlwyd") || ProcessInfo.processInfo.environment["AUTHZ_REQUIRE_IDP"] == "1"
    }

    static var repository: String {
        var components = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        components.removeLast(3)  // GlewlwydIntrospectionTests.swift, IntrospectionTests, Tests
        return components.joined(separator: "/")
    }
}

@Suite("HTTPTokenIntrospector against a real Glewlwyd", .enabled(if: Glewlwyd.available), .timeLimit(.minutes(3)))
struct GlewlwydIntrospectionTests {
    @Test("a certificate-bound client-credentials token: active, scoped, cnf.x5t#S256 = thumbprint of client1")
    func boundToken() async throws {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("authz-glewlwyd-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        let port = try await FakeAuthorizationServer.closedPort()
        let script = Glewlwyd.repository + "/scripts/idp-glewlwyd.sh"
        let started = try run(["bash", script, work], environment: ["IDP_PORT": "\(port)"])
        defer { _ = try? run(["bash", script, "--stop", work]) }
        try #require(started.status == 0, "idp-glewlwyd.sh failed:\n\(started.output.suffix(2000))")

        let env = try String(contentsOfFile: work + "/idp.env", encoding: .utf8)
        var idp: [String: String] = [:]
        for line in env.split(separator: "\n") where !line.hasPrefix("#") {
            let parts = line.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { idp[String(parts[0])] = String(parts[1]) }
        }
        let get = { (key: String) throws -> String in try #require(idp[key], "\(key) missing from idp.env") }

        // A real token, obtained with tls_client_auth by client1.
        let tokenResponse = try run([
            "curl", "-sS", "--max-time", "10", "--cacert", get("IDP_CA"), "--cert", get("IDP_CLIENT1_CERT"), "--key", get("IDP_CLIENT1_KEY"),
            "-d", "grant_type=client_credentials", "-d", "client_id=\(get("IDP_MTLS_CLIENT_ID"))", "-d", "scope=\(get("IDP_MTLS_SCOPE"))",
            get("IDP_TOKEN_URL"),
        ])
        guard case .object(let members) = try JSONParser.parse(Array(tokenResponse.output.utf8)), case .string(let token)? = members["access_token"] else {
            Issue.record("no access_token in \(tokenResponse.output.prefix(300))")
            return
        }

        var configuration = IntrospectionConfiguration(
            endpoint: try get("IDP_INTROSPECT_URL"),
            clientID: try get("IDP_INTROSPECTION_CLIENT_ID"),
            clientSecret: Secret(try get("IDP_INTROSPECTION_CLIENT_SECRET")),
            caFile: try get("IDP_CA")
        )
        let client = try HTTPTokenIntrospector.makeHTTPClient(for: configuration)
        let introspector = HTTPTokenIntrospector(configuration: configuration, client: client)
        let info: TokenInfo
        let garbage: TokenInfo
        do {
            info = try await introspector.introspect(token)
            garbage = try await introspector.introspect("this-is-not-a-token")
        } catch {
            try? await client.shutdown()
            throw error
        }
        try await client.shutdown()

        // The expected thumbprint, computed here from the certificate file.
        let pem = try String(contentsOfFile: try get("IDP_CLIENT1_CERT"), encoding: .utf8)
        let der = try #require(Data(base64Encoded: pem.split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()))
        let expected = Data(SHA256.hash(data: der)).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")

        #expect(info.active)
        #expect(info.scopes.contains("system-access"))
        #expect(info.certificateThumbprint == expected)
        #expect(info.exp != nil)
        #expect(garbage == .inactive)

        // Wrong credentials: a fault (401 from the AS), never "inactive".
        configuration.clientSecret = Secret("wrong")
        let wrongClient = try HTTPTokenIntrospector.makeHTTPClient(for: configuration)
        let wrong = HTTPTokenIntrospector(configuration: configuration, client: wrongClient)
        await #expect(throws: IntrospectionError.status(401)) { try await wrong.introspect(token) }
        try await wrongClient.shutdown()
    }
}
