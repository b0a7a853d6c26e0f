"""Envoy (deploy/envoy-grpc.yaml, ext_authz gRPC mode: envoy.service.auth.v3.Authorization/Check)
-> authz-sidecar on server.grpc_listen -> fake RFC 7662 AS, with mTLS client certificates.

DESIGN.md §4: the same decision as HTTP mode; the certificate from attributes.source.certificate
(policies with certificate_header: null) or from the header the policy names; the policy also
selectable by attributes.context_extensions["policy"]; OK -> OkHttpResponse headers and
headers_to_remove; deny -> DeniedHttpResponse (status, JSON body, WWW-Authenticate); AS fault ->
the Check call fails with UNAVAILABLE, which Envoy turns into its status_on_error (503 JSON).

If the sidecar rejects or ignores server.grpc_listen, these tests fail (they are not skipped).
"""
from __future__ import annotations

import subprocess

import pytest

from conftest import (KONG_DENIED, KONG_UNAUTHENTICATED, KONG_UNAVAILABLE, SIDECAR_BIN, EdgeClient, Sidecar,
                      stack, tail, to_yaml)
import envoy_support
from envoy_support import (DEPLOY_ENVOY_GRPC, XFCC, Envoy, assert_kong, claims, client_xfcc, new_token, policy,
                           render_envoy_conf, sidecar_config, validate, xfcc_hash)

# fixtures shared by the Envoy suites (assigned here so that pytest registers them in this module)
envoy_as = envoy_support.envoy_as
envoy_bin = envoy_support.envoy_bin

GRPC_POLICIES = [
    # Listed first and matching /token-mtls/shadow/ by path, but deploy/envoy-grpc.yaml's
    # /token-mtls/ route names the policy "token-mtls" in its context extensions, which wins.
    policy("shadow", "/token-mtls/shadow/", ["never-granted"], certificate_header=None, certificate_format="auto"),
    # The peer certificate from the CheckRequest (attributes.source.certificate).
    policy("token-mtls", "/token-mtls/", ["system-access"], certificate_header=None, certificate_format="auto"),
    # The x-forwarded-client-cert header (Envoy sends every header in gRPC mode).
    policy("admin", "/admin-api/", ["admin"]),
    policy("xfcc", "/xfcc/", ["system-access"]),
    policy("read-only", "/read-only/", ["system-access"], methods=["GET"]),
]
GRPC_START_TIMEOUT = 20.0


class GrpcSidecar(Sidecar):
    """The sidecar with server.grpc_listen on a free loopback port, waited for like /healthz."""

    def __init__(self, workdir, as_url: str, name: str = "sidecar-envoy-grpc"):
        self.grpc_port = stack.free_port()
        super().__init__(workdir, sidecar_config(as_url, GRPC_POLICIES,
                                                 server={"grpc_listen": f"127.0.0.1:{self.grpc_port}"}), name=name)
        try:
            stack.wait_port("127.0.0.1", self.grpc_port, timeout=GRPC_START_TIMEOUT, proc=self.proc)
        except (TimeoutError, RuntimeError) as e:
            self.stop()
            pytest.fail(f"authz-sidecar started but does not listen on server.grpc_listen "
                        f"127.0.0.1:{self.grpc_port} ({e}): the gRPC ext_authz server (DESIGN.md §3, §4) is "
                        f"missing or ignores the key.\nconfig:\n{self.config_path.read_text()}\n"
                        f"log:\n{tail(self.log_path)}", pytrace=False)


@pytest.fixture(scope="module")
def grpc_sidecar(tmp_path_factory, envoy_as):
    sc = GrpcSidecar(tmp_path_factory.mktemp("sidecar-grpc"), envoy_as.url)
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def envoy(tmp_path_factory, envoy_bin, certs, grpc_sidecar, echo):
    e = Envoy(envoy_bin, tmp_path_factory.mktemp("envoy-grpc"), certs, upstream_port=echo.port,
              sidecar_grpc_port=grpc_sidecar.grpc_port, source=DEPLOY_ENVOY_GRPC, name="envoy-grpc")
    yield e
    e.stop()


@pytest.fixture(scope="module")
def edge(envoy, certs) -> EdgeClient:
    return EdgeClient(envoy.port, certs)


def seen_by_upstream(resp) -> dict:
    return resp.json()["headers"]


# ------------------------------------------------------------------------------------- the deploy file
def test_deploy_envoy_grpc_yaml_validates(envoy_bin, certs, tmp_path):
    conf = render_envoy_conf(tmp_path, {"listen": 1, "admin": 2, "sidecar_grpc": 3, "upstream": 4}, certs,
                             source=DEPLOY_ENVOY_GRPC)
    out = validate(envoy_bin, conf)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"configuration '{conf}' OK" in out.stdout + out.stderr
    assert "deprecated" not in (out.stdout + out.stderr).lower()


def test_deploy_envoy_grpc_yaml_keeps_its_contract():
    text = DEPLOY_ENVOY_GRPC.read_text()
    for needle in ["require_client_certificate: true", "forward_client_cert_details: SANITIZE_SET",
                   "envoy_grpc: { cluster_name: authz_sidecar_grpc }", "transport_api_version: V3",
                   "include_peer_certificate: true", "status_on_error: { code: ServiceUnavailable }",
                   "http2_protocol_options: {}", "context_extensions: { policy: token-mtls }",
                   "remove_on_match: { key_matcher: { prefix: x-credential- } }",
                   '{"data":[],"error":{"code":503,"message":"Authorization server unavailable."}}']:
        assert needle in text, needle
    assert text.index("strip-client-identity-headers") < text.index("- name: envoy.filters.http.ext_authz")


def test_check_config_accepts_grpc_listen(tmp_path, envoy_as):
    conf = tmp_path / "grpc.yaml"
    conf.write_text(to_yaml(sidecar_config(envoy_as.url, GRPC_POLICIES,
                                           server={"listen": "127.0.0.1:9191", "grpc_listen": "127.0.0.1:9192"})))
    out = subprocess.run([SIDECAR_BIN, "check-config", "--config", str(conf)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "127.0.0.1:9192" in out.stdout, out.stdout


def test_sidecar_listens_on_grpc_listen(grpc_sidecar):
    assert stack.port_open("127.0.0.1", grpc_sidecar.grpc_port)


# ------------------------------------------------------------------------------------- allow
def test_bound_token_with_its_peer_certificate_is_allowed(edge, envoy_as, echo, certs):
    c = claims(certs)
    token = envoy_as.add_token(new_token(), c)
    before = len(echo.requests)
    resp = edge.request("/token-mtls/resource?x=1&y=a%20b", token=token, cert="client1")
    assert resp.status == 200, resp
    assert len(echo.requests) == before + 1
    assert echo.requests[-1]["path"] == "/token-mtls/resource?x=1&y=a%20b"
    seen = seen_by_upstream(resp)
    assert seen["x-credential-scope"] == "system-access"
    assert seen["x-credential-sub"] == c["sub"]
    assert seen["x-credential-client-id"] == c["client_id"]
    assert seen["x-credential-exp"] == str(c["exp"])
    assert len([n for n, _ in resp.json()["raw_headers"] if n.lower() == "x-credential-sub"]) == 1, resp


def test_route_context_extension_selects_the_policy(edge, envoy_as, certs):
    """By path the first policy would be "shadow" (scope never-granted); the route says token-mtls."""
    token = envoy_as.add_token(new_token(), claims(certs))
    resp = edge.request("/token-mtls/shadow/x", token=token, cert="client1")
    assert resp.status == 200, resp


def test_policy_reading_xfcc_over_grpc(edge, envoy_as, certs):
    token = envoy_as.add_token(new_token(), claims(certs, bound_to="client1"))
    assert edge.request("/xfcc/resource", token=token, cert="client1").status == 200
    assert_kong(edge.request("/xfcc/resource", token=token, cert="client2"), 401, KONG_DENIED)
    # a forged XFCC is replaced by Envoy (SANITIZE_SET) before the Check call
    resp = edge.request("/xfcc/resource", token=token, cert="client2",
                        headers={"X-Forwarded-Client-Cert": client_xfcc(certs, "client1")})
    assert_kong(resp, 401, KONG_DENIED)


# ------------------------------------------------------------------------------------- deny
def test_bound_token_with_another_peer_certificate_is_401(edge, envoy_as, echo, certs):
    token = envoy_as.add_token(new_token(), claims(certs, bound_to="client1"))
    before = len(echo.requests)
    resp = edge.request("/token-mtls/resource", token=token, cert="client2")
    assert_kong(resp, 401, KONG_DENIED)
    www = resp.header("WWW-Authenticate") or ""
    assert 'realm="authz-sidecar"' in www and 'error="invalid_token"' in www, resp
    assert len(echo.requests) == before


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
    assert 'error="insufficient_scope"' in www and 'scope="admin"' in www, resp
    assert len(echo.requests) == before


def test_policy_limited_to_get_refuses_a_post(edge, envoy_as, echo, certs):
    token = envoy_as.add_token(new_token(), claims(certs))
    assert edge.request("/read-only/report", token=token).status == 200
    before = len(echo.requests)
    resp = edge.request("/read-only/report", token=token, method="POST", body=b'{"a":1}',
                        headers={"Content-Type": "application/json"})
    assert resp.status == 403, resp
    assert resp.json()["error"]["code"] == 403, resp
    assert len(echo.requests) == before


def test_post_with_a_body_is_authorized_and_forwarded(edge, envoy_as, echo, certs):
    token = envoy_as.add_token(new_token(), claims(certs))
    resp = edge.request("/token-mtls/items", token=token, method="POST", body=b'{"a":1}',
                        headers={"Content-Type": "application/json"})

    assert resp.status == 200, resp
    assert echo.requests[-1]["method"] == "POST" and echo.requests[-1]["body_bytes"] == 7


# ------------------------------------------------------------------------------------- trust boundary
def test_client_sent_identity_headers_never_reach_the_upstream(edge, envoy_as, certs):
    c = claims(certs)
    token = envoy_as.add_token(new_token(), c)
    resp = edge.request("/token-mtls/resource", token=token, cert="client1", headers={
        "X-Credential-Sub": "mallory", "X-Credential-Admin": "true", "X-Credential-Username": "root",
        "X-Anonymous": "true", "X-Authz-Policy": "admin", "x_credential_admin": "true",
        "X-Forwarded-Client-Cert": client_xfcc(certs, "client2")})
    assert resp.status == 200, resp
    seen = seen_by_upstream(resp)
    assert seen["x-credential-sub"] == c["sub"]
    for name in ("x-credential-admin", "x-credential-username", "x-anonymous", "x-authz-policy",
                 "x_credential_admin"):
        assert name not in seen, (name, seen)
    assert seen[XFCC].count("Hash=") == 1 and seen[XFCC].startswith(f"Hash={xfcc_hash(certs, 'client1')};")


def test_without_the_header_mutation_filter_headers_to_remove_still_clear_owned_names(
        tmp_path, envoy_bin, certs, echo, grpc_sidecar, envoy_as):
    """An Envoy without the strip filter: OkHttpResponse.headers_to_remove is the fallback."""
    e = Envoy(envoy_bin, tmp_path, certs, upstream_port=echo.port, sidecar_grpc_port=grpc_sidecar.grpc_port,
              source=DEPLOY_ENVOY_GRPC, name="envoy-grpc-no-mutation", without_header_mutation=True)
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


# ------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("fault", ["down", "500", "slow", "garbage"])
def test_authorization_server_fault_is_503_json_at_the_client(edge, envoy, envoy_as, echo, certs, fault):
    token = envoy_as.add_token(new_token(), claims(certs))
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
    assert len(echo.requests) == before
    assert envoy.stats().get("http.ingress.ext_authz.error", 0) == errors + 1, "not a gRPC error (a denial?)"
    assert edge.request("/token-mtls/resource", token=token).status == 200


def test_grpc_sidecar_down_is_503_json_at_the_client(tmp_path, envoy_bin, certs, echo):
    e = Envoy(envoy_bin, tmp_path, certs, upstream_port=echo.port, sidecar_grpc_port=stack.free_port(),
              source=DEPLOY_ENVOY_GRPC, name="envoy-grpc-no-sidecar")
    try:
        resp = EdgeClient(e.port, certs).request("/token-mtls/resource", token=new_token())
    finally:
        e.stop()
    assert_kong(resp, 503, KONG_UNAVAILABLE)
