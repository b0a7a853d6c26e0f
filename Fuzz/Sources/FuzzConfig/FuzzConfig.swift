// Fuzzes SidecarConfiguration.parse(yaml:) (operator input; Yams/libyaml underneath). Only
// "no crash": a refused configuration must name at least one problem.
import AuthzSidecar

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let yaml = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    do {
        _ = try SidecarConfiguration.parse(yaml: yaml, environment: ["AUTHZ_INTROSPECTION_CLIENT_SECRET": "fuzz-secret"])
    } catch let error as ConfigurationError {
        if error.problems.isEmpty { fatalError("invariant violated: ConfigurationError without problems") }
    } catch {
        fatalError("invariant violated: parse threw \(type(of: error)), not ConfigurationError")
    }
    return 0
}
