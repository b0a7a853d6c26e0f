/// Envoy's `x-forwarded-client-cert` header: elements separated by `,`, each a list of
/// `key=value` pairs separated by `;`; values may be double-quoted with `\"` escapes, and `,`
/// or `;` inside quotes belong to the value (so a `;Cert=` inside a quoted Subject is text).
public enum XFCC {
    /// One proxy's element: its pairs in order, keys lowercased.
    public struct Element: Equatable, Sendable {
        public var pairs: [(key: String, value: String)]

        /// The first value for `key` (case-insensitive).
        public func value(for key: String) -> String? {
            pairs.first { $0.key == key }?.value
        }

        public static func == (lhs: Element, rhs: Element) -> Bool {
            lhs.pairs.elementsEqual(rhs.pairs) { $0.key == $1.key && $0.value == $1.value }
        }
    }

    /// Why an XFCC value was refused.
    public struct ParseError: Error, Equatable, CustomStringConvertible {
        public var description: String
    }

    /// The keys Envoy emits (RFC-less; Envoy's header documentation).
    static let knownKeys: Set<String> = ["by", "hash", "cert", "chain", "subject", "uri", "dns"]

    /// Whether a value starts like XFCC (`By=`, `Hash=`, `Cert=`, … case-insensitive).
    static func looksLikeXFCC(_ value: Substring) -> Bool {
        guard let eq = value.firstIndex(of: "="), value.distance(from: value.startIndex, to: eq) <= 7 else { return false }
        return knownKeys.contains(value[..<eq].lowercased())
    }

    /// Parses every element; a malformed value (unbalanced quote, pair without `=`, a key
    /// repeated where it must be unique) is an error.
    public static func parse(_ value: Substring) throws(ParseError) -> [Element] {
        var elements: [Element] = []
        var pairs: [(key: String, value: String)] = []
        var key = ""
        var current = ""
        var inKey = true
        var quoted = false
        var wasQuoted = false
        var iterator = value.unicodeScalars.makeIterator()

        func endPair() throws(ParseError) {
            let k = key.trimmingSpaces.lowercased()
            if inKey {
                // an empty segment (e.g. a trailing ';') is tolerated; text without '=' is not
                guard current.trimmingSpaces.isEmpty else { throw ParseError(description: "pair without '='") }
            } else {
                guard !k.isEmpty else { throw ParseError(description: "pair with an empty key") }
                if k == "hash" || k == "cert" || k == "by" || k == "subject" || k == "chain",
                    pairs.contains(where: { $0.key == k })
                {
                    throw ParseError(description: "\(k) appears twice in one element")
                }
                pairs.append((k, wasQuoted ? current : String(current.trimmingSpaces)))
            }
            key = ""
            current = ""
            inKey = true
            wasQuoted = false
        }

        while let c = iterator.next() {
            if quoted {
                switch c {
                case "\\":
                    guard let next = iterator.next() else { throw ParseError(description: "unterminated escape") }
                    // keep escapes other than \" as they are (RFC 2253 escapes in Subject)
                    if next != "\"" { current.unicodeScalars.append("\\") }
                    current.unicodeScalars.append(next)
                case "\"":
                    quoted = false
                default:
                    current.unicodeScalars.append(c)
                }
                continue
            }
            switch c {
            case "\"" where !inKey && current.trimmingSpaces.isEmpty && !wasQuoted:
                quoted = true
                wasQuoted = true
                current = ""
            case "\"":
                throw ParseError(description: "stray double quote")
            case "=" where inKey:
                key = current
                current = ""
                inKey = false
            case ";":
                try endPair()
            case ",":
                try endPair()
                guard !pairs.isEmpty else { throw ParseError(description: "empty element") }
                elements.append(Element(pairs: pairs))
                pairs = []
            default:
                if wasQuoted, c != " " { throw ParseError(description: "text after a closing quote") }
                current.unicodeScalars.append(c)
            }
        }
        guard !quoted else { throw ParseError(description: "unbalanced double quote") }
        try endPair()
        guard !pairs.isEmpty else { throw ParseError(description: "empty element") }
        elements.append(Element(pairs: pairs))
        return elements
    }
}
