@testable import AuthzSidecar
import Foundation
import Introspection
import Testing

/// An independent model of how backends read a path, written differently from `PathReadings`
/// (string replacement and RFC 3986 §5.2.4's buffer algorithm), so the property below checks the
/// sidecar against something it does not share code with.
enum BackendModel {
    /// RFC 3986 §5.2.4 remove_dot_segments, with a flag for a `..` that would climb above the root.
    static func removeDotSegments(_ path: String) -> (String, climbed: Bool) {
        var input = path
        var output: [String] = []  // each element starts with "/" (or is the first bare segment)
        var climbed = false
        while !input.isEmpty {
            if input.hasPrefix("../") { input.removeFirst(3) }
            else if input.hasPrefix("./") { input.removeFirst(2) }
            else if input.hasPrefix("/./") { input = "/" + input.dropFirst(3) }
            else if input == "/." { input = "/" }
            else if input.hasPrefix("/../") {
                input = "/" + input.dropFirst(4)
                if output.popLast() == nil { climbed = true }
            } else if input == "/.." {
                input = "/"
                if output.popLast() == nil { climbed = true }
            } else if input == "." || input == ".." { input = "" }
            else {
                let start = input.hasPrefix("/") ? input.index(after: input.startIndex) : input.startIndex
                let end = input[start...].firstIndex(of: "/") ?? input.endIndex
                output.append(String(input[..<end]))
                input = String(input[end...])
            }
        }
        return (output.joined(), climbed)
    }

    static func mergeSlashes(_ path: String) -> String {
        var out = path
        while out.contains("//") { out = out.replacingOccurrences(of: "//", with: "/") }
        return out
    }

    static func decodeUnreserved(_ path: String) -> String {
        var out = ""
        var i = path.startIndex
        while i < path.endIndex {
            if path[i] == "%", let end = path.index(i, offsetBy: 3, limitedBy: path.endIndex),
                let value = UInt8(path[path.index(after: i)..<end], radix: 16)
            {
                let c = Character(Unicode.Scalar(value))
                if c.isASCII, c.isLetter || c.isNumber || "-._~".contains(c) {
                    out.append(c)
                } else {
                    out += "%" + path[path.index(after: i)..<end].uppercased()
                }
                i = end
            } else {
                out.append(path[i])
                i = path.index(after: i)
            }
        }
        return out
    }

    /// (reading, climbed) for: merge-then-resolve, resolve-then-merge, a servlet container that
    /// decodes before cutting parameters, and Tomcat, which cuts them first.
    static func readings(_ path: String) -> [(String, Bool)] {
        let strict = decodeUnreserved(path)
        let mergedFirst = removeDotSegments(mergeSlashes(strict))
        let rfc = removeDotSegments(strict)
        var servlet = path
        for encoded in ["%2F", "%2f", "%5C", "%5c"] { servlet = servlet.replacingOccurrences(of: encoded, with: "/") }
        servlet = decodeUnreserved(servlet.replacingOccurrences(of: "\\", with: "/"))
        servlet = servlet.replacingOccurrences(of: #";[^/]*"#, with: "", options: .regularExpression)
        let servletRead = removeDotSegments(mergeSlashes(servlet))
        // Tomcat's order: path parameters cut from the raw segments first, then decoded.
        var tomcat = path.replacingOccurrences(of: #";[^/]*"#, with: "", options: .regularExpression)
        for encoded in ["%2F", "%2f", "%5C", "%5c"] { tomcat = tomcat.replacingOccurrences(of: encoded, with: "/") }
        tomcat = decodeUnreserved(tomcat.replacingOccurrences(of: "\\", with: "/"))
        let tomcatRead = removeDotSegments(mergeSlashes(tomcat))
        return [
            (mergeSlashes(mergedFirst.0), mergedFirst.1), (mergeSlashes(rfc.0), rfc.1),
            (mergeSlashes(servletRead.0), servletRead.1), (mergeSlashes(tomcatRead.0), tomcatRead.1),
        ]
    }
}

@Suite("Path readings: property tests against an independent model")
struct PathPropertyTests {
    static let yaml = """
        introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
        policies:
          - { name: public, match: { path_prefix: /public/ }, allow_anonymous: true }
          - { name: admin, match: { path_prefix: /admin-api/ }, required_scopes: [admin] }
          - { name: api, match: { path_prefix: /api/v1/ }, required_scopes: [api] }
          - { name: files, match: { path_prefix: /files } }
        """

    static let pieces = [
        "public", "admin-api", "api", "v1", "files", "x", "..", ".", "..;", ";a=1", "%2e%2e", "%2E", "%2F", "%2f", "%5C", "%5c",
        "\\", "/", "//", "%252F", "%2e", ";", "a;b", "%41", "%", "%zz", "..%2F", "..%5C", ".%2e", "?", "#",
    ]

    @Test("if the sidecar selects policy P, every backend reading selects P; a climbing reading is refused")
    func everyReadingAgrees() throws {
        let configuration = try SidecarConfiguration.parse(yaml: Self.yaml)
        let authorizer = Authorizer(
            configuration: configuration,
            cache: CachingTokenIntrospector(upstream: ClosureTokenIntrospector { _ in .inactive }, configuration: configuration.cache)
        )
        func policy(of path: String) -> String? {
            configuration.policies.first { $0.matches(method: "GET", path: path[...], host: "h") }?.name
        }
        var generator = SplitMix64(seed: 42)
        var selected = 0
        var refused = 0
        for _ in 0..<20_000 {
            // half the paths start under a policy's prefix, so that both outcomes are common
            var path = Bool.random(using: &generator) ? ["/public/", "/admin-api/", "/api/v1/", "/files"].randomElement(using: &generator)! : ""
            for _ in 0..<Int.random(in: 1...5, using: &generator) {
                path += (Bool.random(using: &generator) ? "/" : "") + Self.pieces.randomElement(using: &generator)!
            }
            if !path.hasPrefix("/") { path = "/" + path }
            let request = AccessRequest(front: .envoyHTTP, method: "GET", path: path, host: "h", headers: [:] as HTTPFieldsShim)
            let withoutQuery = String(path.prefix { $0 != "?" && $0 != "#" })
            let readings = BackendModel.readings(withoutQuery)
            switch authorizer.select(for: request) {
            case .selected(let evaluation):
                selected += 1
                for (reading, climbed) in readings {
                    #expect(!climbed, "\(path) selected \(evaluation.policy.name) though a reading climbs above the root")
                    #expect(policy(of: reading) == evaluation.policy.name, "\(path): \(reading) selects \(policy(of: reading) ?? "none"), the sidecar \(evaluation.policy.name)")
                }
            case .refused(let denial):
                refused += 1
                if denial.reason == .noPolicy {
                    for (reading, _) in readings { #expect(policy(of: reading) == nil, "\(path): \(reading) selects a policy, the sidecar none") }
                }
            }
        }
        print("path property: \(selected) selected, \(refused) refused of 20,000")
        #expect(selected > 2000 && refused > 2000, "the generator should exercise both outcomes: \(selected) selected, \(refused) refused")
    }
}

typealias HTTPFieldsShim = HTTPTypes.HTTPFields
import HTTPTypes
