"""JWT access tokens (DESIGN.md §9) verified locally, end to end with a real authorization server:
Glewlwyd (scripts/idp-glewlwyd.sh) issues RS256 `at+jwt` access tokens bound to client1's
certificate (cnf.x5t#S256, RFC 8705) and publishes its keys at the jwks_uri of its discovery
document; the sidecar (issuers: validation jwt) verifies them without calling the AS, behind nginx
and behind Envoy (ext_authz HTTP and gRPC modes).

Then, in this order (the module has its own Glewlwyd, so test_glewlwyd_e2e.py is not disturbed):
  * jwt_then_introspect: verified first, then introspected (a forgery never reaches the AS);
  * key rotation through the admin API (scripts/idp-glewlwyd.sh --rotate): [A] -> [B, A] -> [B];
  * the AS goes down (--stop): known keys keep verifying, a key set never obtained is a 503;
    Glewlwyd is started again (--start) afterwards.
"""
from __future__ import annotations

import base64
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import (ALL_TOKENS, KONG_DENIED, KONG_UNAVAILABLE, EdgeClient, Nginx, Sidecar, http_request,
                      kong_body, policies, stack, tail)
import envoy_support
from envoy_support import DEPLOY_ENVOY_GRPC, Envoy, assert_kong, policy
import test_glewlwyd_e2e as glewlwyd_e2e
from test_glewlwyd_e2e import idp_script, read_env

from dpop_client import b64url, jwt_header, jwt_payload   # scripts/ is on sys.path (conftest)

# fixtures shared with the other suites (assigned here so that pytest registers them in this module)
envoy_bin = envoy_support.envoy_bin
idp = glewlwyd_e2e.idp      # a Glewlwyd of this module's own (module scope), on the suite's mkcerts PKI

pytestmark = pytest.mark.glewlwyd

ISSUER_NAME = "glew"
AUDIENCE = "system-access"          # Glewlwyd's aud: the scope name (or the RFC 8707 resource)
CLIENT_ID = "system-client-mtls"
JWKS_CACHE_SECONDS = 4              # the rotation sidecar's jwks_cache_seconds
MIN_REFETCH_SECONDS = 1             # jwks_min_refetch_seconds
WAIT_SLACK = 6.0                    # bound on every wait beyond the configured intervals


# ---------------------------------------------------------------------------------------------
# Helpers (base64url and JWT parts: scripts/dpop_client.py)
def get_token(idp: dict, resource: "str | None" = None) -> str:
    """A client_credentials token for client1 (tls_client_auth), straight from Glewlwyd's token endpoint."""
    ctx = ssl.create_default_context(cafile=idp["IDP_CA"])
    ctx.load_cert_chain(idp["IDP_CLIENT1_CERT"], idp["IDP_CLIENT1_KEY"])
    form = {"grant_type": "client_credentials", "client_id": idp["IDP_MTLS_CLIENT_ID"], "scope": idp["IDP_MTLS_SCOPE"]}
    if resource:
        form["resource"] = resource
    req = urllib.request.Request(idp["IDP_TOKEN_URL"], data=urllib.parse.urlencode(form).encode(), method="POST")
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        body = json.loads(r.read())
    token = body["access_token"]
    ALL_TOKENS.add(token)
    return token


def rotate(idp: dict, step: str) -> dict:
    """Glewlwyd's signing keys to STEP (BA, B, A) through its admin API; returns WORKDIR/keys.env."""
    idp_script("--rotate", idp["IDP_WORKDIR"], step)
    return read_env(Path(idp["IDP_KEYS_ENV"]))


def metric(base: str, name: str, **labels: str) -> float:
    """Sum of NAME's series on BASE/metrics whose labels include LABELS (0 when there is none)."""
    text = http_request(base, "/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def introspection_calls(sc: Sidecar) -> float:
    return metric(sc.base, "authz_introspection_calls_total")


def jwks_fetches(sc: Sidecar, outcome: str) -> float:
    return metric(sc.base, "authz_jwks_fetches_total", issuer=ISSUER_NAME, outcome=outcome)


def verifications(sc: Sidecar, outcome: str) -> float:
    return metric(sc.base, "authz_jwt_verifications_total", issuer=ISSUER_NAME, outcome=outcome)


def jwt_issuer(idp: dict, **overrides) -> dict:
    """issuers[0] of DESIGN.md §9 for Glewlwyd: keys from discovery (<issuer>/.well-known/openid-configuration)."""
    issuer = {"name": ISSUER_NAME, "issuer": idp["IDP_ISSUER"], "validation": "jwt", "audiences": [AUDIENCE],
              "ca_file": idp["IDP_CA"], "timeout_ms": 1500, "jwks_cache_seconds": 300,
              "jwks_min_refetch_seconds": MIN_REFETCH_SECONDS}
    issuer.update(overrides)
    return issuer


def assert_jwt_credentials(seen: dict, idp: dict, token: str) -> None:
    """The X-Credential-* headers the upstream received for a Glewlwyd JWT verified locally."""
    claims = jwt_payload(token)
    assert seen.get("x-credential-client-id") == CLIENT_ID, seen
    assert seen.get("x-credential-scope") == idp["IDP_MTLS_SCOPE"], seen
    assert seen.get("x-credential-token-type") == "Bearer", seen
    assert seen.get("x-credential-iss") == idp["IDP_ISSUER"], seen
    assert seen.get("x-credential-sub") == claims["sub"], seen
    assert seen.get("x-credential-jti") == claims["jti"], seen
    assert seen.get("x-credential-exp") == str(claims["exp"]), seen


def assert_denied_401(resp) -> None:
    assert resp.status == 401, resp
    assert resp.body == kong_body(401, KONG_DENIED), resp
    assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or ""), resp


def tampered(token: str, **claims) -> str:
    """TOKEN with its payload changed (the signature left as it was): a forgery."""
    head, _, sig = token.split(".")
    payload = {**jwt_payload(token), **claims}
    forged = f"{head}.{b64url(json.dumps(payload, separators=(',', ':')).encode())}.{sig}"
    ALL_TOKENS.add(forged)
    return forged


def as_is_down(idp: dict) -> bool:
    try:
        urllib.request.urlopen(idp["IDP_DISCOVERY_URL"], context=ssl.create_default_context(cafile=idp["IDP_CA"]),
                               timeout=2)
    except (urllib.error.URLError, OSError):
        return True
    return False


def wait_until(predicate, timeout: float, interval: float = 0.25):
    """Poll PREDICATE until it returns a true value or TIMEOUT passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Edge:
    """A sidecar and the proxy in front of it."""

    def __init__(self, sidecar: Sidecar, client: EdgeClient):
        self.sidecar, self.client = sidecar, client

    def request(self, path: str, token: "str | None", cert: str = "client1"):
        return self.client.request(path, token=token, cert=cert)


# ---------------------------------------------------------------------------------------------
# Fixtures
@pytest.fixture(scope="module")
def token(idp) -> str:
    """A Glewlwyd access token (RS256, kid of the initial key) bound to client1."""
    return get_token(idp)


def nginx_policies(idp: dict) -> list:
    return policies() + [
        # the policy's audiences replace the issuer's: an RFC 8707 resource-bound token
        {"name": "resource-api", "match": {"path_prefix": "/resource-api/"}, "required_scopes": ["system-access"],
         "audiences": [idp["IDP_RESOURCE"]], "certificate_header": "X-Client-Cert", "certificate_format": "auto"},
        {"name": "claims-ok", "match": {"path_prefix": "/claims-ok/"}, "issuers": [ISSUER_NAME],
         "required_claims": {"client_id": CLIENT_ID, "type": ["access_token", "other"]},
         "certificate_header": "X-Client-Cert", "certificate_format": "auto"},
        {"name": "claims-miss", "match": {"path_prefix": "/claims-miss/"}, "issuers": [ISSUER_NAME],
         "required_claims": {"client_id": "someone-else"},
         "certificate_header": "X-Client-Cert", "certificate_format": "auto"},
    ]


@pytest.fixture(scope="module")
def jwt_edge(tmp_path_factory, certs, idp, echo):
    """nginx (mTLS) -> sidecar with one jwt issuer (Glewlwyd) and no introspection at all."""
    work = tmp_path_factory.mktemp("jwt-nginx")
    config = {"cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5}, "issuers": [jwt_issuer(idp)],
              "policies": nginx_policies(idp)}
    sc = Sidecar(work, config, name="sidecar-jwt-nginx")
    ng = Nginx(work / "nginx", certs, sc.port, echo.port)
    yield Edge(sc, EdgeClient(ng.port, certs))
    ng.stop()
    sc.stop()


@pytest.fixture(scope="module")
def envoy_http_edge(tmp_path_factory, certs, idp, envoy_bin, echo):
    """Envoy (deploy/envoy.yaml, ext_authz HTTP mode) -> sidecar (jwt issuer; certificate from XFCC)."""
    work = tmp_path_factory.mktemp("jwt-envoy-http")
    config = {"cache": {"ttl_seconds": 30}, "issuers": [jwt_issuer(idp)],
              "policies": [policy("token-mtls", "/token-mtls/", ["system-access"])]}
    sc = Sidecar(work, config, name="sidecar-jwt-envoy-http")
    e = Envoy(envoy_bin, work, certs, upstream_port=echo.port, sidecar_port=sc.port, name="envoy-jwt-http")
    yield Edge(sc, EdgeClient(e.port, certs))
    e.stop()
    sc.stop()


@pytest.fixture(scope="module")
def envoy_grpc_edge(tmp_path_factory, certs, idp, envoy_bin, echo):
    """Envoy (deploy/envoy-grpc.yaml, ext_authz gRPC) -> sidecar on server.grpc_listen (jwt issuer;
    certificate from the CheckRequest's attributes.source.certificate)."""
    work = tmp_path_factory.mktemp("jwt-envoy-grpc")
    grpc_port = stack.free_port()
    config = {"server": {"grpc_listen": f"127.0.0.1:{grpc_port}"}, "cache": {"ttl_seconds": 30},
              "issuers": [jwt_issuer(idp)],
              "policies": [policy("token-mtls", "/token-mtls/", ["system-access"], certificate_header=None,
                                  certificate_format="auto")]}
    sc = Sidecar(work, config, name="sidecar-jwt-envoy-grpc")
    try:
        stack.wait_port("127.0.0.1", grpc_port, timeout=20, proc=sc.proc)
    except (TimeoutError, RuntimeError) as e:
        sc.stop()
        pytest.fail(f"the sidecar does not listen on server.grpc_listen ({e})\n{tail(sc.log_path)}", pytrace=False)
    e = Envoy(envoy_bin, work, certs, upstream_port=echo.port, sidecar_grpc_port=grpc_port,
              source=DEPLOY_ENVOY_GRPC, name="envoy-jwt-grpc")
    yield Edge(sc, EdgeClient(e.port, certs))
    e.stop()
    sc.stop()


@pytest.fixture(scope="module")
def jti_edge(tmp_path_factory, certs, idp, echo):
    """nginx -> sidecar whose Glewlwyd issuer is jwt_then_introspect (introspection with client_secret_basic)."""
    work = tmp_path_factory.mktemp("jwt-then-introspect")
    issuer = jwt_issuer(idp, validation="jwt_then_introspect", introspection={
        "endpoint": idp["IDP_INTROSPECT_URL"], "client_id": idp["IDP_INTROSPECTION_CLIENT_ID"],
        "client_secret": idp["IDP_INTROSPECTION_CLIENT_SECRET"], "auth_method": "client_secret_basic",
        "ca_file": idp["IDP_CA"], "timeout_ms": 1500})
    config = {"cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5}, "issuers": [issuer], "policies": policies()}
    sc = Sidecar(work, config, name="sidecar-jwt-then-introspect")
    ng = Nginx(work / "nginx", certs, sc.port, echo.port)
    yield Edge(sc, EdgeClient(ng.port, certs))
    ng.stop()
    sc.stop()


@pytest.fixture(scope="module")
def rotation_edge(tmp_path_factory, certs, idp, echo):
    """nginx -> sidecar with short key-set intervals (jwks_cache_seconds 4, jwks_min_refetch_seconds 1)
    and a 1 s claims cache, so that rotations show within seconds."""
    work = tmp_path_factory.mktemp("jwt-rotation")
    config = {"cache": {"ttl_seconds": 1, "negative_ttl_seconds": 1},
              "issuers": [jwt_issuer(idp, jwks_cache_seconds=JWKS_CACHE_SECONDS)], "policies": policies()}
    sc = Sidecar(work, config, name="sidecar-jwt-rotation")
    ng = Nginx(work / "nginx", certs, sc.port, echo.port)
    yield Edge(sc, EdgeClient(ng.port, certs))
    ng.stop()
    sc.stop()


# ---------------------------------------------------------------------------------------------
# What Glewlwyd issues
def test_glewlwyd_issues_bound_at_jwt_access_tokens(idp, token, certs):
    header, claims = jwt_header(token), jwt_payload(token)
    assert header["typ"] == "at+jwt" and header["alg"] == "RS256", header
    assert header["kid"] == idp["IDP_JWT_KID"], header
    assert claims["iss"] == idp["IDP_ISSUER"] and claims["aud"] == AUDIENCE, claims
    assert claims["client_id"] == CLIENT_ID and claims["scope"] == "system-access", claims
    assert claims["cnf"]["x5t#S256"] == stack.thumbprint(certs / "client1.crt"), claims
    with urllib.request.urlopen(idp["IDP_DISCOVERY_URL"], context=ssl.create_default_context(cafile=idp["IDP_CA"]),
                                timeout=10) as r:
        discovery = json.loads(r.read())
    assert discovery["issuer"] == idp["IDP_ISSUER"] and discovery["jwks_uri"] == idp["IDP_JWKS_URL"], discovery


# ---------------------------------------------------------------------------------------------
# nginx (auth_request) -> sidecar, jwt only
def test_nginx_bound_jwt_with_client1_is_allowed_without_introspection(jwt_edge, idp, token):
    resp = jwt_edge.request("/token-mtls/resource", token)
    assert resp.status == 200, resp
    assert_jwt_credentials(resp.json()["headers"], idp, token)
    sc = jwt_edge.sidecar
    assert verifications(sc, "valid") >= 1
    assert jwks_fetches(sc, "ok") >= 1
    assert jwks_fetches(sc, "error") == 0
    assert introspection_calls(sc) == 0


def test_nginx_bound_jwt_with_client2_is_401(jwt_edge, token):
    resp = jwt_edge.request("/token-mtls/resource", token, cert="client2")
    assert_denied_401(resp)
    assert (resp.header("Content-Type") or "").startswith("application/json")
    assert introspection_calls(jwt_edge.sidecar) == 0


def test_nginx_jwt_without_the_routes_scope_is_403(jwt_edge, token):
    resp = jwt_edge.request("/admin-api/users", token)
    assert resp.status == 403, resp
    assert 'error="insufficient_scope"' in (resp.header("WWW-Authenticate") or "")


def test_nginx_forged_jwt_is_401(jwt_edge, certs, token):
    # client2 rebinds client1's token to its own certificate: the signature no longer verifies
    forged = tampered(token, cnf={"x5t#S256": stack.thumbprint(certs / "client2.crt")})
    before = verifications(jwt_edge.sidecar, "invalid")
    assert_denied_401(jwt_edge.request("/token-mtls/resource", forged, cert="client2"))
    assert verifications(jwt_edge.sidecar, "invalid") == before + 1
    assert introspection_calls(jwt_edge.sidecar) == 0


def test_nginx_audience_from_rfc8707_resource(jwt_edge, idp, token):
    resource_token = get_token(idp, resource=idp["IDP_RESOURCE"])
    assert jwt_payload(resource_token)["aud"] == idp["IDP_RESOURCE"]
    # the issuer's audiences [system-access] do not hold the resource
    assert_denied_401(jwt_edge.request("/token-mtls/resource", resource_token))
    # a policy with audiences: [the resource] accepts it, and refuses the scope-named audience
    resp = jwt_edge.request("/resource-api/items", resource_token)
    assert resp.status == 200, resp
    assert resp.json()["headers"].get("x-credential-aud") == idp["IDP_RESOURCE"]
    assert_denied_401(jwt_edge.request("/resource-api/items", token))
    assert introspection_calls(jwt_edge.sidecar) == 0


def test_nginx_required_claims_of_a_glewlwyd_jwt(jwt_edge, token):
    assert jwt_edge.request("/claims-ok/x", token).status == 200
    resp = jwt_edge.request("/claims-miss/x", token)
    assert resp.status == 403, resp
    assert resp.body == kong_body(403, KONG_DENIED), resp
    www = resp.header("WWW-Authenticate") or ""
    assert 'error="insufficient_scope"' in www and "scope=" not in www, www


# ---------------------------------------------------------------------------------------------
# Envoy, ext_authz HTTP mode and gRPC mode
@pytest.mark.parametrize("mode", ["http", "grpc"])
def test_envoy_bound_jwt(mode, request, idp, token):
    edge = request.getfixturevalue(f"envoy_{mode}_edge")
    resp = edge.request("/token-mtls/resource", token)
    assert resp.status == 200, resp
    assert_jwt_credentials(resp.json()["headers"], idp, token)
    resp = edge.request("/token-mtls/resource", token, cert="client2")
    assert_kong(resp, 401, KONG_DENIED)
    assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or "")
    assert verifications(edge.sidecar, "valid") >= 1
    assert introspection_calls(edge.sidecar) == 0


# ---------------------------------------------------------------------------------------------
# jwt_then_introspect
def test_jwt_then_introspect_against_glewlwyd(jti_edge, idp, token, certs):
    sc = jti_edge.sidecar
    fresh = get_token(idp)      # not in any cache yet
    resp = jti_edge.request("/token-mtls/resource", fresh)
    assert resp.status == 200, resp
    # the introspection answer decides and feeds the headers (Glewlwyd's has token_type "bearer", no client_id)
    seen = resp.json()["headers"]
    assert seen.get("x-credential-scope") == "system-access", seen
    assert seen.get("x-credential-jti") == jwt_payload(fresh)["jti"], seen
    calls = introspection_calls(sc)
    assert calls > 0
    assert metric(sc.base, "authz_introspection_calls_total", outcome="active") > 0
    assert verifications(sc, "valid") >= 1
    assert_denied_401(jti_edge.request("/token-mtls/resource", fresh, cert="client2"))
    # a forgery is refused by the signature check and never reaches the AS
    forged = tampered(fresh, cnf={"x5t#S256": stack.thumbprint(certs / "client2.crt")})
    assert_denied_401(jti_edge.request("/token-mtls/resource", forged, cert="client2"))
    assert introspection_calls(sc) == calls



# ---------------------------------------------------------------------------------------------
# RFC 9701 signed introspection answers (introspection.response_format: jwt)
@pytest.fixture(scope="module")
def signed_edge(tmp_path_factory, certs, idp, echo):
    """nginx -> sidecar that introspects at Glewlwyd asking for RFC 9701 signed answers."""
    work = tmp_path_factory.mktemp("jwt-signed-introspection")
    issuer = jwt_issuer(idp, validation="introspection", introspection={
        "endpoint": idp["IDP_INTROSPECT_URL"], "client_id": idp["IDP_INTROSPECTION_CLIENT_ID"],
        "client_secret": idp["IDP_INTROSPECTION_CLIENT_SECRET"], "auth_method": "client_secret_basic",
        "ca_file": idp["IDP_CA"], "timeout_ms": 1500, "response_format": "jwt"})
    config = {"cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5}, "issuers": [issuer], "policies": policies()}
    sc = Sidecar(work, config, name="sidecar-signed-introspection")
    ng = Nginx(work / "nginx", certs, sc.port, echo.port)
    yield Edge(sc, EdgeClient(ng.port, certs))
    ng.stop()
    sc.stop()


def glewlwyd_signed_answer(idp: dict, token: str):
    """What Glewlwyd answers to an RFC 9701 request: (status, content type, body)."""
    import ssl
    import urllib.request
    ctx = ssl.create_default_context(cafile=idp["IDP_CA"])
    basic = base64.b64encode(f"{idp['IDP_INTROSPECTION_CLIENT_ID']}:{idp['IDP_INTROSPECTION_CLIENT_SECRET']}".encode()).decode()
    req = urllib.request.Request(idp["IDP_INTROSPECT_URL"], data=urllib.parse.urlencode({"token": token}).encode(),
                                 headers={"Authorization": f"Basic {basic}", "Accept": "application/token-introspection+jwt"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def test_signed_introspection_glewlwyd_deviations_are_faults(signed_edge, idp):
    """Glewlwyd signs its answers, but names the token's audience as `aud` (RFC 9701 §5 wants the
    resource server's client id) and answers an unknown token with HTTP 400 and no body: the sidecar
    reads both as AS faults (503), as the RFC requires of answers it cannot verify; never 200 or 401."""
    fresh = get_token(idp)
    status, ctype, body = glewlwyd_signed_answer(idp, fresh)
    assert status == 200 and ctype.startswith("application/token-introspection+jwt"), (status, ctype)
    assert jwt_header(body)["typ"] == "token-introspection+jwt"
    answer = jwt_payload(body)
    assert answer["iss"] == idp["IDP_ISSUER"] and answer["token_introspection"]["active"] is True
    assert answer["aud"] != idp["IDP_INTROSPECTION_CLIENT_ID"], answer["aud"]     # the deviation
    resp = signed_edge.request("/token-mtls/resource", fresh)
    assert resp.status == 503, resp
    log = signed_edge.sidecar.log_path.read_text()
    assert "aud does not name this client" in log, log[-2000:]
    assert jwks_fetches(signed_edge.sidecar, "ok") >= 1        # the signature itself was checked
    # an unknown token: HTTP 400 with an empty body, not a signed inactive answer
    status, _, body = glewlwyd_signed_answer(idp, "not-a-token-" + b64url(os.urandom(9)))
    assert status == 400 and body == "", (status, body)
    assert signed_edge.request("/token-mtls/resource", "not-a-token-at-all").status == 503

# ---------------------------------------------------------------------------------------------
# Key rotation: [A] -> [B, A] -> [B], no restart of the sidecar
ROTATION: dict = {}


def test_rotation_new_key_is_fetched_once_and_old_tokens_still_verify(rotation_edge, idp):
    sc = rotation_edge.sidecar
    # kid A tokens: one sent at once, one first sent after the rotation, one only after A is retired
    old_seen, old_unseen, old_spare = get_token(idp), get_token(idp), get_token(idp)
    assert jwt_header(old_seen)["kid"] == idp["IDP_JWT_KID"]
    assert rotation_edge.request("/token-mtls/resource", old_seen).status == 200
    first = time.monotonic()        # the first key set fetch has been made by now
    assert jwks_fetches(sc, "ok") >= 1

    keys = rotate(idp, "BA")
    assert keys["IDP_PUBLISHED_KIDS"] == f"{keys['IDP_KID_B']},{keys['IDP_KID_A']}", keys
    new = get_token(idp)
    assert jwt_header(new)["kid"] == keys["IDP_KID_B"] != keys["IDP_KID_A"] == idp["IDP_JWT_KID"]
    assert jwt_header(new)["alg"] == "ES256"
    # an unknown kid may fetch the key set again once jwks_min_refetch_seconds passed since the last fetch
    time.sleep(max(0.0, first + MIN_REFETCH_SECONDS + 0.3 - time.monotonic()))
    before = jwks_fetches(sc, "ok")
    resp = rotation_edge.request("/token-mtls/resource", new)
    ROTATION["fetched"] = time.monotonic()
    assert resp.status == 200, resp
    assert_jwt_credentials(resp.json()["headers"], idp, new)
    assert jwks_fetches(sc, "ok") == before + 1, "the unknown kid should have fetched the key set exactly once"
    assert rotation_edge.request("/token-mtls/resource", new).status == 200
    assert jwks_fetches(sc, "ok") == before + 1, "a known kid must not fetch again"
    # key A is still published: old tokens, seen or not, keep verifying
    assert rotation_edge.request("/token-mtls/resource", old_seen).status == 200
    assert rotation_edge.request("/token-mtls/resource", old_unseen).status == 200
    assert introspection_calls(sc) == 0
    ROTATION.update(old_seen=old_seen, old_spare=old_spare, new=new)


def test_rotation_retired_key_is_401_after_the_key_set_refresh(rotation_edge, idp):
    if not ROTATION:
        pytest.skip("needs test_rotation_new_key_is_fetched_once_and_old_tokens_still_verify")
    keys = rotate(idp, "B")
    assert keys["IDP_PUBLISHED_KIDS"] == keys["IDP_KID_B"], keys
    newer = get_token(idp)
    assert jwt_header(newer)["kid"] == keys["IDP_KID_B"]
    # kid A verifies until the cached set is jwks_cache_seconds old and refreshed (claims cache 1 s)
    timeout = max(0.0, ROTATION["fetched"] + JWKS_CACHE_SECONDS - time.monotonic()) + WAIT_SLACK
    last = []

    def old_token_refused() -> bool:
        last.append(rotation_edge.request("/token-mtls/resource", ROTATION["old_seen"]))
        return last[-1].status != 200

    started = time.monotonic()
    assert wait_until(old_token_refused, timeout=timeout, interval=0.5), \
        f"a kid-A token was still allowed {time.monotonic() - started:.1f} s after key A was retired"
    assert_denied_401(last[-1])
    assert_denied_401(rotation_edge.request("/token-mtls/resource", ROTATION["old_spare"]))
    assert rotation_edge.request("/token-mtls/resource", newer).status == 200
    assert rotation_edge.request("/token-mtls/resource", ROTATION["new"]).status == 200
    assert verifications(rotation_edge.sidecar, "invalid") >= 1
    assert introspection_calls(rotation_edge.sidecar) == 0


# ---------------------------------------------------------------------------------------------
# The AS goes down (last: Glewlwyd is started again afterwards)
def test_as_down_known_keys_keep_verifying(rotation_edge, tmp_path_factory, certs, idp, echo):
    sc = rotation_edge.sidecar
    seen = get_token(idp)
    assert rotation_edge.request("/token-mtls/resource", seen).status == 200
    # obtained before the AS goes away, never shown to the sidecar
    unseen = [get_token(idp) for _ in range(3)]
    idp_script("--stop", idp["IDP_WORKDIR"])
    try:
        assert as_is_down(idp)
        assert rotation_edge.request("/token-mtls/resource", seen).status == 200
        resp = rotation_edge.request("/token-mtls/resource", unseen[0])
        assert resp.status == 200, resp
        assert_jwt_credentials(resp.json()["headers"], idp, unseen[0])
        # once the set is jwks_cache_seconds old a refresh is due: it fails, the last good set stays
        errors = jwks_fetches(sc, "error")
        time.sleep(JWKS_CACHE_SECONDS + 0.5)
        assert rotation_edge.request("/token-mtls/resource", unseen[1]).status == 200
        assert wait_until(lambda: jwks_fetches(sc, "error") > errors, timeout=WAIT_SLACK), \
            "no failed key set refresh was counted while the AS was down"
        time.sleep(0.3)
        assert rotation_edge.request("/token-mtls/resource", unseen[2]).status == 200
        assert rotation_edge.request("/token-mtls/resource", seen).status == 200
        assert introspection_calls(sc) == 0

        # a sidecar that never obtained the keys cannot verify anything: 503 + Retry-After
        work = tmp_path_factory.mktemp("jwt-no-keys")
        cold = Sidecar(work, {"issuers": [jwt_issuer(idp)], "policies": policies()}, name="sidecar-jwt-no-keys")
        ng = Nginx(work / "nginx", certs, cold.port, echo.port)
        try:
            resp = EdgeClient(ng.port, certs).request("/token-mtls/resource", token=seen)
            assert resp.status == 503, resp
            assert resp.body == kong_body(503, KONG_UNAVAILABLE), resp
            assert (resp.header("Retry-After") or "").isdigit(), resp
        finally:
            ng.stop()
            cold.stop()
    finally:
        idp_script("--start", idp["IDP_WORKDIR"])
    assert not as_is_down(idp)
