import HTTPTypes
import Introspection
import Logging

/// Token → introspection (cached) → policy → decision, logged and counted (DESIGN.md §5, §8).
public final class Authorizer: Sendable {
    /// A decision, or a fault that prevented one.
    public enum Outcome: Sendable {
        case decision(Decision)
        case fault(IntrospectionError)
    }

    public let configuration: SidecarConfiguration
    public let cache: CachingTokenIntrospector
    private let evaluations: [PolicyEvaluation]
    private let clock: any EpochClock
    private let logger: Logger
    private let metrics: DecisionMetrics
    private let faultLog: RateLimitedLog

    public init(configuration: SidecarConfiguration, cache: CachingTokenIntrospector, clock: any EpochClock = SystemEpochClock(), logger: Logger = Logger(label: "authz")) {
        self.configuration = configuration
        self.cache = cache
        self.evaluations = configuration.policies.map { PolicyEvaluation(policy: $0, expectedIssuer: configuration.introspection.expectedIssuer) }
        self.clock = clock
        self.logger = logger
        self.metrics = DecisionMetrics(policies: configuration.policies.map(\.name))
        self.faultLog = RateLimitedLog(clock: clock, interval: 10)
    }

    /// Decides and renders the answer for the proxy that asked.
    public func answer(_ request: AccessRequest) async -> AuthzAnswer {
        let (outcome, policy) = await authorize(request)
        let answer = AuthzAnswer(outcome: outcome, policy: policy, front: request.front)
        if !answer.droppedHeaders.isEmpty {
            // DESIGN.md §6: a claim value with a control character is never emitted.
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

    /// Decides (DESIGN.md §5), logging denials and faults.
    public func authorize(_ request: AccessRequest) async -> (Outcome, PolicyConfiguration?) {
        let started = clock.now()
        // 1. policy
        guard let evaluation = selectPolicy(for: request) else {
            let denial = Denial(.noPolicy, detail: "no policy matches \(request.method) \(request.host)\(request.pathWithoutQuery.prefix(200))")
            record(.decision(.deny(denial)), policy: nil, digest: nil, request: request, started: started)
            return (.decision(.deny(denial)), nil)
        }
        let policy = evaluation.policy
        if request.headerBytes > configuration.server.maxHeaderBytes {
            let denial = Denial(.requestTooLarge, detail: "\(request.headerBytes) header bytes")
            record(.decision(.deny(denial)), policy: policy, digest: nil, request: request, started: started)
            return (.decision(.deny(denial)), policy)
        }
        // 2. token
        let token: String
        switch BearerToken.parse(request.headers[values: .authorization]) {
        case .missing:
            let outcome: Outcome = policy.allowAnonymous ? .decision(.allow(Grant(token: nil))) : .decision(.deny(Denial(.noToken)))
            record(outcome, policy: policy, digest: nil, request: request, started: started)
            return (outcome, policy)
        case .malformed(let why):
            let outcome = Outcome.decision(.deny(Denial(.malformedToken, detail: why)))
            record(outcome, policy: policy, digest: nil, request: request, started: started)
            return (outcome, policy)
        case .token(let value):
            token = value
        }
        // 3. introspection through the cache
        let digest = TokenDigest(token: token)
        let outcome: Outcome
        do {
            let answer = try await cache.lookup(token: token, digest: digest)
            // 4–7. the pure decision
            outcome = .decision(evaluation.decide(token: answer.info, request: request, now: clock.now()))
        } catch {
            outcome = .fault(error)
        }
        record(outcome, policy: policy, digest: digest, request: request, started: started)
        return (outcome, policy)
    }

    /// The policy the proxy named (the front end passes a hint only from a trusted source), else
    /// the first policy that matches. A named policy that does not exist matches nothing.
    func selectPolicy(for request: AccessRequest) -> PolicyEvaluation? {
        if let hint = request.policyHint {
            return evaluations.first { $0.policy.name == hint }
        }
        let path = request.pathWithoutQuery
        let host = Substring(request.host)
        return evaluations.first { $0.policy.matches(method: request.method, path: path, host: host) }
    }

    private func record(_ outcome: Outcome, policy: PolicyConfiguration?, digest: TokenDigest?, request: AccessRequest, started: Double) {
        let policyName = policy?.name ?? "none"
        switch outcome {
        case .decision(.allow(let grant)):
            metrics.count(policy: policyName, outcome: "allow", reason: grant.token == nil ? "anonymous" : "granted")
            if logger.logLevel <= .debug {
                logger.debug("allowed", metadata: metadata(policyName, "granted", digest, request, started))
            }
        case .decision(.deny(let denial)):
            metrics.count(policy: policyName, outcome: "deny", reason: denial.reason.rawValue)
            var fields = metadata(policyName, denial.reason.rawValue, digest, request, started)
            fields["authz.status"] = "\(denial.status)"
            if let detail = denial.detail { fields["authz.detail"] = "\(detail)" }
            logger.info("denied", metadata: fields)
        case .fault(let error):
            metrics.count(policy: policyName, outcome: "fault", reason: "as_fault")
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
