import Introspection
import NIOConcurrencyHelpers

/// Allow answers as rendered, per token, policy and front end. The `X-Credential-*` headers of an
/// allow are a pure function of the token's introspection and the policy, so a cached token's
/// headers are rendered once rather than on every request. This remembers a rendering, not a
/// decision: expiry, binding and scopes are still checked on every request, and only an allow
/// is looked up here. An entry is used only for the very same introspection answer (a token that
/// was introspected again renders afresh, once) and the same proxy cache lifetime. Bounded.
final class AllowAnswerMemo: Sendable {
    private struct Key: Hashable {
        let digest: TokenDigest
        let policy: ObjectIdentifier
        let front: AccessRequest.Front
    }

    private struct Entry {
        let token: TokenInfo
        let cacheSeconds: Int64
        let answer: AuthzAnswer
    }

    private final class Shard: Sendable {
        let entries = NIOLockedValueBox<[Key: Entry]>([:])
    }

    private let shards: [Shard]
    private let perShard: Int

    init(capacity: Int = 4096, shardCount: Int = 8) {
        shards = (0..<shardCount).map { _ in Shard() }
        perShard = max(1, capacity / shardCount)
    }

    /// The remembered answer for this grant, or `render()`'s, which is then remembered.
    func answer(for grant: Grant, digest: TokenDigest, policy: PolicyEvaluation, front: AccessRequest.Front, render: () -> AuthzAnswer) -> AuthzAnswer {
        guard let token = grant.token else { return render() }
        let key = Key(digest: digest, policy: ObjectIdentifier(policy), front: front)
        let shard = shards[Int(digest.w0 % UInt64(shards.count))]
        if let entry = shard.entries.withLockedValue({ $0[key] }), entry.cacheSeconds == grant.cacheSeconds,
            entry.token.isSameStorage(as: token)
        {
            return entry.answer
        }
        let answer = render()
        shard.entries.withLockedValue { entries in
            // Bounded: when a shard is full it starts over (tokens in use come back at once).
            if entries.count >= perShard { entries.removeAll(keepingCapacity: true) }
            entries[key] = Entry(token: token, cacheSeconds: grant.cacheSeconds, answer: answer)
        }
        return answer
    }

    /// Remembered answers (for tests).
    var count: Int { shards.reduce(0) { $0 + $1.entries.withLockedValue { $0.count } } }
}
