import AuthzSidecar
import Foundation
import Logging

/// Environment lookups.
enum Environment {
    static func value(_ name: String) -> String? {
        ProcessInfo.processInfo.environment[name]
    }
}

/// The version `--version` prints.
enum SidecarVersion {
    static let current = "0.1.0"
}

/// Bootstraps swift-log from `logging:`: text or one JSON object per line, on standard error.
enum LogSetup {
    static func bootstrap(_ configuration: LoggingConfiguration) {
        let level = Logger.Level(rawValue: configuration.level) ?? .info
        LoggingSystem.bootstrap { label in
            var handler: any LogHandler
            switch configuration.format {
            case .text: handler = StreamLogHandler.standardError(label: label)
            case .json: handler = JSONLogHandler(label: label)
            }
            handler.logLevel = level
            return handler
        }
    }
}
