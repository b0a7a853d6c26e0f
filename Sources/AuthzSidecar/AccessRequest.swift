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

    /// The path without its query string.
    public var pathWithoutQuery: Substring {
        path.firstIndex(where: { $0 == "?" || $0 == "#" }).map { path[..<$0] } ?? path[...]
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
}
