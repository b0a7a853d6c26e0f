"""Integration harness: real nginx (rendered from deploy/nginx.conf) in front of the real
authz-sidecar binary, a fake RFC 7662 authorization server and an echo upstream, all on 127.0.0.1.

Environment:
  AUTHZ_SIDECAR_BIN  the binary (default <repo>/.build/debug/authz-sidecar, else
                     /work/main/.build/debug/authz-sidecar)
  NGINX_BIN          nginx (default: nginx on PATH, else /usr/sbin/nginx)

Every process is started here, on free loopback ports, and stopped by its PID at teardown.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import stack  # noqa: E402  (scripts/stack.py: nginx rendering, ports, thumbprints)
from echo_upstream import EchoUpstream  # noqa: E402

INTROSPECTION_CLIENT_ID = "introspection-client"
INTROSPECTION_CLIENT_SECRET = "fake-as-secret"
KONG_DENIED = "The resource owner or authorization server denied the request."
KONG_UNAUTHENTICATED = "Unauthenticated."
KONG_UNAVAILABLE = "Authorization server unavailable."
HTTP_TIMEOUT = 10.0


def kong_body(code: int, message: str) -> bytes:
    """The exact deny body of DESIGN.md §6."""
    return json.dumps({"data": [], "error": {"code": code, "message": message}}, separators=(",", ":")).encode()


def _default_bin() -> str:
    if os.environ.get("AUTHZ_SIDECAR_BIN"):
        return os.environ["AUTHZ_SIDECAR_BIN"]
    own = REPO / ".build" / "debug" / "authz-sidecar"
    return str(own if own.exists() else Path("/work/main/.build/debug/authz-sidecar"))


SIDECAR_BIN = _default_bin()
NGINX_BIN = os.environ.get("NGINX_BIN") or shutil.which("nginx") or "/usr/sbin/nginx"


def pytest_configure(config):
    config.addinivalue_line("markers", "nginx: nginx + sidecar + fake authorization server")
    config.addinivalue_line("markers", "glewlwyd: end to end with a real Glewlwyd authorization server")


def pytest_sessionstart(session):
    problems = []
    if not (os.path.isfile(SIDECAR_BIN) and os.access(SIDECAR_BIN, os.X_OK)):
        problems.append(f"authz-sidecar binary not found at {SIDECAR_BIN}: build it with "
                        "`swift build --product authz-sidecar` or set AUTHZ_SIDECAR_BIN")
    if not os.path.exists(NGINX_BIN):
        problems.append("nginx is not installed (scripts/test.sh installs it)")
    if not os.path.exists(stack.HEADERS_MORE_MODULE):
        problems.append(f"{stack.HEADERS_MORE_MODULE} missing: apt-get install libnginx-mod-http-headers-more-filter")
    if shutil.which("openssl") is None:
        problems.append("openssl is not installed")
    if problems:
        pytest.exit("integration tests cannot run:\n  " + "\n  ".join(problems), returncode=1)


# ---------------------------------------------------------------------------------------------
# YAML for the sidecar's config file (no PyYAML needed: block style, JSON-quoted scalars).
def to_yaml(obj, indent: int = 0) -> str:
    pad = "  " * indent

    def scalar(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        return json.dumps(str(v))

    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict) and v:
                lines.append(f"{pad}{k}:")
                lines.append(to_yaml(v, indent + 1))
            elif isinstance(v, list) and v and any(isinstance(x, dict) for x in v):
                lines.append(f"{pad}{k}:")
                lines.append(to_yaml(v, indent + 1))
            elif isinstance(v, list):
                lines.append(f"{pad}{k}: [{', '.join(scalar(x) for x in v)}]")
            elif isinstance(v, dict):
                lines.append(f"{pad}{k}: {{}}")
            else:
                lines.append(f"{pad}{k}: {scalar(v)}")
    elif isinstance(obj, list):
        for item in obj:
            body = to_yaml(item, indent + 1).splitlines()
            first = body[0].lstrip() if body else "{}"
            lines.append(f"{pad}- {first}")
            lines.extend(body[1:])
    else:
        lines.append(pad + scalar(obj))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Processes
def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def stop_process(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop PROC (and, if it has to be killed, the children it leaves behind) by PID."""
    if proc.poll() is not None:
        return
    kids = _children(proc.pid)
    try:
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


_LOGS: list[tuple[str, Path]] = []   # (label, path) shown under a failed test
ALL_TOKENS: set[str] = set()         # every token a test used: none may appear in a sidecar log


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for label, path in _LOGS:
            report.sections.append((f"{label} ({path})", tail(path, 25)))


class Sidecar:
    """A running authz-sidecar (serve --config)."""

    def __init__(self, workdir: Path, config: dict, env: "dict | None" = None, name: str = "sidecar",
                 health_base: "str | None" = None, port: "int | None" = None):
        self.port = port or stack.free_port()
        config = dict(config)
        config["server"] = {**config.get("server", {}), "listen": f"127.0.0.1:{self.port}"}
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(to_yaml(config) + "\n")
        self.log_path = workdir / f"{name}.log"
        self.base = f"http://127.0.0.1:{self.port}"
        penv = {**os.environ, **(env or {})}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([SIDECAR_BIN, "serve", "--config", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=penv)
        _LOGS.append((name, self.log_path))
        try:
            # /healthz lives on server.admin_listen when one is set (pass its base URL)
            stack.wait_http((health_base or self.base) + "/healthz", timeout=20, proc=self.proc)
        except (TimeoutError, RuntimeError) as e:
            self.stop()
            pytest.fail(f"authz-sidecar did not start: {e}\nconfig:\n{self.config_path.read_text()}\n"
                        f"log:\n{tail(self.log_path)}", pytrace=False)

    def stop(self) -> None:
        stop_process(self.proc)


class Nginx:
    """nginx running the rendered deploy/nginx.conf in the foreground (its PID is ours)."""

    def __init__(self, workdir: Path, certs: Path, sidecar_port: int, upstream_port: int):
        self.port = stack.free_port()
        self.workdir = workdir
        self.conf = stack.render_nginx_conf(workdir, {"nginx": self.port, "sidecar": sidecar_port,
                                                      "upstream": upstream_port}, certs)
        self.error_log = workdir / "logs" / "error.log"
        check = subprocess.run([NGINX_BIN, "-t", "-e", str(self.error_log), "-c", str(self.conf)],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            pytest.fail(f"nginx -t rejected {self.conf}:\n{check.stderr}", pytrace=False)
        self.stdout = workdir / "logs" / "nginx.stdout"
        with open(self.stdout, "wb") as out:
            self.proc = subprocess.Popen([NGINX_BIN, "-e", str(self.error_log), "-c", str(self.conf)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _LOGS.append(("nginx error.log", self.error_log))
        try:
            stack.wait_port("127.0.0.1", self.port, timeout=15, proc=self.proc)
        except (TimeoutError, RuntimeError) as e:
            self.stop()
            pytest.fail(f"nginx did not start: {e}\n{tail(self.error_log)}", pytrace=False)

    def stop(self) -> None:
        stop_process(self.proc)   # SIGTERM = fast shutdown of master and workers


# ---------------------------------------------------------------------------------------------
# Fake RFC 7662 authorization server
class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):   # reset / dropped connections are expected
        pass


class QuietHandler(BaseHTTPRequestHandler):
    """The fake servers' request handler: HTTP/1.1, no request log, answers through _send."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


def serve(handler, name: str, port: int = 0) -> _QuietServer:
    """HANDLER served on 127.0.0.1:PORT (0: a free one) by a daemon thread called NAME."""
    srv = _QuietServer(("127.0.0.1", port), handler)
    threading.Thread(target=srv.serve_forever, name=name, daemon=True).start()
    return srv


def shut_down(srv: "_QuietServer | None") -> None:
    """Stop serving and close the listening socket (its port then refuses connections)."""
    if srv is not None:
        srv.shutdown()
        srv.server_close()


class FakeAuthorizationServer:
    """POST /introspect (RFC 7662 §2) with client_secret_basic.

    tokens: token -> the JSON object to answer (unknown tokens -> {"active": false}).
    calls:  Counter of introspection calls per token (only authenticated, well-formed calls).
    mode:   "ok" | "500" | "slow" (answers after `delay` s) | "garbage" (200 text/html) | "reset"
            (closes the connection without answering); stop()/start() take it off the network.
    """

    def __init__(self, client_id: str = INTROSPECTION_CLIENT_ID, client_secret: str = INTROSPECTION_CLIENT_SECRET):
        self.client_id, self.client_secret = client_id, client_secret
        self.tokens: dict[str, dict] = {}
        self.calls: Counter = Counter()
        self.total_calls = 0
        self.rejected_auth = 0
        self.mode = "ok"
        self.delay = 2.5
        self.port = 0
        self._lock = threading.Lock()
        self._server: "ThreadingHTTPServer | None" = None
        self._connections: set = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/introspect"

    def add_token(self, token: str, claims: dict) -> str:
        ALL_TOKENS.add(token)
        self.tokens[token] = claims
        return token

    def _handler(self):
        fake = self

        class Handler(QuietHandler):
            def setup(self):
                super().setup()
                # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with fake._lock:
                    fake._connections.add(self.connection)

            def finish(self):
                with fake._lock:
                    fake._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def do_GET(self):
                self._send(404, b'{"error":"not_found"}')

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self.path.split("?")[0] != "/introspect":
                    return self._send(404, b'{"error":"not_found"}')
                expected = "Basic " + base64.b64encode(f"{fake.client_id}:{fake.client_secret}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    with fake._lock:
                        fake.rejected_auth += 1
                    return self._send(401, b'{"error":"invalid_client"}',
                                      extra=[("WWW-Authenticate", 'Basic realm="fake-as"')])
                if not (self.headers.get("Content-Type") or "").startswith("application/x-www-form-urlencoded"):
                    return self._send(400, b'{"error":"invalid_request"}')
                form = urllib.parse.parse_qs(raw.decode(), keep_blank_values=True)
                token = (form.get("token") or [""])[0]
                if not token:
                    return self._send(400, b'{"error":"invalid_request"}')
                with fake._lock:
                    fake.calls[token] += 1
                    fake.total_calls += 1
                mode = fake.mode
                if mode == "500":
                    return self._send(500, b'{"error":"server_error"}')
                if mode == "garbage":
                    return self._send(200, b"<html>maintenance</html>", "text/html")
                if mode == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                # The answer is what the AS knows when the call arrives: a slow call still in
                # flight answers that, even if a test changes the token meanwhile.
                answer = json.dumps(fake.tokens.get(token, {"active": False})).encode()
                if mode == "slow":
                    time.sleep(fake.delay)
                self._send(200, answer)

        return Handler

    def start(self) -> "FakeAuthorizationServer":
        self._server = serve(self._handler(), "fake-as", self.port)
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        """Take the server off the network (connections to its port are refused)."""
        shut_down(self._server)
        self._server = None
        # Also drop the keep-alive connections the sidecar holds, or it would still be served.
        with self._lock:
            conns, self._connections = list(self._connections), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# Client side
class Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> "str | None":
        return self.headers.get(name)

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {dict(self.headers)} {self.body[:300]!r}>"


class EdgeClient:
    """HTTPS client for nginx, presenting one of the mkcerts client certificates."""

    def __init__(self, port: int, certs: Path):
        self.port, self.certs = port, certs

    def request(self, path: str, token: "str | None" = None, cert: "str | None" = "client1",
                method: str = "GET", headers: "dict | None" = None, body: "bytes | None" = None) -> Response:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        if cert:
            ctx.load_cert_chain(str(self.certs / f"{cert}.crt"), str(self.certs / f"{cert}.key"))
        conn = http.client.HTTPSConnection("localhost", self.port, context=ctx, timeout=HTTP_TIMEOUT)
        try:
            h = dict(headers or {})
            if token is not None:
                h["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return Response(r.status, r.headers, r.read())
        finally:
            conn.close()


def http_request(base: str, path: str, method: str = "GET", headers: "dict | None" = None,
                 body: "bytes | None" = None) -> Response:
    """Plain HTTP straight to the sidecar."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=HTTP_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read())
    finally:
        conn.close()


def log_line(sc: Sidecar, rid: str, timeout: float = 5.0) -> "dict | None":
    """The sidecar's JSON log line for the request with X-Request-Id RID (polls: logging is async)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in sc.log_path.read_text(errors="replace").splitlines():
            if rid in line:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("authz.request_id") == rid:
                    return obj
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Fixtures
@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(REPO / "scripts" / "mkcerts.sh"), str(d)], check=True,
                   capture_output=True, timeout=120)
    return d


@pytest.fixture(scope="session")
def fake_as():
    srv = FakeAuthorizationServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def echo():
    srv = EchoUpstream(0).start()
    yield srv
    srv.stop()


def policies(certificate_header: str = "X-Client-Cert") -> list[dict]:
    """The two policies the suites use (DESIGN.md §3)."""
    return [
        {"name": "token-mtls", "match": {"path_prefix": "/token-mtls/"}, "required_scopes": ["system-access"],
         "certificate_header": certificate_header, "certificate_format": "auto"},
        {"name": "admin", "match": {"path_prefix": "/admin-api/"}, "required_scopes": ["admin"],
         "certificate_header": certificate_header, "certificate_format": "auto"},
    ]


@pytest.fixture(scope="session")
def sidecar(tmp_path_factory, fake_as):
    config = {
        "introspection": {
            "endpoint": fake_as.url,
            "client_id": INTROSPECTION_CLIENT_ID,
            "client_secret": INTROSPECTION_CLIENT_SECRET,
            "auth_method": "client_secret_basic",
            "timeout_ms": 1000,
        },
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
        "policies": policies(),
    }
    sc = Sidecar(tmp_path_factory.mktemp("sidecar"), config)
    yield sc
    sc.stop()


@pytest.fixture(scope="session")
def nginx(tmp_path_factory, certs, sidecar, echo):
    ng = Nginx(tmp_path_factory.mktemp("nginx"), certs, sidecar.port, echo.port)
    yield ng
    ng.stop()


@pytest.fixture(scope="session")
def edge(nginx, certs) -> EdgeClient:
    return EdgeClient(nginx.port, certs)
