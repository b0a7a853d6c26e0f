import Foundation
import Introspection
import Logging

/// swift-log handler writing one JSON object per line to standard error (`logging.format: json`).
public struct JSONLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    private let label: String

    public init(label: String) {
        self.label = label
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        FileHandle.standardError.write(Data((Self.render(event: event, label: label, handlerMetadata: metadata) + "\n").utf8))
    }

    /// One log line as compact JSON: time, level, label, message and the metadata fields.
    static func render(event: LogEvent, label: String, handlerMetadata: Logger.Metadata) -> String {
        var fields: [String: JSONValue] = [
            "time": .string(Date().ISO8601Format(.iso8601.time(includingFractionalSeconds: true).year().month().day())),
            "level": .string(event.level.rawValue),
            "label": .string(label),
            "message": .string(event.message.description),
        ]
        for (key, value) in handlerMetadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 }) {
            fields[key] = json(value)
        }
        return JSONValue.object(fields).compactJSON
    }

    /// A metadata value as JSON: a list stays a list (the steps of a decision trace), a
    /// dictionary an object, anything else its text.
    static func json(_ value: Logger.MetadataValue) -> JSONValue {
        switch value {
        case .array(let items): return .array(items.map(json))
        case .dictionary(let members): return .object(members.mapValues(json))
        default: return .string(value.description)
        }
    }
}
