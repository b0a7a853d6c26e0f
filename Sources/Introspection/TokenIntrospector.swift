/// The seam between the decision and the authorization server.
///
/// Returns the AS's answer (active or inactive) or throws an `IntrospectionError` for a fault.
public protocol TokenIntrospector: Sendable {
    /// Asks whether `token` is active and what it carries (RFC 7662 §2.1).
    func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo
}

/// An introspector that can often answer without suspending (a JWT verified with keys it already
/// holds): the cache then fills a miss on the calling thread, with no task or hop to another
/// thread. nil means the answer needs I/O: use `introspect`.
public protocol SynchronousTokenIntrospector: TokenIntrospector {
    func introspectWithoutSuspending(_ token: String) -> TokenInfo?
}

/// An introspector that can hand over the AS's answer as it came (a 200's body), for answers
/// that another layer must verify first: RFC 9701 signed introspection responses.
public protocol RawTokenIntrospector: TokenIntrospector {
    func introspectRaw(_ token: String) async throws(IntrospectionError) -> [UInt8]
}

/// An introspector made from a closure: for tests and for wiring.
public struct ClosureTokenIntrospector: TokenIntrospector {
    private let body: @Sendable (String) async throws(IntrospectionError) -> TokenInfo

    public init(_ body: @escaping @Sendable (String) async throws(IntrospectionError) -> TokenInfo) {
        self.body = body
    }

    public func introspect(_ token: String) async throws(IntrospectionError) -> TokenInfo {
        try await body(token)
    }
}
