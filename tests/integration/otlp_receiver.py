"""A small OTLP/HTTP trace receiver for the tests: POST /v1/traces on 127.0.0.1.

It decodes `ExportTraceServiceRequest` with the `opentelemetry-proto` package (PyPI) and keeps every
span as a plain dict, so a test can look up a trace and check parent ids across services (Envoy's
spans and the sidecar's land in the same receiver):

    {"trace_id": 32 hex, "span_id": 16 hex, "parent_span_id": 16 hex or "", "name": str,
     "kind": "SERVER" | "CLIENT" | "INTERNAL" | "PRODUCER" | "CONSUMER" | "UNSPECIFIED",
     "attributes": {key: str | int | float | bool | list | dict | bytes},
     "status": {"code": "UNSET" | "OK" | "ERROR", "message": str},
     "service_name": resource service.name, "resource": {resource attributes},
     "scope": instrumentation scope name, "trace_state": str, "flags": int,
     "start_ns": int, "end_ns": int, "events": [{"name", "attributes"}], "links": [...]}

Content types: application/x-protobuf (what Envoy and swift-otel send), application/json
(OTLP/JSON: trace and span ids are hex there, not base64, so they are converted before
google.protobuf.json_format parses the body). Bodies with Content-Length or chunked (Envoy 1.40's
exporter sends Transfer-Encoding: chunked); Content-Encoding gzip is accepted. The answer is 200
with an empty ExportTraceServiceResponse in the request's encoding. Anything else: 404 / 405 / 411
/ 415 / 400, each recorded in .rejected.

    with OtlpReceiver() as rx:            # or rx = OtlpReceiver().start(); ...; rx.stop()
        endpoint = rx.url                 # http://127.0.0.1:PORT (the sidecar appends /v1/traces)
        spans = rx.wait_for(lambda s: s["name"] == "authz.decision", timeout=15)

Run alone (prints each span as a JSON line): python3 tests/integration/otlp_receiver.py --port 4318
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

TRACES_PATH = "/v1/traces"
MAX_BODY = 64 * 1024 * 1024

_KIND_PREFIX = "SPAN_KIND_"
_STATUS_PREFIX = "STATUS_CODE_"
_HEX_ID_KEYS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}


# ------------------------------------------------------------------------------ decoding
def any_value(v):
    """An OTLP AnyValue as a Python value."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def attributes(kvs) -> dict:
    return {kv.key: any_value(kv.value) for kv in kvs}


def span_dict(span, resource: dict, scope: str) -> dict:
    kind = Span.SpanKind.Name(span.kind) if span.kind in Span.SpanKind.values() else str(span.kind)
    code = Status.StatusCode.Name(span.status.code) if span.status.code in Status.StatusCode.values() \
        else str(span.status.code)
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "name": span.name,
        "kind": kind[len(_KIND_PREFIX):] if kind.startswith(_KIND_PREFIX) else kind,
        "attributes": attributes(span.attributes),
        "status": {"code": code[len(_STATUS_PREFIX):] if code.startswith(_STATUS_PREFIX) else code,
                   "message": span.status.message},
        "service_name": resource.get("service.name"),
        "resource": resource,
        "scope": scope,
        "trace_state": span.trace_state,
        "flags": span.flags,
        "start_ns": span.start_time_unix_nano,
        "end_ns": span.end_time_unix_nano,
        "events": [{"name": e.name, "attributes": attributes(e.attributes)} for e in span.events],
        "links": [{"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex(),
                   "attributes": attributes(ln.attributes)} for ln in span.links],
    }


def spans_of(request: ExportTraceServiceRequest) -> list[dict]:
    out = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append(span_dict(span, resource, ss.scope.name))
    return out


def _hex_ids_to_base64(obj):
    """OTLP/JSON writes trace and span ids as hex; proto3 JSON (json_format) expects base64."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in _HEX_ID_KEYS and isinstance(v, str):
                try:
                    v = base64.b64encode(bytes.fromhex(v)).decode() if v else ""
                except ValueError:
                    pass      # already base64 (a client that followed proto3 JSON): keep it
            else:
                v = _hex_ids_to_base64(v)
            out[k] = v
        return out
    if isinstance(obj, list):
        return [_hex_ids_to_base64(x) for x in obj]
    return obj


def decode(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """Raises ValueError for a body that is not an ExportTraceServiceRequest in CONTENT_TYPE."""
    req = ExportTraceServiceRequest()
    if content_type == "application/x-protobuf":
        try:
            req.ParseFromString(body)
        except DecodeError as e:
            raise ValueError(f"not an ExportTraceServiceRequest: {e}") from e
    elif content_type == "application/json":
        try:
            json_format.ParseDict(_hex_ids_to_base64(json.loads(body or b"{}")), req)
        except (ValueError, json_format.ParseError) as e:
            raise ValueError(f"not an OTLP/JSON ExportTraceServiceRequest: {e}") from e
    else:
        raise ValueError(f"unsupported content type {content_type!r}")
    return req


# ------------------------------------------------------------------------------ the server
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):   # a client that hangs up is not our concern
        pass


class OtlpReceiver:
    """OTLP/HTTP traces on 127.0.0.1:PORT (0: a free port). Thread-safe; every span kept in .spans."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, on_span: Optional[Callable[[dict], None]] = None):
        self.host, self.port = host, port
        self.on_span = on_span
        self.spans: list[dict] = []
        self.exports: list[dict] = []      # one per accepted POST: content_type, encoding, user_agent, spans
        self.rejected: list[str] = []      # why a POST was refused
        self._cond = threading.Condition()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # -------------------------------------------------------------- life cycle
    @property
    def url(self) -> str:
        """The OTLP/HTTP base URL (exporters append /v1/traces)."""
        return f"http://{self.host}:{self.port}"

    @property
    def traces_url(self) -> str:
        return self.url + TRACES_PATH

    def start(self) -> "OtlpReceiver":
        self._server = _Server((self.host, self.port), self._handler())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------- queries
    def add(self, spans: list[dict], export: dict) -> None:
        with self._cond:
            self.spans.extend(spans)
            self.exports.append(export)
            self._cond.notify_all()
        if self.on_span:
            for s in spans:
                self.on_span(s)

    def snapshot(self) -> list[dict]:
        with self._cond:
            return list(self.spans)

    def clear(self) -> None:
        with self._cond:
            self.spans.clear()
            self.exports.clear()
            self.rejected.clear()

    def find(self, predicate: Callable[[dict], bool]) -> list[dict]:
        return [s for s in self.snapshot() if predicate(s)]

    def trace(self, trace_id: str) -> list[dict]:
        return self.find(lambda s: s["trace_id"] == trace_id)

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 15.0, count: int = 1) -> list[dict]:
        """The spans matching PREDICATE once there are at least COUNT of them; [] ... after TIMEOUT s
        (the caller asserts, with the spans seen so far in its message)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [s for s in self.spans if predicate(s)]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._cond.wait(min(left, 0.5))

    # -------------------------------------------------------------- HTTP
    def _handler(self):
        rx = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, status: int, body: bytes = b"", ctype: str = "application/x-protobuf") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _refuse(self, status: int, why: str) -> None:
                with rx._cond:
                    rx.rejected.append(f"{self.command} {self.path}: {status} {why}")
                self._answer(status, why.encode(), "text/plain")

            def do_GET(self):
                self._refuse(405 if self.path.split("?")[0] == TRACES_PATH else 404, "POST OTLP traces here")

            do_PUT = do_DELETE = do_GET

            def _read_chunked(self) -> "bytes | None":
                """A Transfer-Encoding: chunked body (Envoy's OTLP/HTTP exporter sends one)."""
                parts, total = [], 0
                while True:
                    line = self.rfile.readline(1024)
                    try:
                        size = int(line.split(b";")[0].strip(), 16)
                    except ValueError:
                        return None
                    if size == 0:
                        while self.rfile.readline(8192).strip():   # trailers, up to the empty line
                            pass
                        return b"".join(parts)
                    total += size
                    if total > MAX_BODY:
                        return None
                    parts.append(self.rfile.read(size))
                    if self.rfile.read(2) != b"\r\n":
                        return None

            def do_POST(self):
                length = self.headers.get("Content-Length")
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    body = self._read_chunked()
                    if body is None:
                        self.close_connection = True
                        return self._refuse(400, "malformed or oversized chunked body")
                elif length is not None and length.isdigit() and int(length) <= MAX_BODY:
                    body = self.rfile.read(int(length))
                else:
                    self.close_connection = True
                    return self._refuse(411, "Content-Length or chunked body required")
                if self.path.split("?")[0] != TRACES_PATH:
                    return self._refuse(404, f"only {TRACES_PATH}")
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    elif encoding != "identity":
                        return self._refuse(415, f"unsupported Content-Encoding {encoding}")
                except (OSError, zlib.error) as e:
                    return self._refuse(400, f"bad {encoding} body: {e}")
                if ctype not in ("application/x-protobuf", "application/json"):
                    return self._refuse(415, f"unsupported Content-Type {ctype!r}")
                try:
                    spans = spans_of(decode(body, ctype))
                except ValueError as e:
                    return self._refuse(400, str(e))
                rx.add(spans, {"content_type": ctype, "encoding": encoding, "spans": len(spans),
                               "user_agent": self.headers.get("User-Agent") or ""})
                if ctype == "application/json":
                    self._answer(200, json_format.MessageToJson(ExportTraceServiceResponse()).encode(),
                                 "application/json")
                else:
                    self._answer(200, ExportTraceServiceResponse().SerializeToString())

        return Handler


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="OTLP/HTTP trace receiver: prints each span as a JSON line")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4318)
    args = p.parse_args(argv)

    def show(span: dict) -> None:
        print(json.dumps(span, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)), flush=True)

    rx = OtlpReceiver(args.host, args.port, on_span=show).start()
    print(f"listening on {rx.traces_url}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        rx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
