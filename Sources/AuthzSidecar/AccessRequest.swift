import HTTPTypes

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
    /// The headers of the question (the proxy's own and the allow-listed client headers).
    public var headers: HTTPFields
    /// A certificate the transport itself vouches for (gRPC `attributes.source.certificate`),
    /// used when the policy names no header.
    public var peerCertificate: String?
    /// A policy name the proxy picked (`X-Authz-Policy`, or Envoy's `context_extensions`).
    public var policyHint: String?
    /// Total bytes of header names and values, for `max_header_bytes`.
    public var headerBytes: Int

    public init(front: Front, method: String, path: String, host: String, headers: HTTPFields, peerCertificate: String? = nil, policyHint: String? = nil, headerBytes: Int = 0) {
        self.front = front
        self.method = method
        self.path = path
        self.host = host
        self.headers = headers
        self.peerCertificate = peerCertificate
        self.policyHint = policyHint
        self.headerBytes = headerBytes
    }

    /// The question behind an HTTP request to the decision listener, or nil when the path is
    /// not a decision path: `/authz` is nginx `auth_request` (a GET; the original method, URI and
    /// host in `X-Original-*`), `/authz/<path>` is Envoy's HTTP service with `path_prefix: /authz`
    /// (method and host as sent, the original path after the prefix). DESIGN.md §4.
    public init?(method: String, target: String, authority: String?, headers: HTTPFields, trustPolicyHeader: Bool) {
        let headerBytes = headers.reduce(0) { $0 + $1.name.rawName.utf8.count + $1.value.utf8.count + 4 }
        let policyHint = trustPolicyHeader ? headers[.authzPolicy] : nil
        let host = authority ?? headers[.host] ?? ""
        if target == "/authz" || target.hasPrefix("/authz?") {
            self.init(
                front: .nginx,
                method: (headers[.originalMethod] ?? method).uppercased(),
                path: headers[.originalURI] ?? "/",
                host: headers[.originalHost] ?? host,
                headers: headers,
                policyHint: policyHint,
                headerBytes: headerBytes
            )
        } else if target.hasPrefix("/authz/") {
            self.init(
                front: .envoyHTTP,
                method: method,
                path: String(target.dropFirst("/authz".count)),
                host: host,
                headers: headers,
                policyHint: policyHint,
                headerBytes: headerBytes
            )
        } else {
            return nil
        }
    }

    /// The path policies match: without query, dot segments resolved, slashes merged.
    public var pathWithoutQuery: Substring {
        RequestPath.normalized(path[...])
    }

    /// `X-Request-Id` when the proxy sent one (for log correlation), bounded.
    public var requestID: String? {
        headers[.requestID].map { String($0.prefix(128)) }
    }
}

extension HTTPField.Name {
    static let requestID = HTTPField.Name("X-Request-Id")!
    static let authzPolicy = HTTPField.Name("X-Authz-Policy")!
    static let originalMethod = HTTPField.Name("X-Original-Method")!
    static let originalURI = HTTPField.Name("X-Original-URI")!
    static let originalHost = HTTPField.Name("X-Original-Host")!
    static let authzBody = HTTPField.Name("X-Authz-Body")!
    static let envoyHeadersToRemove = HTTPField.Name("x-envoy-auth-headers-to-remove")!
    static let anonymous = HTTPField.Name("X-Anonymous")!
    static let host = HTTPField.Name("Host")!
}
