"""End to end with a real authorization server: Glewlwyd (scripts/idp-glewlwyd.sh) issues a
client_credentials token bound to client1's certificate (RFC 8705 tls_client_auth), and the sidecar
introspects it over HTTPS (RFC 7662, client_secret_basic from the environment) behind nginx.

Glewlwyd reuses the suite's mkcerts CA, so nginx trusts the same client certificates.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import (ALL_TOKENS, KONG_DENIED, REPO, EdgeClient, Nginx, Sidecar, kong_body, policies, stack)

pytestmark = pytest.mark.glewlwyd

IDP_SCRIPT = REPO / "scripts" / "idp-glewlwyd.sh"


def read_env(path: Path) -> dict:
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    return env


def idp_script(*args: str) -> str:
    """scripts/idp-glewlwyd.sh ARGS; its output, or the test fails with it."""
    run = subprocess.run(["bash", str(IDP_SCRIPT), *args], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    if run.returncode != 0:
        pytest.fail(f"idp-glewlwyd.sh {' '.join(args)} failed ({run.returncode}):\n{run.stdout[-3000:]}\n"
                    f"{run.stderr[-3000:]}", pytrace=False)
    return run.stdout


@pytest.fixture(scope="module")
def idp(tmp_path_factory, certs):
    if shutil.which("glewlwyd") is None and os.geteuid() != 0:
        pytest.skip("glewlwyd is not installed and apt-get needs root (scripts/test.sh installs it)")
    work = tmp_path_factory.mktemp("idp")
    env = {**os.environ, "IDP_PORT": str(stack.free_port()), "IDP_PKI_DIR": str(certs)}
    try:
        run = subprocess.run(["bash", str(IDP_SCRIPT), str(work)], env=env, capture_output=True,
                             text=True, timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["bash", str(IDP_SCRIPT), "--stop", str(work)], timeout=60)
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


@pytest.fixture(scope="module")
def e2e_edge(tmp_path_factory, certs, idp, echo):
    config = {
        "introspection": {
            "endpoint": idp["IDP_INTROSPECT_URL"],
            "client_id": idp["IDP_INTROSPECTION_CLIENT_ID"],
            "auth_method": "client_secret_basic",
            "ca_file": idp["IDP_CA"],
            "timeout_ms": 1500,
        },
        "cache": {"ttl_seconds": 30},
        "policies": policies(),
    }
    work = tmp_path_factory.mktemp("e2e")
    sc = Sidecar(work, config, env={"AUTHZ_INTROSPECTION_CLIENT_SECRET": idp["IDP_INTROSPECTION_CLIENT_SECRET"]},
                 name="sidecar-glewlwyd")
    ng = Nginx(work / "nginx", certs, sc.port, echo.port)
    yield EdgeClient(ng.port, certs)
    ng.stop()
    sc.stop()


def test_token_is_bound_to_client1(idp, idp_token, certs):
    out = subprocess.run([
        "curl", "-sS", "--max-time", "10", "--cacert", idp["IDP_CA"],
        "-u", f"{idp['IDP_INTROSPECTION_CLIENT_ID']}:{idp['IDP_INTROSPECTION_CLIENT_SECRET']}",
        "-d", f"token={idp_token}", idp["IDP_INTROSPECT_URL"]], capture_output=True, text=True, timeout=30)
    intro = json.loads(out.stdout)
    assert intro["active"] is True
    assert intro["cnf"]["x5t#S256"] == stack.thumbprint(certs / "client1.crt")


def test_client1_with_its_glewlwyd_token_is_allowed(e2e_edge, idp_token, idp):
    resp = e2e_edge.request("/token-mtls/resource", token=idp_token, cert="client1")
    assert resp.status == 200, resp
    seen = resp.json()["headers"]
    assert seen["x-credential-scope"] == idp["IDP_MTLS_SCOPE"] == "system-access"
    assert seen.get("x-credential-exp", "").isdigit(), seen


def test_client2_with_client1s_glewlwyd_token_is_401(e2e_edge, idp_token):
    resp = e2e_edge.request("/token-mtls/resource", token=idp_token, cert="client2")
    assert resp.status == 401, resp
    assert resp.body == kong_body(401, KONG_DENIED), resp
    assert (resp.header("Content-Type") or "").startswith("application/json")
    assert 'error="invalid_token"' in (resp.header("WWW-Authenticate") or "")


def test_glewlwyd_token_lacks_admin_scope(e2e_edge, idp_token):
    resp = e2e_edge.request("/admin-api/users", token=idp_token, cert="client1")
    assert resp.status == 403, resp
    assert 'error="insufficient_scope"' in (resp.header("WWW-Authenticate") or "")
