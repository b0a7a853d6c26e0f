/// The path policies are matched against.
///
/// Proxies and upstreams resolve `..`, `//` and `%2E` in their own ways; a policy matched on the
/// raw text could approve `/public/../admin/` for a route the upstream then serves as `/admin/`.
/// So the query and fragment are cut, percent-encoded unreserved characters decoded, dot
/// segments removed (RFC 3986 §5.2.4) and repeated slashes merged. An encoded slash (`%2F`)
/// stays encoded: it is data, not a separator.
enum RequestPath {
    static func normalized(_ target: Substring) -> Substring {
        let path = target.utf8.firstIndex(where: { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") }).map { target[..<$0] } ?? target
        guard needsWork(path) else { return path }
        return Substring(normalize(decodeUnreserved(path)))
    }

    /// Whether the path holds anything normalisation would change (the common case is no).
    private static func needsWork(_ path: Substring) -> Bool {
        var previous: UInt8 = 0
        for byte in path.utf8 {
            if byte == UInt8(ascii: "%") { return true }
            if previous == UInt8(ascii: "/"), byte == UInt8(ascii: "/") || byte == UInt8(ascii: ".") { return true }
            previous = byte
        }
        return !path.hasPrefix("/")
    }

    private static func decodeUnreserved(_ path: Substring) -> String {
        var out = [UInt8]()
        out.reserveCapacity(path.utf8.count)
        let bytes = Array(path.utf8)
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "%"), i + 2 < bytes.count, let hi = Hex.value(bytes[i + 1]), let lo = Hex.value(bytes[i + 2]) {
                let decoded = hi << 4 | lo
                if isUnreserved(decoded) {
                    out.append(decoded)
                } else {
                    // keep it encoded, in upper case so that equal paths compare equal
                    out.append(contentsOf: [UInt8(ascii: "%"), upperHex(hi), upperHex(lo)])
                }
                i += 3
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static func normalize(_ path: String) -> String {
        var segments: [Substring] = []
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        for (index, part) in parts.enumerated() {
            let last = index == parts.count - 1
            switch part {
            case "." where last, ".." where last:
                if part == "..", !segments.isEmpty { segments.removeLast() }
                segments.append("")  // a trailing "." or ".." leaves a trailing slash
            case ".":
                continue
            case "..":
                if !segments.isEmpty { segments.removeLast() }
            case "" where !last:
                continue  // leading or repeated slash
            default:
                segments.append(part)
            }
        }
        return "/" + segments.joined(separator: "/")
    }

    private static func isUnreserved(_ c: UInt8) -> Bool {
        (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || (c >= 0x30 && c <= 0x39)
            || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_") || c == UInt8(ascii: "~")
    }

    private static func upperHex(_ nibble: UInt8) -> UInt8 {
        nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "A") + nibble - 10
    }
}
