#!/usr/bin/env python3
"""A tiny HTTP upstream for the demo and the tests: answers every request with 200 and a JSON
description of what it received, so one can see which X-Credential-* headers nginx passed on.

    python3 scripts/echo_upstream.py [--port 9292] [--host 127.0.0.1] [--log FILE.jsonl]

Answer body: {"method": ..., "path": ..., "headers": {lower-case name: value}, "raw_headers": [[name, value], ...]}
Listens on 127.0.0.1 unless --host says otherwise (the compose demo runs it in a container with
--host 0.0.0.0). Standard library only; tests import EchoUpstream and read .requests.
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as nginx's upstream keepalive expects
    server: "EchoUpstream"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # no Nagle delay

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        record = {
            "method": self.command,
            "path": self.path,
            "headers": headers,
            "raw_headers": [[n, v] for n, v in self.headers.items()],
            "body_bytes": len(body),
        }
        self.server.record(record)
        out = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, fmt, *args):  # quiet
        pass


class EchoUpstream(ThreadingHTTPServer):
    """The echo server; .requests holds every request it answered (newest last)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, log_path: "str | None" = None, host: str = "127.0.0.1"):
        super().__init__((host, port), _Handler)
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._log_path = log_path
        self._thread: "threading.Thread | None" = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def record(self, rec: dict) -> None:
        with self._lock:
            self.requests.append(rec)
            if self._log_path:
                with open(self._log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")

    def start(self) -> "EchoUpstream":
        self._thread = threading.Thread(target=self.serve_forever, name="echo-upstream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main() -> None:
    p = argparse.ArgumentParser(description="echo upstream (on 127.0.0.1 by default)")
    p.add_argument("--port", type=int, default=9292)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--log", help="append each request as one JSON line to this file")
    a = p.parse_args()
    srv = EchoUpstream(a.port, a.log, host=a.host)
    print(f"echo upstream on http://{a.host}:{srv.port}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
