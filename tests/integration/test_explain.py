""""Why was I denied?" (issue 16 part 3) against the real binary:

  1. `authz-sidecar explain`: one request decided as the sidecar would (real introspection at the
     fake AS, real JWT verification at a fake issuer, a DPoP proof), printed step by step; exit
     status 0 allow / 1 deny / 2 fault; the token never printed (only its SHA-256 prefix);
  2. the same against a real Glewlwyd (a certificate-bound token: client1 allowed, client2 refused
     with `binding cnf.x5t#S256: mismatch`), in introspection and in JWT mode (skipped when
     Glewlwyd cannot be installed);
  3. the per-request debug log: `X-Authz-Debug` honoured only with `server.trust_debug_header`,
     `debug_log: true` per policy, one `decision trace` line at notice level, the answer unchanged;
  4. through the real nginx (deploy/nginx.conf): a client's X-Authz-Debug never reaches the
     sidecar, while an operator's `map` + `proxy_set_header X-Authz-Debug` does;
  5. through the real Envoy (deploy/envoy.yaml, HTTP, and deploy/envoy-grpc.yaml, gRPC): a
     client's x-authz-debug is removed; a `debug_log: true` policy is traced in both modes
     (skipped when no Envoy can be installed);
  6. a traced decision is the same decision: a DPoP proof replayed at another replica (shared
     store, a real redis-server) is refused whether the policy traces or not (skipped without
     redis-server).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import envoy_support
from conftest import (_LOGS, ALL_TOKENS, INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, KONG_DENIED,
                      KONG_UNAUTHENTICATED, KONG_UNAVAILABLE, REPO, SIDECAR_BIN, EdgeClient, Nginx, QuietHandler,
                      Sidecar, http_request, kong_body, serve, shut_down, stack, stop_process, to_yaml)
from envoy_support import DEPLOY_ENVOY, DEPLOY_ENVOY_GRPC, Envoy
from jose_support import b64u, compact, discovery_doc, jwk_int, keep

EXPLAIN_TIMEOUT = 30          # every explain run (the fault cases take timeout_ms at most)
REALM = 'Bearer realm="authz-sidecar"'
HOST = "api.example.test"
XFCC = "x-forwarded-client-cert"
AUD = "explain-api"

POLICIES = [
    {"name": "token-mtls", "match": {"path_prefix": "/token-mtls/"}, "issuers": ["default"],
     "required_scopes": ["system-access"], "certificate_header": "X-Client-Cert", "certificate_format": "auto"},
    {"name": "admin", "match": {"path_prefix": "/admin-api/"}, "issuers": ["default"], "required_scopes": ["admin"]},
    {"name": "envoy-mtls", "match": {"path_prefix": "/envoy-mtls/"}, "issuers": ["default"],
     "required_scopes": ["system-access"], "certificate_header": XFCC, "certificate_format": "xfcc"},
    {"name": "client-cert", "match": {"path_prefix": "/client-cert/"}, "issuers": ["default"],
     "required_scopes": ["system-access"], "certificate_header": "Client-Cert", "certificate_format": "rfc9440"},
    {"name": "claims", "match": {"path_prefix": "/claims/"}, "issuers": ["default"],
     "required_claims": {"tenant": "acme"}},
    {"name": "dpop-api", "match": {"path_prefix": "/dpop-api/"}, "issuers": ["default"], "dpop": "required"},
    {"name": "jwt-api", "match": {"path_prefix": "/jwt-api/"}, "issuers": ["jwt"], "required_scopes": ["system-access"]},
    {"name": "jwt-dead", "match": {"path_prefix": "/jwt-dead/"}, "issuers": ["dead"]},
]


# ---------------------------------------------------------------------------------------------
# Helpers
def new_token(prefix: str = "explain") -> str:
    token = f"{prefix}-" + secrets.token_urlsafe(24)
    ALL_TOKENS.add(token)
    return token


def digest8(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def active(scope: str = "system-access", **extra) -> dict:
    now = int(time.time())
    return {"active": True, "scope": scope, "client_id": "explain-client", "exp": now + 600, "iat": now - 5,
            "sub": "svc-" + secrets.token_hex(4), **extra}


class Explained:
    """One `authz-sidecar explain` run: exit code, output, the steps in order and the answer."""

    def __init__(self, run: subprocess.CompletedProcess, secrets_: "list[str]"):
        self.code, self.out, self.err = run.returncode, run.stdout, run.stderr
        self.steps: list[tuple[str, str]] = []
        self.answer: "int | None" = None
        self.headers: dict[str, str] = {}
        self.body: "str | None" = None
        for line in self.out.splitlines():
            if line.startswith("  "):
                name, _, value = line.strip().partition(": ")
                if name == "body":
                    self.body = value
                else:
                    self.headers[name.lower()] = value
            elif line.startswith("answer: "):
                self.answer = int(line[len("answer: "):])
            elif line.startswith("request: "):
                continue
            elif ": " in line:
                name, _, result = line.partition(": ")
                self.steps.append((name, result))
        for s in secrets_:
            assert s not in self.out and s not in self.err, f"a token or proof was printed:\n{self}"

    def step(self, name: str) -> str:
        found = [r for n, r in self.steps if n == name]
        assert found, f"no step {name!r}:\n{self}"
        assert len(found) == 1, f"step {name!r} printed {len(found)} times:\n{self}"
        return found[0]

    def names(self) -> list[str]:
        return [n for n, _ in self.steps]

    def __str__(self):
        return f"exit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"

    __repr__ = __str__


def explain(config: Path, url: str, *args: str, token: "str | None" = None, env: "dict | None" = None,
            hide: "tuple[str, ...]" = ()) -> Explained:
    argv = [SIDECAR_BIN, "explain", "--config", str(config), "--url", url, *args]
    if token is not None:
        argv += ["--token", token]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=EXPLAIN_TIMEOUT, stdin=subprocess.DEVNULL,
                         env={**os.environ, **(env or {})})
    return Explained(run, [t for t in (token, *hide) if t])


def assert_allowed(e: Explained) -> None:
    assert e.code == 0, e
    assert e.step("decision") == "allow", e
    assert e.answer == 200, e
    assert e.body is None, e


def assert_denied(e: Explained, status: int, reason: str, www: "str | None" = None,
                  message: str = KONG_DENIED) -> None:
    assert e.code == 1, e
    assert e.step("decision").startswith(f"deny {status}: {reason}"), e
    assert e.answer == status, e
    assert e.body == kong_body(status, message).decode(), e
    assert e.headers.get("x-authz-body") == e.body, e
    if www is not None:
        assert e.headers.get("www-authenticate") == www, e


# ---------------------------------------------------------------------------------------------
# A fake JWT issuer (discovery + JWKS) at /t/jwt
ISSUER_KEY = ec.generate_private_key(ec.SECP256R1())


def issuer_jwk() -> dict:
    pub = ISSUER_KEY.public_key().public_numbers()
    return {"kty": "EC", "kid": "explain-1", "use": "sig", "crv": "P-256", "x": jwk_int(pub.x, 32),
            "y": jwk_int(pub.y, 32)}


class FakeIssuer:
    def __init__(self):
        self._server = None
        self.port = 0

    @property
    def iss(self) -> str:
        return f"http://127.0.0.1:{self.port}/t/jwt"

    def start(self) -> "FakeIssuer":
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/t/jwt/.well-known/openid-configuration":
                    return self._send(200, json.dumps(discovery_doc(fake.iss, ["ES256"])).encode())
                if path == "/t/jwt/jwks":
                    return self._send(200, json.dumps({"keys": [issuer_jwk()]}).encode())
                self._send(404, b'{"error":"not_found"}')

        self._server = serve(Handler, "explain-issuer")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        shut_down(self._server)


def jwt(iss: str, **over) -> str:
    now = int(time.time())
    claims = {"iss": iss, "sub": "svc-jwt", "aud": AUD, "exp": now + 600, "iat": now - 5, "client_id": "jwt-client",
              "scope": "system-access", "jti": secrets.token_hex(12), **over}
    return keep(compact({"alg": "ES256", "typ": "at+jwt", "kid": "explain-1"}, claims, ISSUER_KEY, "ES256"))


# ---------------------------------------------------------------------------------------------
# DPoP proofs (RFC 9449 §4.2)
def public_jwk(key) -> dict:
    pub = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": jwk_int(pub.x, 32), "y": jwk_int(pub.y, 32)}


def jkt(key) -> str:
    jwk = public_jwk(key)
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return b64u(hashlib.sha256(canonical.encode()).digest())


def dpop_proof(key, token: str, htu: str, htm: str = "GET") -> str:
    claims = {"jti": secrets.token_urlsafe(18), "htm": htm, "htu": htu, "iat": int(time.time()),
              "ath": b64u(hashlib.sha256(token.encode()).digest())}
    return compact({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(key)}, claims, key, "ES256")


# ---------------------------------------------------------------------------------------------
# Fixtures
@pytest.fixture(scope="module")
def issuer():
    srv = FakeIssuer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("explain")


def write_config(path: Path, config: dict) -> Path:
    path.write_text(to_yaml(config) + "\n")
    return path


@pytest.fixture(scope="module")
def dead_iss() -> str:
    """An issuer where nothing listens: its keys are unavailable."""
    return f"http://127.0.0.1:{stack.free_port()}/t/dead"


@pytest.fixture(scope="module")
def config(work, fake_as, issuer, dead_iss) -> Path:
    return write_config(work / "explain.yaml", {
        "introspection": {"endpoint": fake_as.url, "client_id": INTROSPECTION_CLIENT_ID,
                          "client_secret": INTROSPECTION_CLIENT_SECRET, "auth_method": "client_secret_basic",
                          "timeout_ms": 1500},
        "issuers": [
            {"name": "jwt", "issuer": issuer.iss, "validation": "jwt", "audiences": [AUD], "algorithms": ["ES256"],
             "timeout_ms": 1500},
            {"name": "dead", "issuer": dead_iss, "validation": "jwt",
             "audiences": [AUD], "timeout_ms": 1000},
        ],
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
        "policies": POLICIES,
    })


def url(path: str) -> str:
    return f"https://{HOST}{path}"


# ---------------------------------------------------------------------------------------------
# 1. explain against the fake AS
def test_allow_prints_every_step_and_the_answer(config, fake_as):
    token = fake_as.add_token(new_token(), active(scope="system-access read"))
    e = explain(config, url("/token-mtls/items?page=2"), token=token)
    assert_allowed(e)
    assert e.out.splitlines()[0] == f"request: GET {url('/token-mtls/items?page=2')}", e
    assert e.step("path") == f"GET {HOST}/token-mtls/items", e
    assert e.step("policy").startswith("token-mtls"), e
    assert e.step("token") == f"Bearer scheme, an opaque token, sha256 {digest8(token)}…", e
    assert e.step("issuer") == "default (introspection)", e
    # a private cache: always a miss, always a call to the AS
    assert e.step("validation").startswith("miss: active client_id=explain-client"), e
    assert e.step("time window").startswith("ok: exp "), e
    assert e.step("issuer and audience").startswith("ok"), e
    assert e.step("binding") == "the token is bound to nothing (the policy does not require a binding)", e
    assert e.step("scopes") == 'ok: all of [system-access] required, granted "system-access read"', e
    # the steps come in the order of the decision
    assert e.names() == ["path", "policy", "token", "issuer", "validation", "time window", "issuer and audience",
                         "binding", "scopes", "decision"], e
    assert e.headers.get("x-credential-scope") == "system-access read", e
    assert e.headers.get("x-credential-client-id") == "explain-client", e
    assert e.err == "", e


def test_each_run_asks_the_authorization_server(config, fake_as):
    token = fake_as.add_token(new_token(), active())
    before = fake_as.calls[token]
    for _ in range(2):
        assert_allowed(explain(config, url("/token-mtls/items"), token=token))
    assert fake_as.calls[token] == before + 2, "explain must not reuse any cache between runs"


def test_insufficient_scope(config, fake_as):
    token = fake_as.add_token(new_token(), active(scope="system-access"))
    e = explain(config, url("/admin-api/users"), token=token)
    assert_denied(e, 403, "insufficient_scope", f'{REALM}, error="insufficient_scope", scope="admin"')
    assert e.step("policy").startswith("admin"), e
    assert e.step("scopes") == 'insufficient: all of [admin] required, granted "system-access"', e


def test_unknown_token_is_not_active(config, fake_as):
    token = new_token("unknown")      # the fake AS answers {"active": false}
    e = explain(config, url("/token-mtls/items"), token=token)
    assert_denied(e, 401, "inactive", f'{REALM}, error="invalid_token"')
    assert e.step("validation") == "miss: inactive", e
    assert e.step("active").startswith("no"), e
    assert "scopes" not in e.names(), e


def test_expired_token(config, fake_as):
    token = fake_as.add_token(new_token(), active(exp=int(time.time()) - 60))
    e = explain(config, url("/token-mtls/items"), token=token)
    assert e.code == 1, e
    assert e.step("time window").startswith("expired: exp "), e


def test_no_token(config):
    e = explain(config, url("/token-mtls/items"))
    assert_denied(e, 401, "no_token", REALM, KONG_UNAUTHENTICATED)
    assert e.step("token") == "none", e
    assert "validation" not in e.names(), e


def test_required_claim_missing(config, fake_as):
    token = fake_as.add_token(new_token(), active(tenant="initech"))
    e = explain(config, url("/claims/x"), token=token)
    assert_denied(e, 403, "claims")
    assert e.step("claims") == "claim tenant is missing or has none of the required values", e
    good = fake_as.add_token(new_token(), active(tenant="acme"))
    ok = explain(config, url("/claims/x"), token=good)
    assert_allowed(ok)
    assert ok.step("claims") == "ok: tenant", ok


def test_no_policy(config, fake_as):
    token = fake_as.add_token(new_token(), active())
    e = explain(config, url("/nowhere/at/all"), token=token)
    assert_denied(e, 403, "no_policy", REALM)
    assert e.step("policy").startswith("none"), e
    assert "token" not in e.names() and "validation" not in e.names(), e


def test_certificate_bound_token(config, fake_as, certs):
    thumb = stack.thumbprint(certs / "client1.crt")
    token = fake_as.add_token(new_token(), active(cnf={"x5t#S256": thumb}))
    target = url("/token-mtls/items")

    right = explain(config, target, "--cert", str(certs / "client1.crt"), token=token)
    assert_allowed(right)
    assert right.step("validation").endswith(f"cnf.x5t#S256={thumb}"), right
    assert right.step("binding cnf.x5t#S256") == f"match: certificate {thumb}", right

    other = stack.thumbprint(certs / "client2.crt")
    wrong = explain(config, target, "--cert", str(certs / "client2.crt"), token=token)
    assert_denied(wrong, 401, "binding_mismatch", f'{REALM}, error="invalid_token"')
    assert wrong.step("binding cnf.x5t#S256") == f"mismatch: bound to {thumb}, certificate {other}", wrong
    assert "scopes" not in wrong.names(), wrong

    missing = explain(config, target, token=token)
    assert_denied(missing, 401, "certificate_missing")
    assert missing.step("binding cnf.x5t#S256") == \
        f"bound to {thumb}, but no certificate came (header X-Client-Cert)", missing


def xfcc_of(certs: Path, name: str) -> str:
    pem = (certs / f"{name}.crt").read_text()
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    return f'Hash={digest};Cert="{urllib.parse.quote(pem, safe="")}";Subject="CN={name}"'


def test_xfcc_as_envoy_sends_it(config, fake_as, certs):
    thumb = stack.thumbprint(certs / "client1.crt")
    token = fake_as.add_token(new_token(), active(cnf={"x5t#S256": thumb}))
    target = url("/envoy-mtls/items")
    right = explain(config, target, "--xfcc", xfcc_of(certs, "client1"), token=token)
    assert_allowed(right)
    assert right.step("binding cnf.x5t#S256") == f"match: certificate {thumb}", right
    wrong = explain(config, target, "--xfcc", xfcc_of(certs, "client2"), token=token)
    assert_denied(wrong, 401, "binding_mismatch")
    assert wrong.step("binding cnf.x5t#S256").startswith(f"mismatch: bound to {thumb}"), wrong
    missing = explain(config, target, token=token)
    assert missing.step("binding cnf.x5t#S256").endswith(f"(header {XFCC})"), missing


@pytest.mark.parametrize("path", ["/envoy-mtls/items", "/client-cert/items"], ids=["xfcc", "rfc9440"])
def test_cert_option_follows_the_policys_certificate_format(config, fake_as, certs, path):
    """--cert is "the client certificate": it must reach a policy reading XFCC (deploy/envoy.yaml's
    sidecar configuration) or RFC 9440 Client-Cert in that policy's format, not only nginx's."""
    thumb = stack.thumbprint(certs / "client1.crt")
    token = fake_as.add_token(new_token(), active(cnf={"x5t#S256": thumb}))
    e = explain(config, url(path), "--cert", str(certs / "client1.crt"), token=token)
    assert e.step("binding cnf.x5t#S256") == f"match: certificate {thumb}", e
    assert_allowed(e)


def test_dpop_proof(config, fake_as):
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    token = fake_as.add_token(new_token(), active(cnf={"jkt": jkt(key)}, token_type="DPoP"))
    target = url("/dpop-api/things")
    proof = dpop_proof(key, token, target)
    e = explain(config, target, "--dpop", proof, token=token, hide=(proof,))
    assert_allowed(e)
    assert e.step("token") == f"DPoP scheme, an opaque token, sha256 {digest8(token)}…", e
    assert e.step("dpop proof") == f"valid, key {jkt(key)}", e
    assert e.step("binding cnf.jkt") == f"match: the proof's key is {jkt(key)}", e

    stolen = dpop_proof(other, token, target)    # a valid proof, by another key
    e = explain(config, target, "--dpop", stolen, token=token, hide=(stolen,))
    assert e.code == 1, e
    assert e.step("binding cnf.jkt") == f"mismatch: bound to {jkt(key)}, the proof's key is {jkt(other)}", e

    # the policy requires DPoP: the same token as Bearer
    e = explain(config, target, token=token)
    assert e.code == 1, e
    assert e.step("decision").startswith("deny 401"), e


def test_header_option(config, fake_as):
    """--header adds a request header: here Authorization itself."""
    token = fake_as.add_token(new_token(), active())
    e = explain(config, url("/token-mtls/items"), "--header", f"Authorization: Bearer {token}", hide=(token,))
    assert_allowed(e)
    assert e.step("token") == f"Bearer scheme, an opaque token, sha256 {digest8(token)}…", e


def test_method_option(config, fake_as):
    token = fake_as.add_token(new_token(), active())
    e = explain(config, url("/token-mtls/items"), "--method", "delete", token=token)
    assert_allowed(e)
    assert e.out.splitlines()[0] == f"request: DELETE {url('/token-mtls/items')}", e
    assert e.step("path") == f"DELETE {HOST}/token-mtls/items", e


def test_token_file(config, fake_as, work):
    token = fake_as.add_token(new_token(), active())
    path = work / "token.txt"
    path.write_text(token + "\n")        # surrounding whitespace is trimmed
    path.chmod(0o600)
    e = explain(config, url("/token-mtls/items"), "--token-file", str(path), hide=(token,))
    assert_allowed(e)
    assert e.step("token") == f"Bearer scheme, an opaque token, sha256 {digest8(token)}…", e


def test_authorization_server_unreachable_is_a_fault(work, fake_as):
    closed = stack.free_port()
    cfg = write_config(work / "unreachable.yaml", {
        "introspection": {"endpoint": f"http://127.0.0.1:{closed}/introspect", "client_id": INTROSPECTION_CLIENT_ID,
                          "client_secret": INTROSPECTION_CLIENT_SECRET, "timeout_ms": 1000},
        "policies": [POLICIES[0]],
    })
    token = new_token()
    started = time.monotonic()
    e = explain(cfg, url("/token-mtls/items"), token=token)
    assert time.monotonic() - started < 10, e
    assert e.code == 2, e
    assert e.step("validation").startswith("fault: "), e
    assert e.step("decision").startswith("fault 503: "), e
    assert e.answer == 503, e
    assert e.body == kong_body(503, KONG_UNAVAILABLE).decode(), e
    assert e.headers.get("retry-after"), e
    assert INTROSPECTION_CLIENT_SECRET not in e.out + e.err, e


def test_a_failing_authorization_server_is_a_fault(config, fake_as):
    token = fake_as.add_token(new_token(), active())
    fake_as.mode = "500"
    try:
        e = explain(config, url("/token-mtls/items"), token=token)
    finally:
        fake_as.mode = "ok"
    assert e.code == 2, e
    assert e.step("validation").startswith("fault: "), e
    assert e.answer == 503, e


def test_bad_configuration(work):
    bad = work / "bad.yaml"
    bad.write_text("server:\n  colour: blue\nintrospection:\n  endpoint: https://as.example/introspect\n"
                   "  client_id: c\n  client_secret: s3cr3t-value\npolicies:\n  - name: p\n")
    run = subprocess.run([SIDECAR_BIN, "explain", "--config", str(bad), "--url", url("/x")],
                         capture_output=True, text=True, timeout=EXPLAIN_TIMEOUT, stdin=subprocess.DEVNULL)
    assert run.returncode == 2, run
    assert "server.colour: unknown key at line 2" in run.stderr, run.stderr
    assert "s3cr3t-value" not in run.stdout + run.stderr
    assert "decision" not in run.stdout, run.stdout

    missing = subprocess.run([SIDECAR_BIN, "explain", "--config", str(work / "absent.yaml"), "--url", url("/x")],
                             capture_output=True, text=True, timeout=EXPLAIN_TIMEOUT, stdin=subprocess.DEVNULL)
    assert missing.returncode == 2, missing
    assert "cannot read the configuration file" in missing.stderr, missing.stderr


def test_usage_errors(config):
    """A relative --url or an unreadable --token-file is a usage error (64), not a decision."""
    for args in (["--url", "/token-mtls/items"], ["--url", url("/x"), "--token-file", "/nonexistent/token"]):
        run = subprocess.run([SIDECAR_BIN, "explain", "--config", str(config), *args], capture_output=True,
                             text=True, timeout=EXPLAIN_TIMEOUT, stdin=subprocess.DEVNULL)
        assert run.returncode == 64, run
        assert "decision:" not in run.stdout, run


def test_jwt_issuer(config, issuer):
    token = jwt(issuer.iss)
    e = explain(config, url("/jwt-api/items"), token=token)
    assert_allowed(e)
    assert e.step("token") == f"Bearer scheme, a JWT, sha256 {digest8(token)}…", e
    assert e.step("issuer") == "jwt (jwt)", e
    assert f"iss={issuer.iss}" in e.step("validation"), e
    # the signature and iss were checked by the verification; the audience by the decision
    assert e.step("issuer and audience").endswith(f"aud one of [{AUD}]"), e

    wrong_aud = jwt(issuer.iss, aud="someone-else")
    e = explain(config, url("/jwt-api/items"), token=wrong_aud)
    assert e.code == 1, e
    assert e.step("decision").startswith("deny 401"), e
    assert "someone-else" in e.out, e       # the step that refused it names the audience it saw


def test_jwt_keys_unavailable_is_a_fault(config, dead_iss):
    token = jwt(dead_iss)
    e = explain(config, url("/jwt-dead/items"), token=token)
    assert e.code == 2, e
    assert e.step("issuer") == "dead (jwt)", e
    assert e.step("validation").startswith("fault: "), e
    assert e.answer == 503, e


# ---------------------------------------------------------------------------------------------
# 2. explain against a real Glewlwyd
IDP_SCRIPT = REPO / "scripts" / "idp-glewlwyd.sh"


def read_env(path: Path) -> dict:
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    return env


@pytest.fixture(scope="module")
def idp(tmp_path_factory, certs):
    if shutil.which("glewlwyd") is None and os.geteuid() != 0:
        pytest.skip("glewlwyd is not installed and apt-get needs root (scripts/test.sh installs it)")
    work = tmp_path_factory.mktemp("explain-idp")
    env = {**os.environ, "IDP_PORT": str(stack.free_port()), "IDP_PKI_DIR": str(certs)}
    try:
        run = subprocess.run(["bash", str(IDP_SCRIPT), str(work)], env=env, capture_output=True, text=True,
                             timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["bash", str(IDP_SCRIPT), "--stop", str(work)], capture_output=True, timeout=60)
        pytest.fail(f"idp-glewlwyd.sh timed out: {e}", pytrace=False)
    if run.returncode != 0:
        pytest.fail(f"idp-glewlwyd.sh failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}",
                    pytrace=False)
    vals = read_env(work / "idp.env")
    yield vals
    subprocess.run(["bash", str(IDP_SCRIPT), "--stop", str(work)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def idp_token(idp) -> str:
    out = subprocess.run([
        "curl", "-sS", "--max-time", "10", "--cacert", idp["IDP_CA"],
        "--cert", idp["IDP_CLIENT1_CERT"], "--key", idp["IDP_CLIENT1_KEY"],
        "-d", "grant_type=client_credentials", "-d", f"client_id={idp['IDP_MTLS_CLIENT_ID']}",
        "-d", f"scope={idp['IDP_MTLS_SCOPE']}", idp["IDP_TOKEN_URL"]],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body.get("access_token"), body
    ALL_TOKENS.add(body["access_token"])
    return body["access_token"]


@pytest.mark.glewlwyd
@pytest.mark.parametrize("mode", ["introspection", "jwt"])
def test_glewlwyd_certificate_bound_token(mode, idp, idp_token, work, certs):
    secret = idp["IDP_INTROSPECTION_CLIENT_SECRET"]
    if mode == "introspection":
        cfg = {"introspection": {"endpoint": idp["IDP_INTROSPECT_URL"], "client_id": idp["IDP_INTROSPECTION_CLIENT_ID"],
                                 "auth_method": "client_secret_basic", "ca_file": idp["IDP_CA"], "timeout_ms": 3000}}
        issuer_line = "default (introspection)"
    else:
        cfg = {"issuers": [{"name": "glewlwyd", "issuer": idp["IDP_ISSUER"], "validation": "jwt",
                            "audiences": [idp["IDP_MTLS_SCOPE"]], "ca_file": idp["IDP_CA"], "timeout_ms": 3000}]}
        issuer_line = "glewlwyd (jwt)"
    cfg["policies"] = [{"name": "token-mtls", "match": {"path_prefix": "/token-mtls/"},
                        "required_scopes": ["system-access"], "certificate_header": "X-Client-Cert",
                        "certificate_format": "auto", "require_bound_token": True}]
    path = write_config(work / f"glewlwyd-{mode}.yaml", cfg)
    env = {"AUTHZ_INTROSPECTION_CLIENT_SECRET": secret}
    thumb = stack.thumbprint(certs / "client1.crt")
    target = url("/token-mtls/resource")

    ok = explain(path, target, "--cert", idp["IDP_CLIENT1_CERT"], token=idp_token, env=env, hide=(secret,))
    assert_allowed(ok)
    assert ok.step("issuer") == issuer_line, ok
    assert ok.step("token").startswith("Bearer scheme, a JWT, sha256 "), ok
    assert ok.step("binding cnf.x5t#S256") == f"match: certificate {thumb}", ok
    assert ok.headers.get("x-credential-scope") == "system-access", ok

    stolen = explain(path, target, "--cert", idp["IDP_CLIENT2_CERT"], token=idp_token, env=env, hide=(secret,))
    assert_denied(stolen, 401, "binding_mismatch", f'{REALM}, error="invalid_token"')
    assert stolen.step("binding cnf.x5t#S256").startswith(f"mismatch: bound to {thumb}, certificate "), stolen


# ---------------------------------------------------------------------------------------------
# 3. The per-request debug log
def debug_config(fake_as, server: dict, policies: list) -> dict:
    return {
        "server": server,
        "introspection": {"endpoint": fake_as.url, "client_id": INTROSPECTION_CLIENT_ID,
                          "client_secret": INTROSPECTION_CLIENT_SECRET, "timeout_ms": 1500},
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
        "logging": {"format": "json", "level": "info"},
        "policies": policies,
    }


DEBUG_POLICIES = [
    {"name": "api", "match": {"path_prefix": "/api/"}, "required_scopes": ["system-access"]},
    {"name": "admin", "match": {"path_prefix": "/admin-api/"}, "required_scopes": ["admin"]},
    {"name": "traced", "match": {"path_prefix": "/traced/"}, "required_scopes": ["system-access"], "debug_log": True},
]


@pytest.fixture(scope="module")
def trusting(work, fake_as):
    sc = Sidecar(work / "sidecar-trusting", debug_config(fake_as, {"trust_debug_header": True}, DEBUG_POLICIES[:2]),
                 name="sidecar-debug-trusting")
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def untrusting(work, fake_as):
    sc = Sidecar(work / "sidecar-untrusting", debug_config(fake_as, {}, DEBUG_POLICIES),
                 name="sidecar-debug-untrusting")
    yield sc
    sc.stop()


def ask(sc: Sidecar, path: str, token: "str | None" = None, debug: bool = False, rid: "str | None" = None):
    rid = rid or "explain-" + secrets.token_hex(8)
    h = {"Host": HOST, "X-Original-URI": path, "X-Original-Method": "GET", "X-Forwarded-Proto": "https",
         "X-Request-Id": rid}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if debug:
        h["X-Authz-Debug"] = "1"
    return http_request(sc.base, "/authz", headers=h), rid


def log_objects(sc: Sidecar) -> list[dict]:
    out = []
    for line in sc.log_path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def lines_for(sc: Sidecar, rid: str) -> list[dict]:
    return [o for o in log_objects(sc) if o.get("authz.request_id") == rid]


def wait_for(sc: Sidecar, rid: str, message: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for o in lines_for(sc, rid):
            if o.get("message") == message:
                return o
        if time.monotonic() > deadline:
            pytest.fail(f"no {message!r} line for {rid} in {sc.log_path}", pytrace=False)
        time.sleep(0.05)


def settle(sc: Sidecar) -> None:
    """Wait until everything logged so far is in the file: a denial with a fresh id is written
    after it (one request at a time)."""
    _, rid = ask(sc, "/nowhere/settle")
    wait_for(sc, rid, "denied")


def trace_steps(line: dict) -> list[str]:
    """authz.trace of a `decision trace` line: the steps, "name: result" each."""
    trace = line.get("authz.trace")
    assert isinstance(trace, list) and all(isinstance(s, str) for s in trace), \
        f"authz.trace is not a JSON array of strings: {trace!r}"
    return trace


def comparable(resp) -> tuple:
    skip = {"date", "content-length", "connection", "keep-alive"}
    return resp.status, resp.body, sorted((k.lower(), v) for k, v in resp.headers.items() if k.lower() not in skip)


def test_trusted_debug_header_logs_a_trace(trusting, fake_as):
    token = fake_as.add_token(new_token(), active())
    resp, rid = ask(trusting, "/api/items", token, debug=True)
    assert resp.status == 200, resp
    line = wait_for(trusting, rid, "decision trace")
    assert line["level"] == "notice", line
    steps = trace_steps(line)
    assert "policy: api (the first that matches every reading of the path)" in steps, steps
    assert f"token: Bearer scheme, an opaque token, sha256 {digest8(token)}…" in steps, steps
    assert any(s.startswith("validation: miss: active") for s in steps), steps
    assert steps[-1] == "decision: allow", steps
    assert token not in trusting.log_path.read_text(errors="replace")


def test_trace_of_a_denial_and_of_a_cache_hit(trusting, fake_as):
    token = fake_as.add_token(new_token(), active(scope="system-access"))
    plain, _ = ask(trusting, "/api/items", token)          # fills the sidecar's cache
    assert plain.status == 200, plain
    resp, rid = ask(trusting, "/admin-api/users", token, debug=True)
    assert resp.status == 403, resp
    steps = trace_steps(wait_for(trusting, rid, "decision trace"))
    assert any(s.startswith("validation: hit: active") for s in steps), steps   # the sidecar's own cache
    assert 'scopes: insufficient: all of [admin] required, granted "system-access"' in steps, steps
    assert steps[-1] == "decision: deny 403: insufficient_scope", steps
    # the denial is logged as always, besides the trace
    assert wait_for(trusting, rid, "denied")["authz.reason"] == "insufficient_scope"


def test_without_the_header_no_trace(trusting, fake_as):
    token = fake_as.add_token(new_token(), active())
    _, allowed = ask(trusting, "/api/items", token)
    resp, denied = ask(trusting, "/admin-api/users", token)
    assert resp.status == 403, resp
    assert wait_for(trusting, denied, "denied")["authz.reason"] == "insufficient_scope"
    settle(trusting)
    for rid in (allowed, denied):
        assert [o for o in lines_for(trusting, rid) if o.get("message") == "decision trace"] == [], rid


@pytest.mark.parametrize("path, scope, status", [
    ("/api/items", "system-access", 200),
    ("/admin-api/users", "system-access", 403),
    ("/api/items", None, 401),           # no token
    ("/api/items", "unknown", 401),      # not active
])
def test_the_answer_is_the_same_with_and_without_tracing(trusting, fake_as, path, scope, status):
    if scope is None:
        token = None
    elif scope == "unknown":
        token = new_token("unknown")
    else:
        token = fake_as.add_token(new_token(), active(scope=scope))
    # traced first (a miss), then plain (a hit): the same status, headers and body
    traced, rid = ask(trusting, path, token, debug=True)
    plain, _ = ask(trusting, path, token)
    assert traced.status == status, traced
    assert comparable(traced) == comparable(plain), (traced, plain)
    wait_for(trusting, rid, "decision trace")


def test_untrusted_debug_header_is_ignored(untrusting, fake_as):
    token = fake_as.add_token(new_token(), active())
    ok, allowed = ask(untrusting, "/api/items", token, debug=True)
    assert ok.status == 200, ok
    resp, denied = ask(untrusting, "/admin-api/users", token, debug=True)
    assert resp.status == 403, resp
    wait_for(untrusting, denied, "denied")
    settle(untrusting)
    for rid in (allowed, denied):
        assert [o for o in lines_for(untrusting, rid) if o.get("message") == "decision trace"] == [], rid


def test_debug_log_policy_is_traced_without_the_header(untrusting, fake_as):
    token = fake_as.add_token(new_token(), active())
    resp, rid = ask(untrusting, "/traced/items", token)
    assert resp.status == 200, resp
    steps = trace_steps(wait_for(untrusting, rid, "decision trace"))
    assert steps[1].startswith("policy: traced"), steps
    assert steps[-1] == "decision: allow", steps
    plain, _ = ask(untrusting, "/traced/items", token)
    assert comparable(plain) == comparable(resp)
    assert token not in untrusting.log_path.read_text(errors="replace")


def test_a_reload_turns_trust_debug_header_on(work, fake_as):
    sc = Sidecar(work / "sidecar-reload", debug_config(fake_as, {}, DEBUG_POLICIES[:1]), name="sidecar-debug-reload")
    try:
        token = fake_as.add_token(new_token(), active())
        unknown = new_token("unknown")
        assert ask(sc, "/api/items", token, debug=True)[0].status == 200
        _, before = ask(sc, "/api/items", unknown, debug=True)
        wait_for(sc, before, "denied")
        settle(sc)
        assert [o for o in log_objects(sc) if o.get("message") == "decision trace"] == []

        config = debug_config(fake_as, {"trust_debug_header": True, "listen": f"127.0.0.1:{sc.port}"}, DEBUG_POLICIES[:1])
        sc.config_path.write_text(to_yaml(config) + "\n")
        sc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any(o.get("message") == "configuration reloaded" for o in log_objects(sc)):
            assert time.monotonic() < deadline, "no `configuration reloaded` line"
            time.sleep(0.05)
        resp, rid = ask(sc, "/api/items", unknown, debug=True)
        assert resp.status == 401, resp
        steps = trace_steps(wait_for(sc, rid, "decision trace"))
        assert steps[-1] == "decision: deny 401: inactive", steps
    finally:
        sc.stop()


# ---------------------------------------------------------------------------------------------
# 4. Through nginx: a client cannot switch the trace on; an operator can
DEBUG_CLEARED = ("operator's IP, to trace chosen requests.\n"
                 "            proxy_set_header X-Authz-Debug           \"\";")


def operator_nginx_conf(workdir: Path) -> Path:
    """deploy/nginx.conf with the README's recipe: X-Authz-Debug set from a map on the client's
    address (here every loopback client is "the operator")."""
    text = (REPO / "deploy" / "nginx.conf").read_text()
    assert text.count(DEBUG_CLEARED) == 1, "deploy/nginx.conf's /_authz X-Authz-Debug line changed shape"
    text = text.replace(DEBUG_CLEARED, DEBUG_CLEARED.replace('""', "$authz_debug"))
    text, n = re.subn(r"\nhttp \{\n", "\nhttp {\n    map $remote_addr $authz_debug {\n        default \"\";\n"
                      "        127.0.0.1 1;\n    }\n", text, count=1)
    assert n == 1
    path = workdir / "nginx-operator-debug.conf"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def nginx_pair(work, certs, fake_as, echo):
    """One sidecar trusting X-Authz-Debug, behind deploy/nginx.conf and behind the operator's variant."""
    sc = Sidecar(work / "sidecar-nginx", {
        **debug_config(fake_as, {"trust_debug_header": True}, []),
        "policies": [{"name": "token-mtls", "match": {"path_prefix": "/token-mtls/"},
                      "required_scopes": ["system-access"], "certificate_header": "X-Client-Cert"}],
    }, name="sidecar-debug-nginx")
    plain = Nginx(work / "nginx-deploy", certs, sc.port, echo.port)
    source = operator_nginx_conf(work)
    original = stack.DEPLOY_NGINX_CONF
    stack.DEPLOY_NGINX_CONF = source
    try:
        operator = Nginx(work / "nginx-operator", certs, sc.port, echo.port)
    finally:
        stack.DEPLOY_NGINX_CONF = original
    yield sc, EdgeClient(plain.port, certs), EdgeClient(operator.port, certs)
    operator.stop()
    plain.stop()
    sc.stop()


def test_nginx_clears_a_clients_debug_header(nginx_pair, fake_as, certs, echo):
    sc, edge, _ = nginx_pair
    token = fake_as.add_token(new_token(), active(cnf={"x5t#S256": stack.thumbprint(certs / "client1.crt")}))
    allowed_rid, denied_rid = "explain-" + secrets.token_hex(8), "explain-" + secrets.token_hex(8)
    ok = edge.request("/token-mtls/items", token=token, headers={"X-Authz-Debug": "1", "X-Request-Id": allowed_rid})
    assert ok.status == 200, ok
    assert "x-authz-debug" not in {k.lower() for k in ok.json()["headers"]}, "X-Authz-Debug reached the upstream"
    stolen = edge.request("/token-mtls/items", token=token, cert="client2",
                          headers={"X-Authz-Debug": "1", "X-Request-Id": denied_rid})
    assert stolen.status == 401, stolen
    assert wait_for(sc, denied_rid, "denied")["authz.reason"] == "binding_mismatch"
    settle(sc)
    assert [o for o in log_objects(sc) if o.get("message") == "decision trace"] == [], \
        "a client's X-Authz-Debug went through nginx"


def test_nginx_operator_can_set_the_debug_header(nginx_pair, fake_as, certs):
    sc, _, operator = nginx_pair
    token = fake_as.add_token(new_token(), active(cnf={"x5t#S256": stack.thumbprint(certs / "client1.crt")}))
    rid = "explain-" + secrets.token_hex(8)
    resp = operator.request("/token-mtls/items", token=token, cert="client2", headers={"X-Request-Id": rid})
    assert resp.status == 401, resp
    steps = trace_steps(wait_for(sc, rid, "decision trace"))
    assert any(s.startswith("binding cnf.x5t#S256: mismatch") for s in steps), steps
    assert steps[-1].startswith("decision: deny 401: binding_mismatch"), steps
    assert token not in sc.log_path.read_text(errors="replace")


# ---------------------------------------------------------------------------------------------
# 5. Through Envoy, HTTP and gRPC modes
ENVOY_POLICIES = [
    # unbound tokens only: certificate_header null (the peer certificate in gRPC mode)
    {"name": "token-mtls", "match": {"path_prefix": "/token-mtls/"}, "required_scopes": ["system-access"]},
    {"name": "traced", "match": {"path_prefix": "/traced/"}, "required_scopes": ["system-access"], "debug_log": True},
]


@pytest.fixture(scope="module")
def envoy_path():
    try:
        return envoy_support.find_envoy()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no usable Envoy: {e}")


@pytest.fixture(scope="module")
def envoy_fronts(work, envoy_path, certs, fake_as, echo):
    """One sidecar trusting X-Authz-Debug (HTTP and gRPC listeners), behind Envoy in both modes."""
    grpc_port = stack.free_port()
    sc = Sidecar(work / "sidecar-envoy",
                 debug_config(fake_as, {"trust_debug_header": True, "grpc_listen": f"127.0.0.1:{grpc_port}"},
                              ENVOY_POLICIES), name="sidecar-debug-envoy")
    started = []
    try:
        stack.wait_port("127.0.0.1", grpc_port, timeout=20, proc=sc.proc)
        started.append(Envoy(envoy_path, work / "envoy-http", certs, upstream_port=echo.port, sidecar_port=sc.port,
                             source=DEPLOY_ENVOY, name="envoy-debug-http"))
        started.append(Envoy(envoy_path, work / "envoy-grpc", certs, upstream_port=echo.port,
                             sidecar_grpc_port=grpc_port, source=DEPLOY_ENVOY_GRPC, name="envoy-debug-grpc"))
        render = envoy_support.render_envoy_conf
        envoy_support.render_envoy_conf = operator_envoy_conf(render)
        try:
            started.append(Envoy(envoy_path, work / "envoy-operator", certs, upstream_port=echo.port,
                                 sidecar_port=sc.port, source=DEPLOY_ENVOY, name="envoy-debug-operator"))
        finally:
            envoy_support.render_envoy_conf = render
        yield sc, {"http": EdgeClient(started[0].port, certs), "grpc": EdgeClient(started[1].port, certs),
                   "operator": EdgeClient(started[2].port, certs)}
    finally:
        for e in reversed(started):
            e.stop()
        sc.stop()


AUTHZ_PATH_PREFIX = "                path_prefix: /authz\n"


def operator_envoy_conf(render):
    """render_envoy_conf, then the README's Envoy recipe: x-authz-debug added to the check request
    itself (http_service.authorization_request.headers_to_add)."""
    def rendered(*args, **kwargs):
        out = render(*args, **kwargs)
        text = out.read_text()
        assert text.count(AUTHZ_PATH_PREFIX) == 1, "deploy/envoy.yaml's http_service changed shape"
        out.write_text(text.replace(AUTHZ_PATH_PREFIX, AUTHZ_PATH_PREFIX + (
            "                authorization_request:\n"
            "                  headers_to_add:\n"
            '                  - { key: x-authz-debug, value: "1" }\n')))
        return out
    return rendered


def traces_of(sc: Sidecar, token: str) -> list[dict]:
    """The `decision trace` lines that name TOKEN (by its digest prefix)."""
    mark = f"sha256 {digest8(token)}"
    return [o for o in log_objects(sc) if o.get("message") == "decision trace" and mark in str(o.get("authz.trace"))]


def wait_denied(sc: Sidecar, token: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for o in log_objects(sc):
            if o.get("message") == "denied" and o.get("authz.token") == digest8(token):
                return o
        if time.monotonic() > deadline:
            pytest.fail(f"no denial logged for token {digest8(token)} in {sc.log_path}", pytrace=False)
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["http", "grpc"])
def test_envoy_removes_a_clients_debug_header(envoy_fronts, fake_as, echo, mode):
    sc, edges = envoy_fronts
    token = fake_as.add_token(new_token(), active())
    ok = edges[mode].request("/token-mtls/items", token=token, headers={"X-Authz-Debug": "1"})
    assert ok.status == 200, ok
    assert "x-authz-debug" not in {k.lower() for k in ok.json()["headers"]}, "x-authz-debug reached the upstream"
    unknown = new_token("unknown")
    denied = edges[mode].request("/token-mtls/items", token=unknown, headers={"X-Authz-Debug": "1"})
    assert denied.status == 401, denied
    wait_denied(sc, unknown)
    assert traces_of(sc, token) == [] and traces_of(sc, unknown) == [], f"a client's x-authz-debug went through Envoy ({mode})"


def test_envoy_operator_can_add_the_debug_header(envoy_fronts, fake_as):
    sc, edges = envoy_fronts
    token = fake_as.add_token(new_token(), active())
    resp = edges["operator"].request("/token-mtls/items", token=token)
    assert resp.status == 200, resp
    deadline = time.monotonic() + 5
    while not traces_of(sc, token) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = traces_of(sc, token)
    assert len(found) == 1, "headers_to_add: x-authz-debug did not trace the request"
    steps = trace_steps(found[0])
    assert steps[1].startswith("policy: token-mtls"), steps
    assert steps[-1] == "decision: allow", steps


@pytest.mark.parametrize("mode", ["http", "grpc"])
def test_envoy_debug_log_policy_is_traced(envoy_fronts, fake_as, mode):
    sc, edges = envoy_fronts
    token = fake_as.add_token(new_token(), active())
    resp = edges[mode].request("/traced/items", token=token)
    assert resp.status == 200, resp
    deadline = time.monotonic() + 5
    while not traces_of(sc, token) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = traces_of(sc, token)
    assert len(found) == 1, f"a debug_log policy was not traced through Envoy in {mode} mode"
    steps = trace_steps(found[0])
    assert steps[-1] == "decision: allow", steps


# ---------------------------------------------------------------------------------------------
# 6. Traced or not, the same decision: a DPoP proof replayed at another replica
REDIS_SERVER = shutil.which("redis-server")
DPOP_POLICIES = [
    {"name": "plain-dpop", "match": {"path_prefix": "/plain-dpop/"}},
    {"name": "traced-dpop", "match": {"path_prefix": "/traced-dpop/"}, "debug_log": True},
]


def dpop_ask(sc: Sidecar, path: str, token: str, proof: str):
    return http_request(sc.base, "/authz", headers={
        "Host": HOST, "X-Original-URI": path, "X-Original-Method": "GET", "X-Forwarded-Proto": "https",
        "Authorization": f"DPoP {token}", "DPoP": proof})


@pytest.fixture(scope="module")
def dpop_replicas(work, fake_as):
    """Two replicas sharing a redis-server (the cross-replica DPoP replay check, DESIGN.md §11)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    rdir = work / "redis"
    rdir.mkdir()
    port = stack.free_port()
    log_path = rdir / "redis.log"
    with open(log_path, "wb") as log:
        redis = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(rdir), "--daemonize", "no"],
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(rdir))
    _LOGS.append(("redis (explain)", log_path))
    replicas = []
    try:
        stack.wait_port("127.0.0.1", port, timeout=10, proc=redis)
        seal = rdir / "seal.key"
        seal.write_text(secrets.token_hex(32) + "\n")
        seal.chmod(0o600)
        cfg = debug_config(fake_as, {}, DPOP_POLICIES)
        cfg["cache"]["shared"] = {"url": f"redis://127.0.0.1:{port}/0", "seal_key_file": str(seal),
                                  "key_prefix": "explain:", "timeout_ms": 1000}
        for name in ("a", "b"):
            replicas.append(Sidecar(work / f"sidecar-dpop-{name}", cfg, name=f"sidecar-dpop-{name}"))
        # the first use of the store connects: not during the test
        key = ec.generate_private_key(ec.SECP256R1())
        token = fake_as.add_token(new_token(), active(cnf={"jkt": jkt(key)}, token_type="DPoP"))
        for sc in replicas:
            dpop_ask(sc, "/plain-dpop/warm", token, dpop_proof(key, token, url("/plain-dpop/warm")))
        yield replicas
    finally:
        for sc in replicas:
            sc.stop()
        stop_process(redis)


@pytest.mark.parametrize("policy", ["plain-dpop", "traced-dpop"])
def test_a_proof_replayed_at_another_replica_is_refused_traced_or_not(dpop_replicas, fake_as, policy):
    a, b = dpop_replicas
    key = ec.generate_private_key(ec.SECP256R1())
    token = fake_as.add_token(new_token(), active(cnf={"jkt": jkt(key)}, token_type="DPoP"))
    path = f"/{policy}/items"
    proof = dpop_proof(key, token, url(path))
    first = dpop_ask(a, path, token, proof)
    assert first.status == 200, first
    replayed = dpop_ask(b, path, token, proof)
    assert replayed.status == 401, f"a proof used at replica a was accepted at replica b ({policy}): {replayed}"
    assert 'error="invalid_dpop_proof"' in (replayed.header("WWW-Authenticate") or ""), replayed
