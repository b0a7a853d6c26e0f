import Introspection

/// Allow answers as rendered, per token, policy and front end. The `X-Credential-*` headers of an
/// allow are a pure function of the token's introspection and the policy, so a cached token's
/// headers are rendered once rather than on every request. This remembers a rendering, not a
/// decision: expiry, binding and scopes are still checked on every request, and only an allow
/// is looked up here. An entry is used only for the very same introspection answer (a token that
/// was introspected again renders afresh, once) and the same proxy cache lifetime. Bounded.
final class AllowAnswerMemo: Sendable {
    private struct Key: Hashable, Sendable {
        let digest: TokenDigest
        let policy: ObjectIdentifier
        let front: AccessRequest.Front
    }

    private struct Entry: Sendable {
        let token: TokenInfo
        let cacheSeconds: Int64
        /// The DPoP key of the answer (its X-Credential-Jkt), nil for Bearer.
        let dpopKey: String?
        let answer: AuthzAnswer
    }

    private let memo: BoundedMemo<Key, Entry>

    init(capacity: Int = 4096, shardCount: Int = 8) {
        memo = BoundedMemo(capacity: capacity, shardCount: shardCount)
    }

    /// The remembered answer for this grant, or `render()`'s, which is then remembered.
    func answer(for grant: Grant, digest: TokenDigest, policy: PolicyEvaluation, front: AccessRequest.Front, render: () -> AuthzAnswer) -> AuthzAnswer {
        guard let token = grant.token else { return render() }
        let key = Key(digest: digest, policy: ObjectIdentifier(policy), front: front)
        if let entry = memo.value(for: key, spread: digest.w0), entry.cacheSeconds == grant.cacheSeconds,
            entry.dpopKey == grant.dpopKey, entry.token.isSameStorage(as: token)
        {
            return entry.answer
        }
        let answer = render()
        memo.remember(Entry(token: token, cacheSeconds: grant.cacheSeconds, dpopKey: grant.dpopKey, answer: answer), for: key, spread: digest.w0)
        return answer
    }

    /// Remembered answers (for tests).
    var count: Int { memo.count }
}
