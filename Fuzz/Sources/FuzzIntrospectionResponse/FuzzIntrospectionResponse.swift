// Fuzzes the introspection-response parser: TokenInfo(jsonBody:) and the strict JSONParser
// under it.
import Introspection

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let body = UnsafeBufferPointer(start: data, count: size)

    let document: JSONValue?
    do {
        document = try JSONParser.parse(body)
    } catch {
        check(!error.description.isEmpty, "JSON failure without a description")
        document = nil
    }
    let info: TokenInfo?
    do {
        info = try TokenInfo(jsonBody: body)
        // the same through the other Collection<UInt8> types the client hands it
        check(try TokenInfo(jsonBody: Array(body)) == info!, "parse differs between buffer and array")
    } catch {
        info = nil
    }

    if let document {
        checkRoundTrip(document)
        if case .object(let members) = document, case .bool(let active)? = members["active"] {
            if !active {
                check(info == .inactive, "an inactive response is not TokenInfo.inactive")
            } else if let info {
                checkActive(info, members)
            }
        } else {
            check(info == nil, "TokenInfo from a body that is not an object with a boolean \"active\"")
        }
    } else {
        check(info == nil, "TokenInfo from a body JSONParser refuses")
    }
    return 0
}

/// The compact serialisation is ASCII on one line and parses back to the same value.
func checkRoundTrip(_ value: JSONValue) {
    guard allFinite(value) else { return }  // non-finite numbers are written as null
    let text = value.compactJSON
    check(text.utf8.allSatisfy { $0 >= 0x20 && $0 <= 0x7E }, "compactJSON is not printable ASCII: \(text.prefix(200).debugDescription)")
    do {
        let again = try JSONParser.parse(Array(text.utf8))
        check(again == value, "compactJSON does not round-trip: \(text.prefix(200).debugDescription)")
        check(again.compactJSON == text, "compactJSON is not stable")
    } catch {
        fatalError("compactJSON does not parse (\(error)): \(text.prefix(200).debugDescription)")
    }
}

func allFinite(_ value: JSONValue) -> Bool {
    switch value {
    case .number(let d): return d.isFinite
    case .array(let items): return items.allSatisfy(allFinite)
    case .object(let members): return members.values.allSatisfy(allFinite)
    default: return true
    }
}

/// What an active TokenInfo holds follows from the members it was read from.
func checkActive(_ info: TokenInfo, _ members: [String: JSONValue]) {
    check(info.active, "active response read as inactive")
    check(try TokenInfo(members: members) == info, "init(members:) differs from init(jsonBody:)")
    check(info.claim("active") == .bool(true), "claim(active)")
    for (name, value) in members {
        switch name {
        case "client_id": check(info.clientID == value.stringValue, "client_id")
        case "sub": check(info.sub == value.stringValue, "sub")
        case "iss": check(info.iss == value.stringValue, "iss")
        case "exp", "iat", "nbf":
            let seconds = name == "exp" ? info.exp : name == "iat" ? info.iat : info.nbf
            switch value {
            case .integer(let i): check(seconds == i, "\(name) integer")
            case .null: check(seconds == nil, "\(name) null")
            case .number(let d): check(seconds == Int64(d), "\(name) number")
            default: fatalError("\(name) of type \(value) accepted")
            }
        case "scope":
            if case .string(let s) = value { check(info.scope == s && info.scopes.allSatisfy { !$0.isEmpty && !$0.contains(" ") }, "scope") }
        case "aud":
            if case .string(let s) = value { check(info.aud == [s], "aud string") }
        case "cnf":
            if case .object(let cnf) = value {
                check(info.certificateThumbprint == cnf["x5t#S256"]?.stringValue, "cnf.x5t#S256")
                if case .some(.string) = cnf["x5t#S256"] {} else { check(cnf["x5t#S256"] == nil, "non-string x5t#S256 accepted") }
                check(info.claim("cnf") == value, "claim(cnf)")
            } else {
                check(value == .null && info.certificateThumbprint == nil, "cnf that is not an object accepted")
            }
        case "active", "username", "token_type", "jti": break
        default: check(info.claim(name) == value, "extra member \(name.debugDescription) lost")
        }
    }
    if members["cnf"] == nil { check(info.certificateThumbprint == nil, "thumbprint without cnf") }
}

@inline(never)
func check(_ condition: @autoclosure () throws -> Bool, _ message: @autoclosure () -> String, file: StaticString = #file, line: UInt = #line) {
    let holds: Bool
    do { holds = try condition() } catch { fatalError("invariant violated: \(message()) (threw \(error))", file: file, line: line) }
    if !holds { fatalError("invariant violated: \(message())", file: file, line: line) }
}
