// Fuzzes SidecarConfiguration.parse(yaml:) (operator input; Yams/libyaml underneath).
// Invariants: a refused configuration names at least one problem, and no problem ever holds the
// client secret. Every "@S@" in the input becomes the secret before parsing (the seeds put it on
// the client_secret line), so the fuzzer moves the secret into keys, values, broken quotes and
// flow collections; an error text holding it is a crash (DESIGN.md §8: configuration errors never
// echo a source line).
import AuthzSidecar
import Foundation

let secret = "Zq9TOPSECRETx7f3b"

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    // The fuzzer may spell the secret's distinctive part itself; then an echo is not a leak.
    guard !input.contains("TOPSECRET") else { return 0 }
    let yaml = input.replacingOccurrences(of: "@S@", with: secret)
    do {
        _ = try SidecarConfiguration.parse(yaml: yaml, environment: ["AUTHZ_INTROSPECTION_CLIENT_SECRET": "fuzz-secret"])
    } catch let error as ConfigurationError {
        if error.problems.isEmpty { fatalError("invariant violated: ConfigurationError without problems") }
        if yaml.contains(secret), "\(error)".contains("TOPSECRET") {
            fatalError("invariant violated: the secret is echoed in a configuration error: \(error.problems)")
        }
    } catch {
        fatalError("invariant violated: parse threw \(type(of: error)), not ConfigurationError")
    }
    return 0
}
