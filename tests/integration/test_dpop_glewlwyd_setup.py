"""DPoP (RFC 9449) groundwork with the real authorization server and the real client: Glewlwyd
(scripts/idp-glewlwyd.sh --dpop) issues DPoP-bound tokens to requests-oauth2client
(scripts/dpop_client.py). No sidecar yet: this pins down what the AS issues and how the client
signs, so that the sidecar's DPoP tests can rely on both.

  * `--dpop WORKDIR on` switches the oidc plugin's oauth-dpop-* parameters on through the admin API
    and writes IDP_DPOP_* (client, secret, exact htu) to idp.env;
  * client_credentials + proof (client_secret_basic client) -> token_type DPoP, cnf.jkt = RFC 7638
    thumbprint of the client's key, in the JWT and in introspection, for each proof algorithm;
  * the mTLS client with a proof -> cnf has both x5t#S256 and jkt;
  * Glewlwyd's own proof checks (403 invalid_dpop_proof) and its nonces (400 use_dpop_nonce), which
    requests-oauth2client answers by itself;
  * the client's proofs at a resource: a new jti per request, htu without the query, ath of the
    token; and how it reacts to a resource server's DPoP 401s (a fake resource server here).

The module has its own Glewlwyd (module-scoped fixture of test_glewlwyd_e2e.py) on its own port.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwskate
import pytest
import requests

from conftest import ALL_TOKENS, REPO, stack
import test_glewlwyd_e2e as glewlwyd_e2e
from test_glewlwyd_e2e import idp_script, read_env

import dpop_client as dc   # scripts/ is on sys.path (conftest)
from requests_oauth2client import DPoPKey, DPoPToken

idp = glewlwyd_e2e.idp      # a Glewlwyd of this module's own (module scope)

pytestmark = pytest.mark.glewlwyd


def dpop_mode(idp: dict, mode: str) -> dict:
    """--dpop WORKDIR MODE; returns the new idp.env."""
    idp_script("--dpop", idp["IDP_WORKDIR"], mode)
    return read_env(Path(idp["IDP_WORKDIR"]) / "idp.env")


@pytest.fixture(scope="module")
def dpop_idp(idp) -> dict:
    return dpop_mode(idp, "on")


def token_form(env: dict) -> dict:
    return {"grant_type": "client_credentials", "scope": env["IDP_DPOP_SCOPE"]}


def raw_token_request(env: dict, proof: "str | None"):
    """A token request for the DPoP client with exactly this DPoP header (or none)."""
    headers = {"DPoP": proof} if proof is not None else {}
    return requests.post(env["IDP_TOKEN_URL"], data=token_form(env), headers=headers, timeout=10,
                         auth=(env["IDP_DPOP_CLIENT_ID"], env["IDP_DPOP_CLIENT_SECRET"]),
                         verify=env["IDP_CA"])


def remember(token) -> None:
    ALL_TOKENS.add(token.access_token if hasattr(token, "access_token") else token)


# ---------------------------------------------------------------------------------------------
# The AS side
def test_dpop_switch_writes_what_the_tests_need(dpop_idp):
    env = dpop_idp
    assert env["IDP_DPOP_MODE"] == "on"
    assert env["IDP_DPOP_CLIENT_ID"] == "dpop-client" and env["IDP_DPOP_CLIENT_SECRET"]
    # The exact htu Glewlwyd compares with: external_url/api/oidc/token (= the token endpoint)
    assert env["IDP_DPOP_HTU"] == env["IDP_ISSUER"] + "/token" == env["IDP_TOKEN_URL"]
    assert (env["IDP_DPOP_IAT_DURATION"], env["IDP_DPOP_IAT_GAP"], env["IDP_DPOP_NONCE"]) == ("60", "5", "false")
    disco = requests.get(env["IDP_DISCOVERY_URL"], verify=env["IDP_CA"], timeout=10).json()
    assert disco["dpop_signing_alg_values_supported"] == env["IDP_DPOP_ALGS"].split(",")
    assert {"ES256", "RS256", "PS256", "EdDSA"} <= set(disco["dpop_signing_alg_values_supported"])


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA"])
def test_requests_oauth2client_gets_a_dpop_bound_token(dpop_idp, alg):
    token = dc.get_dpop_token(dpop_idp, alg=alg)
    remember(token)
    assert isinstance(token, DPoPToken) and token.dpop_key.alg == alg
    report = dc.check_dpop_token(dpop_idp, token)
    assert report["problems"] == [], report
    jkt = dc.thumbprint(token.dpop_key.public_jwk.to_dict())
    claims = dc.jwt_payload(token.access_token)
    assert token.token_type == "DPoP"
    assert claims["cnf"] == {"jkt": jkt}
    assert claims["client_id"] == dpop_idp["IDP_DPOP_CLIENT_ID"] and claims["scope"] == dpop_idp["IDP_DPOP_SCOPE"]
    assert dc.jwt_header(token.access_token)["typ"] == "at+jwt"
    intro = dc.introspect(dpop_idp, token.access_token)
    assert intro["active"] is True and intro["token_type"] == "DPoP" and intro["cnf"] == {"jkt": jkt}, intro


def test_mtls_client_with_a_proof_gets_x5t_and_jkt(dpop_idp, certs):
    token = dc.get_dpop_token(dpop_idp, mtls=True)
    remember(token)
    report = dc.check_dpop_token(dpop_idp, token, mtls=True)
    assert report["problems"] == [], report
    want = {"x5t#S256": stack.thumbprint(certs / "client1.crt"),
            "jkt": dc.thumbprint(token.dpop_key.public_jwk.to_dict())}
    assert dc.jwt_payload(token.access_token)["cnf"] == want
    assert dc.introspect(dpop_idp, token.access_token)["cnf"] == want


def test_same_client_without_a_proof_gets_a_bearer_token(dpop_idp):
    r = raw_token_request(dpop_idp, None)
    assert r.status_code == 200, r.text
    body = r.json()
    remember(body["access_token"])
    assert body["token_type"] == "bearer"      # Glewlwyd's spelling
    assert "cnf" not in dc.jwt_payload(body["access_token"])


def test_glewlwyd_checks_token_endpoint_proofs(dpop_idp):
    """Glewlwyd's own checks: 403 {"error":"invalid_dpop_proof"}, no WWW-Authenticate (RFC 9449 §5
    says 400). htu is compared as an exact string. (Its iat window is [now - 60, now + 5] with
    iat-duration 60 / iat-gap-duration 5; the times here keep clear of the edges, which a clock tick
    between signing and checking would blur.)"""
    env = dpop_idp
    key = DPoPKey.generate()
    htu = env["IDP_DPOP_HTU"]

    def proof(htu=htu, htm="POST", iat_offset=None):
        k = key if iat_offset is None else DPoPKey(key.private_key, iat_generator=lambda: int(time.time()) + iat_offset)
        return str(k.proof(htm=htm, htu=htu))

    good = proof()
    first = raw_token_request(env, good)
    assert first.status_code == 200 and first.json()["token_type"] == "DPoP", first.text
    remember(first.json()["access_token"])
    bad = {   # name -> a function making the proof just before it is sent
        "the same proof again (jti replay)": lambda: good,
        "htu with localhost for 127.0.0.1": lambda: proof(htu.replace("127.0.0.1", "localhost")),
        "htu with a trailing slash": lambda: proof(htu + "/"),
        "htu http://": lambda: proof(htu.replace("https://", "http://")),
        "htu with a query": lambda: _with_htu(key, htu + "?x=1"),
        "htm GET": lambda: proof(htm="GET"),
        "iat 70 s old (iat-duration 60)": lambda: proof(iat_offset=-70),
        "iat 15 s ahead (iat-gap-duration 5)": lambda: proof(iat_offset=15),
        "not a JWS": lambda: "not-a-proof",
    }
    for name, make in bad.items():
        r = raw_token_request(env, make())
        assert r.status_code == 403, (name, r.status_code, r.text)
        assert r.json()["error"] == "invalid_dpop_proof", (name, r.text)
        assert "WWW-Authenticate" not in r.headers, name
    for name, offset in {"iat 50 s old": -50, "iat 3 s ahead": 3}.items():
        r = raw_token_request(env, proof(iat_offset=offset))
        assert r.status_code == 200, (name, r.text)
        remember(r.json()["access_token"])


def _with_htu(key: DPoPKey, htu: str) -> str:
    """A proof whose htu keeps a query: DPoPKey.proof() would strip it, so sign the claims directly."""
    claims = {"jti": str(uuid.uuid4()), "htm": "POST", "htu": htu, "iat": int(time.time())}
    return str(jwskate.SignedJwt.sign(claims, key=key.private_key, alg=key.alg, typ="dpop+jwt",
                                      extra_headers={"jwk": key.public_jwk}))


def test_nonce_mode_is_answered_by_requests_oauth2client(idp, dpop_idp):
    env = dpop_mode(idp, "nonce")
    try:
        assert env["IDP_DPOP_NONCE"] == "true"
        # Glewlwyd: a proof without the client's nonce -> 400 use_dpop_nonce + DPoP-Nonce
        r = raw_token_request(env, str(DPoPKey.generate().proof(htm="POST", htu=env["IDP_DPOP_HTU"])))
        assert r.status_code == 400 and r.json()["error"] == "use_dpop_nonce", r.text
        nonce = r.headers["DPoP-Nonce"]
        # the library: stores it as as_nonce and asks again, transparently
        client = dc.oauth2_client(env)
        seen = []
        client.session.hooks["response"].append(lambda resp, *a, **k: seen.append(resp.status_code))
        key = DPoPKey.generate()
        token = client.client_credentials(scope=env["IDP_DPOP_SCOPE"], dpop=True, dpop_key=key)
        remember(token)
        assert seen == [400, 200] and key.as_nonce == nonce
        assert dc.check_dpop_token(env, token)["problems"] == []
    finally:
        env = dpop_mode(idp, "on")
    assert env["IDP_DPOP_NONCE"] == "false"
    token = dc.get_dpop_token(env)          # no nonce needed any more
    remember(token)
    assert token.token_type == "DPoP"


def test_cli_token(dpop_idp, tmp_path):
    state = tmp_path / "state.json"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "dpop_client.py"), "token", "--idp-env",
                          str(Path(dpop_idp["IDP_WORKDIR"]) / "idp.env"), "--save", str(state)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    assert lines["token_type"] == "DPoP"
    token = dc.load_state(state)
    remember(token)
    assert lines["jkt"] == dc.thumbprint(token.dpop_key.public_jwk.to_dict()) == dc.jwt_payload(token.access_token)["cnf"]["jkt"]
    assert oct(state.stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------------------------------------
# The client side at a resource
def test_fresh_proof_per_request(dpop_idp, echo):
    token = dc.get_dpop_token(dpop_idp)
    remember(token)
    path = f"/dpop-setup/{uuid.uuid4().hex}"
    url = f"http://127.0.0.1:{echo.port}{path}?q=1&r=2"
    proofs = []
    for method in ("GET", "GET", "POST"):
        resp, before = dc.call(url, token, method=method, data="x=1" if method == "POST" else None)
        assert resp.status_code == 200 and before == []
        seen = resp.json()["headers"]
        assert seen["authorization"] == f"DPoP {token.access_token}"
        proofs.append(seen["dpop"])
    claims = [dc.jwt_payload(p) for p in proofs]
    headers = [dc.jwt_header(p) for p in proofs]
    assert len({c["jti"] for c in claims}) == 3
    assert [c["htm"] for c in claims] == ["GET", "GET", "POST"]
    assert {c["htu"] for c in claims} == {f"http://127.0.0.1:{echo.port}{path}"}     # no query
    assert {c["ath"] for c in claims} == {dc.ath_of(token.access_token)}
    assert all("nonce" not in c and abs(c["iat"] - time.time()) < 10 for c in claims)
    assert all(h["typ"] == "dpop+jwt" and h["alg"] == "ES256" and "d" not in h["jwk"] for h in headers)
    assert {dc.thumbprint(h["jwk"]) for h in headers} == {dc.jwt_payload(token.access_token)["cnf"]["jkt"]}


class _ScriptedResource:
    """A resource server on loopback that answers from a list of (status, headers)."""

    def __init__(self):
        self.script: list = []
        self.proofs: list = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.proofs.append(dc.jwt_payload(self.headers["DPoP"]) if self.headers.get("DPoP") else None)
                status, headers = outer.script.pop(0) if outer.script else (200, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/r"

    def run(self, script, key=None):
        self.script, self.proofs = list(script), []
        tok = DPoPToken("tok", _dpop_key=key or DPoPKey.generate())
        resp, before = dc.call(self.url, tok)
        return resp, [r.status_code for r in before], list(self.proofs), tok.dpop_key


@pytest.fixture(scope="module")
def scripted():
    rs = _ScriptedResource()
    yield rs
    rs.srv.shutdown()
    rs.srv.server_close()


def test_client_answers_use_dpop_nonce_once(scripted):
    nonce = {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n1"}
    resp, before, proofs, key = scripted.run([(401, nonce), (200, {})])
    assert resp.status_code == 200 and before == [401] and key.rs_nonce == "n1"
    assert [p.get("nonce") for p in proofs] == [None, "n1"] and proofs[0]["jti"] != proofs[1]["jti"]
    # a second 401 after the retry is returned, not retried again
    resp, before, proofs, _ = scripted.run([(401, nonce), (401, {**nonce, "DPoP-Nonce": "n2"})])
    assert resp.status_code == 401 and len(proofs) == 2
    # a DPoP-Nonce on a 200 is not taken up
    resp, _, _, key = scripted.run([(200, {"DPoP-Nonce": "n9"})])
    assert resp.status_code == 200 and key.rs_nonce is None


def test_client_raises_on_a_dpop_401_without_new_nonce(scripted):
    """requests-oauth2client raises MissingDPoPNonce / RepeatedDPoPNonce from its response hook on a
    DPoP 401 with no (or the same) DPoP-Nonce; dpop_client.call() hands back the 401 instead."""
    challenge = {"WWW-Authenticate": 'DPoP realm="authz-sidecar", error="invalid_token", algs="ES256"'}
    tok = DPoPToken("tok", _dpop_key=DPoPKey.generate())
    scripted.script = [(401, challenge)]
    with pytest.raises(dc.InvalidUseDPoPNonceResponse):
        requests.get(scripted.url, auth=tok, timeout=10)
    resp, before, proofs, _ = scripted.run([(401, challenge)])
    assert resp.status_code == 401 and before == [] and len(proofs) == 1
    resp, before, proofs, _ = scripted.run([(401, {**challenge, "DPoP-Nonce": "n1"})], key=DPoPKey.generate(rs_nonce="n1"))
    assert resp.status_code == 401 and len(proofs) == 1
    # a Bearer challenge is just returned
    resp, _, proofs, _ = scripted.run([(401, {"WWW-Authenticate": 'Bearer error="invalid_token"'})])
    assert resp.status_code == 401 and len(proofs) == 1
