#!/usr/bin/env python3
"""Hit ratio of a hot set of active tokens while unique junk tokens flood the sidecar (issue: a
flood of junk must not evict good entries). Runs the real binary against a fake AS on loopback.

    scripts/junk_flood.py [--bin PATH] [--hot 1000] [--junk 100000] [--max-entries 5000]

Each round sends `max_entries` junk tokens (unknown to the AS: inactive answers), then every hot
token once; the ratio counts hot requests answered without an AS call. Prints one line:
`hot-set hit ratio: R (H of N hot requests answered from the cache; J junk)`. Standard library only.
"""
from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import stack  # noqa: E402


class FakeAS(BaseHTTPRequestHandler):
    hot_calls = 0
    lock = threading.Lock()
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        token = parse_qs(body).get("token", [""])[0]
        if token.startswith("hot-"):
            with FakeAS.lock:
                FakeAS.hot_calls += 1
            answer = b'{"active":true,"scope":"api","token_type":"Bearer"}'
        else:
            answer = b'{"active":false}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default=str(REPO / ".build" / "debug" / "authz-sidecar"))
    parser.add_argument("--hot", type=int, default=1000)
    parser.add_argument("--junk", type=int, default=100_000)
    parser.add_argument("--max-entries", type=int, default=5000)
    args = parser.parse_args()

    as_port, sidecar_port = stack.free_port(), stack.free_port()
    server = ThreadingHTTPServer(("127.0.0.1", as_port), FakeAS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="junk-flood-"))
    config = work / "sidecar.yaml"
    config.write_text(f"""server: {{ listen: "127.0.0.1:{sidecar_port}" }}
introspection: {{ endpoint: "http://127.0.0.1:{as_port}/introspect", client_id: c, client_secret: s, timeout_ms: 5000 }}
cache: {{ ttl_seconds: 3600, negative_ttl_seconds: 3600, max_entries: {args.max_entries} }}
logging: {{ level: error }}
policies: [ {{ name: api, match: {{ path_prefix: / }}, required_scopes: [api] }} ]
""")
    proc = subprocess.Popen([args.bin, "serve", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stack.wait_port("127.0.0.1", sidecar_port, 30, proc)
        conn = http.client.HTTPConnection("127.0.0.1", sidecar_port, timeout=10)

        def ask(token: str, want: int) -> None:
            conn.request("GET", "/authz", headers={"X-Original-URI": "/x", "Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            if response.status != want:
                raise SystemExit(f"{token}: expected {want}, got {response.status}")

        hot = [f"hot-{i}" for i in range(args.hot)]
        for token in hot:
            ask(token, 200)
        hot_requests = 0
        calls_before = FakeAS.hot_calls
        sent = 0
        started = time.monotonic()
        while sent < args.junk:
            for _ in range(min(args.max_entries, args.junk - sent)):
                ask(f"junk-{sent}", 401)
                sent += 1
            for token in hot:
                ask(token, 200)
                hot_requests += 1
        misses = FakeAS.hot_calls - calls_before
        ratio = (hot_requests - misses) / hot_requests
        print(f"hot-set hit ratio: {ratio:.3f} ({hot_requests - misses} of {hot_requests} hot requests answered "
              f"from the cache; {sent} junk tokens; max_entries {args.max_entries}; {time.monotonic() - started:.0f} s)")
        return 0
    finally:
        proc.terminate()
        proc.wait(10)
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
