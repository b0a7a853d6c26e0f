import Yams

/// Every problem found while reading a configuration, each naming its key.
public struct ConfigurationError: Error, Equatable, CustomStringConvertible {
    public var problems: [String]

    public var description: String {
        "invalid configuration:\n" + problems.map { "  - \($0)" }.joined(separator: "\n")
    }
}

/// Collects problems while a configuration is read, so that all of them are reported at once.
final class ConfigProblems {
    private(set) var messages: [String] = []

    func add(_ key: String, _ message: String) {
        messages.append("\(key): \(message)")
    }
}

/// Reads one YAML mapping: typed values with defaults and ranges, and unknown keys reported.
///
/// Problems name the key and its position, never the text of a value or a line: a broken file
/// may put a secret where a key or another value should be (DESIGN.md §8).
final class MappingReader {
    let path: String
    private let mapping: Node.Mapping
    let problems: ConfigProblems
    private var known: Set<String> = []

    init(_ mapping: Node.Mapping, path: String, problems: ConfigProblems) {
        self.mapping = mapping
        self.path = path
        self.problems = problems
    }

    /// A reader for `node` if it is a mapping; records a problem if it is something else.
    static func make(_ node: Node?, path: String, problems: ConfigProblems) -> MappingReader? {
        guard let node, !isNull(node) else { return nil }
        guard let mapping = node.mapping else {
            problems.add(path, "must be a mapping")
            return nil
        }
        return MappingReader(mapping, path: path, problems: problems)
    }

    static func isNull(_ node: Node) -> Bool {
        node.scalar != nil && node.null != nil
    }

    /// An unquoted scalar: `"5"` is a string, not a number.
    static func isPlain(_ node: Node) -> Bool {
        node.scalar?.style == .plain
    }

    func key(_ name: String) -> String { path.isEmpty ? name : "\(path).\(name)" }

    /// Whether a key found in the file may be printed: it looks like one of ours (lower-case
    /// letters, digits and `_`, at most 40). Anything else may be a value that slid into a key's
    /// place, so only its position is given.
    static func nameable(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 40
            && name.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == UInt8(ascii: "_") }
    }

    /// `line L, column C` of a node (1-based), or `an unknown position`.
    static func position(_ node: Node) -> String {
        guard let mark = node.mark else { return "an unknown position" }
        return "line \(mark.line), column \(mark.column)"
    }

    /// The node for `name`, or nil when absent or null.
    func node(_ name: String) -> Node? {
        known.insert(name)
        guard let node = mapping[name], !Self.isNull(node) else { return nil }
        return node
    }

    func string(_ name: String) -> String? {
        guard let node = node(name) else { return nil }
        guard node.scalar != nil, let value = node.string else {
            problems.add(key(name), "must be a string")
            return nil
        }
        return value
    }

    func string(_ name: String, default value: String) -> String {
        string(name) ?? value
    }

    func bool(_ name: String, default value: Bool) -> Bool {
        guard let node = node(name) else { return value }
        guard Self.isPlain(node), let parsed = node.bool else {
            problems.add(key(name), "must be true or false")
            return value
        }
        return parsed
    }

    func int(_ name: String, default value: Int, range: ClosedRange<Int>) -> Int {
        guard let node = node(name) else { return value }
        guard Self.isPlain(node), let parsed = node.int else {
            problems.add(key(name), "must be an integer")
            return value
        }
        guard range.contains(parsed) else {
            problems.add(key(name), "must be between \(range.lowerBound) and \(range.upperBound), not \(parsed)")
            return value
        }
        return parsed
    }

    func number(_ name: String, default value: Double, range: ClosedRange<Double>) -> Double {
        guard let node = node(name) else { return value }
        guard Self.isPlain(node), let parsed = node.float, parsed.isFinite else {
            problems.add(key(name), "must be a number")
            return value
        }
        guard range.contains(parsed) else {
            problems.add(key(name), "must be between \(range.lowerBound) and \(range.upperBound), not \(parsed)")
            return value
        }
        return parsed
    }

    func choice<Choice: RawRepresentable & CaseIterable>(_ name: String, default value: Choice) -> Choice where Choice.RawValue == String {
        guard let text = string(name) else { return value }
        guard let parsed = Choice(rawValue: text) else {
            let allowed = Choice.allCases.map(\.rawValue).joined(separator: " | ")
            problems.add(key(name), "must be one of \(allowed)")
            return value
        }
        return parsed
    }

    func stringList(_ name: String) -> [String] {
        guard let node = node(name) else { return [] }
        guard let sequence = node.sequence else {
            problems.add(key(name), "must be a list of strings")
            return []
        }
        var result: [String] = []
        for (i, item) in sequence.enumerated() {
            guard item.scalar != nil, let s = item.string else {
                problems.add("\(key(name))[\(i)]", "must be a string")
                continue
            }
            result.append(s)
        }
        return result
    }

    /// The keys of this mapping (for mappings whose keys are the user's, like `required_claims`).
    var keys: [String] { mapping.keys.compactMap(\.string) }

    func mapping(_ name: String) -> MappingReader? {
        MappingReader.make(node(name), path: key(name), problems: problems)
    }

    /// Reports every key that no reader asked for.
    func reportUnknownKeys() {
        for keyNode in mapping.keys {
            let name = keyNode.string ?? "?"
            if !known.contains(name) {
                problems.add(Self.nameable(name) ? key(name) : path.isEmpty ? "(top level)" : path, "unknown key at \(Self.position(keyNode))")
            }
        }
    }
}
