"""DPoP (RFC 9449, DESIGN.md §10) end to end: Glewlwyd (scripts/idp-glewlwyd.sh --dpop) issues
DPoP-bound JWT access tokens (cnf.jkt) to requests-oauth2client (scripts/dpop_client.py), which calls
the API with a fresh proof per request through the real proxies, rendered from the deploy files:

  * nginx (deploy/nginx.conf, mTLS edge, auth_request: DPoP, X-Forwarded-Proto and X-Original-Host
    reach the sidecar; DPoP-Nonce and the DPoP challenge reach the client);
  * Envoy ext_authz HTTP (deploy/envoy.yaml: dpop and x-forwarded-proto in allowed_headers,
    dpop-nonce in allowed_client_headers and allowed_client_headers_on_success);
  * Envoy ext_authz gRPC (deploy/envoy-grpc.yaml: the scheme and host of attributes.request.http);
  * nginx with its opt-in decision cache on (a replayed proof is never answered from the cache).

One sidecar serves all of them (HTTP listener for nginx and Envoy HTTP, server.grpc_listen for
Envoy gRPC), with the Glewlwyd issuer verified locally (jwt) and, for one policy, introspected:

  /dpop-required/  dpop: required            /dpop-allowed/  dpop: allowed
  /dpop-intro/     dpop: required, tokens introspected at Glewlwyd (validation: introspection)
  /dpop-nonce/     dpop: required, dpop_nonce: true
  /dpop-cached/    dpop: allowed, proxy_cache_seconds: 30 (the caching nginx)
  /dpop-mtls/      dpop: allowed, certificate X-Client-Cert (a token bound to client1 AND a key)

The stolen token is replayed as dpop_client.py's --steal does: without a proof, with proofs of
another key, and as a Bearer token. The module has its own Glewlwyd (module-scoped fixture of
test_glewlwyd_e2e.py) on its own port and work directory, switched to DPoP mode.
"""
from __future__ import annotations

import http.client
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import (ALL_TOKENS, KONG_DENIED, REPO, Nginx, Sidecar, http_request, kong_body, stack, tail)
import envoy_support
from envoy_support import DEPLOY_ENVOY_GRPC, Envoy
import test_glewlwyd_e2e as glewlwyd_e2e
from test_glewlwyd_e2e import IDP_SCRIPT, read_env
from test_jwt_glewlwyd import ISSUER_NAME, jwt_issuer, metric
from test_nginx_decision_cache import enabled_nginx_conf

import dpop_client as dc   # scripts/ is on sys.path (conftest)
from requests_oauth2client import DPoPToken

# fixtures shared with the other suites (assigned here so that pytest registers them in this module)
envoy_bin = envoy_support.envoy_bin
idp = glewlwyd_e2e.idp      # a Glewlwyd of this module's own (module scope)

pytestmark = pytest.mark.glewlwyd

PROXIES = ["nginx", "envoy-http", "envoy-grpc"]
INTRO_ISSUER = "glew-intro"
ALGS = ("ES256", "PS256", "RS256", "EdDSA")     # server.dpop_algorithms by default (CONTRACT.md)


# ---------------------------------------------------------------------------------------------
# Helpers
def dpop_mode(idp: dict, mode: str) -> dict:
    """scripts/idp-glewlwyd.sh --dpop WORKDIR MODE; returns the new idp.env."""
    run = subprocess.run(["bash", str(IDP_SCRIPT), "--dpop", idp["IDP_WORKDIR"], mode], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    if run.returncode != 0:
        pytest.fail(f"idp-glewlwyd.sh --dpop {mode} failed ({run.returncode}):\n{run.stdout[-3000:]}\n"
                    f"{run.stderr[-3000:]}", pytrace=False)
    return read_env(Path(idp["IDP_WORKDIR"]) / "idp.env")


def new_token(env: dict, **kw) -> DPoPToken:
    """A DPoP-bound token for a new key, from Glewlwyd through requests-oauth2client."""
    token = dc.get_dpop_token(env, **kw)
    ALL_TOKENS.add(token.access_token)
    assert token.token_type == "DPoP", token
    return token


def jkt(token: DPoPToken) -> str:
    return dc.thumbprint(token.dpop_key.public_jwk.to_dict())


def dpop_policy(name: str, prefix: str, mode: str, issuer: str = ISSUER_NAME, **extra) -> dict:
    return {"name": name, "match": {"path_prefix": prefix}, "issuers": [issuer], "required_scopes": ["system-access"],
            "certificate_header": "X-Client-Cert", "certificate_format": "auto", "dpop": mode, **extra}


def challenge(resp) -> str:
    return resp.headers.get("WWW-Authenticate") or ""


def assert_dpop_401(resp, error: "str | None") -> None:
    """401, the Kong body, and RFC 9449 §7.1's challenge: DPoP realm, error (or none), algs."""
    assert resp.status_code == 401, (resp.status_code, dict(resp.headers), resp.text)
    assert resp.content == kong_body(401, KONG_DENIED), resp.text
    assert (resp.headers.get("Content-Type") or "").split(";")[0] == "application/json", dict(resp.headers)
    www = challenge(resp)
    assert www.startswith("DPoP "), www
    assert 'realm="authz-sidecar"' in www, www
    if error:
        assert f'error="{error}"' in www, www
    else:
        assert "error=" not in www, www
    m = re.search(r'algs="([^"]*)"', www)
    assert m and set(m.group(1).split()) == set(ALGS), www


def seen(resp) -> dict:
    """The headers the echo upstream received (it answers them as JSON)."""
    return resp.json()["headers"]


class Edge:
    def __init__(self, name: str, port: int):
        self.name, self.port = name, port

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"


# ---------------------------------------------------------------------------------------------
# Fixtures
@pytest.fixture(scope="module")
def dpop_idp(idp) -> dict:
    return dpop_mode(idp, "on")


@pytest.fixture(scope="module")
def token(dpop_idp) -> DPoPToken:
    """The client's token for most tests (its key never gets a server nonce)."""
    return new_token(dpop_idp)


@pytest.fixture(scope="module")
def session(certs) -> requests.Session:
    """The client side: mTLS with client1 at the edge (every edge requires a certificate)."""
    return dc.make_session(str(certs / "ca.crt"), (str(certs / "client1.crt"), str(certs / "client1.key")))


@pytest.fixture(scope="module")
def client2_session(certs) -> requests.Session:
    return dc.make_session(str(certs / "ca.crt"), (str(certs / "client2.crt"), str(certs / "client2.key")))


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, dpop_idp):
    work = tmp_path_factory.mktemp("dpop-e2e-sidecar")
    grpc_port = stack.free_port()
    intro = {"name": INTRO_ISSUER, "validation": "introspection", "introspection": {
        "endpoint": dpop_idp["IDP_INTROSPECT_URL"], "client_id": dpop_idp["IDP_INTROSPECTION_CLIENT_ID"],
        "client_secret": dpop_idp["IDP_INTROSPECTION_CLIENT_SECRET"], "auth_method": "client_secret_basic",
        "ca_file": dpop_idp["IDP_CA"], "timeout_ms": 1500}}
    config = {
        "server": {"grpc_listen": f"127.0.0.1:{grpc_port}"},
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
        "issuers": [jwt_issuer(dpop_idp), intro],
        "policies": [
            dpop_policy("dpop-required", "/dpop-required/", "required"),
            dpop_policy("dpop-allowed", "/dpop-allowed/", "allowed"),
            dpop_policy("dpop-intro", "/dpop-intro/", "required", issuer=INTRO_ISSUER),
            dpop_policy("dpop-nonce", "/dpop-nonce/", "required", dpop_nonce=True),
            dpop_policy("dpop-cached", "/dpop-cached/", "allowed", proxy_cache_seconds=30),
            dpop_policy("dpop-mtls", "/dpop-mtls/", "allowed"),
        ],
    }
    sc = Sidecar(work, config, name="sidecar-dpop-e2e")
    sc.grpc_port = grpc_port
    try:
        stack.wait_port("127.0.0.1", grpc_port, timeout=20, proc=sc.proc)
    except (TimeoutError, RuntimeError) as e:
        sc.stop()
        pytest.fail(f"the sidecar does not listen on server.grpc_listen ({e})\n{tail(sc.log_path)}", pytrace=False)
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def nginx_edge(tmp_path_factory, certs, sidecar, echo):
    ng = Nginx(tmp_path_factory.mktemp("dpop-e2e-nginx"), certs, sidecar.port, echo.port)
    yield Edge("nginx", ng.port)
    ng.stop()


@pytest.fixture(scope="module")
def cached_nginx_edge(tmp_path_factory, certs, sidecar, echo):
    """deploy/nginx.conf with its opt-in decision cache switched on (test_nginx_decision_cache.py)."""
    work = tmp_path_factory.mktemp("dpop-e2e-nginx-cache")
    source = enabled_nginx_conf(work)
    original = stack.DEPLOY_NGINX_CONF
    stack.DEPLOY_NGINX_CONF = source
    try:
        ng = Nginx(work / "nginx", certs, sidecar.port, echo.port)
    finally:
        stack.DEPLOY_NGINX_CONF = original
    yield Edge("nginx-cache", ng.port)
    ng.stop()


@pytest.fixture(scope="module")
def envoy_http_edge(tmp_path_factory, certs, sidecar, envoy_bin, echo):
    e = Envoy(envoy_bin, tmp_path_factory.mktemp("dpop-e2e-envoy-http"), certs, upstream_port=echo.port,
              sidecar_port=sidecar.port, name="envoy-dpop-http")
    yield Edge("envoy-http", e.port)
    e.stop()


@pytest.fixture(scope="module")
def envoy_grpc_edge(tmp_path_factory, certs, sidecar, envoy_bin, echo):
    e = Envoy(envoy_bin, tmp_path_factory.mktemp("dpop-e2e-envoy-grpc"), certs, upstream_port=echo.port,
              sidecar_grpc_port=sidecar.grpc_port, source=DEPLOY_ENVOY_GRPC, name="envoy-dpop-grpc")
    yield Edge("envoy-grpc", e.port)
    e.stop()


def edge_for(request, proxy: str) -> Edge:
    return request.getfixturevalue(proxy.replace("-", "_") + "_edge")


# ---------------------------------------------------------------------------------------------
# The token
def test_glewlwyd_issues_a_dpop_bound_token(dpop_idp, token):
    claims = dc.jwt_payload(token.access_token)
    assert claims["cnf"] == {"jkt": jkt(token)}, claims
    assert claims["iss"] == dpop_idp["IDP_ISSUER"] and claims["scope"] == "system-access", claims
    assert dc.jwt_header(token.access_token)["typ"] == "at+jwt"


# ---------------------------------------------------------------------------------------------
# The real client, a fresh proof per request
@pytest.mark.parametrize("proxy", PROXIES)
def test_real_client_with_fresh_proofs_is_allowed(request, proxy, token, session, echo):
    edge = edge_for(request, proxy)
    proofs = []
    calls = [("GET", f"/dpop-required/items?page={i}") for i in range(3)] + [
        ("POST", "/dpop-required/items"), ("GET", "/dpop-allowed/items")]
    for method, path in calls:
        resp, before = dc.call(edge.url(path), token, session, method=method,
                               data="a=1" if method == "POST" else None)
        assert resp.status_code == 200, (proxy, method, path, resp.status_code, dict(resp.headers), resp.text)
        assert before == [], (proxy, path, [(r.status_code, dict(r.headers)) for r in before])
        up = seen(resp)
        assert up.get("x-credential-token-type") == "DPoP", (path, up)
        assert up.get("x-credential-jkt") == jkt(token), (path, up)
        assert up.get("x-credential-client-id") == "dpop-client", (path, up)
        assert up.get("authorization") == f"DPoP {token.access_token}", (path, up)
        assert "dpop-nonce" not in {k.lower() for k in resp.headers}, "nonces are off on these policies"
        proofs.append(dc.jwt_payload(up["dpop"]))
        assert echo.requests[-1]["method"] == method
    assert len({p["jti"] for p in proofs}) == len(calls), "each request carries a new proof"
    assert {p["htu"] for p in proofs[:4]} == {edge.url("/dpop-required/items")}, "htu without the query"
    assert [p["htm"] for p in proofs[:4]] == ["GET", "GET", "GET", "POST"]


@pytest.mark.parametrize("proxy", PROXIES)
def test_real_client_with_an_introspected_token(request, proxy, dpop_idp, session):
    """The same token kind, introspected at Glewlwyd (issuer validation: introspection): the first
    request (an introspection, the cache cold) and the next ones (cache hits) all pass."""
    edge = edge_for(request, proxy)
    tok = new_token(dpop_idp)             # never seen by the sidecar: the first request introspects
    for i in range(3):
        resp, before = dc.call(edge.url(f"/dpop-intro/items?i={i}"), tok, session)
        assert resp.status_code == 200, (proxy, i, resp.status_code, challenge(resp), resp.text)
        up = seen(resp)
        assert up.get("x-credential-token-type") == "DPoP" and up.get("x-credential-jkt") == jkt(tok), up


# ---------------------------------------------------------------------------------------------
# The token without its key
STEALS = {
    # case -> (dpop_client.py --steal, path, challenge scheme, error)
    "no-proof": ("no-proof", "/dpop-required/items", "DPoP", "invalid_dpop_proof"),
    "other-key": ("other-key", "/dpop-required/items", "DPoP", "invalid_token"),         # cnf.jkt mismatch
    "bearer-allowed": ("bearer", "/dpop-allowed/items", "Bearer", "invalid_token"),     # jkt-bound token as Bearer
    "bearer-required": ("bearer", "/dpop-required/items", "DPoP", None),                # dpop: required refuses Bearer
}


@pytest.mark.parametrize("steal", list(STEALS))
@pytest.mark.parametrize("proxy", PROXIES)
def test_stolen_token_is_refused(request, proxy, steal, token, session, echo):
    edge = edge_for(request, proxy)
    how, path, scheme, error = STEALS[steal]
    before = len(echo.requests)
    resp, _ = dc.call(edge.url(path), dc._Stolen(token.access_token, how), session)
    assert len(echo.requests) == before, "the upstream must not be called"
    if scheme == "DPoP":
        assert_dpop_401(resp, error)
    else:
        assert resp.status_code == 401, (resp.status_code, dict(resp.headers), resp.text)
        assert resp.content == kong_body(401, KONG_DENIED), resp.text
        www = challenge(resp)
        assert www.startswith("Bearer ") and 'error="invalid_token"' in www, www
    # the real client still gets in with the same token right after
    ok, _ = dc.call(edge.url(path), token, session)
    assert ok.status_code == 200, (ok.status_code, ok.text)


# ---------------------------------------------------------------------------------------------
# A replayed proof
@pytest.mark.parametrize("proxy", PROXIES)
def test_replayed_proof_is_refused(request, proxy, token, session, echo):
    edge = edge_for(request, proxy)
    url = edge.url("/dpop-required/replay")
    proof = str(token.dpop_key.proof(htm="GET", htu=url, ath=dc.ath_of(token.access_token)))
    headers = {"Authorization": f"DPoP {token.access_token}", "DPoP": proof}
    first = session.get(url + "?n=1", headers=headers, timeout=10)
    assert first.status_code == 200, (first.status_code, dict(first.headers), first.text)
    before = len(echo.requests)
    second = session.get(url + "?n=2", headers=headers, timeout=10)
    assert_dpop_401(second, "invalid_dpop_proof")
    assert len(echo.requests) == before


@pytest.mark.parametrize("proxy", PROXIES)
def test_two_proofs_are_refused(request, proxy, token, certs, echo):
    """Two valid proofs in two DPoP headers: nginx passes both headers, Envoy joins them into one
    value "a,b" (HTTP and gRPC alike); either way the sidecar refuses (RFC 9449 §4.3 step 1)."""
    edge = edge_for(request, proxy)
    url = edge.url("/dpop-required/two")
    proofs = [str(token.dpop_key.proof(htm="GET", htu=url, ath=dc.ath_of(token.access_token))) for _ in range(2)]
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(str(certs / "client1.crt"), str(certs / "client1.key"))
    conn = http.client.HTTPSConnection("localhost", edge.port, context=ctx, timeout=10)
    before = len(echo.requests)
    try:
        conn.putrequest("GET", "/dpop-required/two")
        conn.putheader("Authorization", f"DPoP {token.access_token}")
        for proof in proofs:
            conn.putheader("DPoP", proof)
        conn.endheaders()
        resp = conn.getresponse()
        status, www, body = resp.status, resp.getheader("WWW-Authenticate") or "", resp.read()
    finally:
        conn.close()
    assert status == 401 and body == kong_body(401, KONG_DENIED), (status, body)
    assert www.startswith("DPoP ") and 'error="invalid_dpop_proof"' in www, www
    assert len(echo.requests) == before


# ---------------------------------------------------------------------------------------------
# Server nonces: 401 use_dpop_nonce + DPoP-Nonce through the proxy; the client retries by itself
@pytest.mark.parametrize("proxy", PROXIES)
def test_server_nonce_is_answered_by_the_client(request, proxy, dpop_idp, session):
    edge = edge_for(request, proxy)
    tok = new_token(dpop_idp)             # a key that holds no nonce yet
    resp, before = dc.call(edge.url("/dpop-nonce/items"), tok, session)
    assert [r.status_code for r in before] == [401], (
        f"{proxy}: expected one use_dpop_nonce 401 answered by the client's retry; got before={[r.status_code for r in before]}, "
        f"final {resp.status_code} WWW-Authenticate={challenge(resp)!r} DPoP-Nonce={resp.headers.get('DPoP-Nonce')!r}")
    first = before[0]
    assert_dpop_401(first, "use_dpop_nonce")
    nonce = first.headers.get("DPoP-Nonce")
    assert nonce, f"{proxy}: no DPoP-Nonce on the use_dpop_nonce 401: {dict(first.headers)}"
    assert resp.status_code == 200, (resp.status_code, dict(resp.headers), resp.text)
    assert tok.dpop_key.rs_nonce == nonce
    up = seen(resp)
    assert dc.jwt_payload(up["dpop"]).get("nonce") == nonce
    assert up.get("x-credential-jkt") == jkt(tok)
    # the nonce stays good: the next request goes straight through
    again, before = dc.call(edge.url("/dpop-nonce/items?again=1"), tok, session)
    assert again.status_code == 200 and before == [], (again.status_code, again.text, [r.status_code for r in before])


@pytest.mark.parametrize("proxy", PROXIES)
def test_nonce_reaches_the_client_on_success(request, proxy, dpop_idp, session):
    """Every answer to a DPoP request carries the current DPoP-Nonce when nonces are on (RFC 9449
    §8.2): the allow too, through each proxy (Envoy gRPC: OkHttpResponse.response_headers_to_add)."""
    edge = edge_for(request, proxy)
    tok = new_token(dpop_idp)
    resp, before = dc.call(edge.url("/dpop-nonce/ok"), tok, session)
    assert resp.status_code == 200 and len(before) == 1, (
        f"{proxy}: final {resp.status_code} WWW-Authenticate={challenge(resp)!r} "
        f"DPoP-Nonce={resp.headers.get('DPoP-Nonce')!r}, retries {[r.status_code for r in before]}")
    assert resp.headers.get("DPoP-Nonce"), \
        f"{proxy}: the allow answer reached the client without DPoP-Nonce: {dict(resp.headers)}"


# ---------------------------------------------------------------------------------------------
# nginx's opt-in decision cache never answers a DPoP request
def test_nginx_cache_never_answers_a_replayed_proof(cached_nginx_edge, sidecar, dpop_idp, token, session, echo):
    edge = cached_nginx_edge

    def granted() -> float:
        return metric(sidecar.base, "authz_decisions_total", policy="dpop-cached", outcome="allow", reason="granted")

    # control: the cache is on (a Bearer token of the same client is answered by nginx the second time)
    r = requests.post(dpop_idp["IDP_TOKEN_URL"], data={"grant_type": "client_credentials", "scope": "system-access"},
                      auth=(dpop_idp["IDP_DPOP_CLIENT_ID"], dpop_idp["IDP_DPOP_CLIENT_SECRET"]),
                      verify=dpop_idp["IDP_CA"], timeout=10)
    assert r.status_code == 200 and r.json()["token_type"].lower() == "bearer", r.text
    bearer = r.json()["access_token"]
    ALL_TOKENS.add(bearer)
    url = edge.url("/dpop-cached/items")
    assert session.get(url, headers={"Authorization": f"Bearer {bearer}"}, timeout=10).status_code == 200
    asked = granted()
    for _ in range(3):
        assert session.get(url, headers={"Authorization": f"Bearer {bearer}"}, timeout=10).status_code == 200
    assert granted() == asked, "the Bearer repeats should come from nginx's cache (is the cache on?)"

    # fresh proofs: every one is decided by the sidecar
    for i in range(3):
        resp, _ = dc.call(url, token, session)
        assert resp.status_code == 200, (resp.status_code, resp.text)
        assert seen(resp).get("x-credential-jkt") == jkt(token)
    assert granted() == asked + 3, "a DPoP allow must never be served from nginx's cache"

    # the same proof twice: the second is refused, not replayed from the cache
    proof = str(token.dpop_key.proof(htm="GET", htu=url, ath=dc.ath_of(token.access_token)))
    headers = {"Authorization": f"DPoP {token.access_token}", "DPoP": proof}
    first = session.get(url, headers=headers, timeout=10)
    assert first.status_code == 200, (first.status_code, first.text)
    before = len(echo.requests)
    second = session.get(url, headers=headers, timeout=10)
    assert_dpop_401(second, "invalid_dpop_proof")
    assert len(echo.requests) == before


def test_sidecar_answers_dpop_allows_no_store(sidecar, token):
    """Straight to the sidecar, in nginx's form: a DPoP allow is Cache-Control: no-store even under
    proxy_cache_seconds, and htu is rebuilt from X-Forwarded-Proto + X-Original-Host + the path."""
    htu = "https://api.example.test:8443/dpop-cached/direct"
    proof = str(token.dpop_key.proof(htm="GET", htu=htu, ath=dc.ath_of(token.access_token)))
    resp = http_request(sidecar.base, "/authz", headers={
        "X-Original-Method": "GET", "X-Original-URI": "/dpop-cached/direct?q=1", "X-Original-Host": "API.example.test:8443",
        "X-Forwarded-Proto": "https", "Authorization": f"DPoP {token.access_token}", "DPoP": proof})
    assert resp.status == 200, resp
    assert resp.header("Cache-Control") == "no-store", resp
    assert resp.header("X-Credential-Jkt") == jkt(token), resp
    assert resp.header("X-Credential-Token-Type") == "DPoP", resp


# ---------------------------------------------------------------------------------------------
# A token bound to a certificate and to a key (Glewlwyd's mTLS client with a proof)
def test_certificate_and_key_bound_token_needs_both(nginx_edge, dpop_idp, certs, session, client2_session):
    tok = new_token(dpop_idp, mtls=True)
    cnf = dc.jwt_payload(tok.access_token)["cnf"]
    assert cnf == {"x5t#S256": stack.thumbprint(certs / "client1.crt"), "jkt": jkt(tok)}, cnf
    url = nginx_edge.url("/dpop-mtls/items")
    resp, _ = dc.call(url, tok, session)
    assert resp.status_code == 200, (resp.status_code, resp.text)
    assert seen(resp).get("x-credential-jkt") == jkt(tok)
    # client2's certificate with the right key's proofs: the certificate binding fails
    resp, _ = dc.call(url, tok, client2_session)
    assert resp.status_code == 401 and 'error="invalid_token"' in challenge(resp), (resp.status_code, dict(resp.headers))
    assert resp.content == kong_body(401, KONG_DENIED)
    # client1's certificate without a proof: the key binding fails
    resp, _ = dc.call(url, dc._Stolen(tok.access_token, "no-proof"), session)
    assert_dpop_401(resp, "invalid_dpop_proof")


# ---------------------------------------------------------------------------------------------
# scripts/dpop_client.py as the demo runs it
def test_dpop_client_cli_through_nginx(nginx_edge, dpop_idp, certs, tmp_path):
    state = tmp_path / "state.json"
    py = [sys.executable, str(REPO / "scripts" / "dpop_client.py")]
    run = subprocess.run(py + ["token", "--idp-env", str(Path(dpop_idp["IDP_WORKDIR"]) / "idp.env"), "--save", str(state)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    ALL_TOKENS.add(dc.load_state(state).access_token)
    tls = ["--cacert", str(certs / "ca.crt"), "--cert", str(certs / "client1.crt"), "--key", str(certs / "client1.key")]
    url = nginx_edge.url("/dpop-required/cli")
    run = subprocess.run(py + ["call", url, "--state", str(state), "--count", "2"] + tls,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("HTTP 200") == 2, run.stdout
    run = subprocess.run(py + ["call", url, "--state", str(state), "--steal", "other-key"] + tls,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "HTTP 401" in run.stdout and 'error="invalid_token"' in run.stdout, run.stdout


# ---------------------------------------------------------------------------------------------
def test_denials_are_counted_by_reason(sidecar, token):
    """Straight to the sidecar (nginx's form): each new reason of DESIGN.md §10 is one more
    authz_decisions_total{outcome="deny", reason=...}; the answers carry what the proxies copy."""
    def ask(path: str, authorization: str, proof: "str | None" = None):
        headers = {"X-Original-Method": "GET", "X-Original-URI": path, "X-Original-Host": "api.example.test",
                   "X-Forwarded-Proto": "https", "Authorization": authorization}
        if proof:
            headers["DPoP"] = proof
        return http_request(sidecar.base, "/authz", headers=headers)

    def count(reason: str) -> float:
        return metric(sidecar.base, "authz_decisions_total", outcome="deny", reason=reason)

    cases = {
        "dpop_proof": ("/dpop-required/m", f"DPoP {token.access_token}", None),
        "dpop_required": ("/dpop-required/m", f"Bearer {token.access_token}", None),
        "dpop_nonce": ("/dpop-nonce/m", f"DPoP {token.access_token}",
                       str(token.dpop_key.proof(htm="GET", htu="https://api.example.test/dpop-nonce/m",
                                                ath=dc.ath_of(token.access_token)))),
    }
    for reason, (path, authorization, proof) in cases.items():
        before = count(reason)
        resp = ask(path, authorization, proof)
        assert resp.status == 401, (reason, resp)
        assert resp.header("X-Authz-Body") == kong_body(401, KONG_DENIED).decode(), (reason, resp)
        assert (resp.header("WWW-Authenticate") or "").startswith("DPoP "), (reason, resp)
        assert count(reason) == before + 1, reason
        if reason == "dpop_nonce":
            assert 'error="use_dpop_nonce"' in resp.header("WWW-Authenticate") and resp.header("DPoP-Nonce"), resp
