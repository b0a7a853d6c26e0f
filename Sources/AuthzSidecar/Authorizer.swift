import HTTPTypes
import Introspection
import JWTValidation
import Logging
import Metrics
import NIOHTTP1
import Synchronization
import Tracing
import SharedCache

/// Token → introspection (cached) → policy → decision, logged and counted (DESIGN.md §5, §8).
public final class Authorizer: Sendable {
    /// A decision, or a fault that prevented one.
    public enum Outcome: Sendable {
        case decision(Decision)
        case fault(IntrospectionError)
    }

    public let configuration: SidecarConfiguration
    /// Every issuer, `default` first (DESIGN.md §9); each has its own cache.
    public let issuers: [Issuer]
    private let evaluations: [PolicyEvaluation]
    private let clock: any EpochClock
    private let logger: Logger
    private let metrics: DecisionMetrics
    private let faultLog: RateLimitedLog
    let allowAnswers = AllowAnswerMemo()
    /// DPoP proofs: replay memory and nonces (shared by the generations of a running sidecar).
    let dpop: DPoPVerifier
    /// The store shared by replicas: a proof is consumed there too, so that it is refused at
    /// every replica (DESIGN.md §11).
    let sharedReplay: SharedTokenStore?
    /// Whether any policy has `match.hosts`.
    private let comparesHosts: Bool
    /// Whether any policy has `debug_log: true`.
    private let hasDebugPolicies: Bool
    /// Whether decisions make spans (`tracing.otlp_endpoint` set): nothing is done for them
    /// otherwise, on any path.
    let spans: Bool
    /// The draw for decisions that come without a parent.
    let sampling: SamplingDraw
    /// Whether any request may be traced (a debug policy, or a trusted debug header).
    private let tracesSome: Bool

    /// An authorizer over one introspection cache: the issuer `default` (tests, benches).
    public convenience init(
        configuration: SidecarConfiguration,
        cache: CachingTokenIntrospector,
        clock: any EpochClock = SystemEpochClock(),
        logger: Logger = Logger(label: "authz"),
        metrics factory: any MetricsFactory = MetricsSystem.factory
    ) {
        self.init(
            configuration: configuration, issuers: [Issuer(default: configuration.introspection, cache: cache)],
            clock: clock, logger: logger, metrics: factory
        )
    }

    /// - Parameter issuers: one per `configuration.allIssuers`, by name.
    public init(
        configuration: SidecarConfiguration,
        issuers: [Issuer],
        dpop: DPoPVerifier? = nil,
        sharedStore: SharedTokenStore? = nil,
        clock: any EpochClock = SystemEpochClock(),
        logger: Logger = Logger(label: "authz"),
        metrics factory: any MetricsFactory = MetricsSystem.factory
    ) {
        self.configuration = configuration
        self.sharedReplay = sharedStore
        self.issuers = issuers
        self.dpop = dpop ?? DPoPVerifier(server: configuration.server)
        let thumbprints = ThumbprintCache()
        self.evaluations = configuration.policies.map { policy in
            let accepted = policy.issuers.isEmpty ? issuers : issuers.filter { policy.issuers.contains($0.name) }
            return PolicyEvaluation(policy: policy, route: IssuerRoute(accepting: accepted), thumbprints: thumbprints)
        }
        self.comparesHosts = configuration.policies.contains { !$0.hosts.isEmpty }
        self.hasDebugPolicies = configuration.policies.contains { $0.debugLog }
        self.spans = configuration.tracing.otlpEndpoint != nil
        self.sampling = SamplingDraw(ratio: configuration.tracing.samplingRatio)
        self.tracesSome = hasDebugPolicies || configuration.server.trustDebugHeader
        self.clock = clock
        self.logger = logger
        self.metrics = DecisionMetrics(policies: configuration.policies.map(\.name), factory: factory)
        self.faultLog = RateLimitedLog(clock: clock, interval: 10)
    }

    /// Decides and renders the answer for the proxy that asked.
    public func answer(_ request: AccessRequest) async -> AuthzAnswer {
        if tracesSome, wantsTrace(request) { return await explainAndLog(request).answer }
        let (outcome, policy, dpopContext) = await decideAndExplain(request, parent: nil)
        return render(outcome, policy: policy, front: request.front, dpop: dpopContext)
    }

    /// Decides, in a span of its own when tracing is on (DESIGN.md §12): its parent is the
    /// `traceparent` the proxy sent (`parent`, when the front end found it elsewhere, as gRPC
    /// metadata); AS calls and store lookups made for it are its children.
    func decideAndExplain(_ request: AccessRequest, parent: ServiceContext?) async -> (Outcome, PolicyConfiguration?, AuthzAnswer.DPoPContext?) {
        guard spans, parent != nil || sampled(request) else { return await decideAndExplain(request) }
        return await withSpan("authz.decision", context: parent ?? Self.parentContext(of: request), ofKind: .server) { span in
            let trace = DecisionTrace(recordsSteps: false)
            let result = await decideAndExplain(request, trace: trace)
            let status: Int
            switch result.0 {
            case .decision(.allow): status = 200
            case .decision(.deny(let denial)): status = denial.status
            case .fault: status = 503
            }
            Self.annotate(span, trace: trace, request: request, status: status, outcome: result.0)
            return result
        }
    }

    /// Whether this decision gets a span, decided before any span work so that an unsampled
    /// decision costs next to nothing: a `traceparent` from the proxy decides by its sampled flag
    /// (parent-based sampling); without one, a draw at `tracing.sampling_ratio`. (The tracer
    /// itself then samples every span it is given.)
    func sampled(_ request: AccessRequest) -> Bool {
        if let parent = request.headers.first(name: "traceparent") {
            // version "-" trace-id "-" parent-id "-" flags: the flags' low bit is "sampled".
            let utf8 = parent.utf8
            if utf8.count >= 55, let last = utf8.last, let flags = Self.hexValue(last) { return flags & 1 == 1 }
        }
        return sampling.draw()
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        default: return nil
        }
    }

    /// The W3C trace context the proxy sent with the request (none: a new trace).
    static func parentContext(of request: AccessRequest) -> ServiceContext {
        var context = ServiceContext.topLevel
        InstrumentationSystem.instrument.extract(request.headers, into: &context, using: HeaderExtractor())
        return context
    }

    /// The decision's attributes (DESIGN.md §12): never a token, never a claim value.
    static func annotate(_ span: any Span, trace: DecisionTrace, request: AccessRequest, status: Int, outcome: Outcome?) {
        guard span.isRecording else { return }
        span.attributes["authz.front"] = request.front.rawValue
        span.attributes["authz.policy"] = trace.policy ?? "none"
        span.attributes["authz.cache"] = trace.cache
        if let token = trace.tokenPrefix { span.attributes["authz.token"] = token }
        span.attributes["http.response.status_code"] = status
        switch outcome {
        case .decision(.deny(let denial))?:
            span.attributes["authz.outcome"] = "deny"
            span.attributes["authz.reason"] = denial.reason.rawValue
        case .fault?:
            span.attributes["authz.outcome"] = "fault"
            span.attributes["authz.reason"] = "as_fault"
            span.setStatus(SpanStatus(code: .error, message: "authorization server unavailable"))
        case .decision(.allow)?:
            span.attributes["authz.outcome"] = "allow"
            span.attributes["authz.reason"] = "granted"
        case nil:
            // Answered without suspending: read from the status.
            span.attributes["authz.outcome"] = status == 200 ? "allow" : status >= 500 ? "fault" : "deny"
            if status == 200 { span.attributes["authz.reason"] = "granted" }
        }
    }

    /// The answer without suspending, when no call to the AS is needed: a denial before
    /// introspection, a fresh cache hit (the hot path), or a JWT verified with keys in hand.
    /// nil: use `answer(_:)`.
    public func answerWithoutSuspending(_ request: AccessRequest) -> AuthzAnswer? {
        // A request to trace takes the suspending path (`answer`), which traces it.
        if tracesSome, wantsTrace(request) { return nil }
        guard spans, sampled(request) else { return answerWithoutSuspending(request, trace: nil) }
        // A span, made after the fact with the times it began and ended: only for a request
        // answered here (a declined one gets its span on the suspending path).
        let began = DefaultTracerClock.now
        let trace = DecisionTrace(recordsSteps: false)
        guard let answer = answerWithoutSuspending(request, trace: trace) else { return nil }
        let span = InstrumentationSystem.tracer.startSpan("authz.decision", context: Self.parentContext(of: request), ofKind: .server, at: began)
        Self.annotate(span, trace: trace, request: request, status: answer.status, outcome: trace.outcome)
        span.end()
        return answer
    }

    private func answerWithoutSuspending(_ request: AccessRequest, trace: DecisionTrace?) -> AuthzAnswer? {
        let started = clock.now()
        switch prepare(request, started: started, trace: trace) {
        case .decided(let outcome, let policy, let dpopContext):
            trace?.outcome = outcome
            return render(outcome, policy: policy, front: request.front, dpop: dpopContext)
        case .introspect(let evaluation, let issuer, let token, let digest, let proof):
            // A proof to consume at the shared store too needs the suspending path.
            if proof != nil, sharedReplay != nil { return nil }
            // A hit, or a JWT verified here and now with keys in hand.
            guard let found = issuer.cache.lookupWithoutSuspending(token: token, digest: digest) else { return nil }
            trace?.cache = found.source.rawValue
            if let replayed = consume(proof, policy: evaluation.policy, digest: digest, request: request, started: started) {
                trace?.outcome = replayed
                return render(replayed, policy: evaluation.policy, front: request.front, dpop: proof?.context)
            }
            let decision = evaluation.decide(token: found.info, request: request, now: clock.now(), issuer: issuer, dpopKey: proof?.key)
            let outcome = Outcome.decision(decision)
            trace?.outcome = outcome
            record(outcome, policy: evaluation.policy, digest: digest, request: request, started: started)
            // A rendering is remembered from the second sight on: a token seen once (a JWT
            // verified just now) would only churn the memo. A DPoP allow is a function of the
            // token too (its key must be the token's cnf.jkt), unless it carries a nonce.
            if case .allow(let grant) = decision, found.source == .hit, proof?.context.nonce == nil {
                return allowAnswers.answer(for: grant, digest: digest, policy: evaluation, front: request.front) {
                    render(outcome, policy: evaluation.policy, front: request.front, dpop: proof?.context)
                }
            }
            return render(outcome, policy: evaluation.policy, front: request.front, dpop: proof?.context)
        }
    }

    /// Decides as `answer` does, recording every step (DESIGN.md §5): `authz-sidecar explain` and
    /// the debug log of a single request.
    public func explain(_ request: AccessRequest) async -> Explanation {
        let trace = DecisionTrace()
        let started = clock.now()
        let outcome: Outcome
        let policy: PolicyConfiguration?
        var dpopContext: AuthzAnswer.DPoPContext?
        switch prepare(request, started: started, trace: trace) {
        case .decided(let decided, let decidedPolicy, let context):
            (outcome, policy, dpopContext) = (decided, decidedPolicy, context)
        case .introspect(let evaluation, let issuer, let token, let digest, let proof):
            policy = evaluation.policy
            dpopContext = proof?.context
            trace.add("issuer", "\(issuer.name) (\(issuer.configuration.validation.rawValue))")
            if let replayed = consume(proof, policy: evaluation.policy, digest: digest, request: request, started: started) {
                trace.add("dpop proof", "replayed: its jti was used before")
                outcome = replayed
            } else if let proof, let sharedReplay,
                await sharedReplay.firstUse(ofProof: proof.proof.replayKey, windowSeconds: proof.proof.windowSeconds) == false
            {
                trace.add("dpop proof", "replayed: its jti was used before, at another replica")
                outcome = .decision(.deny(Denial(.dpopProof, detail: "the proof (jti) was used before, at another replica")))
                record(outcome, policy: evaluation.policy, digest: digest, request: request, started: started)
            } else {
                do {
                    let answer = try await issuer.cache.lookup(token: token, digest: digest)
                    trace.cache = answer.source.rawValue
                    trace.add("validation", "\(answer.source.rawValue): \(answer.info.traceSummary)")
                    outcome = .decision(evaluation.decide(token: answer.info, request: request, now: clock.now(), issuer: issuer, dpopKey: proof?.key, trace: trace))
                } catch {
                    trace.cache = "miss"
                    trace.add("validation", "fault: \(error)")
                    outcome = .fault(error)
                }
                record(outcome, policy: evaluation.policy, digest: digest, request: request, started: started)
            }
        }
        let answer = render(outcome, policy: policy, front: request.front, dpop: dpopContext)
        switch outcome {
        case .decision(.allow): trace.add("decision", "allow")
        case .decision(.deny(let denial)): trace.add("decision", "deny \(denial.status): \(denial.reason.rawValue)" + (denial.detail.map { " (\($0))" } ?? ""))
        case .fault(let error): trace.add("decision", "fault \(answer.status): \(error)")
        }
        return Explanation(steps: trace.steps, outcome: outcome, answer: answer, summary: trace)
    }

    /// Decides a request to trace (`wantsTrace`), logging its steps in one line at notice level.
    func explainAndLog(_ request: AccessRequest) async -> Explanation {
        let explanation: Explanation
        if spans, ServiceContext.current != nil || sampled(request) {
            explanation = await withSpan("authz.decision", context: ServiceContext.current ?? Self.parentContext(of: request), ofKind: .server) { span in
                let explanation = await explain(request)
                Self.annotate(span, trace: explanation.summary, request: request, status: explanation.answer.status, outcome: explanation.outcome)
                return explanation
            }
        } else {
            explanation = await explain(request)
        }
        var fields: Logger.Metadata = ["authz.trace": .array(explanation.steps.map { .string("\($0.name): \($0.result)") })]
        if let id = request.requestID { fields["authz.request_id"] = "\(id)" }
        fields["authz.front"] = "\(request.front.rawValue)"
        logger.notice("decision trace", metadata: fields)
        return explanation
    }

    /// A JWT (three dot-separated parts) or an opaque token, as the trace names it.
    static func kind(of token: String) -> String {
        token.utf8.reduce(0) { $0 + ($1 == UInt8(ascii: ".") ? 1 : 0) } == 2 ? "a JWT" : "an opaque token"
    }

    /// Whether this request's decision is to be logged step by step: `X-Authz-Debug` from a
    /// trusted proxy (`server.trust_debug_header`), or a policy with `debug_log: true`.
    var tracesSomeRequests: Bool { tracesSome }

    func wantsTrace(_ request: AccessRequest) -> Bool {
        if configuration.server.trustDebugHeader, request.headers.first(name: "X-Authz-Debug") != nil { return true }
        guard hasDebugPolicies, case .selected(let evaluation) = select(for: request) else { return false }
        return evaluation.policy.debugLog
    }

    /// Decides (DESIGN.md §5), logging denials and faults.
    public func authorize(_ request: AccessRequest) async -> (Outcome, PolicyConfiguration?) {
        let (outcome, policy, _) = await decideAndExplain(request)
        return (outcome, policy)
    }

    /// The same, with what a DPoP answer adds.
    func decideAndExplain(_ request: AccessRequest, trace: DecisionTrace? = nil) async -> (Outcome, PolicyConfiguration?, AuthzAnswer.DPoPContext?) {
        let started = clock.now()
        switch prepare(request, started: started, trace: trace) {
        case .decided(let outcome, let policy, let dpopContext):
            return (outcome, policy, dpopContext)
        case .introspect(let evaluation, let issuer, let token, let digest, let proof):
            if let replayed = consume(proof, policy: evaluation.policy, digest: digest, request: request, started: started) {
                return (replayed, evaluation.policy, proof?.context)
            }
            if let proof, let sharedReplay,
                await sharedReplay.firstUse(ofProof: proof.proof.replayKey, windowSeconds: proof.proof.windowSeconds) == false
            {
                let outcome = Outcome.decision(.deny(Denial(.dpopProof, detail: "the proof (jti) was used before, at another replica")))
                record(outcome, policy: evaluation.policy, digest: digest, request: request, started: started)
                return (outcome, evaluation.policy, proof.context)
            }
            // 3. validation through the issuer's cache: introspection, or the JWT verified locally
            let outcome: Outcome
            do {
                let answer = try await issuer.cache.lookup(token: token, digest: digest)
                trace?.cache = answer.source.rawValue
                // 4–7. the pure decision
                outcome = .decision(evaluation.decide(token: answer.info, request: request, now: clock.now(), issuer: issuer, dpopKey: proof?.key))
            } catch {
                trace?.cache = "miss"
                outcome = .fault(error)
            }
            record(outcome, policy: evaluation.policy, digest: digest, request: request, started: started)
            return (outcome, evaluation.policy, proof?.context)
        }
    }

    /// A verified DPoP proof (not yet consumed), and what the answer adds.
    struct VerifiedProof {
        var proof: DPoPVerifier.Verified
        var context: AuthzAnswer.DPoPContext
        var key: String { proof.thumbprint }
    }

    /// The replay check, made once per request at the point where it is decided: a replayed
    /// proof is refused (and never costs an AS call).
    private func consume(_ proof: VerifiedProof?, policy: PolicyConfiguration, digest: TokenDigest, request: AccessRequest, started: Double) -> Outcome? {
        guard let proof, !dpop.consume(proof.proof, uptime: clock.uptime()) else { return nil }
        let outcome = Outcome.decision(.deny(Denial(.dpopProof, detail: "the proof (jti) was used before")))
        record(outcome, policy: policy, digest: digest, request: request, started: started)
        return outcome
    }

    /// Steps 1–2, which need no I/O: either a decision already, or the token to introspect.
    private enum Prepared {
        case decided(Outcome, PolicyConfiguration?, AuthzAnswer.DPoPContext?)
        case introspect(PolicyEvaluation, Issuer, token: String, digest: TokenDigest, proof: VerifiedProof?)
    }

    private func prepare(_ request: AccessRequest, started: Double, trace: DecisionTrace? = nil) -> Prepared {
        /// A refusal before validation, logged and counted.
        func refuse(_ denial: Denial, policy: PolicyConfiguration?, digest: TokenDigest?, dpop: AuthzAnswer.DPoPContext? = nil) -> Prepared {
            let outcome = Outcome.decision(.deny(denial))
            record(outcome, policy: policy, digest: digest, request: request, started: started)
            return .decided(outcome, policy, dpop)
        }
        // 1. policy
        let evaluation: PolicyEvaluation
        if let trace {
            switch request.pathReadings {
            case .refused(let why): trace.add("path", "refused: \(why)")
            case .readings(let readings):
                trace.add("path", "\(request.method) \(request.host)\(readings.strict.prefix(200))" + (readings.others.isEmpty ? "" : " (also read as \(readings.others.map { String($0.prefix(200)) }.joined(separator: ", ")))"))
            }
        }
        switch select(for: request) {
        case .selected(let selected):
            evaluation = selected
            trace?.policy = selected.policy.name
            trace?.add("policy", "\(selected.policy.name)" + (request.policyHint != nil ? " (named by the proxy)" : " (the first that matches every reading of the path)"))
        case .refused(let denial):
            trace?.add("policy", "none: \(denial.detail ?? denial.reason.rawValue)")
            let outcome = Outcome.decision(.deny(denial))
            record(outcome, policy: nil, digest: nil, request: request, started: started)
            return .decided(outcome, nil, nil)
        }
        let policy = evaluation.policy
        if request.headerBytes > configuration.server.maxHeaderBytes {
            return refuse(Denial(.requestTooLarge, detail: "\(request.headerBytes) header bytes"), policy: policy, digest: nil)
        }
        // 2. token
        let parsed = BearerToken.parse(request.headers.values(.authorization))
        if let trace {
            switch parsed {
            case .dpop(let token), .token(let token): trace.tokenPrefix = TokenDigest(token: token).prefix
            default: break
            }
        }
        if let trace, trace.recordsSteps {
            switch parsed {
            case .missing: trace.add("token", "none" + (policy.allowAnonymous ? " (the policy allows anonymous requests)" : ""))
            case .malformed(let why): trace.add("token", "malformed: \(why)")
            case .dpop(let token): trace.add("token", "DPoP scheme, \(Self.kind(of: token)), sha256 \(TokenDigest(token: token).prefix)…")
            case .token(let token): trace.add("token", "Bearer scheme, \(Self.kind(of: token)), sha256 \(TokenDigest(token: token).prefix)…")
            }
        }
        switch parsed {
        case .missing:
            let outcome: Outcome = policy.allowAnonymous ? .decision(.allow(Grant(token: nil))) : .decision(.deny(Denial(.noToken)))
            record(outcome, policy: policy, digest: nil, request: request, started: started)
            return .decided(outcome, policy, nil)
        case .malformed(let why):
            return refuse(Denial(.malformedToken, detail: why), policy: policy, digest: nil)
        case .dpop(let token):
            guard policy.dpop != .disabled else {
                return refuse(Denial(.dpopUnsupported, detail: "Authorization: DPoP on a policy with dpop: disabled; a DPoP token is never anonymous"), policy: policy, digest: nil)
            }
            // The proof first: a bad one never costs an AS call (RFC 9449 §4.3, DESIGN.md §10).
            let now = clock.now()
            var context = dpopContext(policy, now: now)
            let digest = TokenDigest(token: token)
            let verified = dpop.verify(
                // Each header as it came (a comma is no part of a proof: two joined by a proxy fail).
                proofs: request.headers["DPoP"], token: digest, method: request.method,
                expectedURL: expectedURL(of: request, policy: policy), maxAgeSeconds: policy.dpopMaxAgeSeconds,
                leewaySeconds: policy.dpopIatLeewaySeconds, requireNonce: policy.dpopNonce, now: now
            )
            let accepted: DPoPVerifier.Verified
            switch verified {
            case .success(let proof):
                trace?.add("dpop proof", "valid, key \(proof.thumbprint)")
                accepted = proof
            case .failure(.proof(let why)):
                trace?.add("dpop proof", "refused: \(why)")
                return refuse(Denial(.dpopProof, detail: why), policy: policy, digest: digest, dpop: context)
            case .failure(.nonce(let why)):
                trace?.add("dpop proof", "nonce: \(why)")
                context.nonce = dpop.currentNonce(now: now)
                return refuse(Denial(.dpopNonce, detail: why), policy: policy, digest: digest, dpop: context)
            }
            guard let issuer = evaluation.route.issuer(for: token) else {
                return refuse(Denial(.noIssuer, detail: "no issuer the policy accepts takes this token"), policy: policy, digest: digest, dpop: context)
            }
            return .introspect(evaluation, issuer, token: token, digest: digest, proof: VerifiedProof(proof: accepted, context: context))
        case .token(let token):
            if policy.dpop == .required {
                trace?.add("dpop", "the policy requires DPoP; a Bearer token came")
                let context = dpopContext(policy, now: clock.now())
                return refuse(Denial(.dpopRequired, detail: "a Bearer token on a policy with dpop: required"), policy: policy, digest: TokenDigest(token: token), dpop: context)
            }
            let digest = TokenDigest(token: token)
            guard let issuer = evaluation.route.issuer(for: token) else {
                return refuse(Denial(.noIssuer, detail: "no issuer the policy accepts takes this token"), policy: policy, digest: digest)
            }
            return .introspect(evaluation, issuer, token: token, digest: digest, proof: nil)
        }
    }

    /// What an answer to a DPoP request (or one refused for not being one) adds.
    private func dpopContext(_ policy: PolicyConfiguration, now: Double) -> AuthzAnswer.DPoPContext {
        AuthzAnswer.DPoPContext(algorithms: dpop.challengeAlgorithms, nonce: policy.dpopNonce ? dpop.currentNonce(now: now) : nil)
    }

    /// The URL a DPoP proof's `htu` must name (RFC 9449 §4.3): `public_base_url`, else the
    /// scheme the proxy reports (gRPC attributes, `X-Forwarded-Proto`, else https) and the
    /// original host; then the original path (query and fragment are not compared).
    /// nil when the host the proxy reports is not a valid `host[:port]` (or the scheme not
    /// http(s)): then no proof can match.
    func expectedURL(of request: AccessRequest, policy: PolicyConfiguration) -> String? {
        let path = request.path.prefix { $0 != "?" && $0 != "#" }
        if let base = policy.publicBaseURL { return base + path }
        let scheme = request.scheme ?? request.headers.first(name: "X-Forwarded-Proto").map { $0.lowercased() } ?? "https"
        guard scheme == "https" || scheme == "http", DPoPURL.hostAndPort(Substring(request.host), scheme: scheme) != nil else { return nil }
        return scheme + "://" + request.host + path
    }

    /// Renders an outcome; logs claim headers dropped for control characters (DESIGN.md §6).
    private func render(_ outcome: Outcome, policy: PolicyConfiguration?, front: AccessRequest.Front, dpop: AuthzAnswer.DPoPContext?) -> AuthzAnswer {
        let answer = AuthzAnswer(outcome: outcome, policy: policy, front: front, dpop: dpop)
        if !answer.droppedHeaders.isEmpty {
            logger.warning(
                "claim headers dropped: value holds a control character",
                metadata: [
                    "authz.policy": "\(policy?.name ?? "none")",
                    "authz.headers": "\(answer.droppedHeaders.joined(separator: ","))",
                ]
            )
        }
        return answer
    }

    /// The policy a request selects, or why it selects none (DESIGN.md §5.1).
    public enum Selection {
        case selected(PolicyEvaluation)
        case refused(Denial)
    }

    /// The issuer's caches, every one: a purge must reach a token wherever it was validated.
    public var caches: [CachingTokenIntrospector] { issuers.map(\.cache) }

    /// The cache of the issuer named `name`.
    public func cache(for name: String) -> CachingTokenIntrospector? {
        issuers.first { $0.name == name }?.cache
    }

    /// The cache of the issuer `default`, else of the first issuer.
    public var cache: CachingTokenIntrospector { issuers[0].cache }

    /// The policy the proxy named (the front end passes a hint only from a trusted source), else
    /// the first policy that matches under every reading of the path. A named policy that does not
    /// exist matches nothing.
    public func select(for request: AccessRequest) -> Selection {
        if request.originalURIMissing {
            return .refused(Denial(.missingOriginalURI, detail: "proxy misconfiguration: an nginx-form /authz request without X-Original-URI"))
        }
        let readings: PathReadings.Readings
        switch request.pathReadings {
        case .refused(let why):
            return .refused(Denial(.ambiguousPath, detail: why))
        case .readings(let derived):
            readings = derived
        }
        if let hint = request.policyHint {
            guard let named = evaluations.first(where: { $0.policy.name == hint }) else {
                return .refused(Denial(.noPolicy, detail: "the proxy named policy \"\(hint.prefix(64))\", which does not exist"))
            }
            return .selected(named)
        }
        // Normalising the host (and, with a port, building host:port) is paid only when some
        // policy compares hosts: not on the hit path of a configuration without `hosts:`.
        let host = comparesHosts ? HostKey(Substring(request.host)) : HostKey.unused
        let first = firstMatch(path: readings.strict, method: request.method, host: host)
        for other in readings.others where firstMatch(path: other, method: request.method, host: host) !== first {
            return .refused(Denial(.ambiguousPath, detail: "readings of the path select different policies: \(readings.strict.prefix(200)) and \(other.prefix(200))"))
        }
        guard let first else {
            return .refused(Denial(.noPolicy, detail: "no policy matches \(request.method) \(request.host)\(readings.strict.prefix(200))"))
        }
        return .selected(first)
    }

    private func firstMatch(path: Substring, method: String, host: HostKey) -> PolicyEvaluation? {
        evaluations.first { $0.policy.matches(method: method, path: path, host: host) }
    }

    private func record(_ outcome: Outcome, policy: PolicyConfiguration?, digest: TokenDigest?, request: AccessRequest, started: Double) {
        let policyName = policy?.name ?? "none"
        switch outcome {
        case .decision(.allow(let grant)):
            metrics.allowed(policy: policyName, anonymous: grant.token == nil)
            if logger.logLevel <= .debug {
                logger.debug("allowed", metadata: metadata(policyName, "granted", digest, request, started))
            }
        case .decision(.deny(let denial)):
            metrics.denied(policy: policyName, reason: denial.reason)
            var fields = metadata(policyName, denial.reason.rawValue, digest, request, started)
            fields["authz.status"] = "\(denial.status)"
            if let detail = denial.detail { fields["authz.detail"] = "\(detail)" }
            if denial.reason == .missingOriginalURI {
                // Not the client's doing: every request through this proxy location is refused.
                logger.warning("denied: proxy misconfiguration", metadata: fields)
            } else {
                logger.info("denied", metadata: fields)
            }
        case .fault(let error):
            metrics.faulted(policy: policyName)
            var fields = metadata(policyName, "as_fault", digest, request, started)
            fields["authz.fault"] = "\(error.label)"
            fields["authz.detail"] = "\(error.description)"
            faultLog.log(key: error.label) { suppressed in
                if suppressed > 0 { fields["authz.suppressed"] = "\(suppressed)" }
                logger.warning("authorization server fault", metadata: fields)
            }
        }
    }

    private func metadata(_ policy: String, _ reason: String, _ digest: TokenDigest?, _ request: AccessRequest, _ started: Double) -> Logger.Metadata {
        var fields: Logger.Metadata = [
            "authz.policy": "\(policy)",
            "authz.reason": "\(reason)",
            "authz.latency_ms": "\(((clock.now() - started) * 1000 * 1000).rounded() / 1000)",
            "authz.front": "\(request.front.rawValue)",
        ]
        if let digest { fields["authz.token"] = "\(digest.prefix)" }
        if let id = request.requestID { fields["authz.request_id"] = "\(id)" }
        return fields
    }
}

/// Reads W3C trace context (`traceparent`, `tracestate`) from the request's headers.
struct HeaderExtractor: Extractor {
    func extract(key: String, from carrier: HTTPHeaders) -> String? {
        carrier.first(name: key)
    }
}

/// A sampling draw at a ratio, without a system call or a lock: a shared counter through
/// SplitMix64 (uniform enough for sampling; not for anything secret).
final class SamplingDraw: Sendable {
    let ratio: Double
    private let counter: Atomic<UInt64>

    init(ratio: Double) {
        self.ratio = ratio
        self.counter = Atomic(UInt64.random(in: .min ... .max))
    }

    func draw() -> Bool {
        if ratio >= 1 { return true }
        if ratio <= 0 { return false }
        var z = counter.wrappingAdd(0x9E37_79B9_7F4A_7C15, ordering: .relaxed).newValue
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return Double(z >> 11) * 0x1p-53 < ratio
    }
}
