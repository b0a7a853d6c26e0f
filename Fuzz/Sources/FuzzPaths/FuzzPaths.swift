// Fuzzes the path readings and the policy selection (DESIGN.md §5.1): the input is the original
// path (the Envoy form's path after /authz, or nginx's X-Original-URI).
// Invariants: every reading is a clean absolute path (starts with "/", no "//", no "." or ".."
// segment, no control character), and the strict one reads back as itself; if the sidecar
// selects policy P, every reading selects P; if it finds no policy, no reading selects one.
import AuthzSidecar
import Introspection
import NIOHTTP1

let configuration = try! SidecarConfiguration.parse(yaml: """
    introspection: { endpoint: http://127.0.0.1:1/introspect, client_id: c, client_secret: s }
    policies:
      - { name: public, match: { path_prefix: /public/ }, allow_anonymous: true }
      - { name: admin, match: { path_prefix: /admin-api/ }, required_scopes: [admin] }
      - { name: api, match: { path_prefix: /api/v1/ }, required_scopes: [api] }
      - { name: files, match: { path_prefix: /files } }
    """)
let authorizer = Authorizer(
    configuration: configuration,
    cache: CachingTokenIntrospector(upstream: ClosureTokenIntrospector { _ in .inactive }, configuration: configuration.cache)
)

func selected(_ path: String) -> String?? {
    let request = AccessRequest(front: .envoyHTTP, method: "GET", path: path, host: "h", headers: HTTPHeaders())
    switch authorizer.select(for: request) {
    case .selected(let evaluation): return .some(evaluation.policy.name)
    case .refused(let denial): return denial.reason == .noPolicy ? .some(nil) : nil  // nil: refused
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let path = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    guard case .readings(let readings) = PathReadings.of(path[...]) else { return 0 }
    for reading in readings.all {
        let text = String(reading)
        // Bytes: "/" and a combining mark are one Character, so Character-based checks would lie.
        let bytes = Array(text.utf8)
        check(bytes.first == UInt8(ascii: "/"), "reading \(text.debugDescription) is not absolute")
        check(!zip(bytes, bytes.dropFirst()).contains { $0 == UInt8(ascii: "/") && $1 == UInt8(ascii: "/") }, "reading \(text.debugDescription) holds //")
        check(!text.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7F }, "reading holds a control character")
        let segments = bytes.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false)
        check(!segments.contains { $0.elementsEqual([0x2E]) || $0.elementsEqual([0x2E, 0x2E]) }, "reading \(text.debugDescription) holds a dot segment")
    }
    // The strict reader is idempotent. (Another reader applied to the strict reading may climb
    // above the root where no single pass over the raw path does — `/a\b/../..\x` — and is then
    // refused; that composition is no backend's reading, so only the strict one is compared.)
    if let again = PathReadings.of(readings.strict).readingsStrict {
        check(again == readings.strict, "the strict reading does not read back as itself")
    }
    // The property of DESIGN.md §5.1: if the sidecar selects P, every reading selects P (first
    // match over the same policies); if it selects none, no reading selects one.
    func firstMatch(_ reading: Substring) -> String? {
        configuration.policies.first { $0.matches(method: "GET", path: reading, host: "h") }?.name
    }
    switch selected(path) {
    case .some(.some(let policy)):
        for reading in readings.all {
            check(firstMatch(reading) == policy, "\(path.debugDescription) selects \(policy), its reading \(reading) selects \(firstMatch(reading) ?? "none")")
        }
    case .some(.none):
        for reading in readings.all {
            check(firstMatch(reading) == nil, "\(path.debugDescription) selects no policy, its reading \(reading) selects one")
        }
    case .none:
        break
    }
    return 0
}

extension PathReadings {
    var readingsStrict: Substring? {
        if case .readings(let readings) = self { return readings.strict }
        return nil
    }
}

@inline(never)
func check(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String) {
    if !condition() { fatalError("invariant violated: \(message())") }
}
