#!/usr/bin/env python3
"""A real DPoP (RFC 9449) client for the tests and the demo, built on `requests-oauth2client` (PyPI;
written by none of us): it gets a DPoP-bound access token from Glewlwyd's token endpoint
(client_credentials, with a DPoP proof) and calls a URL with that token, signing a fresh proof for
every request through the library's own DPoP auth handler.

    python3 scripts/dpop_client.py token --idp-env WORKDIR/idp.env [--mtls] [--alg ES256]
                                   [--resource URL] [--save STATE.json] [--json]
        A token for IDP_DPOP_CLIENT_ID (client_secret_basic) or, with --mtls, for IDP_MTLS_CLIENT_ID
        (tls_client_auth with client1's certificate). Prints token_type, jkt (RFC 7638 thumbprint of
        the key, computed here, not taken from the library), the JWT's cnf, the introspection answer
        and the token. Exits 1 unless token_type is DPoP and cnf.jkt = jkt in the JWT and in
        introspection (and, with --mtls, cnf.x5t#S256 = client1's certificate thumbprint).
        --save writes the token and its private key (mode 0600) for `call --state`.

    python3 scripts/dpop_client.py call URL [--state STATE.json | --idp-env WORKDIR/idp.env [--mtls]]
                                   [-X METHOD] [-d DATA] [-H 'Name: value']... [--cacert CA]
                                   [--cert CRT --key KEY] [--count N]
                                   [--steal bearer|other-key|no-proof] [--show-proof] [--body]
        Requests URL with `Authorization: DPoP <token>` and a new proof per request. Prints, per
        request: the status line, the response headers, and (--show-proof) the proof's claims.
        --steal replays the token as an attacker would: as a Bearer token, with proofs signed by
        another key, or with no DPoP header at all. Exit status 0 when every answer is 2xx, else 1.

Importable: tests use load_idp_env(), get_dpop_token(), thumbprint(), b64url(), jwt_header(), jwt_payload(), introspect(),
check_dpop_token() and make_session().

What requests-oauth2client 1.8.0 really does (checked against it and Glewlwyd 2.7.5; it matters
for the sidecar's htu and nonce rules):

  htu. The DPoP auth handler (DPoPToken.__call__ -> add_dpop_proof) takes the *prepared* request's
  URL and removes query and fragment with furl. So htu is what `requests` sends, normalised by
  requests/urllib3 first and then by furl:
    https://api.example.test/a/b?x=1&y=2#frag  -> https://api.example.test/a/b
    https://api.example.test:8443/a            -> https://api.example.test:8443/a (other ports stay)
    https://api.example.test:443/a             -> https://api.example.test/a  (furl drops the default
    http://api.example.test:80/a               -> http://api.example.test/a    port; urllib3's Host
                                                  header drops it too: "Host: api.example.test")
    HTTPS://API.Example.TEST/A                 -> https://api.example.test/A  (scheme and host
                                                  lower-cased, path case kept)
    https://api.example.test                   -> https://api.example.test/   (empty path -> "/")
    https://api.example.test/a/                -> https://api.example.test/a/ (trailing slash kept)
    https://api.example.test/a?                -> https://api.example.test/a
    https://api.example.test/a/./b/../c        -> https://api.example.test/a/c (dot segments removed,
                                                  in the request line as well)
    https://api.example.test/%41%62            -> https://api.example.test/Ab (unreserved %XX decoded;
    .../a%2fb/%7euser/c d                      -> .../a%2Fb/~user/c%20d        hex upper-cased, space
                                                  encoded; a%2Fb stays encoded)
    https://api.example.test/café              -> https://api.example.test/caf%C3%A9
    https://café.example/a                     -> https://xn--caf-dma.example/a (IDNA)
    https://api.example.test/a;p=1?q           -> https://api.example.test/a;p=1 (params kept)
    https://user:pw@api.example.test/a         -> https://user:pw@api.example.test/a (userinfo KEPT
                                                  in htu although never sent in the request line)
    https://[::1]:8443/a                       -> https://[::1]:8443/a
  The request line carries the same path (and the query), so a resource server that rebuilds
  scheme://host[:port]/path from the request and normalises per RFC 3986 matches what this
  client signs. For token requests the library signs htu = the configured token endpoint string
  passed through furl (query/fragment and a default port removed), not the prepared URL.
  Glewlwyd compares a token-endpoint htu with external_url/api/oidc/token as an exact string (no
  case folding, no default-port removal; a query makes it 403), so IDP_DPOP_HTU in idp.env must be
  the token endpoint the client is configured with - the script writes both from the same value.

  Nonces from a resource server. DPoPToken registers a response hook on every request. On a 401
  whose WWW-Authenticate value *starts with* "DPoP" (case-sensitive; a "dpop ..." challenge, or a
  DPoP challenge after a Bearer one in the same header, is not seen), whatever its error:
    * DPoP-Nonce header present and different from the nonce the key holds: the nonce is stored on
      the DPoPKey (rs_nonce) and the request is sent again ONCE, with a new proof (new jti, nonce
      claim) and the same body. The retry goes straight to the transport adapter
      (response.connection.send), so its own 401 is not examined again: no loop, and the caller gets
      the retry's response; the first 401 is not in response.history.
    * DPoP-Nonce header missing: the hook raises requests_oauth2client.dpop.MissingDPoPNonce
      (exception.response is the 401). So an ordinary `WWW-Authenticate: DPoP error="invalid_token"`
      or `error="invalid_dpop_proof"` 401 without a DPoP-Nonce header surfaces as an EXCEPTION from
      requests.get(), not as a response. Tests (and `call` below) must catch
      InvalidUseDPoPNonceResponse and read .response.
    * DPoP-Nonce equal to the nonce already held: raises RepeatedDPoPNonce. With server nonces on,
      a 401 invalid_token that carries the current nonce therefore costs one retry the first time
      and raises on later requests with the same key.
  A Bearer challenge, a 400, or a DPoP-Nonce on a 2xx answer (RFC 9449 §8.2's "next nonce") is
  ignored: the client learns a new nonce only from a 401. The rs_nonce lives on the DPoPKey, so it
  is shared by every URL, server and token used with that key.
  Nonces from the AS (token endpoint): OAuth2Client._request catches the error `use_dpop_nonce` (in
  the JSON body of any non-2xx answer - Glewlwyd's 400), stores the DPoP-Nonce as as_nonce and tries
  again, at most 3 requests in all; a missing or repeated nonce raises InvalidTokenResponse. A
  DPoP-Nonce on a 200 is ignored there too, so when Glewlwyd moves a client's nonce on (every
  oauth-dpop-nonce-counter + 1 DPoP token requests, the new nonce in the DPoP-Nonce of that 200)
  the next token request costs one 400 + retry.

  Other: with a DPoP key the library wraps whatever token answer comes back in its DPoPToken class
  without looking at token_type (a "Bearer" answer would be used with DPoP proofs), and it never
  looks at cnf; check_dpop_token() below does both. A token that is not token68 (RFC 9449 §7.1's
  character set) is refused by the library (InvalidDPoPAccessToken).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from pathlib import Path

try:
    import jwskate
    import requests
    from requests_oauth2client import (ClientSecretBasic, DPoPKey, DPoPToken, OAuth2Client, PublicApp)
    from requests_oauth2client.dpop import InvalidUseDPoPNonceResponse
except ImportError as e:   # pragma: no cover - the message is the point
    _msg = f"dpop_client.py needs requests-oauth2client 1.8 (pip install 'requests-oauth2client==1.8.*'): {e}"
    if __name__ == "__main__":
        sys.exit(_msg)
    raise ImportError(_msg) from e

PROOF_ALGS = ("ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA")


# ---------------------------------------------------------------------------------------------
# Small independent helpers (not the library's): base64url, JWT parts, RFC 7638, RFC 8705
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def jwt_header(token: str) -> dict:
    return b64url_json(token.split(".")[0])


def jwt_payload(token: str) -> dict:
    return b64url_json(token.split(".")[1])


def thumbprint(jwk: dict) -> str:
    """RFC 7638 SHA-256 JWK thumbprint of a public (or private) JWK, from its required members."""
    members = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def cert_thumbprint(pem_path: str) -> str:
    """RFC 8705 x5t#S256 of a PEM certificate."""
    import ssl
    der = ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text())
    return b64url(hashlib.sha256(der).digest())


def ath_of(token: str) -> str:
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


# ---------------------------------------------------------------------------------------------
# idp.env and the library's objects
def load_idp_env(path) -> dict:
    """The KEY=value lines of scripts/idp-glewlwyd.sh's idp.env (a WORKDIR is accepted too)."""
    p = Path(path)
    if p.is_dir():
        p = p / "idp.env"
    env = {}
    for line in p.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    return env


def _require(env: dict, *keys: str) -> None:
    missing = [k for k in keys if not env.get(k)]
    if missing:
        raise SystemExit(f"idp.env has no {', '.join(missing)} (DPoP on? run: scripts/idp-glewlwyd.sh --dpop WORKDIR)")


def make_session(cacert: "str | None" = None, cert: "tuple[str, str] | None" = None) -> requests.Session:
    s = requests.Session()
    # Without this, REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment override session.verify
    # (requests merges environment settings over the session's), and proxies from the environment
    # would apply; everything here is loopback with a CA of its own.
    s.trust_env = False
    if cacert:
        s.verify = cacert
    if cert:
        s.cert = cert
    return s


def oauth2_client(env: dict, mtls: bool = False) -> OAuth2Client:
    """An OAuth2Client for Glewlwyd's token endpoint: IDP_DPOP_CLIENT_ID with client_secret_basic, or
    (mtls) IDP_MTLS_CLIENT_ID with tls_client_auth (client1's certificate; client_id in the body)."""
    if mtls:
        session = make_session(env["IDP_CA"], (env["IDP_CLIENT1_CERT"], env["IDP_CLIENT1_KEY"]))
        auth = PublicApp(env["IDP_MTLS_CLIENT_ID"])
    else:
        _require(env, "IDP_DPOP_CLIENT_ID", "IDP_DPOP_CLIENT_SECRET")
        session = make_session(env["IDP_CA"])
        auth = ClientSecretBasic(env["IDP_DPOP_CLIENT_ID"], env["IDP_DPOP_CLIENT_SECRET"])
    # The library signs htu = this string (query/fragment and a default port removed); Glewlwyd
    # wants exactly IDP_DPOP_HTU. They are the same value when idp-glewlwyd.sh wrote both.
    endpoint = env.get("IDP_DPOP_HTU") or env["IDP_TOKEN_URL"]
    return OAuth2Client(token_endpoint=endpoint, auth=auth, session=session, dpop_bound_access_tokens=True)


def new_key(alg: str = "ES256") -> DPoPKey:
    return DPoPKey.generate(alg=alg)


def get_dpop_token(env: dict, key: "DPoPKey | None" = None, mtls: bool = False, alg: str = "ES256",
                   resource: "str | None" = None, scope: "str | None" = None) -> DPoPToken:
    """client_credentials with DPoP: a DPoPToken (access_token, token_type, dpop_key)."""
    client = oauth2_client(env, mtls)
    scope = scope or (env["IDP_MTLS_SCOPE"] if mtls else env.get("IDP_DPOP_SCOPE") or env["IDP_MTLS_SCOPE"])
    extra = {"resource": resource} if resource else {}
    return client.client_credentials(scope=scope, dpop=True, dpop_key=key or new_key(alg), **extra)


def introspect(env: dict, access_token: str) -> dict:
    """RFC 7662 introspection with the introspection client of idp.env (client_secret_basic)."""
    r = requests.post(env["IDP_INTROSPECT_URL"], data={"token": access_token}, verify=env["IDP_CA"], timeout=10,
                      auth=(env["IDP_INTROSPECTION_CLIENT_ID"], env["IDP_INTROSPECTION_CLIENT_SECRET"]))
    r.raise_for_status()
    return r.json()


def check_dpop_token(env: dict, token: DPoPToken, mtls: bool = False) -> dict:
    """What the AS issued, checked independently of the library: token_type DPoP, cnf.jkt = RFC 7638
    thumbprint of the key in the JWT and in introspection (mtls: also cnf.x5t#S256 = client1's).
    Returns a report; report["problems"] is empty when all holds."""
    jkt = thumbprint(token.dpop_key.public_jwk.to_dict())
    payload = jwt_payload(token.access_token)
    intro = introspect(env, token.access_token)
    problems = []
    if token.token_type != "DPoP":
        problems.append(f"token_type is {token.token_type!r}, not 'DPoP'")
    if jkt != token.dpop_key.dpop_jkt:
        problems.append(f"RFC 7638 thumbprint {jkt} differs from the library's {token.dpop_key.dpop_jkt}")
    if (payload.get("cnf") or {}).get("jkt") != jkt:
        problems.append(f"JWT cnf is {payload.get('cnf')}, expected jkt {jkt}")
    if intro.get("active") is not True or (intro.get("cnf") or {}).get("jkt") != jkt:
        problems.append(f"introspection says active={intro.get('active')} cnf={intro.get('cnf')}, expected jkt {jkt}")
    x5t = None
    if mtls:
        x5t = cert_thumbprint(env["IDP_CLIENT1_CERT"])
        if (payload.get("cnf") or {}).get("x5t#S256") != x5t or (intro.get("cnf") or {}).get("x5t#S256") != x5t:
            problems.append(f"cnf {payload.get('cnf')} / introspection cnf {intro.get('cnf')}: expected x5t#S256 {x5t}")
    return {"token_type": token.token_type, "jkt": jkt, "x5t#S256": x5t, "alg": token.dpop_key.alg,
            "jwt_header": jwt_header(token.access_token), "cnf": payload.get("cnf"),
            "introspection": intro, "problems": problems}


def save_state(path, token: DPoPToken) -> None:
    state = {"access_token": token.access_token, "token_type": token.token_type,
             "expires_at": int(token.expires_at.timestamp()) if token.expires_at else None,
             "alg": token.dpop_key.alg, "private_jwk": token.dpop_key.private_key.to_dict()}
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)


def load_state(path) -> DPoPToken:
    state = json.loads(Path(path).read_text())
    key = DPoPKey(jwskate.Jwk(state["private_jwk"]), alg=state["alg"])
    return DPoPToken(state["access_token"], _dpop_key=key, token_type=state.get("token_type", "DPoP"))


# ---------------------------------------------------------------------------------------------
# Calling a resource
class _Stolen(requests.auth.AuthBase):
    """The token without its key: as Bearer, with no DPoP header, or with proofs of another key."""

    def __init__(self, access_token: str, how: str):
        self.access_token, self.how = access_token, how
        self.other = new_key() if how == "other-key" else None

    def __call__(self, r):
        scheme = "Bearer" if self.how == "bearer" else "DPoP"
        r.headers["Authorization"] = f"{scheme} {self.access_token}"
        if self.other is not None:
            r.headers["DPoP"] = str(self.other.proof(htm=r.method, htu=r.url, ath=ath_of(self.access_token)))
        return r


def call(url: str, auth, session: "requests.Session | None" = None, method: str = "GET",
         headers: "dict | None" = None, data=None, timeout: float = 10.0):
    """One request; returns (final response, responses seen before it, e.g. a use_dpop_nonce 401 that
    the library answered with a retry). A 401 the library raised on (DPoP challenge without a new
    DPoP-Nonce) is returned as the response, not raised."""
    session = session or requests.Session()
    seen: list = []

    def observed(r):   # the auth handler, then a hook of ours placed before the library's own
        r = auth(r)
        r.hooks["response"].insert(0, lambda resp, *a, **k: seen.append(resp))
        return r

    try:
        resp = session.request(method, url, auth=observed, headers=headers, data=data, timeout=timeout)
    except InvalidUseDPoPNonceResponse as exc:
        resp = exc.response
    before = [r for r in seen if r is not resp]
    return resp, before


def _proof_claims(prepared) -> "dict | None":
    proof = prepared.headers.get("DPoP")
    if not proof:
        return None
    try:
        return {"header": jwt_header(proof), "claims": jwt_payload(proof)}
    except (ValueError, IndexError):
        return {"raw": proof}


def _print_response(resp, show_proof: bool, show_body: bool, prefix: str = "") -> None:
    print(f"{prefix}HTTP {resp.status_code} {resp.reason}")
    for k, v in resp.headers.items():
        print(f"{prefix}{k}: {v}")
    if show_proof:
        pc = _proof_claims(resp.request)
        if pc:
            hdr = {k: v for k, v in pc.get("header", {}).items() if k != "jwk"}
            print(f"{prefix}(proof sent: header {json.dumps(hdr)} claims {json.dumps(pc.get('claims'))})")
        else:
            print(f"{prefix}(no DPoP header sent)")
    if show_body:
        print(f"{prefix}{resp.text}")


# ---------------------------------------------------------------------------------------------
def _cmd_token(a) -> int:
    env = load_idp_env(a.idp_env)
    t0 = time.monotonic()
    token = get_dpop_token(env, mtls=a.mtls, alg=a.alg, resource=a.resource)
    ms = (time.monotonic() - t0) * 1000
    report = check_dpop_token(env, token, mtls=a.mtls)
    if a.save:
        save_state(a.save, token)
    if a.json:
        print(json.dumps({**report, "access_token": token.access_token, "ms": round(ms, 1)}, indent=1))
    else:
        print(f"token_type: {report['token_type']}")
        print(f"jkt: {report['jkt']}")
        print(f"proof alg: {report['alg']}")
        print(f"jwt header: {json.dumps(report['jwt_header'])}")
        print(f"jwt cnf: {json.dumps(report['cnf'])}")
        intro = report["introspection"]
        print(f"introspection: {json.dumps({k: intro.get(k) for k in ('active', 'token_type', 'client_id', 'scope', 'cnf')})}")
        print(f"access_token: {token.access_token}")
        if a.save:
            print(f"saved to {a.save} (token and private key; use: call URL --state {a.save})")
    for p in report["problems"]:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if report["problems"] else 0


def _cmd_call(a) -> int:
    if a.state:
        token = load_state(a.state)
        env = None
    elif a.idp_env:
        env = load_idp_env(a.idp_env)
        token = get_dpop_token(env, mtls=a.mtls, alg=a.alg)
    else:
        raise SystemExit("call needs --state FILE or --idp-env FILE")
    cacert = a.cacert or (env or {}).get("IDP_CA")
    cert = (a.cert, a.key) if a.cert else None
    session = make_session(cacert, cert)
    headers = dict(h.split(":", 1) for h in a.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    auth = _Stolen(token.access_token, a.steal) if a.steal else token
    all_ok = True
    for i in range(a.count):
        resp, before = call(a.url, auth, session, a.method, headers, a.data)
        if a.count > 1:
            print(f"--- request {i + 1}")
        for r in before:
            print(f"(answered by requests-oauth2client with a retry: HTTP {r.status_code}, "
                  f"WWW-Authenticate: {r.headers.get('WWW-Authenticate')}, DPoP-Nonce: {r.headers.get('DPoP-Nonce')})")
            if a.show_proof:
                _print_response(r, True, False, prefix="  | ")
        _print_response(resp, a.show_proof, a.body)
        all_ok = all_ok and 200 <= resp.status_code < 300
    return 0 if all_ok else 1


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("token", help="get a DPoP-bound token from Glewlwyd and check it")
    t.add_argument("--idp-env", required=True, help="WORKDIR/idp.env of scripts/idp-glewlwyd.sh")
    t.add_argument("--mtls", action="store_true", help="the tls_client_auth client (client1) instead of the DPoP client")
    t.add_argument("--alg", default="ES256", choices=PROOF_ALGS, help="proof key algorithm (default ES256)")
    t.add_argument("--resource", help="RFC 8707 resource (aud)")
    t.add_argument("--save", help="write token + private key here (0600), for call --state")
    t.add_argument("--json", action="store_true")
    c = sub.add_parser("call", help="call URL with a DPoP token and a fresh proof per request")
    c.add_argument("url")
    c.add_argument("--state", help="a file written by token --save")
    c.add_argument("--idp-env", help="get a new token first (when no --state)")
    c.add_argument("--mtls", action="store_true")
    c.add_argument("--alg", default="ES256", choices=PROOF_ALGS)
    c.add_argument("-X", "--method", default="GET")
    c.add_argument("-d", "--data")
    c.add_argument("-H", "--header", action="append", default=[], help="'Name: value' (repeatable)")
    c.add_argument("--cacert", help="CA for https URLs (default: IDP_CA of --idp-env)")
    c.add_argument("--cert", help="client certificate (PEM) for https URLs")
    c.add_argument("--key", help="its private key")
    c.add_argument("--count", type=int, default=1, help="send the request N times (a new proof each)")
    c.add_argument("--steal", choices=("bearer", "other-key", "no-proof"),
                   help="replay the token without its key")
    c.add_argument("--show-proof", action="store_true", help="print the claims of the proof sent")
    c.add_argument("--body", action="store_true", help="print the response body")
    a = ap.parse_args(argv)
    return _cmd_token(a) if a.cmd == "token" else _cmd_call(a)


if __name__ == "__main__":
    sys.exit(main())
