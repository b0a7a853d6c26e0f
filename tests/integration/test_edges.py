"""Edges of the decision and of the service (DESIGN.md §4, §5, §8), against the real binary:

  1. path readings: a path whose readings select different policies, climbs above the root or
     holds a control character is 403 `ambiguous_path` (direct, through nginx, through Envoy);
  2. an nginx-style /authz without X-Original-URI is 403 `missing_original_uri`;
  3. the host is compared lower-cased, without its port and one trailing dot;
  4. only access tokens pass (refresh, ID, offline, logout answers: 401 `token_kind`);
  5. a binding is never ignored (cnf.jkt as Bearer, unknown cnf members: 401
     `unsupported_binding`); a DPoP scheme is never "no token" (401 `dpop_proof` without a proof);
  6. a purge reaches lookups in flight;
  7. a client that never reads its answers cannot grow the sidecar's memory; admin bodies are
     bounded;
  8. /admin/* only on a loopback or unix listener, or with server.admin_token_file;
  9. a configuration error never echoes a secret (check-config and a rejected reload).

Requests straight to the sidecar go over raw sockets, so no client library normalises the path.
Every such request carries its own X-Request-Id, which finds its denial line in the JSON log.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import signal
import socket
import ssl
import string
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import (ALL_TOKENS, INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, KONG_DENIED, SIDECAR_BIN,
                      FakeAuthorizationServer, Nginx, Sidecar, kong_body, log_line, stack, to_yaml)
import envoy_support
from envoy_support import DEPLOY_ENVOY, DEPLOY_ENVOY_GRPC, Envoy, render_envoy_conf, validate

# the session fixture of the Envoy suites (assigned here so that pytest registers it in this module)
envoy_bin = envoy_support.envoy_bin

TIMEOUT = 5.0          # every socket operation of this module
REALM = 'Bearer realm="authz-sidecar"'

# First match wins. `admin-host` comes first so that the host decides; `anything` is the catch-all
# anonymous policy behind every other one (so "no policy" never explains a refusal here).
POLICIES = [
    {"name": "admin-host", "match": {"hosts": ["admin.example"], "path_prefix": "/"}, "required_scopes": ["admin"]},
    {"name": "public", "match": {"path_prefix": "/public/"}, "allow_anonymous": True},
    {"name": "admin", "match": {"path_prefix": "/admin-api/"}, "required_scopes": ["admin"]},
    {"name": "api", "match": {"path_prefix": "/api/"}, "required_scopes": ["system-access"]},
    {"name": "anything", "match": {"path_prefix": "/"}, "allow_anonymous": True},
]


def sidecar_config(as_url: str, *, server: "dict | None" = None, policies=None, timeout_ms: int = 1500) -> dict:
    return {
        "server": dict(server or {}),
        "introspection": {"endpoint": as_url, "client_id": INTROSPECTION_CLIENT_ID,
                          "client_secret": INTROSPECTION_CLIENT_SECRET, "auth_method": "client_secret_basic",
                          "timeout_ms": timeout_ms},
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
        "logging": {"format": "json", "level": "info"},
        "policies": policies or POLICIES,
    }


def new_token(prefix: str = "edge") -> str:
    return f"{prefix}-" + secrets.token_urlsafe(24)


def active(scope: str = "system-access", **extra) -> dict:
    now = int(time.time())
    return {"active": True, "scope": scope, "client_id": "edge-client", "exp": now + 600, "iat": now - 5,
            "sub": "svc-" + secrets.token_hex(4), **extra}


# ---------------------------------------------------------------------------------------------
# Raw HTTP/1.1
class Raw:
    def __init__(self, status: int, headers: dict, body: bytes, head: bytes):
        self.status, self.headers, self.body, self.head = status, headers, body, head

    def header(self, name: str) -> "str | None":
        return self.headers.get(name.lower())

    def __repr__(self):
        return f"<{self.status} {self.headers} {self.body[:300]!r}>"


def _read_response(sock, until_close: bool = False) -> "Raw | None":
    """One response (Content-Length or chunked framing; else up to the close); None if the peer
    closed without answering."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower().decode("latin-1")
        value = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value

    def more() -> bytes:
        try:
            return sock.recv(65536)
        except ConnectionResetError:
            return b""

    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = more()
            if not chunk:
                break
            rest += chunk
        body = rest[:length]
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            while b"\r\n" not in rest:
                chunk = more()
                if not chunk:
                    return Raw(status, headers, body, head)
                rest += chunk
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                chunk = more()
                if not chunk:
                    break
                rest += chunk
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    elif until_close:
        body = rest
        while True:
            chunk = more()
            if not chunk:
                break
            body += chunk
    else:
        body = rest
    return Raw(status, headers, body, head)


def _bytes(text: "str | bytes") -> bytes:
    return text if isinstance(text, bytes) else text.encode("latin-1")


def build(target: "str | bytes", headers: "list[tuple[str, str | bytes]]", method: str = "GET",
          body: bytes = b"") -> bytes:
    out = _bytes(method) + b" " + _bytes(target) + b" HTTP/1.1\r\n"
    for name, value in headers:
        out += _bytes(name) + b": " + _bytes(value) + b"\r\n"
    return out + b"\r\n" + body


def exchange(address, request: bytes, timeout: float = TIMEOUT) -> "Raw | None":
    """Sends REQUEST on a fresh connection to ADDRESS ((host, port) or a unix socket path) and
    reads one answer."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
    else:
        sock = socket.create_connection(address, timeout=timeout)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return _read_response(sock)


def ask(sc: Sidecar, form: str, path: "str | bytes | None", *, token: "str | None" = None,
        authorization: "str | None" = None, host: str = "sidecar.test", original_host: "str | None" = None,
        extra: "list | None" = None) -> "tuple[Raw | None, str]":
    """One decision question straight to the sidecar, in the form nginx (`/authz` + X-Original-*)
    or Envoy's HTTP service (`/authz<path>`) asks it. Returns (answer, its X-Request-Id)."""
    rid = "edges-" + secrets.token_hex(8)
    headers: list = [("Host", host), ("X-Request-Id", rid)]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    if authorization is not None:
        headers.append(("Authorization", authorization))
    if form == "nginx":
        target: "str | bytes" = "/authz"
        headers.append(("X-Original-Method", "GET"))
        if path is not None:
            headers.append(("X-Original-URI", path))
        if original_host is not None:
            headers.append(("X-Original-Host", original_host))
    else:
        assert form == "envoy" and path is not None
        target = b"/authz" + _bytes(path)
    headers.extend(extra or [])
    return exchange(("127.0.0.1", sc.port), build(target, headers)), rid


def assert_denied(sc: Sidecar, resp: "Raw | None", rid: str, status: int, reason: str,
                  www: "str | None" = None) -> dict:
    """STATUS with the exact Kong body, Content-Type JSON, and a log line with REASON."""
    assert resp is not None, "no answer"
    assert resp.status == status, resp
    assert resp.body == kong_body(status, KONG_DENIED), resp
    assert (resp.header("Content-Type") or "").split(";")[0].strip() == "application/json", resp
    if www is not None:
        assert resp.header("WWW-Authenticate") == www, resp
    line = log_line(sc, rid)
    assert line is not None, f"no log line for request {rid}"
    assert line.get("authz.reason") == reason, line
    return line


def assert_ambiguous(sc: Sidecar, resp, rid: str) -> None:
    assert_denied(sc, resp, rid, 403, "ambiguous_path", www=REALM)


# ---------------------------------------------------------------------------------------------
# Fixtures: one sidecar with POLICIES, and nginx (deploy/nginx.conf) and Envoy (deploy/envoy.yaml)
# in front of it, for the tests that need no special configuration.
@pytest.fixture(scope="module")
def edges_as():
    srv = FakeAuthorizationServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def edges_sidecar(tmp_path_factory, edges_as):
    sc = Sidecar(tmp_path_factory.mktemp("sidecar-edges"), sidecar_config(edges_as.url), name="sidecar-edges")
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def edges_nginx(tmp_path_factory, certs, edges_sidecar, echo):
    ng = Nginx(tmp_path_factory.mktemp("nginx-edges"), certs, edges_sidecar.port, echo.port)
    yield ng
    ng.stop()


@pytest.fixture(scope="module")
def edges_envoy(tmp_path_factory, envoy_bin, certs, edges_sidecar, echo):
    e = Envoy(envoy_bin, tmp_path_factory.mktemp("envoy-edges"), certs, upstream_port=echo.port,
              sidecar_port=edges_sidecar.port, name="envoy-edges")
    yield e
    e.stop()


def through_edge(port: int, certs: Path, raw_path: "str | bytes", *, host: str = "localhost",
                 token: "str | None" = None) -> "Raw | None":
    """GET RAW_PATH, byte for byte in the request line, over mTLS (client1) to nginx or Envoy."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(str(certs / "client1.crt"), str(certs / "client1.key"))
    headers = [("Host", host), ("Connection", "close")]
    if token:
        headers.append(("Authorization", f"Bearer {token}"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.settimeout(10)
            s.sendall(build(raw_path, headers))
            try:
                return _read_response(s, until_close=True)
            except ssl.SSLError:
                return None


# ---------------------------------------------------------------------------------------------
# 1. Path readings (DESIGN.md §5.1)
AMBIGUOUS = [
    # ";" parameters: reading (b) drops them (Tomcat, Jetty, Spring)
    "/public/..;/admin-api/users",
    "/public/..;jsessionid=abc/admin-api/users",
    "/public/..;a=b;c=d/admin-api/",
    "/public/%2e%2e;/admin-api/users",
    "/public/%2E%2E;x=1/admin-api/",
    "/public/.;/../admin-api/",
    "/public/x/..;/..;/admin-api/",
    "/admin-api/..;/public/x",
    # encoded slashes: reading (b) decodes them
    "/public/..%2Fadmin-api/users",
    "/public/..%2fadmin-api/users",
    "/public/%2E%2E%2Fadmin-api/",
    "/public/%2e%2E%2fadmin-api/",
    "/public/x%2F..%2F..%2Fadmin-api/",
    "/admin-api/..%2Fpublic/x",
    "/public/..%2Fadmin-api/users?x=1",
    "/public/..%2Fadmin-api/users?next=/public/#frag",
    # backslashes, encoded or raw: reading (b) reads them as "/"
    "/public/..%5Cadmin-api/users",
    "/public/..%5cadmin-api/users",
    "/public/%2e%2e%5Cadmin-api/",
    "/public/..\\admin-api/users",
    "/public\\..\\admin-api\\users",
    # dot segments above the root
    "/..",
    "/../",
    "/../public/x",
    "/public/../../x",
    "/public/../../public/x",
    "/%2e%2e/public/x",
    "/public/%2E%2E/%2e%2e/admin-api/",
    "/./../public/",
    # ... in reading (b) only
    "/public/..%2F..%2Fpublic/x",
    "/..;/public/x",
    # control characters and NUL, percent-encoded
    "/public/a%00b",
    "/public/%00",
    "/public/..%00/admin-api/",
    "/public/a%0Ab",
    "/public/a%0a",
    "/public/a%0d%0a",
    "/public/%7f",
    "/public/%7F",
    "/public/%1b",
    "/public/%09x",
]

# Readings that agree (or differ without selecting another policy): decided normally.
# (path, status without a token)
AGREEING = [
    ("/public/a;b", 200),
    ("/public/a;b=c/d", 200),
    ("/public/x/..;/y", 200),                    # (a) /public/x/..;/y  (b) /public/y: both `public`
    ("/public/%2e%2e%2Fpublic/y", 200),          # (b) /public/y
    ("/public/..%252Fadmin-api/users", 200),     # decoded once only: %2F is text after that
    ("/public/%252e%252e/admin-api/", 200),
    ("/public//x", 200),
    ("//public/x", 200),
    ("/public/x?y=/../../admin-api/", 200),      # the query is not the path
    ("/public/x?a=%2F..%2F%00", 200),
    ("/public/x#/../../admin-api/", 200),        # nor the fragment
    ("/api/group%2Fproject", 401),               # `api` under every reading
    ("/api/group%2fproject/files", 401),
    ("/public/../admin-api/users", 401),         # `admin` under every reading: never anonymous
    ("/public/%2e%2e/admin-api/users", 401),
    ("/public/.%2E/admin-api/", 401),
    ("/public;x=1/../admin-api/", 401),
    ("/x", 200),                                 # the catch-all
]

# Raw control bytes: the HTTP parser may refuse them first (400); they never pass.
RAW_CONTROL = [b"/public/a\x01b", b"/public/a\x7fb", b"/public/a\x1bb", b"/public/\x00"]

FORMS = ["nginx", "envoy"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", AMBIGUOUS)
def test_ambiguous_path_is_403(edges_sidecar, edges_as, form, path):
    resp, rid = ask(edges_sidecar, form, path)
    assert_ambiguous(edges_sidecar, resp, rid)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", ["/public/..;/admin-api/users", "/public/..%2Fadmin-api/users",
                                  "/admin-api/..%2Fpublic/x", "/public/..%5Cadmin-api/", "/public/a%00b"])
def test_ambiguous_path_is_403_even_with_a_token_good_for_every_reading(edges_sidecar, edges_as, form, path):
    token = edges_as.add_token(new_token(), active(scope="admin system-access"))
    resp, rid = ask(edges_sidecar, form, path, token=token)
    assert_ambiguous(edges_sidecar, resp, rid)
    assert edges_as.calls[token] == 0, "the policy step refuses it: the token is never looked up"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path, status", AGREEING)
def test_path_whose_readings_agree_is_decided_normally(edges_sidecar, form, path, status):
    resp, rid = ask(edges_sidecar, form, path)
    assert resp is not None
    assert resp.status == status, resp
    if status == 200:
        assert resp.header("X-Anonymous") == "true", resp
    else:
        assert resp.body == kong_body(401, "Unauthenticated."), resp
        line = log_line(edges_sidecar, rid)
        assert line is not None and line["authz.reason"] == "no_token", line


@pytest.mark.parametrize("form", FORMS)
def test_encoded_slash_under_one_policy_passes_with_its_token(edges_sidecar, edges_as, form):
    token = edges_as.add_token(new_token(), active())
    resp, _ = ask(edges_sidecar, form, "/api/group%2Fproject/files?ref=main", token=token)
    assert resp is not None and resp.status == 200, resp
    assert resp.header("X-Credential-Scope") == "system-access", resp


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("path", RAW_CONTROL, ids=lambda p: repr(p))
def test_raw_control_character_in_the_path_never_passes(edges_sidecar, form, path):
    resp, rid = ask(edges_sidecar, form, path)
    if resp is None or resp.status == 400:      # the HTTP parser refused the request itself
        return
    assert_ambiguous(edges_sidecar, resp, rid)


# A model of the readings (DESIGN.md §5.1), for generated paths: (a) unreserved %XX decoded, dot
# segments resolved, "//" merged; (b) the same after also decoding %2F / %5C, reading "\" as "/"
# and dropping ";..." from every segment; and the third one the sidecar derives (PathReadings.swift),
# (c) = (a) with ";..." dropped and "\" read as "/" but %2F kept (a servlet container that
# refuses encoded slashes). A ".." above the root in ANY reading refuses the path. The generated
# paths avoid the places where the order of those steps could matter (";" and "%2F" in one
# segment, "//"), so the sidecar's fourth reading (dot segments resolved before "//" is merged) is
# exercised by the Swift property test (Tests/AuthzSidecarTests/PathPropertyTests.swift) instead.
_UNRESERVED = set(string.ascii_letters + string.digits + "-._~")


def _decode(path: str, extra: set) -> str:
    out, i = [], 0
    while i < len(path):
        pair = path[i + 1:i + 3]
        if path[i] == "%" and len(pair) == 2 and all(c in string.hexdigits for c in pair):
            ch = chr(int(pair, 16))
            out.append(ch if ch in _UNRESERVED or ch in extra else "%" + pair.upper())
            i += 3
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _resolve(path: str) -> "tuple[str, bool]":
    parts = path.split("/")[1:]
    out: list[str] = []
    climbed = False
    for index, seg in enumerate(parts):
        last = index == len(parts) - 1
        if seg in (".", ".."):
            if seg == "..":
                if out:
                    out.pop()
                else:
                    climbed = True
            if last:
                out.append("")
            continue
        if seg == "" and not last:
            continue
        out.append(seg)
    return "/" + "/".join(out), climbed


def _drop_parameters(path: str) -> str:
    return "/".join(seg.split(";")[0] for seg in path.replace("\\", "/").split("/"))


def readings(path: str) -> "list[tuple[str, bool]]":
    path = path.split("#")[0].split("?")[0]
    a = _resolve(_decode(path, set()))
    b = _resolve(_drop_parameters(_decode(path, {"/", "\\"})))
    c = _resolve(_drop_parameters(_decode(path, set())))
    return [a, b, c]


def select(path: str) -> str:
    for p in POLICIES[1:]:
        if path.startswith(p["match"]["path_prefix"]):
            return p["name"]
    raise AssertionError(path)


_CONTROL = re.compile(r"%(?:[01][0-9a-fA-F]|7[fF])|[\x00-\x1f\x7f]")


def expected(path: str) -> "int | str":
    if _CONTROL.search(path.split("#")[0].split("?")[0]):
        return "ambiguous"
    rs = readings(path)
    if any(climbed for _, climbed in rs) or len({select(p) for p, _ in rs}) > 1:
        return "ambiguous"
    return 200 if select(rs[0][0]) in ("public", "anything") else 401


_SEGMENTS = ["public", "admin-api", "api", "x", "..", ".", "%2e%2e", "%2E", ".%2e", "..;", ".;", "..;p=1", "a;b",
             "..%2Fadmin-api", "..%2fpublic", "..%5Capi", "%2e%2e%2Fadmin-api", "group%2Fproject", "..%252F"]


def test_generated_paths_follow_the_readings(edges_sidecar):
    rng = random.Random(20260518)
    paths = set()
    while len(paths) < 150:
        segs = [rng.choice(_SEGMENTS[:4])] + rng.choices(_SEGMENTS, k=rng.randint(0, 4))
        paths.add("/" + "/".join(segs) + ("/" if rng.random() < 0.4 else ""))
    wrong = []
    for path in sorted(paths):
        want = expected(path)
        for form in FORMS:
            resp, rid = ask(edges_sidecar, form, path)
            got = None if resp is None else resp.status
            if want == "ambiguous":
                ok = got == 403 and (log_line(edges_sidecar, rid, timeout=2) or {}).get("authz.reason") == "ambiguous_path"
            else:
                ok = got == want
            if not ok:
                wrong.append(f"{form} {path}: expected {want}, got {got} (readings {readings(path)})")
    assert not wrong, f"{len(wrong)} of {2 * len(paths)} answers differ from the model:\n" + "\n".join(wrong[:15])


# ... through the real proxies: they may refuse a path themselves (400); it never reaches the API.
THROUGH_PROXIES = [p for p in AMBIGUOUS if "#" not in p]


@pytest.mark.parametrize("path", THROUGH_PROXIES)
def test_ambiguous_path_through_nginx_never_reaches_the_upstream(edges_nginx, certs, echo, path):
    before = len(echo.requests)
    resp = through_edge(edges_nginx.port, certs, path)
    assert resp is not None, "nginx did not answer"
    assert resp.status != 200, resp
    assert resp.status in (400, 403), resp
    if resp.status == 403:
        assert resp.body == kong_body(403, KONG_DENIED), resp
        assert resp.header("WWW-Authenticate") == REALM, resp
    assert len(echo.requests) == before, echo.requests[before:]


@pytest.mark.parametrize("path", THROUGH_PROXIES)
def test_ambiguous_path_through_envoy_never_reaches_the_upstream(edges_envoy, edges_sidecar, certs, echo, path):
    """deploy/envoy.yaml normalises the path before ext_authz (normalize_path, merge_slashes; %2F
    and %5C refused): the sidecar and the upstream then see the same rewritten path, e.g.
    /../public/x -> /public/x. What must never happen is an ambiguous path reaching the upstream."""
    before = len(echo.requests)
    resp = through_edge(edges_envoy.port, certs, path)
    if len(echo.requests) == before:
        assert resp is None or resp.status != 200, resp
        if resp is not None and resp.status == 403:
            assert resp.body == kong_body(403, KONG_DENIED), resp
        return
    assert len(echo.requests) == before + 1
    forwarded = echo.requests[-1]["path"]
    assert forwarded != path, f"Envoy forwarded {path!r} unchanged and the sidecar allowed it"
    assert expected(forwarded) != "ambiguous", f"the upstream was given the ambiguous path {forwarded!r}"
    # ... and that rewritten path is what the sidecar decided on
    direct, _ = ask(edges_sidecar, "envoy", forwarded)
    assert resp is not None and direct is not None and direct.status == resp.status == 200, (resp, direct)


@pytest.mark.parametrize("path", ["/public/a;b", "/public/..%252Fadmin-api/users", "/public/x?y=/../../admin-api/"])
def test_unusual_but_unambiguous_path_through_nginx_and_envoy_is_served(edges_nginx, edges_envoy, certs, echo, path):
    for port in (edges_nginx.port, edges_envoy.port):
        before = len(echo.requests)
        resp = through_edge(port, certs, path)
        assert resp is not None and resp.status == 200, resp
        assert len(echo.requests) == before + 1
        assert echo.requests[-1]["headers"].get("x-anonymous") == "true"


def test_encoded_slash_through_nginx_with_a_token(edges_nginx, edges_as, certs, echo):
    token = edges_as.add_token(new_token(), active())
    before = len(echo.requests)
    resp = through_edge(edges_nginx.port, certs, "/api/group%2Fproject", token=token)
    assert resp is not None and resp.status == 200, resp
    assert echo.requests[-1]["path"] == "/api/group%2Fproject" and len(echo.requests) == before + 1


# ---------------------------------------------------------------------------------------------
# 2. The nginx form without X-Original-URI
@pytest.mark.parametrize("with_token", [False, True])
def test_nginx_form_without_original_uri_is_403(edges_sidecar, edges_as, with_token):
    token = edges_as.add_token(new_token(), active(scope="admin system-access")) if with_token else None
    resp, rid = ask(edges_sidecar, "nginx", None, token=token)
    line = assert_denied(edges_sidecar, resp, rid, 403, "missing_original_uri")
    text = json.dumps(line).lower()
    assert "proxy" in text and "misconfigur" in text, line
    # the catch-all anonymous policy on "/" is what a GET / would have been
    resp, _ = ask(edges_sidecar, "envoy", "/")
    assert resp is not None and resp.status == 200 and resp.header("X-Anonymous") == "true", resp


# ---------------------------------------------------------------------------------------------
# 3. Host: lower-cased, no port, no trailing dot
ADMIN_HOSTS = ["admin.example", "admin.example.", "ADMIN.Example.:443", "admin.example:8443", "Admin.Example.",
               "admin.example.:8443"]


@pytest.mark.parametrize("host", ADMIN_HOSTS)
def test_host_variants_select_the_host_policy(edges_sidecar, host):
    resp, rid = ask(edges_sidecar, "envoy", "/x", host=host)
    assert resp is not None and resp.status == 401, f"Host {host!r}: {resp}"
    assert (log_line(edges_sidecar, rid) or {}).get("authz.policy") == "admin-host"
    resp, rid = ask(edges_sidecar, "nginx", "/x", original_host=host)
    assert resp is not None and resp.status == 401, f"X-Original-Host {host!r}: {resp}"
    assert (log_line(edges_sidecar, rid) or {}).get("authz.policy") == "admin-host"


@pytest.mark.parametrize("host", ["other.example", "admin.example.evil", "xadmin.example", "admin.example.com."])
def test_other_hosts_do_not_select_the_host_policy(edges_sidecar, host):
    resp, _ = ask(edges_sidecar, "envoy", "/x", host=host)
    assert resp is not None and resp.status == 200 and resp.header("X-Anonymous") == "true", (host, resp)


@pytest.mark.parametrize("host", ["admin.example.", "ADMIN.Example.:443", "admin.example:8443"])
def test_host_variants_through_envoy_select_the_host_policy(edges_envoy, certs, echo, host):
    before = len(echo.requests)
    resp = through_edge(edges_envoy.port, certs, "/x", host=host)
    assert resp is not None and resp.status == 401, resp
    assert len(echo.requests) == before


@pytest.mark.parametrize("source", [DEPLOY_ENVOY, DEPLOY_ENVOY_GRPC,
                                    envoy_support.REPO / "deploy" / "compose" / "envoy.yaml"],
                         ids=["envoy.yaml", "envoy-grpc.yaml", "compose-envoy.yaml"])
def test_deploy_envoy_configs_strip_the_trailing_host_dot(source):
    config = "\n".join(ln.split("#")[0] for ln in source.read_text().splitlines())
    assert re.search(r"^\s+strip_trailing_host_dot: true\s*$", config, re.M), source


@pytest.mark.parametrize("source, ports", [(DEPLOY_ENVOY, {"sidecar": 3}), (DEPLOY_ENVOY_GRPC, {"sidecar_grpc": 3})],
                         ids=["envoy.yaml", "envoy-grpc.yaml"])
def test_deploy_envoy_configs_validate(envoy_bin, certs, tmp_path, source, ports):
    conf = render_envoy_conf(tmp_path, {"listen": 1, "admin": 2, "upstream": 4, **ports}, certs, source=source)
    out = validate(envoy_bin, conf)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deprecated" not in (out.stdout + out.stderr).lower()


# ---------------------------------------------------------------------------------------------
# 4. Only access tokens pass
REFUSED_KINDS = [
    {"token_type": "Refresh"}, {"token_type": "refresh_token"}, {"token_type": "REFRESH_TOKEN"},
    {"token_type": "Offline"}, {"token_type": "ID"}, {"token_type": "id_token"}, {"token_type": "Logout"},
    {"typ": "Refresh"}, {"typ": "Offline"}, {"typ": "ID"}, {"typ": "id"}, {"typ": "logout"}, {"typ": "Id_Token"},
    {"token_type": "Bearer", "typ": "Refresh"},
]
ACCEPTED_KINDS = [{"token_type": "Bearer"}, {"token_type": "bearer"}, {"typ": "at+jwt"}, {"typ": "Bearer"}, {}]


@pytest.mark.parametrize("kind", REFUSED_KINDS, ids=lambda k: json.dumps(k, sort_keys=True))
def test_refresh_id_offline_and_logout_tokens_are_401(edges_sidecar, edges_as, kind):
    token = edges_as.add_token(new_token(), active(**kind))
    for attempt in ("miss", "cache hit"):
        resp, rid = ask(edges_sidecar, "nginx", "/api/x", token=token)
        assert_denied(edges_sidecar, resp, rid, 401, "token_kind")
        assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or ""), (attempt, resp)
    assert edges_as.calls[token] == 1


@pytest.mark.parametrize("kind", ACCEPTED_KINDS, ids=lambda k: json.dumps(k, sort_keys=True))
def test_access_tokens_pass(edges_sidecar, edges_as, kind):
    token = edges_as.add_token(new_token(), active(**kind))
    resp, _ = ask(edges_sidecar, "nginx", "/api/x", token=token)
    assert resp is not None and resp.status == 200, resp


# ---------------------------------------------------------------------------------------------
# 5. Bindings are never ignored; DPoP is never "no token"
@pytest.mark.parametrize("cnf", [{"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"},
                                 {"x5t": "dGhpcyBpcyBub3QgYSByZWFsIHRodW1icHJpbnQ"}, {"foo": 1},
                                 {"x5t#S256-ish": "abc"}],
                         ids=["jkt", "x5t", "foo", "lookalike"])
@pytest.mark.parametrize("path", ["/api/x", "/public/x"])
def test_binding_the_sidecar_cannot_check_is_401(edges_sidecar, edges_as, cnf, path):
    token = edges_as.add_token(new_token(), active(cnf=cnf))
    resp, rid = ask(edges_sidecar, "nginx", path, token=token)
    assert_denied(edges_sidecar, resp, rid, 401, "unsupported_binding")
    www = resp.header("WWW-Authenticate") or ""
    assert www.startswith("Bearer ") and 'error="invalid_token"' in www, resp


@pytest.mark.parametrize("scheme", ["DPoP", "dpop", "DPOP"])
@pytest.mark.parametrize("path", ["/public/x", "/x", "/api/x"])
def test_dpop_scheme_is_never_anonymous(edges_sidecar, edges_as, scheme, path):
    token = edges_as.add_token(new_token(), active(cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}))
    resp, rid = ask(edges_sidecar, "nginx", path, authorization=f"{scheme} {token}")
    # dpop: allowed (the default): the proof is checked first, and there is none.
    assert_denied(edges_sidecar, resp, rid, 401, "dpop_proof")
    assert resp.header("X-Anonymous") is None, resp
    www = resp.header("WWW-Authenticate") or ""
    assert www.startswith("DPoP ") and 'error="invalid_dpop_proof"' in www, resp


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwYXNzd29yZA==", "Digest username=\"u\", nonce=\"n\""])
def test_other_schemes_still_count_as_no_token(edges_sidecar, authorization):
    resp, _ = ask(edges_sidecar, "nginx", "/public/x", authorization=authorization)
    assert resp is not None and resp.status == 200 and resp.header("X-Anonymous") == "true", resp


# ---------------------------------------------------------------------------------------------
# 6. A purge reaches lookups in flight
@pytest.fixture
def slow_as():
    srv = FakeAuthorizationServer().start()
    srv.mode, srv.delay = "slow", 1.5
    yield srv
    srv.stop()


@pytest.fixture
def purge_sidecar(tmp_path, slow_as):
    admin_port = stack.free_port()
    sc = Sidecar(tmp_path, sidecar_config(slow_as.url, server={"admin_listen": f"127.0.0.1:{admin_port}"},
                                          timeout_ms=5000),
                 name="sidecar-purge", health_base=f"http://127.0.0.1:{admin_port}")
    sc.admin_port = admin_port
    yield sc
    sc.stop()


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:   # noqa: BLE001 - reported by the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _purge(sc, body: dict) -> Raw:
    payload = json.dumps(body).encode()
    resp = exchange(("127.0.0.1", sc.admin_port), build("/admin/cache/purge", [
        ("Host", "admin"), ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        method="POST", body=payload))
    assert resp is not None
    return resp


def test_purge_reaches_a_lookup_in_flight(purge_sidecar, slow_as):
    """B, asked after the purge answered, must not join A's call (begun before the purge)."""
    sc = purge_sidecar
    token = slow_as.add_token(new_token("purge"), active())
    a, a_box = _in_thread(lambda: ask(sc, "nginx", "/api/x", token=token)[0])
    assert _wait(lambda: slow_as.calls[token] == 1, 3), "A's AS call did not start"
    slow_as.tokens[token] = {"active": False}          # revoked at the AS ...
    purged = _purge(sc, {"token": token})              # ... and purged, while A's call is in flight
    assert purged.status == 200 and "purged" in json.loads(purged.body), purged
    assert a.is_alive(), "A finished before the purge: the AS was not slow enough"
    resp_b, _ = ask(sc, "nginx", "/api/x", token=token)
    a.join(10)
    assert "error" not in a_box, a_box
    assert a_box["value"] is not None and a_box["value"].status in (200, 401), a_box
    assert resp_b is not None and resp_b.status == 401, f"B joined the pre-purge call: {resp_b}"
    assert slow_as.calls[token] >= 2, "B should have been answered by an AS call made after the purge"
    resp_c, _ = ask(sc, "nginx", "/api/x", token=token)
    assert resp_c is not None and resp_c.status == 401, resp_c


def test_an_answer_begun_before_a_purge_is_not_cached(purge_sidecar, slow_as):
    """C, asked after A finished, must not be served A's pre-purge answer from the cache."""
    sc = purge_sidecar
    token = slow_as.add_token(new_token("purge"), active())
    a, a_box = _in_thread(lambda: ask(sc, "nginx", "/api/x", token=token)[0])
    assert _wait(lambda: slow_as.calls[token] == 1, 3), "A's AS call did not start"
    slow_as.tokens[token] = {"active": False}
    purged = _purge(sc, {"token_sha256": hashlib.sha256(token.encode()).hexdigest()})
    assert purged.status == 200, purged
    assert a.is_alive(), "A finished before the purge: the AS was not slow enough"
    a.join(10)
    assert "error" not in a_box and a_box["value"] is not None and a_box["value"].status in (200, 401), a_box
    slow_as.mode = "ok"
    resp_c, _ = ask(sc, "nginx", "/api/x", token=token)
    assert resp_c is not None and resp_c.status == 401, f"A's pre-purge answer was cached: {resp_c}"
    assert slow_as.calls[token] >= 2


def test_purge_all_reaches_a_lookup_in_flight(purge_sidecar, slow_as):
    sc = purge_sidecar
    token = slow_as.add_token(new_token("purge"), active())
    a, a_box = _in_thread(lambda: ask(sc, "nginx", "/api/x", token=token)[0])
    assert _wait(lambda: slow_as.calls[token] == 1, 3), "A's AS call did not start"
    slow_as.tokens[token] = {"active": False}
    assert _purge(sc, {"all": True}).status == 200
    assert a.is_alive(), "A finished before the purge: the AS was not slow enough"
    resp_b, _ = ask(sc, "nginx", "/api/x", token=token)
    a.join(10)
    assert resp_b is not None and resp_b.status == 401, f"B joined the pre-purge call: {resp_b}"


# ---------------------------------------------------------------------------------------------
# 7. Backpressure and bounded admin bodies
def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_client_that_never_reads_cannot_grow_the_sidecars_memory(tmp_path, edges_as):
    sc = Sidecar(tmp_path, sidecar_config(edges_as.url), name="sidecar-flood")
    try:
        pid = sc.proc.pid
        warm = exchange(("127.0.0.1", sc.port), build("/metrics", [("Host", "x")]))
        assert warm is not None and warm.status == 200
        for _ in range(20):                               # settle the allocator a little
            exchange(("127.0.0.1", sc.port), build("/healthz", [("Host", "x")]))
        base = rss_kib(pid)
        limit = base + 100 * 1024
        one = build("/metrics", [("Host", "x"), ("X-Pad", "p" * 1900)])   # ~2 KB asking for ~all metrics
        total, batch = 60_000, 50
        stop = threading.Event()
        state = {"sent": 0, "outcome": None}
        flood = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # answers back up soon
        flood.settimeout(TIMEOUT)
        flood.connect(("127.0.0.1", sc.port))

        def run():
            flood.settimeout(2.0)        # a send that makes no progress for 2 s: reading stopped
            deadline = time.monotonic() + 10
            try:
                while state["sent"] < total:
                    if stop.is_set() or time.monotonic() > deadline:
                        state["outcome"] = "stopped" if stop.is_set() else "still sending after 10 s"
                        return
                    flood.sendall(one * batch)
                    state["sent"] += batch
                state["outcome"] = "all sent"
            except socket.timeout:
                state["outcome"] = "blocked"
            except (BrokenPipeError, ConnectionResetError):
                state["outcome"] = "closed"
            except OSError as e:
                state["outcome"] = f"error {e!r}"

        t = threading.Thread(target=run, daemon=True)
        t.start()
        probes: list[tuple[str, "int | None", float]] = []
        peak = base
        started = time.monotonic()
        while time.monotonic() - started < 14:
            peak = max(peak, rss_kib(pid))
            if peak > base + 150 * 1024:
                stop.set()                                    # bound the damage of a failing build
            t0 = time.monotonic()
            if len(probes) % 2:
                resp, _ = ask(sc, "nginx", "/public/x")
            else:
                try:
                    resp = exchange(("127.0.0.1", sc.port), build("/healthz", [("Host", "x")]), timeout=2.0)
                except OSError:
                    resp = None
            probes.append(("authz" if len(probes) % 2 else "healthz", None if resp is None else resp.status,
                           time.monotonic() - t0))
            if not t.is_alive() and time.monotonic() - started > 4:
                break
            time.sleep(0.2)
        stop.set()
        t.join(5)
        peak = max(peak, rss_kib(pid))
        flood.close()
        slow = [p for p in probes if p[1] != 200 or p[2] > 2.0]
        print(f"\nflood: {state}, RSS KiB {base} -> peak {peak}, {len(probes)} probes, slowest "
              f"{max(p[2] for p in probes):.3f} s")
        assert peak < limit, f"RSS grew from {base} to {peak} KiB while a client did not read ({state})"
        assert state["outcome"] in ("blocked", "closed"), \
            f"the sidecar kept reading from a client that does not read its answers: {state}"
        assert state["sent"] < total
        assert len(probes) >= 5 and not slow, f"other connections were not served promptly: {slow}"
        resp = exchange(("127.0.0.1", sc.port), build("/healthz", [("Host", "x")]))
        assert resp is not None and resp.status == 200 and sc.proc.poll() is None
    finally:
        sc.stop()


@pytest.fixture
def admin_sidecar(tmp_path, edges_as):
    admin_port = stack.free_port()
    sc = Sidecar(tmp_path, sidecar_config(edges_as.url, server={"admin_listen": f"127.0.0.1:{admin_port}"}),
                 name="sidecar-admin-body", health_base=f"http://127.0.0.1:{admin_port}")
    sc.admin_port = admin_port
    yield sc
    sc.stop()


def _cached(sc, fake, token) -> bool:
    """Asks about TOKEN; True when that was answered without an AS call."""
    before = fake.calls[token]
    resp, _ = ask(sc, "nginx", "/api/x", token=token)
    assert resp is not None and resp.status == 200, resp
    return fake.calls[token] == before


@pytest.mark.parametrize("shape", ["content-length", "chunked"])
def test_admin_body_over_16_kib_is_400_and_purges_nothing(admin_sidecar, edges_as, shape):
    sc = admin_sidecar
    token = edges_as.add_token(new_token(), active())
    _cached(sc, edges_as, token)
    assert _cached(sc, edges_as, token)
    head = b'{"all":true}'
    if shape == "content-length":
        body = head + b" " * 17_000    # its first 16 KiB alone would be a valid purge-all
        request = build("/admin/cache/purge", [("Host", "admin"), ("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))], method="POST", body=body)
    else:
        chunks = [head] + [b" " * 1000] * 17
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        request = build("/admin/cache/purge", [("Host", "admin"), ("Content-Type", "application/json"),
                                               ("Transfer-Encoding", "chunked")], method="POST", body=body)
    resp = exchange(("127.0.0.1", sc.admin_port), request)
    assert resp is not None and resp.status == 400, resp
    assert _cached(sc, edges_as, token), "an oversized purge body was cut and obeyed"


def test_admin_body_under_16_kib_is_obeyed(admin_sidecar, edges_as):
    sc = admin_sidecar
    token = edges_as.add_token(new_token(), active())
    _cached(sc, edges_as, token)
    body = json.dumps({"token": token}).encode()
    body += b" " * (16_000 - len(body))
    resp = exchange(("127.0.0.1", sc.admin_port), build("/admin/cache/purge", [
        ("Host", "admin"), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        method="POST", body=body))
    assert resp is not None and resp.status == 200 and json.loads(resp.body) == {"purged": 1}, resp
    assert not _cached(sc, edges_as, token)


# ---------------------------------------------------------------------------------------------
# 8. The admin surface
def _non_loopback_ipv4() -> "str | None":
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 9))
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# (listen host as configured, host to connect to)
NON_LOOPBACK = [("0.0.0.0", "127.0.0.1")]
if _non_loopback_ipv4():
    NON_LOOPBACK.append((_non_loopback_ipv4(), _non_loopback_ipv4()))
if _ipv6_loopback():
    NON_LOOPBACK.append(("[::]", "::1"))
LOOPBACK = [("127.0.0.1", "127.0.0.1"), ("127.0.0.2", "127.0.0.2"), ("localhost", "127.0.0.1"), ("unix", None)]
if _ipv6_loopback():
    LOOPBACK.append(("[::1]", "::1"))


def start_admin_sidecar(tmp_path: Path, fake, listen_host: str, connect_host: "str | None",
                        admin_token_file: "Path | None" = None, name: str = "sidecar-admin"):
    """A sidecar whose admin listener binds LISTEN_HOST ("unix": a socket under TMP_PATH);
    returns (sidecar, the address to reach its admin listener)."""
    port = stack.free_port()
    if listen_host == "unix":
        address: object = str(tmp_path / "admin.sock")
        server = {"admin_listen": f"unix:{address}"}
        # /healthz is on the unix socket only: wait for a decision on the decision listener
        # instead (Envoy form /authz/healthz, answered 200 by the catch-all anonymous policy).
        health = f"http://127.0.0.1:{port}/authz"
    else:
        admin_port = stack.free_port()
        server = {"admin_listen": f"{listen_host}:{admin_port}"}
        address = (connect_host, admin_port)
        health = f"http://[{connect_host}]:{admin_port}" if ":" in connect_host else f"http://{connect_host}:{admin_port}"
    if admin_token_file is not None:
        server["admin_token_file"] = str(admin_token_file)
    sc = Sidecar(tmp_path, sidecar_config(fake.url, server=server), name=name, health_base=health, port=port)
    if listen_host == "unix":
        assert _wait(lambda: Path(address).exists(), 10), "the unix admin socket did not appear"
    return sc, address


def admin_get(address, path: str) -> Raw:
    resp = exchange(address, build(path, [("Host", "admin")]))
    assert resp is not None, path
    return resp


def admin_purge(address, body: dict, authorization: "str | None" = None) -> Raw:
    payload = json.dumps(body).encode()
    headers = [("Host", "admin"), ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    if authorization is not None:
        headers.append(("Authorization", authorization))
    resp = exchange(address, build("/admin/cache/purge", headers, method="POST", body=payload))
    assert resp is not None
    return resp


def assert_json_status(resp: Raw, status: int) -> None:
    assert resp.status == status, resp
    assert (resp.header("Content-Type") or "").split(";")[0].strip() == "application/json", resp
    body = json.loads(resp.body)
    assert isinstance(body, dict), resp
    code = (body.get("error") or {}).get("code") if isinstance(body.get("error"), dict) else None
    assert code in (None, status), resp


@pytest.mark.parametrize("listen_host, connect_host", NON_LOOPBACK, ids=[h for h, _ in NON_LOOPBACK])
def test_admin_on_a_non_loopback_listener_without_a_token_serves_no_purge(tmp_path, edges_as, listen_host,
                                                                          connect_host):
    sc, address = start_admin_sidecar(tmp_path, edges_as, listen_host, connect_host)
    try:
        token = edges_as.add_token(new_token(), active())
        _cached(sc, edges_as, token)
        for path in ("/healthz", "/readyz", "/metrics"):
            assert admin_get(address, path).status == 200, path
        for body in ({"token": token}, {"all": True}):
            assert_json_status(admin_purge(address, body), 403)
        assert _cached(sc, edges_as, token), "a refused purge purged the cache"
    finally:
        sc.stop()


@pytest.mark.parametrize("listen_host, connect_host", LOOPBACK, ids=[h for h, _ in LOOPBACK])
def test_admin_on_a_loopback_or_unix_listener_without_a_token_purges(tmp_path, edges_as, listen_host, connect_host):
    sc, address = start_admin_sidecar(tmp_path, edges_as, listen_host, connect_host)
    try:
        token = edges_as.add_token(new_token(), active())
        _cached(sc, edges_as, token)
        assert admin_get(address, "/healthz").status == 200
        resp = admin_purge(address, {"token": token})
        assert resp.status == 200 and json.loads(resp.body) == {"purged": 1}, resp
        assert not _cached(sc, edges_as, token)
    finally:
        sc.stop()


@pytest.fixture
def admin_token(tmp_path) -> "tuple[str, Path]":
    token = "adm-" + secrets.token_urlsafe(24)
    ALL_TOKENS.add(token)          # never in a sidecar log either
    path = tmp_path / "admin-token"
    path.write_text(f"\n  {token} \t\n")       # surrounding whitespace is trimmed
    path.chmod(0o600)
    return token, path


@pytest.mark.parametrize("listen_host, connect_host", [("127.0.0.1", "127.0.0.1")] + NON_LOOPBACK,
                         ids=["127.0.0.1"] + [h for h, _ in NON_LOOPBACK])
def test_admin_token_file_guards_purge_on_every_listener(tmp_path, edges_as, admin_token, listen_host,
                                                         connect_host):
    secret, path = admin_token
    sc, address = start_admin_sidecar(tmp_path, edges_as, listen_host, connect_host, admin_token_file=path)
    try:
        token = edges_as.add_token(new_token(), active())
        _cached(sc, edges_as, token)
        for path_ in ("/healthz", "/readyz", "/metrics"):
            assert admin_get(address, path_).status == 200, path_      # no token needed for these
        for authorization in (None, f"Bearer {secret}x", f"Bearer {secret[:-1]}", "Bearer ",
                              f"Basic {secret}", f"Bearer {secret} extra", "Bearer " + "a" * len(secret)):
            assert_json_status(admin_purge(address, {"token": token}, authorization), 401)
        assert _cached(sc, edges_as, token), "an unauthorised purge purged the cache"
        resp = admin_purge(address, {"token": token}, f"Bearer {secret}")
        assert resp.status == 200 and json.loads(resp.body) == {"purged": 1}, resp
        assert not _cached(sc, edges_as, token)
        assert secret not in sc.log_path.read_text(errors="replace")
    finally:
        sc.stop()


def test_check_config_with_an_admin_token_file(tmp_path, edges_as, admin_token):
    secret, path = admin_token
    config = sidecar_config(edges_as.url, server={"listen": "127.0.0.1:9191", "admin_listen": "0.0.0.0:9090",
                                                  "admin_token_file": str(path)})
    good = tmp_path / "good.yaml"
    good.write_text(to_yaml(config) + "\n")
    out = subprocess.run([SIDECAR_BIN, "check-config", "--config", str(good)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert secret not in out.stdout + out.stderr
    config["server"]["admin_token_file"] = str(tmp_path / "no-such-file")
    bad = tmp_path / "bad.yaml"
    bad.write_text(to_yaml(config) + "\n")
    out = subprocess.run([SIDECAR_BIN, "check-config", "--config", str(bad)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "admin_token_file" in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------
# 9. Secrets never echoed
SECRET = "Zq9-TOPSECRET-7f3b"
_HEAD = "server:\n  listen: 127.0.0.1:@PORT@\nlogging:\n  format: json\n"
_TAIL = "policies:\n  - name: public\n    match: { path_prefix: /public/ }\n    allow_anonymous: true\n"
_INTRO = "introspection:\n  endpoint: @ENDPOINT@\n  client_id: introspection-client\n"
# Broken files that hold the secret (YAML errors, and valid YAML with configuration errors).
BROKEN = {
    "unterminated-double-quote": _INTRO + '  client_secret: "@SECRET@\n  timeout_ms: 1000\n',
    "unterminated-single-quote": _INTRO + "  client_secret: '@SECRET@\n  timeout_ms: 1000\n",
    "deeper-line-after": _INTRO + "  client_secret: @SECRET@\n      timeout_ms: 1000\n",
    "odd-indentation": _INTRO + "   client_secret: @SECRET@\n  timeout_ms: 1000\n",
    "colon-in-value": _INTRO + "  client_secret: @SECRET@: more\n  timeout_ms: 1000\n",
    "tab-indentation": _INTRO + "\tclient_secret: @SECRET@\n  timeout_ms: 1000\n",
    "tab-before-next-key": _INTRO + "  client_secret: @SECRET@\n\t timeout_ms: 1000\n",
    "duplicate-key": _INTRO + "  client_secret: @SECRET@\n  client_secret: @SECRET@-2\n  timeout_ms: 1000\n",
    "wrong-type-next-to-it": _INTRO + '  client_secret: @SECRET@\n  timeout_ms: "fast"\n  verify_tls: maybe\n',
    "secret-as-a-list": _INTRO + "  client_secret: [@SECRET@]\n  timeout_ms: 1000\n",
    "secret-as-a-mapping": _INTRO + "  client_secret: { value: @SECRET@ }\n  timeout_ms: 1000\n",
    "misspelt-key": _INTRO + "  client_secrets: @SECRET@\n  timeout_ms: 1000\n",
    "unknown-alias": _INTRO + "  client_secret: *@SECRET@\n  timeout_ms: 1000\n",
    "unterminated-flow": "introspection: { endpoint: @ENDPOINT@, client_id: c, client_secret: @SECRET@\n",
    "invalid-utf8": _INTRO + "  client_secret: @SECRET@\udcff\n  timeout_ms: 1000\n",
}
# "names a key and/or a line/column"
_PLACE = re.compile(r"\bline\s*\d+|\b\d+:\d+\b|\bcolumn\s*\d+|\b(?:introspection|server|policies|cache|logging)[.\[:]"
                    r"|\bclient_secret", re.I)


def broken_config(kind: str, port: int = 9191, endpoint: str = "http://127.0.0.1:9/introspect") -> bytes:
    text = (_HEAD + BROKEN[kind] + _TAIL).replace("@PORT@", str(port)).replace("@ENDPOINT@", endpoint)
    return text.replace("@SECRET@", SECRET).encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("kind", list(BROKEN))
def test_check_config_never_echoes_a_secret(tmp_path, kind):
    path = tmp_path / "broken.yaml"
    path.write_bytes(broken_config(kind))
    out = subprocess.run([SIDECAR_BIN, "check-config", "--config", str(path)], capture_output=True, timeout=30)
    text = (out.stdout + out.stderr).decode("utf-8", "replace")
    assert out.returncode == 1, text
    assert "TOPSECRET" not in text, f"the secret was echoed:\n{text}"
    if kind != "invalid-utf8":      # (not a YAML error: a line is not required)
        assert _PLACE.search(out.stderr.decode("utf-8", "replace")), f"the error names no key or line:\n{text}"


def test_rejected_reload_never_logs_a_secret_and_json_lines_stay_json(tmp_path, edges_as):
    sc = Sidecar(tmp_path, sidecar_config(edges_as.url), name="sidecar-secret-reload")
    try:
        for kind in BROKEN:
            rejected = sc.log_path.read_text(errors="replace").count("configuration rejected")
            sc.config_path.write_bytes(broken_config(kind, port=sc.port, endpoint=edges_as.url))
            sc.proc.send_signal(signal.SIGHUP)
            assert _wait(lambda: sc.log_path.read_text(errors="replace").count("configuration rejected") > rejected,
                         8), f"{kind}: the broken file was not rejected"
        assert sc.proc.poll() is None
        resp, _ = ask(sc, "nginx", "/public/x")
        assert resp is not None and resp.status == 200, "the running configuration should stay"
        raw = sc.log_path.read_bytes()
        assert b"TOPSECRET" not in raw, "the secret reached the log"
        for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    pytest.fail(f"log line {n} is not one JSON object: {line[:300]!r}")
                assert isinstance(obj, dict), line
    finally:
        sc.stop()
