/// Why a JWS, a JWK or a key set was refused. The text names the check that failed and never
/// holds the token; it goes to logs as the denial's detail.
public struct JOSEError: Error, Sendable, Equatable, CustomStringConvertible {
    public let description: String

    public init(_ description: String) {
        self.description = description
    }
}
