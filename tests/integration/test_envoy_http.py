"""Envoy (deploy/envoy.yaml, ext_authz HTTP mode) -> authz-sidecar -> fake RFC 7662 AS, with mTLS
client certificates from scripts/mkcerts.sh and the echo upstream.

The sidecar's policies read the certificate from x-forwarded-client-cert (certificate_format xfcc),
which Envoy sets from the TLS session (SANITIZE_SET). Each test uses its own random tokens, so the
sidecar's cache never carries one test into another.
"""
from __future__ import annotations

import pytest

from conftest import (KONG_DENIED, KONG_UNAUTHENTICATED, KONG_UNAVAILABLE, EdgeClient, Sidecar, http_request,
                      kong_body, stack)
import envoy_support
from envoy_support import (CLIENT_ID, DEPLOY_ENVOY, ISSUER, XFCC, Envoy, assert_kong, claims, client_xfcc,
                           curl, envoy_version, new_token, policy, render_envoy_conf, sidecar_config,
                           validate, xfcc_hash)

# fixtures shared by the Envoy suites (assigned here so that pytest registers them in this module)
envoy_as = envoy_support.envoy_as
envoy_bin = envoy_support.envoy_bin

POLICIES = [
    policy("token-mtls", "/token-mtls/", ["system-access"]),
    policy("admin", "/admin-api/", ["admin"]),
    policy("read-only", "/read-only/", ["system-access"], methods=["GET"]),
]
# X-Credential-* names the sidecar owns (DESIGN.md §6; no forward_claims here).
OWNED = ["x-credential-scope", "x-credential-client-id", "x-credential-username", "x-credential-token-type",
         "x-credential-exp", "x-credential-iat", "x-credential-nbf", "x-credential-sub", "x-credential-aud",
         "x-credential-iss", "x-credential-jti"]


@pytest.fixture(scope="module")
def envoy_sidecar(tmp_path_factory, envoy_as):
    sc = Sidecar(tmp_path_factory.mktemp("sidecar-envoy"), sidecar_config(envoy_as.url, POLICIES),
                 name="sidecar-envoy-http")
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def envoy(tmp_path_factory, envoy_bin, certs, envoy_sidecar, echo):
    e = Envoy(envoy_bin, tmp_path_factory.mktemp("envoy-http"), certs, upstream_port=echo.port,
              sidecar_port=envoy_sidecar.port, name="envoy-http")
    yield e
    e.stop()


@pytest.fixture(scope="module")
def edge(envoy, certs) -> EdgeClient:
    return EdgeClient(envoy.port, certs)


def seen_by_upstream(resp) -> dict:
    """The headers the echo upstream received (it answers them as JSON)."""
    return resp.json()["headers"]


# ------------------------------------------------------------------------------------- the deploy file
def test_deploy_envoy_yaml_validates(envoy_bin, certs, tmp_path):
    conf = render_envoy_conf(tmp_path, {"listen": 1, "admin": 2, "sidecar": 3, "upstream": 4}, certs)
    out = validate(envoy_bin, conf)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"configuration '{conf}' OK" in out.stdout + out.stderr
    assert "deprecated" not in (out.stdout + out.stderr).lower()
    major, minor = (int(x) for x in envoy_version(envoy_bin).split("/")[1].split(".")[:2])
    assert (major, minor) >= (1, 40), envoy_version(envoy_bin)


def test_deploy_envoy_yaml_keeps_its_contract():
    text = DEPLOY_ENVOY.read_text()
    for needle in ["require_client_certificate: true", 'alpn_protocols: ["h2", "http/1.1"]',
                   "forward_client_cert_details: SANITIZE_SET", "path_prefix: /authz",
                   "status_on_error: { code: ServiceUnavailable }", "failure_mode_allow: false",
                   "{ exact: x-forwarded-client-cert, ignore_case: true }", "{ prefix: x-credential-, ignore_case: true }",
                   "remove_on_match: { key_matcher: { prefix: x-credential- } }", "timeout: 2s",
                   '{"data":[],"error":{"code":503,"message":"Authorization server unavailable."}}']:
        assert needle in text, needle
    config = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "authorization_request:" not in config, "the deprecated nested allowed_headers is back"
    assert text.index("strip-client-identity-headers") < text.index("envoy.filters.http.ext_authz"), \
        "the header_mutation filter must run before ext_authz"


# ------------------------------------------------------------------------------------- allow
def test_bound_token_with_its_certificate_is_allowed(edge, envoy_as, echo, certs):
    c = claims(certs)
    token = envoy_as.add_token(new_token(), c)
    before = len(echo.requests)
    resp = edge.request("/token-mtls/resource?x=1&y=a%20b", token=token, cert="client1")
    assert resp.status == 200, resp
    assert len(echo.requests) == before + 1
    assert echo.requests[-1]["path"] == "/token-mtls/resource?x=1&y=a%20b"
    seen = seen_by_upstream(resp)
    assert seen["x-credential-scope"] == "system-access"
    assert seen["x-credential-client-id"] == CLIENT_ID
    assert seen["x-credential-sub"] == c["sub"]
    assert seen["x-credential-token-type"] == "Bearer"
    assert seen["x-credential-exp"] == str(c["exp"])
    assert seen["x-credential-iat"] == str(c["iat"])
    assert seen["x-credential-iss"] == ISSUER
    assert seen["x-credential-jti"] == c["jti"]
    for absent in ("x-credential-username", "x-credential-aud", "x-credential-nbf"):
        assert absent not in seen, seen
    assert seen["authorization"] == f"Bearer {token}"          # hide_credentials is off
    assert "x-envoy-auth-headers-to-remove" not in seen
    assert seen[XFCC].startswith(f"Hash={xfcc_hash(certs, 'client1')};"), seen[XFCC]


def test_http2_client_is_served_the_same(envoy, envoy_as, certs):
    token = envoy_as.add_token(new_token(), claims(certs))
    status, version, body = curl(envoy.port, certs, "/token-mtls/h2", token=token, http2=True)
    assert (status, version) == (200, "2"), body
    status, version, body = curl(envoy.port, certs, "/token-mtls/h2", token=token, cert="client2", http2=True)
    assert (status, version) == (401, "2")
    assert body == kong_body(401, KONG_DENIED)


def test_unbound_token_is_allowed_from_any_client_certificate(edge, envoy_as, certs):
    token = envoy_as.add_token(new_token(), claims(certs, bound_to=None))
    resp = edge.request("/token-mtls/resource", token=token, cert="client2")
    assert resp.status == 200, resp


# ------------------------------------------------------------------------------------- deny
def test_bound_token_with_another_certificate_is_401(edge, envoy, envoy_as, echo, certs):
    token = envoy_as.add_token(new_token(), claims(certs, bound_to="client1"))
    before = len(echo.requests)
    resp = edge.request("/token-mtls/resource", token=token, cert="client2")
    assert_kong(resp, 401, KONG_DENIED)
    www = resp.header("WWW-Authenticate") or ""
    assert www.startswith("Bearer "), resp
    assert 'realm="authz-sidecar"' in www, resp
    assert 'error="invalid_token"' in www, resp
    assert len(echo.requests) == before, "the upstream must not be called on a denial"
    assert resp.header("X-Authz-Body") is None, "only allow-listed sidecar headers reach the client"


def test_no_token_is_401_unauthenticated(edge, echo):
    before = len(echo.requests)
    resp = edge.request("/token-mtls/resource", token=None, cert="client1")
    assert_kong(resp, 401, KONG_UNAUTHENTICATED)
    assert resp.header("WWW-Authenticate") == 'Bearer realm="authz-sidecar"', resp
    assert len(echo.requests) == before


def test_token_without_the_route_scope_is_403(edge, envoy_as, echo, certs):
    token = envoy_as.add_token(new_token(), claims(certs, scope="system-access"))
    before = len(echo.requests)
    resp = edge.request("/admin-api/users", token=token, cert="client1")
    assert_kong(resp, 403, KONG_DENIED)
    www = resp.header("WWW-Authenticate") or ""
    assert 'error="insufficient_scope"' in www, resp
    assert 'scope="admin"' in www, resp
    assert len(echo.requests) == before


@pytest.mark.parametrize("answer", ["inactive", "unknown", "expired"])
def test_token_that_is_not_active_is_401(edge, envoy_as, certs, answer):
    token = new_token()
    if answer == "inactive":
        envoy_as.add_token(token, {"active": False})
    elif answer == "expired":
        c = claims(certs)
        envoy_as.add_token(token, {**c, "exp": c["iat"] - 60, "iat": c["iat"] - 3600})
    resp = edge.request("/token-mtls/resource", token=token)
    assert_kong(resp, 401, KONG_DENIED)
    assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or "")


def test_path_without_policy_is_403(edge, envoy_as, echo, certs):
    token = envoy_as.add_token(new_token(), claims(certs))
    before = len(echo.requests)
    resp = edge.request("/no-policy-here/x", token=token)
    assert resp.status == 403, resp
    assert resp.json()["error"]["code"] == 403, resp
    assert len(echo.requests) == before


@pytest.mark.parametrize("cert", [None, "rogue"])
def test_client_without_a_trusted_certificate_fails_the_handshake(edge, envoy_as, certs, cert):
    token = envoy_as.add_token(new_token(), claims(certs))
    with pytest.raises(OSError):          # ssl.SSLError / connection reset: no HTTP answer at all
        edge.request("/token-mtls/resource", token=token, cert=cert)
    assert envoy_as.calls[token] == 0


# ------------------------------------------------------------------------------------- methods and bodies
def test_post_with_a_body_is_authorized_and_forwarded(edge, envoy_as, echo, certs):
    token = envoy_as.add_token(new_token(), claims(certs))
    resp = edge.request("/token-mtls/items", token=token, method="POST", body=b'{"a":1}',
                        headers={"Content-Type": "application/json"})
    assert resp.status == 200, resp
    assert echo.requests[-1]["method"] == "POST"
    assert echo.requests[-1]["body_bytes"] == 7


def test_policy_limited_to_get_refuses_a_post(edge, envoy_as, echo, certs):
    token = envoy_as.add_token(new_token(), claims(certs))
    assert edge.request("/read-only/report", token=token).status == 200
    before = len(echo.requests)
    resp = edge.request("/read-only/report", token=token, method="POST", body=b'{"a":1}',
                        headers={"Content-Type": "application/json"})
    assert resp.status == 403, resp       # no policy matches POST /read-only/ -> 403 (DESIGN.md §3)
    assert resp.json()["error"]["code"] == 403, resp
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp
    assert len(echo.requests) == before


# ------------------------------------------------------------------------------------- trust boundary
def test_client_sent_identity_headers_never_reach_the_upstream(edge, envoy_as, certs):
    c = claims(certs)
    token = envoy_as.add_token(new_token(), c)
    resp = edge.request("/token-mtls/resource", token=token, cert="client1", headers={
        "X-Credential-Sub": "mallory",
        "X-Credential-Admin": "true",
        "X-Credential-Other": "1",
        "X-Credential-Username": "root",
        "x_credential_admin": "true",
        "X-Anonymous": "true",
        "X-Authz-Policy": "admin",
        "X-Forwarded-Client-Cert": client_xfcc(certs, "client2"),
    })
    assert resp.status == 200, resp
    seen = seen_by_upstream(resp)
    assert seen["x-credential-sub"] == c["sub"]
    for name in ("x-credential-admin", "x-credential-other", "x-credential-username", "x_credential_admin",
                 "x-anonymous", "x-authz-policy"):
        assert name not in seen, (name, seen)
    assert len([n for n, _ in resp.json()["raw_headers"] if n.lower() == "x-credential-sub"]) == 1, resp
    # SANITIZE_SET: one element, the real certificate's
    assert seen[XFCC].count("Hash=") == 1, seen[XFCC]
    assert seen[XFCC].startswith(f"Hash={xfcc_hash(certs, 'client1')};"), seen[XFCC]


def test_forged_xfcc_cannot_satisfy_the_binding(edge, envoy_as, certs):
    """client2 connects but sends client1's certificate in X-Forwarded-Client-Cert."""
    token = envoy_as.add_token(new_token(), claims(certs, bound_to="client1"))
    resp = edge.request("/token-mtls/resource", token=token, cert="client2",
                        headers={"X-Forwarded-Client-Cert": client_xfcc(certs, "client1")})

    assert_kong(resp, 401, KONG_DENIED)


@pytest.mark.parametrize("path,checked", [
    ("/token-mtls/../admin-api/users", "/admin-api/users"),
    ("/token-mtls/./../admin-api/users", "/admin-api/users"),
    ("/token-mtls/%2e%2e/admin-api/users", "/admin-api/users"),
    ("/token-mtls//..//admin-api/users", "/token-mtls/admin-api/users"),   # ".." eats the empty segment
])
def test_the_sidecar_checks_the_path_the_upstream_gets(edge, envoy_as, echo, certs, path, checked):
    """normalize_path + merge_slashes run before ext_authz: /token-mtls/.. must not open /admin-api/."""
    token = envoy_as.add_token(new_token(), claims(certs, scope="system-access"))
    before = len(echo.requests)
    resp = edge.request(path, token=token)
    if checked.startswith("/admin-api/"):
        assert resp.status == 403, resp
        assert 'error="insufficient_scope"' in (resp.header("WWW-Authenticate") or ""), resp
        assert len(echo.requests) == before
    else:
        assert resp.status == 200, resp
        assert echo.requests[-1]["path"] == checked


def test_escaped_slash_is_refused_at_the_edge(edge, envoy_as, echo, certs):
    token = envoy_as.add_token(new_token(), claims(certs, scope="system-access"))
    before = len(echo.requests)
    resp = edge.request("/token-mtls/..%2Fadmin-api/users", token=token)
    assert resp.status == 400, resp
    assert envoy_as.calls[token] == 0
    assert len(echo.requests) == before


def test_binding_is_checked_on_cache_hits(edge, envoy_as, certs):
    token = envoy_as.add_token(new_token(), claims(certs, bound_to="client1"))
    assert edge.request("/token-mtls/resource", token=token, cert="client1").status == 200
    assert_kong(edge.request("/token-mtls/resource", token=token, cert="client2"), 401, KONG_DENIED)
    assert edge.request("/token-mtls/resource", token=token, cert="client1").status == 200
    assert envoy_as.calls[token] == 1
    assert envoy_as.rejected_auth == 0, "the sidecar's client_secret_basic credentials were refused"


# ------------------------------------------------------------------------------------- AS faults
@pytest.mark.parametrize("fault", ["down", "500", "slow", "garbage", "reset"])
def test_authorization_server_fault_is_503_json_at_the_client(edge, envoy, envoy_as, echo, certs, fault):
    token = envoy_as.add_token(new_token(), claims(certs))    # not cached yet
    before = len(echo.requests)
    errors = envoy.stats().get("http.ingress.ext_authz.error", 0)
    try:
        if fault == "down":
            envoy_as.stop()
        else:
            envoy_as.mode = fault
        resp = edge.request("/token-mtls/resource", token=token)
    finally:
        envoy_as.mode = "ok"
        if fault == "down":
            envoy_as.start()
    assert_kong(resp, 503, KONG_UNAVAILABLE)
    assert resp.header("Retry-After"), resp
    assert resp.header("WWW-Authenticate") is None, resp
    assert len(echo.requests) == before
    # Envoy counted it as an ext_authz error (status_on_error), not as a denial
    assert envoy.stats().get("http.ingress.ext_authz.error", 0) == errors + 1
    # once the AS is back the same token works (the fault was not cached as a denial)
    resp = edge.request("/token-mtls/resource", token=token)
    assert resp.status == 200, resp


def test_sidecar_down_is_503_json_at_the_client(tmp_path, envoy_bin, certs, echo):
    dead = stack.free_port()                 # nothing listens there
    e = Envoy(envoy_bin, tmp_path, certs, upstream_port=echo.port, sidecar_port=dead, name="envoy-no-sidecar")
    try:
        resp = EdgeClient(e.port, certs).request("/token-mtls/resource", token=new_token())
    finally:
        e.stop()
    assert_kong(resp, 503, KONG_UNAVAILABLE)
    assert resp.header("Retry-After") == "5", resp


def test_upstream_503_is_not_rewritten(edge, envoy_as, certs, tmp_path, envoy_bin, envoy_sidecar):
    """The local-reply mapper only touches ext_authz errors (flag UAEX), not the API's own 503."""
    dead_upstream = stack.free_port()
    e = Envoy(envoy_bin, tmp_path, certs, upstream_port=dead_upstream, sidecar_port=envoy_sidecar.port,
              name="envoy-no-upstream")
    token = envoy_as.add_token(new_token(), claims(certs))
    try:
        resp = EdgeClient(e.port, certs).request("/token-mtls/resource", token=token)
    finally:
        e.stop()
    assert resp.status == 503, resp
    assert b"Authorization server unavailable" not in resp.body, resp


# ------------------------------------------------------------------------------------- the sidecar's Envoy endpoint
def test_sidecar_envoy_endpoint_allows_with_exactly_200_and_lists_headers_to_remove(envoy_sidecar, envoy_as, certs):
    """Straight to the sidecar, as Envoy calls it: any method on /authz/<path>, XFCC, Authorization."""
    token = envoy_as.add_token(new_token(), claims(certs))
    for method in ("GET", "POST", "DELETE"):
        resp = http_request(envoy_sidecar.base, "/authz/token-mtls/x?y=a%20b", method=method, headers={
            "Host": "localhost:8443", "Authorization": f"Bearer {token}", XFCC: client_xfcc(certs, "client1"),
            "Content-Length": "0"})
        assert resp.status == 200, (method, resp)
        assert resp.body == b"", resp
        assert resp.header("X-Credential-Scope") == "system-access", resp
        remove = {h.strip().lower() for h in (resp.header("x-envoy-auth-headers-to-remove") or "").split(",") if h.strip()}
        sent = {k.lower() for k in resp.headers.keys() if k.lower().startswith("x-credential-")}
        assert {"x-credential-username", "x-credential-aud", "x-credential-nbf"} <= remove, resp
        assert not (remove & sent), resp
        assert set(OWNED) <= remove | sent, resp


def test_sidecar_envoy_endpoint_denies_a_certificate_mismatch(envoy_sidecar, envoy_as, certs):
    token = envoy_as.add_token(new_token(), claims(certs, bound_to="client1"))
    resp = http_request(envoy_sidecar.base, "/authz/token-mtls/x", headers={
        "Host": "localhost:8443", "Authorization": f"Bearer {token}", XFCC: client_xfcc(certs, "client2")})
    assert_kong(resp, 401, KONG_DENIED)
    assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or "")


def test_without_the_header_mutation_filter_headers_to_remove_still_clear_owned_names(
        tmp_path, envoy_bin, certs, echo, envoy_sidecar, envoy_as):
    """Gloo / Istio style Envoy without the strip filter: the sidecar's x-envoy-auth-headers-to-remove
    is the fallback for the x-credential-* names it owns (DESIGN.md §6, §7)."""
    e = Envoy(envoy_bin, tmp_path, certs, upstream_port=echo.port, sidecar_port=envoy_sidecar.port,
              name="envoy-no-mutation", without_header_mutation=True)
    c = claims(certs)
    token = envoy_as.add_token(new_token(), c)
    try:
        resp = EdgeClient(e.port, certs).request("/token-mtls/resource", token=token, headers={
            "X-Credential-Sub": "mallory", "X-Credential-Username": "root", "X-Credential-Aud": "admin-api",
            "X-Credential-Nbf": "1"})
    finally:
        e.stop()
    assert resp.status == 200, resp
    seen = seen_by_upstream(resp)
    assert seen["x-credential-sub"] == c["sub"]
    for name in ("x-credential-username", "x-credential-aud", "x-credential-nbf"):
        assert name not in seen, (name, seen)
