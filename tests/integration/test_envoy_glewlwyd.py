"""End to end through Envoy (deploy/envoy.yaml, ext_authz HTTP mode) with a real authorization
server: Glewlwyd issues a client_credentials token bound to client1's certificate (RFC 8705), and
the sidecar introspects it over HTTPS and checks the binding against Envoy's x-forwarded-client-cert.

Reuses the Glewlwyd fixtures of test_glewlwyd_e2e.py (scripts/idp-glewlwyd.sh, same mkcerts PKI).
"""
from __future__ import annotations

import pytest

from conftest import KONG_DENIED, EdgeClient, Sidecar, kong_body
import envoy_support
from envoy_support import Envoy, assert_kong, policy
import test_glewlwyd_e2e as glewlwyd_e2e

# fixtures shared by the Envoy suites (assigned here so that pytest registers them in this module)
envoy_bin = envoy_support.envoy_bin
idp = glewlwyd_e2e.idp              # Glewlwyd on loopback (scripts/idp-glewlwyd.sh)
idp_token = glewlwyd_e2e.idp_token  # a client_credentials token bound to client1

pytestmark = pytest.mark.glewlwyd


@pytest.fixture(scope="module")
def envoy_e2e_edge(tmp_path_factory, certs, idp, envoy_bin, echo):
    config = {
        "introspection": {
            "endpoint": idp["IDP_INTROSPECT_URL"],
            "client_id": idp["IDP_INTROSPECTION_CLIENT_ID"],
            "auth_method": "client_secret_basic",
            "ca_file": idp["IDP_CA"],
            "timeout_ms": 1500,
        },
        "cache": {"ttl_seconds": 30},
        "policies": [policy("token-mtls", "/token-mtls/", ["system-access"]),
                     policy("admin", "/admin-api/", ["admin"])],
    }
    work = tmp_path_factory.mktemp("envoy-e2e")
    sc = Sidecar(work, config, env={"AUTHZ_INTROSPECTION_CLIENT_SECRET": idp["IDP_INTROSPECTION_CLIENT_SECRET"]},
                 name="sidecar-envoy-glewlwyd")
    e = Envoy(envoy_bin, work, certs, upstream_port=echo.port, sidecar_port=sc.port, name="envoy-glewlwyd")
    yield EdgeClient(e.port, certs)
    e.stop()
    sc.stop()


def test_client1_with_its_glewlwyd_token_is_allowed_through_envoy(envoy_e2e_edge, idp_token, idp):
    resp = envoy_e2e_edge.request("/token-mtls/resource", token=idp_token, cert="client1")
    assert resp.status == 200, resp
    seen = resp.json()["headers"]
    assert seen["x-credential-scope"] == idp["IDP_MTLS_SCOPE"] == "system-access"
    assert seen.get("x-credential-exp", "").isdigit(), seen


def test_client2_with_client1s_glewlwyd_token_is_401_through_envoy(envoy_e2e_edge, idp_token):
    resp = envoy_e2e_edge.request("/token-mtls/resource", token=idp_token, cert="client2")
    assert_kong(resp, 401, KONG_DENIED)
    assert resp.body == kong_body(401, KONG_DENIED)
    assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or "")


def test_glewlwyd_token_lacks_admin_scope_through_envoy(envoy_e2e_edge, idp_token):
    resp = envoy_e2e_edge.request("/admin-api/users", token=idp_token, cert="client1")
    assert resp.status == 403, resp
    assert 'error="insufficient_scope"' in (resp.header("WWW-Authenticate") or "")
