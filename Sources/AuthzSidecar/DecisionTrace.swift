import Introspection

/// The steps of one decision (DESIGN.md §5) as they were taken, for `authz-sidecar explain` and
/// for the on-demand debug log of a single request: each step names what it looked at and what it
/// found. Never the token itself: a token appears as its digest prefix.
public final class DecisionTrace: @unchecked Sendable {
    /// One step: its name (`policy`, `token`, `validation`, `binding`, `scopes`, …) and its result.
    public struct Step: Sendable, Equatable {
        public var name: String
        public var result: String
    }

    // Written by the one task that decides; read once the decision is made.
    public private(set) var steps: [Step] = []
    /// Whether steps are written out (explain, the debug log), or only what a span needs.
    let recordsSteps: Bool
    /// What a span of the decision says (DESIGN.md §12): no token, no claim value.
    var policy: String?
    var tokenPrefix: String?
    var cache: String = "none"
    /// The outcome, when the path that decided does not hand it back (the no-suspension path).
    var outcome: Authorizer.Outcome?

    public init(recordsSteps: Bool = true) {
        self.recordsSteps = recordsSteps
    }

    func add(_ name: String, _ result: @autoclosure () -> String) {
        guard recordsSteps else { return }
        steps.append(Step(name: name, result: result()))
    }

    /// The steps as lines, `name: result`.
    public var lines: [String] { steps.map { "\($0.name): \($0.result)" } }
}

/// The explanation of one decision: the steps, the outcome, and the answer the proxy would get.
public struct Explanation: Sendable {
    public var steps: [DecisionTrace.Step]
    public var outcome: Authorizer.Outcome
    public var answer: AuthzAnswer
    /// What a span of the decision says.
    var summary: DecisionTrace
}

extension TokenInfo {
    /// What an operator needs to see of an answer: its kind of claims, never a token.
    var traceSummary: String {
        guard active else { return "inactive" + (rejection.map { " (\($0))" } ?? "") }
        var parts = ["active"]
        if let clientID { parts.append("client_id=\(clientID.prefix(64))") }
        if let sub { parts.append("sub=\(sub.prefix(64))") }
        if let iss { parts.append("iss=\(iss.prefix(128))") }
        if !aud.isEmpty { parts.append("aud=\(aud.prefix(5).joined(separator: ","))") }
        if let exp { parts.append("exp=\(exp)") }
        if let nbf { parts.append("nbf=\(nbf)") }
        if let scope { parts.append("scope=\"\(scope.prefix(256))\"") }
        if let certificateThumbprint { parts.append("cnf.x5t#S256=\(certificateThumbprint.prefix(64))") }
        if let jwkThumbprint { parts.append("cnf.jkt=\(jwkThumbprint.prefix(64))") }
        if let otherConfirmation { parts.append("cnf.\(otherConfirmation.prefix(32))") }
        return parts.joined(separator: " ")
    }
}
