// Fuzzes XFCC.parse (Envoy's x-forwarded-client-cert).
import AuthzSidecar

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let value = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    let elements: [XFCC.Element]
    do {
        elements = try XFCC.parse(Substring(value))
    } catch {
        check(!error.description.isEmpty, "error without a description")
        return 0
    }
    check(!elements.isEmpty, "parsed without any element")
    let unique: Set<String> = ["hash", "cert", "by", "subject", "chain"]
    var canonical: [String] = []
    var roundTrips = true
    for element in elements {
        check(!element.pairs.isEmpty, "an element without pairs")
        var seen = Set<String>()
        for (key, pairValue) in element.pairs {
            check(!key.isEmpty, "empty key")
            check(key == key.lowercased(), "key \(key.debugDescription) is not lowercased")
            check(!key.unicodeScalars.contains { $0 == "=" || $0 == ";" || $0 == "," || $0 == "\"" }, "key \(key.debugDescription) holds a delimiter")
            check(key.first != " " && key.first != "\t" && key.last != " " && key.last != "\t", "key is not trimmed")
            if unique.contains(key) { check(seen.insert(key).inserted, "\(key) twice in one element") }
            check(element.value(for: key) != nil, "value(for:) misses a key")
            if pairValue.unicodeScalars.contains("\\") { roundTrips = false }
        }
        canonical.append(element.pairs.map { key, v in key + "=\"" + v.replacingAll("\"", with: "\\\"") + "\"" }.joined(separator: ";"))
    }
    // Values without backslashes survive being written back quoted (backslash escapes other
    // than \" are kept verbatim, so those values have no canonical form).
    if roundTrips {
        let text = canonical.joined(separator: ",")
        do {
            let again = try XFCC.parse(Substring(text))
            check(again == elements, "canonical form \(text.debugDescription) parses differently")
        } catch {
            fatalError("canonical form \(text.debugDescription) does not parse: \(error)")
        }
    }
    return 0
}

extension String {
    func replacingAll(_ target: Unicode.Scalar, with replacement: String) -> String {
        var out = ""
        for s in unicodeScalars {
            if s == target { out += replacement } else { out.unicodeScalars.append(s) }
        }
        return out
    }
}

@inline(never)
func check(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String, file: StaticString = #file, line: UInt = #line) {
    if !condition() { fatalError("invariant violated: \(message())", file: file, line: line) }
}
