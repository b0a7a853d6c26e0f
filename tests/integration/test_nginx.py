"""nginx (deploy/nginx.conf) -> authz-sidecar -> fake RFC 7662 AS, with mTLS client certificates.

Each test uses its own random tokens, so the sidecar's cache never carries one test into another.
"""
from __future__ import annotations

import re
import secrets
import subprocess
import time
import urllib.parse

import pytest

from conftest import (KONG_DENIED, KONG_UNAUTHENTICATED, KONG_UNAVAILABLE, SIDECAR_BIN, http_request,
                      kong_body, stack)

pytestmark = pytest.mark.nginx

CLIENT_ID = "system-client-mtls"
ISSUER = "https://as.example.test/realms/test"


def new_token() -> str:
    return "tok-" + secrets.token_urlsafe(24)


def claims(certs, *, scope="system-access", bound_to="client1", **extra) -> dict:
    now = int(time.time())
    c = {
        "active": True,
        "scope": scope,
        "client_id": CLIENT_ID,
        "token_type": "Bearer",
        "exp": now + 3600,
        "iat": now - 5,
        "sub": "svc-" + secrets.token_hex(4),
        "iss": ISSUER,
        "jti": "jti-" + secrets.token_hex(8),
    }
    if bound_to:
        c["cnf"] = {"x5t#S256": stack.thumbprint(certs / f"{bound_to}.crt")}
    c.update(extra)
    return c


def assert_kong(resp, status: int, message: str) -> None:
    assert resp.status == status, resp
    assert resp.body == kong_body(status, message), resp
    assert (resp.header("Content-Type") or "").split(";")[0].strip() == "application/json", resp


def upstream_headers(resp) -> dict:
    """The headers the echo upstream received (it answers them as JSON)."""
    return resp.json()["headers"]


# ------------------------------------------------------------------------------------- allow
def test_bound_token_with_its_certificate_is_allowed(edge, fake_as, echo, certs):
    c = claims(certs)
    token = fake_as.add_token(new_token(), c)
    before = len(echo.requests)
    resp = edge.request("/token-mtls/resource?x=1", token=token, cert="client1")
    assert resp.status == 200, resp
    assert len(echo.requests) == before + 1
    seen = echo.requests[-1]["headers"]
    assert seen == upstream_headers(resp)
    assert echo.requests[-1]["path"] == "/token-mtls/resource?x=1"
    assert seen["x-credential-scope"] == "system-access"
    assert seen["x-credential-client-id"] == CLIENT_ID
    assert seen["x-credential-token-type"] == "Bearer"
    assert seen["x-credential-exp"] == str(c["exp"])
    assert seen["x-credential-iat"] == str(c["iat"])
    assert seen["x-credential-sub"] == c["sub"]
    assert seen["x-credential-iss"] == ISSUER
    assert seen["x-credential-jti"] == c["jti"]
    assert "x-client-cert" not in seen          # the certificate header is for the sidecar only
    assert "x-authz-body" not in seen


def test_post_keeps_method_and_body_for_the_upstream(edge, fake_as, echo, certs):
    token = fake_as.add_token(new_token(), claims(certs))
    resp = edge.request("/token-mtls/items", token=token, method="POST", body=b'{"a":1}',
                        headers={"Content-Type": "application/json"})
    assert resp.status == 200, resp
    assert echo.requests[-1]["method"] == "POST"
    assert echo.requests[-1]["body_bytes"] == 7


def test_unbound_token_is_allowed_when_binding_not_required(edge, fake_as, certs):
    token = fake_as.add_token(new_token(), claims(certs, bound_to=None))
    resp = edge.request("/token-mtls/resource", token=token, cert="client2")
    assert resp.status == 200, resp
    assert upstream_headers(resp)["x-credential-scope"] == "system-access"


# ------------------------------------------------------------------------------------- deny
def test_bound_token_with_another_certificate_is_401(edge, fake_as, echo, certs):
    token = fake_as.add_token(new_token(), claims(certs, bound_to="client1"))
    before = len(echo.requests)
    resp = edge.request("/token-mtls/resource", token=token, cert="client2")
    assert_kong(resp, 401, KONG_DENIED)
    www = resp.header("WWW-Authenticate") or ""
    assert www.startswith("Bearer "), resp
    assert 'realm="authz-sidecar"' in www
    assert 'error="invalid_token"' in www
    assert len(echo.requests) == before, "the upstream must not be called on a denial"


def test_no_token_is_401_unauthenticated(edge, echo):
    before = len(echo.requests)
    resp = edge.request("/token-mtls/resource", token=None, cert="client1")
    assert_kong(resp, 401, KONG_UNAUTHENTICATED)
    assert resp.header("WWW-Authenticate") == 'Bearer realm="authz-sidecar"', resp
    assert len(echo.requests) == before


def test_token_without_the_route_scope_is_403(edge, fake_as, echo, certs):
    token = fake_as.add_token(new_token(), claims(certs, scope="system-access"))
    before = len(echo.requests)
    resp = edge.request("/admin-api/users", token=token, cert="client1")
    assert_kong(resp, 403, KONG_DENIED)
    www = resp.header("WWW-Authenticate") or ""
    assert 'error="insufficient_scope"' in www, resp
    assert 'scope="admin"' in www, resp
    assert len(echo.requests) == before


def test_inactive_token_is_401(edge, fake_as, certs):
    token = fake_as.add_token(new_token(), {"active": False})
    resp = edge.request("/token-mtls/resource", token=token)
    assert_kong(resp, 401, KONG_DENIED)
    assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or "")


def test_unknown_token_is_401(edge, fake_as):
    resp = edge.request("/token-mtls/resource", token=new_token())   # fake AS: {"active": false}
    assert_kong(resp, 401, KONG_DENIED)


def test_expired_token_is_401(edge, fake_as, certs):
    now = int(time.time())
    token = fake_as.add_token(new_token(), claims(certs, exp=now - 60, iat=now - 3600))
    resp = edge.request("/token-mtls/resource", token=token)
    assert_kong(resp, 401, KONG_DENIED)


def test_path_without_policy_is_403(edge, fake_as, echo, certs):
    token = fake_as.add_token(new_token(), claims(certs))
    before = len(echo.requests)
    resp = edge.request("/no-policy-here/x", token=token)
    assert resp.status == 403, resp
    assert resp.json()["error"]["code"] == 403, resp
    assert len(echo.requests) == before


def test_certificate_from_another_ca_never_reaches_the_sidecar(edge, fake_as, certs):
    token = fake_as.add_token(new_token(), claims(certs))
    resp = edge.request("/token-mtls/resource", token=token, cert="rogue")
    assert resp.status == 400, resp                  # nginx's own "SSL certificate error" page
    assert fake_as.calls[token] == 0


# ------------------------------------------------------------------------------------- trust boundary
def test_client_sent_identity_headers_never_reach_the_upstream(edge, fake_as, certs):
    c = claims(certs)
    token = fake_as.add_token(new_token(), c)
    forged_cert = "-----BEGIN%20CERTIFICATE-----%0Aforged%0A-----END%20CERTIFICATE-----%0A"
    resp = edge.request("/token-mtls/resource", token=token, cert="client1", headers={
        "X-Credential-Sub": "mallory",
        "X-Credential-Admin": "true",
        "X-Credential-Other": "1",
        "X-Client-Cert": forged_cert,
        "X-Forwarded-Client-Cert": "Hash=deadbeef",
        "X-Authz-Policy": "admin",
    })
    assert resp.status == 200, resp      # the forged X-Client-Cert did not replace the real one
    seen = upstream_headers(resp)
    assert seen["x-credential-sub"] == c["sub"]
    assert "x-credential-admin" not in seen
    assert "x-credential-other" not in seen
    assert "x-client-cert" not in seen
    assert "x-forwarded-client-cert" not in seen
    assert "x-authz-policy" not in seen
    assert [n for n, _ in resp.json()["raw_headers"] if n.lower() == "x-credential-sub"] == ["X-Credential-Sub"]


def test_forged_certificate_header_cannot_satisfy_the_binding(edge, fake_as, certs):
    """client2 connects but sends client1's certificate in X-Client-Cert: nginx overwrites it."""
    token = fake_as.add_token(new_token(), claims(certs, bound_to="client1"))
    pem = (certs / "client1.crt").read_text()
    resp = edge.request("/token-mtls/resource", token=token, cert="client2",
                        headers={"X-Client-Cert": urllib.parse.quote(pem, safe="")})
    assert_kong(resp, 401, KONG_DENIED)


# ------------------------------------------------------------------------------------- AS faults
@pytest.mark.parametrize("fault", ["down", "500", "slow", "garbage", "reset"])
def test_authorization_server_fault_is_503_never_200(edge, fake_as, echo, certs, fault):
    token = fake_as.add_token(new_token(), claims(certs))    # not cached yet
    before = len(echo.requests)
    try:
        if fault == "down":
            fake_as.stop()
        else:
            fake_as.mode = fault
        resp = edge.request("/token-mtls/resource", token=token)
    finally:
        fake_as.mode = "ok"
        if fault == "down":
            fake_as.start()
    assert resp.status != 200, resp
    assert_kong(resp, 503, KONG_UNAVAILABLE)
    assert resp.header("Retry-After"), resp
    assert len(echo.requests) == before
    # and once the AS is back the same token works (the fault was not cached as a denial)
    resp = edge.request("/token-mtls/resource", token=token)
    assert resp.status == 200, resp


def test_sidecar_itself_answers_503_with_retry_after_on_as_fault(sidecar, fake_as, certs):
    """Straight to the sidecar's /authz (what nginx turns into its 500 -> 503 page)."""
    token = fake_as.add_token(new_token(), claims(certs))
    fake_as.mode = "500"
    try:
        resp = http_request(sidecar.base, "/authz", headers={
            "Authorization": f"Bearer {token}", "X-Original-Method": "GET",
            "X-Original-URI": "/token-mtls/x", "X-Original-Host": "localhost"})
    finally:
        fake_as.mode = "ok"
    assert_kong(resp, 503, KONG_UNAVAILABLE)
    assert re.fullmatch(r"\d+", resp.header("Retry-After") or ""), resp


# ------------------------------------------------------------------------------------- cache
def test_twenty_requests_with_one_token_call_the_as_once(edge, fake_as, certs):
    token = fake_as.add_token(new_token(), claims(certs))
    statuses = [edge.request("/token-mtls/resource", token=token).status for _ in range(20)]
    assert statuses == [200] * 20
    assert fake_as.calls[token] == 1


def test_binding_is_checked_on_cache_hits(edge, fake_as, certs):
    token = fake_as.add_token(new_token(), claims(certs, bound_to="client1"))
    assert edge.request("/token-mtls/resource", token=token, cert="client1").status == 200
    assert_kong(edge.request("/token-mtls/resource", token=token, cert="client2"), 401, KONG_DENIED)
    assert edge.request("/token-mtls/resource", token=token, cert="client1").status == 200
    assert fake_as.calls[token] == 1
    assert fake_as.rejected_auth == 0, "the sidecar's client_secret_basic credentials were refused"


# ------------------------------------------------------------------------------------- sidecar basics
def test_health_and_metrics(sidecar):
    assert http_request(sidecar.base, "/healthz").status == 200
    assert http_request(sidecar.base, "/readyz").status == 200
    metrics = http_request(sidecar.base, "/metrics")
    assert metrics.status == 200
    assert b"# TYPE" in metrics.body


def test_thumbprint_command_matches_rfc8705(certs):
    out = subprocess.run([SIDECAR_BIN, "thumbprint", str(certs / "client1.crt")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == stack.thumbprint(certs / "client1.crt")


def test_check_config_accepts_the_suite_config_and_redacts_the_secret(sidecar):
    out = subprocess.run([SIDECAR_BIN, "check-config", "--config", str(sidecar.config_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fake-as-secret" not in out.stdout + out.stderr
