import AuthzSidecar
import Logging
import ServiceLifecycle
import Tracing

#if canImport(OTel)
import OTel

/// `tracing` (DESIGN.md §12) on swift-otel: a tracer with W3C trace-context propagation,
/// parent-based sampling at `sampling_ratio`, batched OTLP/HTTP (protobuf) export to
/// `<otlp_endpoint>/v1/traces`; installed as the process's tracer. Metrics and logs stay as they
/// are (Prometheus, the sidecar's own log lines).
enum TracingSetup {
    static func bootstrap(_ tracing: TracingConfiguration, endpoint: String, logger: Logger) throws -> any Service {
        var configuration = OTel.Configuration.default
        configuration.serviceName = tracing.serviceName
        configuration.resourceAttributes = tracing.resourceAttributes
        configuration.diagnosticLogger = .custom(logger)
        configuration.diagnosticLogLevel = .warning
        configuration.propagators = [.traceContext]
        configuration.metrics.enabled = false
        configuration.logs.enabled = false
        configuration.traces.enabled = true
        configuration.traces.exporter = .otlp
        configuration.traces.otlpExporter.endpoint = endpoint.hasSuffix("/") ? endpoint + "v1/traces" : endpoint + "/v1/traces"
        configuration.traces.otlpExporter.protocol = .httpProtobuf
        // The sidecar decides which decisions get a span before making one (the proxy's sampled
        // flag, else a draw at sampling_ratio: Authorizer.sampled), so that an unsampled decision
        // costs nothing; the tracer records every span it is given.
        guard (0...1).contains(tracing.samplingRatio) else { throw TracingSetupError("sampling_ratio must be between 0 and 1") }
        configuration.traces.sampler = .parentBasedAlwaysOn
        let backend = try OTel.makeTracingBackend(configuration: configuration)
        InstrumentationSystem.bootstrap(backend.factory)
        return backend.service
    }
}

#else
/// A build without swift-otel (the ThreadSanitizer build, `AUTHZ_WITHOUT_OTEL`): no exporter.
enum TracingSetup {
    static func bootstrap(_ tracing: TracingConfiguration, endpoint: String, logger: Logger) throws -> any Service {
        throw TracingSetupError("this build has no OTLP exporter (built with AUTHZ_WITHOUT_OTEL)")
    }
}
#endif

struct TracingSetupError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
