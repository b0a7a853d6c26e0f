/// Every way a backend may read a request path (DESIGN.md §5.1).
///
/// A policy matched on one reading of the path protects nothing if the upstream reads it another
/// way: `/public/..;/admin-api/users` is under `/public/` for a reader that keeps `;` as data and
/// is `/admin-api/users` for Tomcat, Jetty and Spring, which drop `;…` path parameters before
/// resolving `..`. So the sidecar derives the readings backends are known to use and selects a
/// policy only when every reading selects the same one:
/// - **strict**: unreserved `%XX` decoded, dot segments resolved (RFC 3986 §5.2.4), `//` merged;
///   `%2F`, `%5C`, `\` and `;` are data;
/// - **lenient**: the same after also decoding `%2F` and `%5C`, reading `\` as `/` and dropping
///   `;…` from every segment;
/// - **parameters**: the strict reading with `;…` dropped from every segment and `\` read as `/`,
///   but `%2F` kept (a servlet container that refuses encoded slashes but strips parameters);
/// - **servlet**: `;…` dropped from every segment of the raw path first, then `%2F`, `%5C` and `\`
///   read as `/` (Tomcat's order with encoded slashes allowed: `..%2F;x` is `../`);
/// - **unmerged**: the strict reading with dot segments resolved before `//` is merged, as RFC 3986
///   §5.2.4 does (and Envoy's `normalize_path` without `merge_slashes`): `/a//../b` is `/a/b`
///   there and `/b` for readers that merge first.
///
/// A path whose dot segments climb above the root, that holds a control character or `%00`
/// (raw or encoded), or that is neither origin-form nor absolute-form, has no safe reading and
/// is refused. Only one level of percent-decoding is ever applied (`%252F` is the text `%2F`), and
/// a `%` that starts no escape is read as `%25` (so `%2%46` is the text `%2F`, not a slash).
public enum PathReadings: Sendable, Equatable {
    /// The readings (1 when they are all the same text, the common case; else up to 5).
    case readings(Readings)
    /// No reading is safe; the text says why (for the log, never echoing the path).
    case refused(String)

    public struct Readings: Sendable, Equatable {
        /// The strict reading: what policies are matched against when all readings agree.
        public var strict: Substring
        /// The other distinct readings (none when every reading is `strict`).
        public var others: [Substring]

        public var all: [Substring] { [strict] + others }
    }

    /// The readings of a request target (query and fragment are cut first).
    public static func of(_ target: Substring) -> PathReadings {
        var path = target.utf8.firstIndex(where: { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") }).map { target[..<$0] } ?? target
        // Absolute-form (`GET http://host/path`): nginx passes it in $request_uri as sent.
        // Bytes, not Characters, throughout: "/" followed by a combining mark is one Character
        // that is not "/", but a backend reads the byte.
        if path.utf8.first != UInt8(ascii: "/") {
            guard let rest = Self.afterAuthority(path) else { return .refused("the path is not origin-form or absolute-form") }
            path = rest
        }
        switch Self.scan(path) {
        case .plain:
            return .readings(Readings(strict: path, others: []))
        case .control:
            return .refused("the path holds a control character or %00")
        case .special:
            break
        }
        let bytes = Array(path.utf8)
        guard let strict = Self.read(bytes, decodeSlashes: false, dropParameters: false, mergeFirst: true),
            let lenient = Self.read(bytes, decodeSlashes: true, dropParameters: true, mergeFirst: true),
            let parameters = Self.read(bytes, decodeSlashes: false, dropParameters: true, mergeFirst: true),
            let unmerged = Self.read(bytes, decodeSlashes: false, dropParameters: false, mergeFirst: false),
            let servlet = Self.read(Self.withoutParameters(bytes), decodeSlashes: true, dropParameters: false, mergeFirst: true)
        else {
            return .refused("dot segments climb above the root")
        }
        var others: [Substring] = []
        for reading in [lenient, parameters, unmerged, servlet] where reading != strict && !others.contains(reading) {
            others.append(reading)
        }
        return .readings(Readings(strict: strict, others: others))
    }

    private enum Scan {
        /// Nothing any reading would change.
        case plain
        /// `%`, `;`, `\`, `//`, a dot segment, or no leading `/`: the readings must be derived.
        case special
        /// A control character or DEL, raw or encoded, or `%00`.
        case control
    }

    private static func scan(_ path: Substring) -> Scan {
        var result = Scan.plain
        var previous: UInt8 = 0
        let utf8 = path.utf8
        var i = utf8.startIndex
        while i != utf8.endIndex {
            let byte = utf8[i]
            if byte < 0x20 || byte == 0x7F { return .control }
            switch byte {
            case UInt8(ascii: "%"):
                result = .special
                let first = utf8.index(after: i)
                if first != utf8.endIndex, utf8.index(after: first) != utf8.endIndex,
                    let hi = Hex.value(utf8[first]), let lo = Hex.value(utf8[utf8.index(after: first)])
                {
                    let decoded = hi << 4 | lo
                    if decoded < 0x20 || decoded == 0x7F { return .control }
                }
            case UInt8(ascii: ";"), UInt8(ascii: "\\"):
                result = .special
            case UInt8(ascii: "/"), UInt8(ascii: "."):
                if previous == UInt8(ascii: "/") { result = .special }
            default:
                break
            }
            previous = byte
            i = utf8.index(after: i)
        }
        return result
    }

    /// The raw path with `;…` cut from every segment, segments split on raw `/` only.
    private static func withoutParameters(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var inParameters = false
        for byte in bytes {
            if byte == UInt8(ascii: "/") {
                inParameters = false
            } else if byte == UInt8(ascii: ";") {
                inParameters = true
            }
            if !inParameters { out.append(byte) }
        }
        return out
    }

    /// One reading; nil when its dot segments climb above the root.
    private static func read(_ bytes: [UInt8], decodeSlashes: Bool, dropParameters: Bool, mergeFirst: Bool) -> Substring? {
        // 1. decode: unreserved always, `%2F` / `%5C` / `\` only when reading slashes leniently
        var decoded: [UInt8] = []
        decoded.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            let byte = bytes[i]
            if byte == UInt8(ascii: "%"), i + 2 < bytes.count, let hi = Hex.value(bytes[i + 1]), let lo = Hex.value(bytes[i + 2]) {
                let value = hi << 4 | lo
                if isUnreserved(value) {
                    decoded.append(value)
                } else if decodeSlashes, value == UInt8(ascii: "/") || value == UInt8(ascii: "\\") {
                    decoded.append(UInt8(ascii: "/"))
                } else {
                    // kept encoded, in upper case, so that equal paths compare equal
                    decoded.append(contentsOf: [UInt8(ascii: "%"), upperHex(hi), upperHex(lo)])
                }
                i += 3
                continue
            }
            if byte == UInt8(ascii: "%") {
                // A `%` that starts no escape is written as `%25`, so that decoding cannot make a
                // new escape out of it (`%2%46` is the text `%2F`, never a slash) and every
                // reading is canonical: reading it again gives it back.
                decoded.append(contentsOf: [UInt8(ascii: "%"), UInt8(ascii: "2"), UInt8(ascii: "5")])
                i += 1
                continue
            }
            if byte == UInt8(ascii: "\\"), dropParameters || decodeSlashes {
                decoded.append(UInt8(ascii: "/"))
            } else {
                decoded.append(byte)
            }
            i += 1
        }
        // 2. segments: parameters dropped, dot segments resolved, empty segments merged
        var segments: [ArraySlice<UInt8>] = []
        let parts = decoded.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false)
        for (index, rawPart) in parts.enumerated() {
            var part = rawPart
            if dropParameters, let semicolon = part.firstIndex(of: UInt8(ascii: ";")) {
                part = part[..<semicolon]
            }
            let last = index == parts.count - 1
            if part.elementsEqual([UInt8(ascii: ".")]) {
                if last { segments.append([]) }  // a trailing "." leaves a trailing slash
            } else if part.elementsEqual([UInt8(ascii: "."), UInt8(ascii: ".")]) {
                guard !segments.isEmpty else { return nil }
                segments.removeLast()
                if last { segments.append([]) }
            } else if part.isEmpty {
                // a trailing slash is kept; `//` is merged before dot segments are resolved, or
                // kept as an empty segment (that `..` may remove) and merged after
                if index > 0, last || !mergeFirst { segments.append([]) }
            } else {
                segments.append(part)
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(decoded.count + 1)
        for (index, segment) in segments.enumerated() where !segment.isEmpty || index == segments.count - 1 {
            out.append(UInt8(ascii: "/"))
            out.append(contentsOf: segment)
        }
        if out.isEmpty { out.append(UInt8(ascii: "/")) }
        return Substring(String(decoding: out, as: UTF8.self))
    }

    /// The path of an absolute-form target (`http://host[:port]/path`), `/` when it has none; nil
    /// when the target is not one.
    private static func afterAuthority(_ target: Substring) -> Substring? {
        let lower = target.utf8.prefix(8).map(ASCII.lowercased)
        let schemeLength: Int
        if lower.starts(with: "http://".utf8) {
            schemeLength = 7
        } else if lower.starts(with: "https://".utf8) {
            schemeLength = 8
        } else {
            return nil
        }
        let authority = target.utf8.dropFirst(schemeLength)
        guard let slash = authority.firstIndex(of: UInt8(ascii: "/")) else { return "/" }
        return target[slash...]
    }

    static func isUnreserved(_ c: UInt8) -> Bool {
        (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || (c >= 0x30 && c <= 0x39)
            || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_") || c == UInt8(ascii: "~")
    }

    private static func upperHex(_ nibble: UInt8) -> UInt8 {
        nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "A") + nibble - 10
    }
}

/// Host names as policies compare them (DESIGN.md §5.1): lower-cased, without the port and
/// without one trailing dot (`Admin.Example.:443` is `admin.example`).
public enum HostName {
    /// The host without its port, lower-cased, one trailing dot removed.
    public static func normalized(_ host: Substring) -> Substring {
        // Bytes, not Characters (see `PathReadings.of`).
        var bare = host
        if bare.utf8.first == UInt8(ascii: "[") {
            // IPv6 literal: `[::1]:443`
            if let close = bare.utf8.firstIndex(of: UInt8(ascii: "]")) { bare = bare[...close] }
        } else if let colon = bare.utf8.lastIndex(of: UInt8(ascii: ":")),
            bare.utf8[bare.utf8.index(after: colon)...].allSatisfy({ $0 >= 0x30 && $0 <= 0x39 })
        {
            bare = bare[..<colon]
        }
        if bare.utf8.last == UInt8(ascii: ".") { bare = bare[..<bare.utf8.index(before: bare.utf8.endIndex)] }
        if bare.utf8.contains(where: { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") }) {
            return Substring(bare.lowercased())
        }
        return bare
    }
}
