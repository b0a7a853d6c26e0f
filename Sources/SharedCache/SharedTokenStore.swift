import Crypto
import Foundation
import Introspection
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// `cache.shared` (DESIGN.md §11): the store replicas share answers through, and purge on.
public struct SharedCacheConfiguration: Sendable, Equatable {
    public var endpoint: StoreEndpoint
    public var passwordFile: String?
    public var caFile: String?
    public var verifyTLS: Bool
    public var insecure: Bool
    public var keyPrefix: String
    public var timeoutMilliseconds: Int
    public var sealKeyFile: String
    public var sealKey: SealKey
    public var degradedTTLSeconds: Double

    public init(
        endpoint: StoreEndpoint, sealKey: SealKey, sealKeyFile: String = "", passwordFile: String? = nil, caFile: String? = nil,
        verifyTLS: Bool = true, insecure: Bool = false, keyPrefix: String = "authz:", timeoutMilliseconds: Int = 50, degradedTTLSeconds: Double = 5
    ) {
        self.endpoint = endpoint
        self.sealKey = sealKey
        self.sealKeyFile = sealKeyFile
        self.passwordFile = passwordFile
        self.caFile = caFile
        self.verifyTLS = verifyTLS
        self.insecure = insecure
        self.keyPrefix = keyPrefix
        self.timeoutMilliseconds = timeoutMilliseconds
        self.degradedTTLSeconds = degradedTTLSeconds
    }

    /// `rediss://`: verified TLS with `ca_file` roots (the system's otherwise), as for the AS.
    public func makeTLSContext() throws -> NIOSSLContext? {
        guard endpoint.tls else { return nil }
        var tls = TLSConfiguration.makeClientConfiguration()
        if let caFile { tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile)) }
        if !verifyTLS { tls.certificateVerification = .none }
        return try NIOSSLContext(configuration: tls)
    }
}

/// What a purge on the store achieved: `propagated` once the store acknowledged the tombstone
/// (or the new epoch) and the broadcast; `receivers` is how many subscribers it reached.
public struct PurgePropagation: Sendable, Equatable {
    public var propagated: Bool
    public var receivers: Int
}

/// The answers replicas share, and the purges they broadcast, on a Redis-compatible store.
///
/// Layout: an entry is `<prefix><issuer>:<sha256 hex>`, sealed (`SealedEntry`), expiring with
/// the answer; a purged token's entry is overwritten by a tombstone for `tombstoneSeconds`, so an
/// answer fetched before the purge cannot be stored again; a purge of everything increments
/// `<prefix>epoch`, and entries learned under an older epoch are ignored (and deleted when met).
/// Purges are published on `<prefix>purge` as `d <hex> <unix ms>` or `a <unix ms>`.
public final class SharedTokenStore: Sendable {
    public let configuration: SharedCacheConfiguration
    let client: RedisClient
    private let tls: NIOSSLContext?
    private let logger: Logger
    private let metrics: SharedCacheMetrics
    private let problems: RateLimitedLog
    /// Whether purge broadcasts are being received.
    private let subscribed = Atomic<Bool>(false)
    /// The caches a broadcast purges (those of the configuration in force).
    private let caches = NIOLockedValueBox<@Sendable () -> [CachingTokenIntrospector]>({ [] })
    /// Tokens purged lately, whose stored entries are not used (see `PurgeMemory`).
    private let purges: NIOLockedValueBox<PurgeMemory>

    /// How long a purged token's tombstone stays: longer than any AS call in flight.
    static let tombstoneSeconds = 30
    /// A subscription that hears nothing (not even a PING's answer) this long is lost.
    static let silenceLimit = TimeAmount.seconds(1)
    static let pingInterval = TimeAmount.milliseconds(250)

    public var epochKey: String { configuration.keyPrefix + "epoch" }
    public var channel: String { configuration.keyPrefix + "purge" }

    /// - Parameter answerLifetimeSeconds: the longest a stored answer is used after the AS gave
    ///   it (`cache.ttl_seconds`): how long a purged token's stored entries are distrusted here.
    public init(
        configuration: SharedCacheConfiguration, answerLifetimeSeconds: Double = 30, logger: Logger, metrics factory: any MetricsFactory = MetricsSystem.factory
    ) throws {
        self.configuration = configuration
        self.purges = NIOLockedValueBox(PurgeMemory(lifetimeSeconds: answerLifetimeSeconds))
        let tls = try configuration.makeTLSContext()
        self.tls = tls
        self.client = RedisClient(endpoint: configuration.endpoint, tls: tls, timeout: .milliseconds(Int64(configuration.timeoutMilliseconds)))
        var logger = logger
        logger[metadataKey: "authz.shared.store"] = "\(configuration.endpoint.redacted)"
        self.logger = logger
        self.metrics = SharedCacheMetrics(factory: factory)
        self.problems = RateLimitedLog(clock: SystemEpochClock(), interval: 10)
        metrics.subscribed.record(0)
    }

    /// Names the caches that broadcasts purge; called again when a reload replaces them.
    public func attach(caches: @escaping @Sendable () -> [CachingTokenIntrospector]) {
        self.caches.withLockedValue { $0 = caches }
    }

    /// The store as one issuer's cache sees it.
    public func view(issuer: String) -> any SharedAnswerStore {
        IssuerView(store: self, issuer: issuer)
    }

    public func storeKey(issuer: String, digest: TokenDigest) -> String {
        configuration.keyPrefix + issuer + ":" + digest.hex
    }

    public var isSubscribed: Bool { subscribed.load(ordering: .relaxed) }

    // MARK: Entries

    func load(issuer: String, digest: TokenDigest) async -> SharedLoad {
        let key = storeKey(issuer: issuer, digest: digest)
        let reply: RESPValue
        do {
            reply = try await client.send(RESPCommand("MGET", key, epochKey))
        } catch {
            fault(error, "reading an entry")
            return .unavailable
        }
        guard case .array(let values?) = reply, values.count == 2, case .bulkString(let stored) = values[0], case .bulkString(let epochText) = values[1] else {
            fault(.protocolError("MGET answered \(Self.shape(reply))"), "reading an entry")
            return .unavailable
        }
        var epoch = SharedEpoch(0)
        if let epochText {
            guard let value = Int64(String(decoding: epochText, as: UTF8.self)) else {
                fault(.protocolError("the epoch is not an integer"), "reading an entry")
                return .unavailable
            }
            epoch = SharedEpoch(value)
        }
        guard let stored, stored != SealedEntry.tombstone else {
            metrics.misses.increment()
            return .miss(epoch)
        }
        guard let entry = SealedEntry.open(stored, key: configuration.sealKey, storeKey: key) else {
            // Another seal key, garbage or a forgery: a miss; never replaced or deleted here.
            metrics.unopenable.increment()
            metrics.misses.increment()
            warn("unopenable", "an entry in the shared store does not open with this seal key (another key, corrupted or forged): ignored")
            return .miss(epoch)
        }
        guard !purges.withLockedValue({ $0.distrusts(digest) }) else {
            // Purged lately: whatever the store holds may be an answer from before the purge put
            // back over its tombstone (a writer needs no seal key to replay an entry). Every
            // answer from before the purge is past its `until` once this memory forgets it.
            metrics.misses.increment()
            return .miss(epoch)
        }
        if entry.epoch != epoch {
            // Learned before a purge of everything: gone, as the purge said.
            metrics.misses.increment()
            client.send(RESPCommand("DEL", key)).whenComplete { _ in }
            return .miss(epoch)
        }
        guard entry.until > Date().timeIntervalSince1970 else {
            metrics.misses.increment()
            return .miss(epoch)
        }
        metrics.hits.increment()
        return .hit(entry.info, until: entry.until)
    }

    func save(issuer: String, digest: TokenDigest, info: TokenInfo, until: Double, epoch: SharedEpoch) {
        let milliseconds = Int64(((until - Date().timeIntervalSince1970) * 1000).rounded(.down))
        guard milliseconds > 0 else { return }
        let key = storeKey(issuer: issuer, digest: digest)
        guard let sealed = SealedEntry(info: info, until: until, epoch: epoch).seal(key: configuration.sealKey, storeKey: key) else { return }
        client.send(RESPCommand("SET", [Array(key.utf8), sealed, Array("PX".utf8), Array(String(milliseconds).utf8), Array("NX".utf8)])).whenComplete { result in
            switch result {
            case .success: self.metrics.writes.increment()
            case .failure(let error): self.fault(error as? StoreFailure ?? .protocolError("\(error)"), "storing an entry")
            }
        }
    }

    // MARK: DPoP proofs

    /// Consumes a DPoP proof's (key, `jti`) pair at the store (RFC 9449 §11.1 across replicas):
    /// true the first time, false when another replica (or this one) consumed it within
    /// `windowSeconds`, nil when the store cannot tell (the replica's own memory decides alone).
    public func firstUse(ofProof replayKey: String, windowSeconds: Double) async -> Bool? {
        let key = configuration.keyPrefix + "dpop:" + SHA256.hash(data: Array(replayKey.utf8)).map { String(format: "%02x", $0) }.joined()
        let milliseconds = String(max(1, Int64(windowSeconds * 1000)))
        do {
            switch try await client.send(RESPCommand("SET", key, "1", "PX", milliseconds, "NX")) {
            case .simpleString("OK"): return true
            case .bulkString(nil): return false
            case let other:
                fault(.protocolError("SET NX answered \(Self.shape(other))"), "consuming a DPoP proof")
                return nil
            }
        } catch {
            fault(error, "consuming a DPoP proof")
            return nil
        }
    }

    // MARK: Purges

    /// Tombstones the token's entries of `issuers` and broadcasts the purge.
    public func purge(_ digest: TokenDigest, issuers: [String]) async -> PurgePropagation {
        purges.withLockedValue { $0.remember(digest) }
        var commands = issuers.map { issuer in
            RESPCommand("SET", storeKey(issuer: issuer, digest: digest), "tombstone", "PX", String(Self.tombstoneSeconds * 1000))
        }
        commands.append(RESPCommand("PUBLISH", channel, "d \(digest.hex) \(Self.nowMilliseconds())"))
        return await run(commands)
    }

    /// Moves to a new epoch (every entry stored so far is ignored) and broadcasts the purge.
    public func purgeAll() async -> PurgePropagation {
        return await run([RESPCommand("INCR", epochKey), RESPCommand("PUBLISH", channel, "a \(Self.nowMilliseconds())")])
    }

    /// Sends the commands in order (the broadcast last, after the store acknowledged the rest).
    private func run(_ commands: [RESPCommand]) async -> PurgePropagation {
        var receivers = 0
        for command in commands {
            do {
                let reply = try await client.send(command)
                if command.name == "PUBLISH", case .integer(let count) = reply { receivers = Int(count) }
            } catch {
                fault(error, "propagating a purge")
                return PurgePropagation(propagated: false, receivers: 0)
            }
        }
        return PurgePropagation(propagated: true, receivers: receivers)
    }

    // MARK: The subscription

    /// Receives purge broadcasts until cancelled: subscribes, PINGs every 250 ms, and counts the
    /// subscription lost when its connection closes or it hears nothing for a second; then
    /// subscribes again after a back-off. While lost, local entries live at most
    /// `degraded_ttl_seconds`; on resubscribing, the local caches are emptied (broadcasts missed
    /// meanwhile cannot be replayed).
    public func runSubscription() async {
        var failures = 0
        while !Task.isCancelled {
            let watch = SubscriptionWatch()
            do {
                let connection = try await RedisConnection.connect(
                    to: configuration.endpoint, group: client.group, tls: tls, timeout: .milliseconds(max(250, Int64(configuration.timeoutMilliseconds))),
                    onPush: { [self] value in
                        watch.heard()
                        self.received(value, watch: watch)
                    }
                ).get()
                watch.heard()
                connection.sendWithoutAnswer(RESPCommand("SUBSCRIBE", channel))
                while connection.isActive, !Task.isCancelled, !watch.failed.load(ordering: .relaxed) {
                    try await Task.sleep(nanoseconds: UInt64(Self.pingInterval.nanoseconds))
                    if watch.silence > Self.silenceLimit {
                        warn("subscription", "the shared store stopped answering on the purge subscription: resubscribing", cause: "timeout")
                        break
                    }
                    if watch.confirmed.load(ordering: .relaxed) { failures = 0 }
                    connection.sendWithoutAnswer(RESPCommand("PING"))
                }
                connection.close()
            } catch is CancellationError {
                break
            } catch {
                let failure = error as? StoreFailure ?? .protocolError("\(error)")
                metrics.errors(failure.cause).increment()
                warn("subscription", "cannot subscribe to purge broadcasts on the shared store: \(failure)", cause: failure.cause)
            }
            if Task.isCancelled { break }
            lost()
            failures += 1
            let backoff = min(100 * (1 << min(failures - 1, 10)), 5_000)
            try? await Task.sleep(nanoseconds: UInt64(backoff) * 1_000_000)
        }
        // Shutting down: no longer subscribed, but nothing to warn about.
        if subscribed.exchange(false, ordering: .relaxed) { metrics.subscribed.record(0) }
    }

    private func received(_ value: RESPValue, watch: SubscriptionWatch) {
        guard case .array(let parts?) = value, let kind = parts.first?.string else {
            if case .error(let message) = value {
                watch.failed.store(true, ordering: .relaxed)
                warn("subscription", "the shared store refused the subscription: \(RESPChannelHandler.redirection(message) ?? message)", cause: "refused")
            }
            return
        }
        switch kind.lowercased() {
        case "subscribe":
            watch.confirmed.store(true, ordering: .relaxed)
            resubscribed()
        case "message" where parts.count == 3:
            if let text = parts[2].string { broadcast(text) }
        default:
            break  // "pong", "unsubscribe"
        }
    }

    /// A purge broadcast: every local cache drops the token (or everything), lookups in flight
    /// included.
    func broadcast(_ text: String) {
        let fields = text.split(separator: " ")
        let caches = self.caches.withLockedValue { $0 }()
        switch (fields.first, fields.count) {
        case ("d"?, 3):
            guard let digest = TokenDigest(hex: String(fields[1])) else { return }
            purges.withLockedValue { $0.remember(digest) }
            for cache in caches { cache.purge(digest) }
        case ("a"?, 2):
            for cache in caches { cache.purgeAll() }
        default:
            warn("broadcast", "ignored a malformed purge broadcast", cause: "protocol")
            return
        }
        metrics.broadcasts.increment()
        if let sent = Int64(fields[fields.count - 1]) {
            let lag = Self.nowMilliseconds() - sent
            if lag >= 0 { metrics.broadcastLag.recordNanoseconds(lag * 1_000_000) }
        }
    }

    private func resubscribed() {
        guard !subscribed.exchange(true, ordering: .relaxed) else { return }
        // Broadcasts sent while unsubscribed are lost: what was cached meanwhile goes.
        let caches = self.caches.withLockedValue { $0 }()
        let dropped = caches.reduce(0) { $0 + $1.purgeAll() }
        metrics.subscribed.record(1)
        logger.notice("subscribed to purge broadcasts on the shared store", metadata: ["authz.shared.dropped": "\(dropped)"])
    }

    private func lost() {
        guard subscribed.exchange(false, ordering: .relaxed) else { return }
        metrics.subscribed.record(0)
        let caches = self.caches.withLockedValue { $0 }()
        for cache in caches { cache.capLifetimes(seconds: configuration.degradedTTLSeconds) }
        logger.warning(
            "purge broadcasts lost: local cache entries now live at most degraded_ttl_seconds",
            metadata: ["authz.shared.degraded_ttl_seconds": "\(configuration.degradedTTLSeconds)"]
        )
    }

    var localLifetimeCap: Double? {
        subscribed.load(ordering: .relaxed) ? nil : configuration.degradedTTLSeconds
    }

    public func shutdown() {
        client.shutdown()
    }

    // MARK: Helpers

    /// One warning per key per 10 s (a down store must not flood the log), with how many were
    /// suppressed since the last one.
    private func warn(_ key: String, _ message: String, cause: String? = nil) {
        problems.log(key: key) { suppressed in
            var metadata: Logger.Metadata = ["authz.shared.cause": "\(cause ?? key)"]
            if suppressed > 0 { metadata["authz.suppressed"] = "\(suppressed)" }
            logger.warning("\(message)", metadata: metadata)
        }
    }

    private func fault(_ failure: StoreFailure, _ doing: String) {
        metrics.errors(failure.cause).increment()
        warn(failure.cause, "shared store unusable while \(doing): \(failure); going on without it", cause: failure.cause)
    }

    static func nowMilliseconds() -> Int64 {
        Int64((Date().timeIntervalSince1970 * 1000).rounded(.down))
    }

    static func shape(_ value: RESPValue) -> String {
        switch value {
        case .simpleString: "a simple string"
        case .error(let message): "an error (\(message.prefix(60)))"
        case .integer: "an integer"
        case .bulkString: "a bulk string"
        case .array(let items): "an array of \(items?.count ?? -1)"
        }
    }
}

/// The store, seen from one issuer's cache.
struct IssuerView: SharedAnswerStore {
    let store: SharedTokenStore
    let issuer: String

    func load(_ digest: TokenDigest) async -> SharedLoad {
        await store.load(issuer: issuer, digest: digest)
    }

    func save(_ digest: TokenDigest, info: TokenInfo, until: Double, epoch: SharedEpoch) {
        store.save(issuer: issuer, digest: digest, info: info, until: until, epoch: epoch)
    }

    var localLifetimeCap: Double? { store.localLifetimeCap }
}

/// The tokens purged in the last `lifetimeSeconds`: their stored entries are not used, so that an
/// entry from before a purge, written back over its tombstone, is not served. Bounded: past
/// `capacity` purges in the window, every stored entry is distrusted until the window ends. (A
/// purge of everything relies on the epoch alone: distrusting every entry for a whole answer
/// lifetime would turn sharing off after each one.)
struct PurgeMemory: Sendable {
    let lifetimeNanoseconds: UInt64
    var digests: [TokenDigest: UInt64] = [:]
    var allUntil: UInt64 = 0
    static let capacity = 10_000

    init(lifetimeSeconds: Double) {
        lifetimeNanoseconds = UInt64(max(0, lifetimeSeconds) * 1e9) + 1_000_000_000
    }

    mutating func remember(_ digest: TokenDigest) {
        let now = DispatchTime.now().uptimeNanoseconds
        if digests.count >= Self.capacity { digests = digests.filter { $0.value > now } }
        if digests.count >= Self.capacity {
            rememberAll()
        } else {
            digests[digest] = now + lifetimeNanoseconds
        }
    }

    mutating func rememberAll() {
        allUntil = DispatchTime.now().uptimeNanoseconds + lifetimeNanoseconds
        digests = [:]
    }

    mutating func distrusts(_ digest: TokenDigest) -> Bool {
        let now = DispatchTime.now().uptimeNanoseconds
        if now < allUntil { return true }
        guard let until = digests[digest] else { return false }
        if now < until { return true }
        digests[digest] = nil
        return false
    }
}

/// What one subscription attempt has heard.
final class SubscriptionWatch: Sendable {
    private let lastHeard = Atomic<UInt64>(0)
    let confirmed = Atomic<Bool>(false)
    let failed = Atomic<Bool>(false)

    func heard() {
        lastHeard.store(DispatchTime.now().uptimeNanoseconds, ordering: .relaxed)
    }

    var silence: TimeAmount {
        .nanoseconds(Int64(DispatchTime.now().uptimeNanoseconds &- lastHeard.load(ordering: .relaxed)))
    }
}

/// The shared store's metrics (DESIGN.md §11).
struct SharedCacheMetrics: Sendable {
    let hits: Counter
    let misses: Counter
    let unopenable: Counter
    let writes: Counter
    let broadcasts: Counter
    let broadcastLag: Metrics.Timer
    let subscribed: Gauge
    private let errorCounters: [String: Counter]

    init(factory: any MetricsFactory) {
        hits = Counter(label: "authz_shared_cache_hits_total", factory: factory)
        misses = Counter(label: "authz_shared_cache_misses_total", factory: factory)
        unopenable = Counter(label: "authz_shared_cache_unopenable_total", factory: factory)
        writes = Counter(label: "authz_shared_cache_writes_total", factory: factory)
        broadcasts = Counter(label: "authz_shared_cache_broadcasts_received_total", factory: factory)
        broadcastLag = Metrics.Timer(label: "authz_shared_cache_broadcast_lag_seconds", preferredDisplayUnit: .seconds, factory: factory)
        subscribed = Gauge(label: "authz_shared_cache_subscribed", factory: factory)
        var errors: [String: Counter] = [:]
        for cause in ["timeout", "connect", "protocol", "refused"] {
            errors[cause] = Counter(label: "authz_shared_cache_errors_total", dimensions: [("cause", cause)], factory: factory)
        }
        errorCounters = errors
    }

    func errors(_ cause: String) -> Counter {
        errorCounters[cause] ?? errorCounters["protocol"]!
    }
}
