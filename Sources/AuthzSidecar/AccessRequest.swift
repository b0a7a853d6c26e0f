import HTTPTypes
import NIOHTTP1

/// What a proxy asks about: the original request, independent of which proxy asked or how.
public struct AccessRequest: Sendable {
    /// Which front end the question came through; it changes how the answer is rendered.
    public enum Front: String, Sendable {
        case nginx, envoyHTTP = "envoy_http", envoyGRPC = "envoy_grpc"
    }

    public var front: Front
    /// The original method, uppercased.
    public var method: String
    /// The original path with its query, as the client sent it.
    public var path: String
    /// The original host (port included when the client sent one).
    public var host: String
    /// The headers of the question (the proxy's own and the allow-listed client headers), as
    /// SwiftNIO's HTTP/1 parser delivers them: looked up case-insensitively in place, never
    /// converted on the hot path.
    public var headers: HTTPHeaders
    /// A certificate the transport itself vouches for (gRPC `attributes.source.certificate`),
    /// used when the policy names no header.
    public var peerCertificate: String?
    /// A policy name the proxy picked (`X-Authz-Policy`, or Envoy's `context_extensions`).
    public var policyHint: String?
    /// Total bytes of header names and values, for `max_header_bytes`.
    public var headerBytes: Int
    /// The original scheme when the proxy reports it in the question itself (Envoy gRPC's
    /// `attributes.request.http.scheme`); nil: `X-Forwarded-Proto`, else https.
    public var scheme: String?
    /// An nginx-form question that did not say what it asks about (no `X-Original-URI`): a proxy
    /// misconfiguration, refused rather than read as `GET /` (DESIGN.md §5.1).
    public var originalURIMissing = false

    public init(front: Front, method: String, path: String, host: String, headers: HTTPHeaders, peerCertificate: String? = nil, policyHint: String? = nil, headerBytes: Int = 0) {
        self.front = front
        self.method = method
        self.path = path
        self.host = host
        self.headers = headers
        self.peerCertificate = peerCertificate
        self.policyHint = policyHint
        self.headerBytes = headerBytes
    }

    /// The same, with headers as HTTP fields (gRPC and tests).
    public init(front: Front, method: String, path: String, host: String, headers: HTTPFields, peerCertificate: String? = nil, policyHint: String? = nil, headerBytes: Int = 0) {
        self.init(
            front: front, method: method, path: path, host: host, headers: HTTPHeaders(headers.map { ($0.name.rawName, $0.value) }),
            peerCertificate: peerCertificate, policyHint: policyHint, headerBytes: headerBytes
        )
    }

    /// The question behind an HTTP request to the decision listener, or nil when the path is
    /// not a decision path: `/authz` is nginx `auth_request` (a GET; the original method, URI and
    /// host in `X-Original-*`), `/authz/<path>` is Envoy's HTTP service with `path_prefix: /authz`
    /// (method and host as sent, the original path after the prefix). DESIGN.md §4.
    public init?(method: String, target: String, headers: HTTPHeaders, trustPolicyHeader: Bool) {
        let front: Front
        if target == "/authz" || target.hasPrefix("/authz?") {
            front = .nginx
        } else if target.hasPrefix("/authz/") {
            front = .envoyHTTP
        } else {
            return nil
        }
        var headerBytes = 0
        for (name, value) in headers { headerBytes += name.utf8.count + value.utf8.count + 4 }
        let policyHint = trustPolicyHeader ? headers.first(.authzPolicy) : nil
        let host = headers.first(.host) ?? ""
        if front == .nginx {
            let originalURI = headers.first(.originalURI)
            self.init(
                front: .nginx,
                method: Self.uppercased(headers.first(.originalMethod) ?? method),
                path: originalURI ?? "",
                host: headers.first(.originalHost) ?? host,
                headers: headers,
                policyHint: policyHint,
                headerBytes: headerBytes
            )
            originalURIMissing = originalURI == nil
        } else {
            self.init(
                front: .envoyHTTP,
                method: method,
                path: String(target.dropFirst("/authz".count)),
                host: host,
                headers: headers,
                policyHint: policyHint,
                headerBytes: headerBytes
            )
        }
    }

    /// Methods arrive in upper case; only others pay for a copy.
    private static func uppercased(_ method: String) -> String {
        method.utf8.contains(where: { $0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "z") }) ? method.uppercased() : method
    }

    /// Every reading of the path (DESIGN.md §5.1); policies match the strict one, and only when
    /// all of them select the same policy.
    public var pathReadings: PathReadings {
        PathReadings.of(path[...])
    }

    /// `X-Request-Id` when the proxy sent one (for log correlation), bounded.
    public var requestID: String? {
        headers.first(.requestID).map { String($0.prefix(128)) }
    }
}

extension HTTPHeaders {
    /// The first value of a header, compared case-insensitively in place.
    func first(_ name: HTTPField.Name) -> String? {
        let wanted = name.canonicalName
        return first(where: { ASCII.equals($0.name, lowercased: wanted) })?.value
    }

    /// Every value of a header, in order (no copy of the headers).
    func values(_ name: HTTPField.Name) -> LazyMapSequence<LazyFilterSequence<HTTPHeaders>, String> {
        let wanted = name.canonicalName
        return lazy.filter { ASCII.equals($0.name, lowercased: wanted) }.map { $0.value }
    }
}

enum ASCII {
    /// Whether `text` is `lowercased` but for the case of ASCII letters.
    @inline(__always) static func equals(_ text: String, lowercased: String) -> Bool {
        text.utf8.count == lowercased.utf8.count && text.utf8.elementsEqual(lowercased.utf8, by: { Self.lowercased($0) == $1 })
    }

    @inline(__always) static func lowercased(_ byte: UInt8) -> UInt8 {
        byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte
    }
}

extension HTTPField.Name {
    static let requestID = HTTPField.Name("X-Request-Id")!
    static let authzPolicy = HTTPField.Name("X-Authz-Policy")!
    static let originalMethod = HTTPField.Name("X-Original-Method")!
    static let originalURI = HTTPField.Name("X-Original-URI")!
    static let originalHost = HTTPField.Name("X-Original-Host")!
    static let host = HTTPField.Name("Host")!
}
