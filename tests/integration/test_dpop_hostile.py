"""DPoP (RFC 9449, issue 13, DESIGN.md §10) against the real binary, with hostile proofs.

One sidecar, asked straight in the nginx form (GET /authz with X-Original-URI, X-Original-Method,
X-Forwarded-Proto, Host / X-Original-Host, `Authorization: DPoP <token>` and `DPoP: <proof>`), with
two kinds of DPoP-bound access tokens:

  * JWTs of a fake issuer (discovery + JWKS on 127.0.0.1), `cnf.jkt` = the RFC 7638 thumbprint of
    the client's proof key, forged here with `cryptography`;
  * opaque tokens of conftest's FakeAuthorizationServer, whose introspection answer holds `cnf.jkt`.

Policies (path prefix = name): /allowed/ (dpop left at its default, allowed), /required/,
/disabled/, /nonce/ (dpop_nonce: true), /public/ (public_base_url set), /window/ (other
dpop_max_age_seconds and dpop_iat_leeway_seconds).

Proofs are made byte by byte (header, payload and signature each controllable: ES256, RS256, PS256,
EdDSA, and the refused kinds), so duplicate members, stray padding, deep nesting and wrong types are
exactly what is sent. Each row gives the status, the WWW-Authenticate challenge (scheme, error,
algs), the Kong body and the log reason; a hostile row never gets a 200 and nothing gets a 5xx.
The clock is real: `iat` edges keep 2 s margins.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import (HTTP_TIMEOUT, INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, KONG_DENIED,
                      FakeAuthorizationServer, QuietHandler, Response, Sidecar, http_request, kong_body, log_line,
                      serve, shut_down)
from jose_support import b64u, compact, discovery_doc, enc, jwk_int, keep, rsa_key

REALM = "authz-sidecar"
ALGS = "ES256 PS256 RS256 EdDSA"          # the default server.dpop_algorithms, in the challenge
AUD = "dpop-api"
HOST = "api.example.test"                 # what the proxy says the client asked for
PUBLIC_BASE = "https://public.example.test:8443"
OPAQUE_ISS = "https://opaque.example/as"
MAX_AGE, LEEWAY = 60, 5                   # the defaults (policy /allowed/ sets neither)
W_MAX_AGE, W_LEEWAY = 20, 10              # policy /window/
MAX_PROOF = 8192


# ---------------------------------------------------------------------------------------------
# Keys and JWKs
K_ES = ec.generate_private_key(ec.SECP256R1())       # the ES256 client
K_ES_B = ec.generate_private_key(ec.SECP256R1())     # another ES256 client ("key B")
K_RS = rsa_key()                                     # the RS256 client
K_PS = rsa_key()                                     # the PS256 client
K_ED = ed25519.Ed25519PrivateKey.generate()          # the EdDSA client
K_P384 = ec.generate_private_key(ec.SECP384R1())     # ES384: a real algorithm, not on dpop_algorithms
OCT = secrets.token_bytes(32)                        # a symmetric "key"
ISSUER_KEY = ec.generate_private_key(ec.SECP256R1())  # signs the JWT access tokens (kid iss-1)

KEYS = {"ES256": K_ES, "RS256": K_RS, "PS256": K_PS, "EdDSA": K_ED, "ES384": K_P384, "RS384": K_RS}


def public_jwk(key, private: bool = False) -> dict:
    if isinstance(key, bytes):
        return {"kty": "oct", "k": b64u(key)}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        pub = key.public_key().public_numbers()
        jwk = {"kty": "EC", "crv": {256: "P-256", 384: "P-384"}[key.curve.key_size],
               "x": jwk_int(pub.x, size), "y": jwk_int(pub.y, size)}
        if private:
            jwk["d"] = jwk_int(key.private_numbers().private_value, size)
        return jwk
    if isinstance(key, rsa.RSAPrivateKey):
        pub = key.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": jwk_int(pub.n), "e": jwk_int(pub.e)}
        if private:
            p = key.private_numbers()
            jwk.update(d=jwk_int(p.d), p=jwk_int(p.p), q=jwk_int(p.q), dp=jwk_int(p.dmp1), dq=jwk_int(p.dmq1),
                       qi=jwk_int(p.iqmp))
        return jwk
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64u(raw)}
        if private:
            jwk["d"] = b64u(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption()))
        return jwk
    raise TypeError(key)


def thumbprint(jwk: dict) -> str:
    """RFC 7638 SHA-256 thumbprint: the required members only, sorted, no whitespace."""
    members = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"),
               "oct": ("k", "kty")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return b64u(hashlib.sha256(canonical.encode()).digest())


def jkt(key) -> str:
    return thumbprint(public_jwk(key))


def ath_of(token: str) -> str:
    return b64u(hashlib.sha256(token.encode("ascii")).digest())


# ---------------------------------------------------------------------------------------------
# The proof maker (signing: jose_support)
AUTO = object()   # the right value
DROP = object()   # leave the member out


def htu_for(path: str, base: str = f"https://{HOST}") -> str:
    return base + path.split("?", 1)[0].split("#", 1)[0]


def proof_parts(key=None, alg: str = "ES256", *, token: "str | None" = None, htm="GET", htu=AUTO,
                path: str = "/allowed/res", iat=AUTO, jti=AUTO, ath=AUTO, nonce=DROP, typ="dpop+jwt",
                jwk=AUTO, header: "dict | None" = None, claims: "dict | None" = None) -> "tuple[dict, dict]":
    """The proof's header and claims as dicts; every member controllable (DROP removes it)."""
    key = KEYS[alg] if key is None else key
    h = {"typ": typ, "alg": alg, "jwk": public_jwk(key) if jwk is AUTO else jwk}
    h.update(header or {})
    c = {"jti": secrets.token_urlsafe(18) if jti is AUTO else jti,
         "htm": htm,
         "htu": htu_for(path) if htu is AUTO else htu,
         "iat": int(time.time()) if iat is AUTO else iat,
         "ath": (ath_of(token) if token is not None else DROP) if ath is AUTO else ath,
         "nonce": nonce}
    c.update(claims or {})
    return ({k: v for k, v in h.items() if v is not DROP}, {k: v for k, v in c.items() if v is not DROP})


def assemble(header, payload, sign_key, sign_alg: str) -> str:
    """header.payload.signature over the exact text sent (HEADER / PAYLOAD: dict or raw bytes)."""
    return compact(header, payload, sign_key, sign_alg)


def proof(key=None, alg: str = "ES256", *, sign_key=AUTO, sign_alg: "str | None" = None, **kw) -> str:
    """A DPoP proof; SIGN_KEY / SIGN_ALG default to KEY / ALG (the proof maker; see proof_parts)."""
    key = KEYS[alg] if key is None else key
    h, c = proof_parts(key, alg, **kw)
    return assemble(h, c, key if sign_key is AUTO else sign_key, sign_alg or alg)


def sized_proof(token: str, size: int, path: str = "/allowed/res") -> str:
    """A good ES256 proof of exactly SIZE characters (padding members in header and claims)."""
    h, c = proof_parts(K_ES, "ES256", token=token, path=path)
    sig_len = 86   # 64 bytes
    for n in range(max(0, (size * 3) // 4 - 600), size):
        hh = {**h, "pad": "A" * n}
        hl = len(enc(hh))
        need = size - sig_len - 2 - hl
        if need <= 0:
            break
        for m in range(0, 40):
            cc = {**c, "pad": "B" * m}
            if len(enc(cc)) == need:
                p = assemble(hh, cc, K_ES, "ES256")
                assert len(p) == size
                return p
            if len(enc(cc)) > need:
                break
    raise AssertionError(f"no proof of exactly {size} characters")


def nested(depth: int):
    v: object = 1
    for _ in range(depth):
        v = [v]
    return v


# ---------------------------------------------------------------------------------------------
# The fake issuer (discovery + JWKS) and the tokens
class FakeIssuer:
    def __init__(self):
        self.port = 0
        self._server = None

    @property
    def iss(self) -> str:
        return self.tenant("dpop-issuer")

    def tenant(self, name: str) -> str:
        """The issuer at /<name> (every tenant has the same key)."""
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self) -> "FakeIssuer":
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                m = re.fullmatch(r"/([a-z-]+)/(\.well-known/openid-configuration|jwks)", path)
                if m and m.group(2) != "jwks":
                    body = discovery_doc(fake.tenant(m.group(1)), ["ES256"])
                    status = 200
                elif m:
                    body = {"keys": [{**public_jwk(ISSUER_KEY), "kid": "iss-1", "use": "sig", "alg": "ES256"}]}
                    status = 200
                else:
                    body, status = {"error": "not_found"}, 404
                self._send(status, json.dumps(body).encode())

        self._server = serve(Handler, "fake-dpop-issuer")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        shut_down(self._server)
        self._server = None


@dataclass
class Env:
    sc: Sidecar
    fake_as: FakeAuthorizationServer
    iss: str
    hybrid_iss: str = ""   # the jwt_then_introspect issuer (same key, introspected at fake_as)


def jwt_token(env: Env, key=AUTO, bound_to=AUTO, **over) -> str:
    """A JWT access token of the fake issuer bound (cnf.jkt) to KEY (default the ES256 client);
    BOUND_TO: a thumbprint to put there instead, or None for an unbound token."""
    now = int(time.time())
    thumb = (jkt(K_ES if key is AUTO else key)) if bound_to is AUTO else bound_to
    claims = {"iss": env.iss, "sub": "svc-" + secrets.token_hex(4), "aud": AUD, "exp": now + 600, "iat": now - 5,
              "client_id": "dpop-client", "scope": "system-access", "jti": secrets.token_hex(12)}
    if thumb is not None:
        claims["cnf"] = {"jkt": thumb}
    claims.update(over)
    claims = {k: v for k, v in claims.items() if v is not DROP}
    return keep(assemble({"alg": "ES256", "typ": "at+jwt", "kid": "iss-1"}, claims, ISSUER_KEY, "ES256"))


def hybrid_token(env: Env, key=AUTO, bound_to=AUTO) -> str:
    """A JWT of the jwt_then_introspect issuer, verified and then introspected: the fake AS answers
    it active with the same cnf.jkt (the introspection answer decides)."""
    token = jwt_token(env, key, bound_to, iss=env.hybrid_iss)
    now = int(time.time())
    thumb = (jkt(K_ES if key is AUTO else key)) if bound_to is AUTO else bound_to
    answer = {"active": True, "iss": env.hybrid_iss, "aud": AUD, "scope": "system-access", "client_id": "dpop-client",
              "sub": "hybrid-user", "exp": now + 600, "iat": now - 5}
    if thumb is not None:
        answer["cnf"] = {"jkt": thumb}
    return env.fake_as.add_token(token, answer)


def opaque_token(env: Env, key=AUTO, bound_to=AUTO, active: bool = True, **over) -> str:
    """An opaque token the fake AS introspects with cnf.jkt (same arguments as jwt_token)."""
    token = "opq-" + secrets.token_urlsafe(30)
    if not active:
        return keep(token)    # unknown to the AS: active false
    now = int(time.time())
    thumb = (jkt(K_ES if key is AUTO else key)) if bound_to is AUTO else bound_to
    answer = {"active": True, "iss": OPAQUE_ISS, "scope": "system-access", "client_id": "dpop-client",
              "sub": "opaque-user", "exp": now + 600, "iat": now - 5}
    if thumb is not None:
        answer["cnf"] = {"jkt": thumb}
    answer.update(over)
    return env.fake_as.add_token(token, answer)


# ---------------------------------------------------------------------------------------------
# Asking the sidecar (nginx form)
@dataclass
class Req:
    token: "str | None"
    proofs: "list[str]" = field(default_factory=list)   # one DPoP header each
    scheme: str = "DPoP"
    path: str = "/allowed/res"            # X-Original-URI
    method: str = "GET"                   # X-Original-Method
    host: "str | None" = HOST             # Host (None: 127.0.0.1:<port>)
    original_host: "str | None" = None    # X-Original-Host
    proto: "str | None" = "https"         # X-Forwarded-Proto (None: not sent)
    expect_jkt: "str | None" = None       # X-Credential-Jkt of a 200


def send(sc: Sidecar, req: Req) -> "tuple[Response, str]":
    rid = "dpop-" + secrets.token_hex(8)
    headers = [("Host", req.host or f"127.0.0.1:{sc.port}"), ("X-Original-URI", req.path),
               ("X-Original-Method", req.method), ("X-Request-Id", rid)]
    if req.proto is not None:
        headers.append(("X-Forwarded-Proto", req.proto))
    if req.original_host is not None:
        headers.append(("X-Original-Host", req.original_host))
    if req.token is not None:
        headers.append(("Authorization", f"{req.scheme} {req.token}"))
    headers += [("DPoP", p) for p in req.proofs]
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=HTTP_TIMEOUT)
    try:
        conn.putrequest("GET", "/authz", skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read()), rid
    finally:
        conn.close()


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'({_TOKEN})[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|{_TOKEN})')
_SCHEME = re.compile(_TOKEN)
_SEP = re.compile(r"[ \t]*,?[ \t]*")


def challenges(resp) -> "list[tuple[str, dict]]":
    """Every challenge of every WWW-Authenticate header: [(scheme, {param: value})] (RFC 7235)."""
    out: list = []
    for value in resp.headers.get_all("WWW-Authenticate") or []:
        pos = 0
        while True:
            pos = _SEP.match(value, pos).end()
            if pos >= len(value):
                break
            m = _PARAM.match(value, pos) if out else None
            if m:
                name, v = m.group(1).lower(), m.group(2)
                if v.startswith('"'):
                    v = re.sub(r"\\(.)", r"\1", v[1:-1])
                assert name not in out[-1][1], f"parameter {name} twice in {value!r}"
                out[-1][1][name] = v
                pos = m.end()
                continue
            m = _SCHEME.match(value, pos)
            assert m, f"unparsable WWW-Authenticate {value!r}"
            out.append((m.group(0), {}))
            pos = m.end()
    return out


def check_challenge(resp, scheme: str, error: "str | None") -> None:
    got = challenges(resp)
    assert len(got) == 1, f"expected one {scheme} challenge, got {got}: {resp}"
    s, params = got[0]
    assert s == scheme, f"challenge scheme {s!r}, expected {scheme!r}: {resp}"
    assert params.get("realm") == REALM, resp
    assert params.get("error") == error, f"error={params.get('error')!r}, expected {error!r}: {resp}"
    if scheme == "DPoP":
        assert params.get("algs") == ALGS, f"algs={params.get('algs')!r}, expected {ALGS!r}: {resp}"
    else:
        assert "algs" not in params, resp
    extra = set(params) - {"realm", "error", "algs", "error_description"}
    assert not extra, f"unexpected challenge parameters {extra}: {resp}"


def check_reason(sc: Sidecar, rid: str, expected: tuple) -> None:
    line = log_line(sc, rid, timeout=3.0)
    assert line is not None, f"no log line for request {rid}"
    got = line.get("authz.reason")
    assert got in expected, f"log reason {got!r}, expected one of {expected}: {line}"


def assert_allowed_dpop(resp, req: Req) -> None:
    assert resp.status == 200, resp
    assert resp.body == b"", resp
    assert resp.header("X-Credential-Token-Type") == "DPoP", resp
    assert resp.header("X-Credential-Jkt") == req.expect_jkt, resp
    cc = [v.strip().lower() for v in ",".join(resp.headers.get_all("Cache-Control") or []).split(",")]
    assert "no-store" in cc, f"an allowed DPoP answer without Cache-Control: no-store: {resp}"


def assert_allowed_bearer(resp) -> None:
    assert resp.status == 200, resp
    assert resp.body == b"", resp
    assert resp.header("X-Credential-Token-Type") == "Bearer", resp
    assert resp.header("X-Credential-Jkt") is None, resp


def assert_denied(resp, status: int, scheme: str, error: "str | None") -> None:
    assert resp.status == status, resp
    assert resp.body == kong_body(status, KONG_DENIED), resp
    assert (resp.header("Content-Type") or "").split(";")[0].strip() == "application/json", resp
    assert resp.header("X-Authz-Body") == resp.body.decode(), resp
    check_challenge(resp, scheme, error)


# ---------------------------------------------------------------------------------------------
# Building requests
def dpop(env: Env, alg: str = "ES256", key=None, *, path: str = "/allowed/res", token=AUTO, token_kind: str = "jwt",
         rq: "dict | None" = None, **proof_kw) -> Req:
    """A request with a DPoP token bound to KEY and one proof by KEY; PROOF_KW go to the proof maker,
    RQ to the request (method, host, proto, ...)."""
    key = KEYS[alg] if key is None else key
    if token is AUTO:
        token = (jwt_token if token_kind == "jwt" else opaque_token)(env, key)
    proof_kw.setdefault("path", path)
    p = proof(key, alg, token=token, **proof_kw)
    return Req(token, [p], path=path, expect_jkt=jkt(key), **(rq or {}))


def bearer(env: Env, token: str, path: str = "/allowed/res", proofs: "list[str] | None" = None) -> Req:
    return Req(token, proofs or [], scheme="Bearer", path=path)


def fetch_nonce(env: Env, path: str = "/nonce/res") -> str:
    """A nonce-less proof on the nonce policy: 401 use_dpop_nonce with a DPoP-Nonce to use."""
    resp, _ = send(env.sc, dpop(env, path=path))
    assert_denied(resp, 401, "DPoP", "use_dpop_nonce")
    nonce = resp.header("DPoP-Nonce")
    assert nonce, f"use_dpop_nonce without a DPoP-Nonce header: {resp}"
    return nonce


def then(env: Env, first: Req, second: Req, status: int = 200) -> Req:
    """Send FIRST (it must get STATUS) and return SECOND for the row itself."""
    resp, _ = send(env.sc, first)
    assert resp.status == status, f"setup request: expected {status}, got {resp}"
    return second


def replay(env: Env, token_kind: str = "jwt") -> Req:
    req = dpop(env, token_kind=token_kind)
    return then(env, req, Req(req.token, list(req.proofs), path=req.path, expect_jkt=req.expect_jkt))


def same_jti_same_key(env: Env) -> Req:
    jti = secrets.token_urlsafe(18)
    return then(env, dpop(env, jti=jti), dpop(env, jti=jti, iat=int(time.time()) - 1))


def same_jti_other_key(env: Env) -> Req:
    jti = secrets.token_urlsafe(18)
    return then(env, dpop(env, jti=jti), dpop(env, key=K_ES_B, jti=jti))


def with_part(p: str, index: int, text: str) -> str:
    parts = p.split(".")
    parts[index] = text
    return ".".join(parts)


def raw_proof(env: Env, header: "bytes | None" = None, payload: "bytes | None" = None, path: str = "/allowed/res") -> Req:
    """A proof whose header and/or payload is exactly these bytes, signed by the ES256 client."""
    token = jwt_token(env)
    h, c = proof_parts(K_ES, "ES256", token=token, path=path)
    hb = header if header is not None else json.dumps(h, separators=(",", ":")).encode()
    cb = payload if payload is not None else json.dumps(c, separators=(",", ":")).encode()
    return Req(token, [assemble(hb, cb, K_ES, "ES256")], path=path, expect_jkt=jkt(K_ES))


def dup_member(env: Env, where: str, name: str, first, last) -> Req:
    """A proof whose header/payload holds member NAME twice: FIRST, then LAST (the good one)."""
    token = jwt_token(env)
    h, c = proof_parts(K_ES, "ES256", token=token)
    target = h if where == "header" else c
    target.pop(name, None)
    text = json.dumps(target, separators=(",", ":"))
    text = "{" + json.dumps(name) + ":" + json.dumps(first) + "," + text[1:-1] + "," + json.dumps(name) + ":" \
        + json.dumps(last) + "}"
    raw = text.encode()
    hb = raw if where == "header" else json.dumps(h, separators=(",", ":")).encode()
    cb = raw if where == "payload" else json.dumps(c, separators=(",", ":")).encode()
    return Req(token, [assemble(hb, cb, K_ES, "ES256")], expect_jkt=jkt(K_ES))


def proofs_of(env: Env, make: Callable[[str], "list[str]"]) -> Req:
    """A bound token and the DPoP header values MAKE builds from it."""
    token = jwt_token(env)
    return Req(token, make(token), expect_jkt=jkt(K_ES))


def good_proof(token: str, **kw) -> str:
    return proof(K_ES, "ES256", token=token, **kw)


def tweak(req: Req, **attrs) -> Req:
    for k, v in attrs.items():
        setattr(req, k, v)
    return req


def iat_text(env: Env, text: str) -> Req:
    """A proof whose iat is exactly TEXT in the JSON (e.g. a number no double holds)."""
    token = jwt_token(env)
    h, c = proof_parts(K_ES, "ES256", token=token, iat=0)
    payload = json.dumps(c, separators=(",", ":")).replace('"iat":0', '"iat":' + text)
    assert text in payload
    return Req(token, [assemble(h, payload.encode(), K_ES, "ES256")], expect_jkt=jkt(K_ES))


def mangle(req: Req, change: Callable[[str], str]) -> Req:
    """REQ with its one proof passed through CHANGE."""
    return tweak(req, proofs=[change(req.proofs[0])])


def padded(part: str) -> str:
    """PART with = padding (a multiple of 4 gets a whole "====")."""
    return part + "=" * (-len(part) % 4 or 4)


def ago(seconds: float) -> int:
    return int(time.time() - seconds)


def es256_der(env: Env) -> Req:
    token = jwt_token(env)
    h, c = proof_parts(K_ES, "ES256", token=token)
    si = f"{enc(h)}.{enc(c)}"
    return Req(token, [f"{si}.{b64u(K_ES.sign(si.encode(), ec.ECDSA(hashes.SHA256())))}"], expect_jkt=jkt(K_ES))


def flipped(env: Env) -> Req:
    req = dpop(env)
    p = req.proofs[0]
    i = len(p) - 10
    req.proofs = [p[:i] + ("A" if p[i] != "A" else "B") + p[i + 1:]]
    return req


# ---------------------------------------------------------------------------------------------
# The table
PROOF, NONCE = ("dpop_proof",), ("dpop_nonce",)


@dataclass
class Row:
    name: str
    build: Callable[[Env], Req]
    status: int
    scheme: "str | None" = None        # challenge scheme of a denial
    error: "str | None" = None
    reasons: "tuple | None" = None
    nonce: bool = False                # DPoP-Nonce on the answer (else: none)
    kind: str = "dpop"                 # 200: "dpop" or "bearer"
    hostile: bool = True


def ok(name, build, kind="dpop", nonce=False) -> Row:
    return Row(name, build, 200, kind=kind, nonce=nonce, hostile=False)


def bad_proof(name, build, nonce=False) -> Row:
    return Row(name, build, 401, "DPoP", "invalid_dpop_proof", PROOF, nonce=nonce)


def bad_token(name, build, reasons, nonce=False) -> Row:
    return Row(name, build, 401, "DPoP", "invalid_token", reasons, nonce=nonce)


def bearer_refused(name, build) -> Row:
    return Row(name, build, 401, "Bearer", "invalid_token", ("unsupported_binding",))


P = "/allowed/res"

ROWS: list[Row] = [
    # -- good proofs -----------------------------------------------------------------------------
    ok("ES256 proof, JWT token", lambda e: dpop(e, "ES256")),
    ok("RS256 proof, JWT token", lambda e: dpop(e, "RS256")),
    ok("PS256 proof, JWT token", lambda e: dpop(e, "PS256")),
    ok("EdDSA proof, JWT token", lambda e: dpop(e, "EdDSA")),
    ok("ES256 proof, introspected token (token_type DPoP)",
       lambda e: dpop(e, "ES256", token=opaque_token(e, K_ES, token_type="DPoP"))),
    ok("EdDSA proof, introspected token", lambda e: dpop(e, "EdDSA", token_kind="opaque")),
    ok("RS256 proof, introspected token", lambda e: dpop(e, "RS256", token_kind="opaque")),
    ok("ES256 proof, introspected token already cached (by a Bearer try)", lambda e: (lambda t: then(
        e, bearer(e, t), dpop(e, token=t), status=401))(opaque_token(e))),
    ok("dpop: required, a good proof", lambda e: dpop(e, path="/required/res")),
    ok("jwk with extra members (kid, use, alg): thumbprint of the required ones",
       lambda e: dpop(e, jwk={**public_jwk(K_ES), "kid": "client-key", "use": "sig", "alg": "ES256"})),
    ok("unknown header member and claim are ignored", lambda e: dpop(e, header={"kid": "k1"}, claims={"extra": [1]})),
    ok("POST with htm POST", lambda e: dpop(e, htm="POST", rq={"method": "POST"})),
    ok("iat a fraction of a second ago (a non-integer number)", lambda e: dpop(e, iat=time.time() - 0.5)),
    ok("jti of 256 bytes", lambda e: dpop(e, jti="j" * 256)),
    ok("proof of exactly 8192 bytes", lambda e: proofs_of(e, lambda t: [sized_proof(t, MAX_PROOF)])),
    # -- htu normalisation -----------------------------------------------------------------------
    ok("query in X-Original-URI, htu without it", lambda e: dpop(e, path=P + "?a=1&b=2")),
    ok("htu with a query (ignored)", lambda e: dpop(e, htu=f"https://{HOST}{P}?x=other")),
    ok("htu with a fragment (ignored)", lambda e: dpop(e, htu=f"https://{HOST}{P}#frag")),
    ok("htu scheme and host in other case", lambda e: dpop(e, htu=f"HTTPS://API.Example.TEST{P}")),
    ok("htu with the explicit default port :443", lambda e: dpop(e, htu=f"https://{HOST}:443{P}")),
    ok("Host with the explicit default port, htu without", lambda e: dpop(e, rq={"host": f"{HOST}:443"})),
    ok("Host in upper case", lambda e: dpop(e, rq={"host": HOST.upper()})),
    ok("htu with percent-encoded unreserved characters", lambda e: dpop(e, htu=f"https://{HOST}/allowed/%72%65%73")),
    ok("request path with percent-encoded unreserved characters", lambda e: dpop(e, path="/allowed/%72es",
                                                                                htu=f"https://{HOST}{P}")),
    ok("percent-encoding hex case (a%2fb vs a%2Fb)", lambda e: dpop(e, path="/allowed/a%2Fb",
                                                                   htu=f"https://{HOST}/allowed/a%2fb")),
    ok("htu with dot segments", lambda e: dpop(e, htu=f"https://{HOST}/allowed/x/../res")),
    ok("X-Forwarded-Proto http, htu http", lambda e: dpop(e, htu=f"http://{HOST}{P}", rq={"proto": "http"})),
    ok("no X-Forwarded-Proto: https", lambda e: dpop(e, rq={"proto": None})),
    ok("X-Original-Host over Host", lambda e: dpop(e, rq={"host": None, "original_host": HOST})),
    ok("Authorization scheme in lower case (RFC 7235: case-insensitive)",
       lambda e: tweak(dpop(e), scheme="dpop")),
    # -- iat window (2 s margins, real clock) ----------------------------------------------------
    ok(f"iat {MAX_AGE - 2} s old (max age {MAX_AGE})", lambda e: dpop(e, iat=ago(MAX_AGE - 2))),
    bad_proof(f"iat {MAX_AGE + 2} s old", lambda e: dpop(e, iat=ago(MAX_AGE + 2))),
    ok(f"iat {LEEWAY - 2} s ahead (leeway {LEEWAY})", lambda e: dpop(e, iat=ago(-(LEEWAY - 2)))),
    bad_proof(f"iat {LEEWAY + 2} s ahead", lambda e: dpop(e, iat=ago(-(LEEWAY + 2)))),
    ok(f"window policy: iat {W_MAX_AGE - 2} s old", lambda e: dpop(e, path="/window/res", iat=ago(W_MAX_AGE - 2))),
    bad_proof(f"window policy: iat {W_MAX_AGE + 2} s old", lambda e: dpop(e, path="/window/res", iat=ago(W_MAX_AGE + 2))),
    ok(f"window policy: iat {W_LEEWAY - 2} s ahead", lambda e: dpop(e, path="/window/res", iat=ago(-(W_LEEWAY - 2)))),
    bad_proof(f"window policy: iat {W_LEEWAY + 2} s ahead",
              lambda e: dpop(e, path="/window/res", iat=ago(-(W_LEEWAY + 2)))),
    # -- claims missing, wrong type, wrong value -------------------------------------------------
    bad_proof("jti missing", lambda e: dpop(e, jti=DROP)),
    bad_proof("htm missing", lambda e: dpop(e, htm=DROP)),
    bad_proof("htu missing", lambda e: dpop(e, htu=DROP)),
    bad_proof("iat missing", lambda e: dpop(e, iat=DROP)),
    bad_proof("ath missing", lambda e: dpop(e, ath=DROP)),
    bad_proof("jti a number", lambda e: dpop(e, jti=12345)),
    bad_proof("jti empty", lambda e: dpop(e, jti="")),
    bad_proof("jti of 257 bytes", lambda e: dpop(e, jti="j" * 257)),
    bad_proof("iat a string", lambda e: dpop(e, iat=str(int(time.time())))),
    bad_proof("iat null", lambda e: dpop(e, iat=None)),
    bad_proof("iat true", lambda e: dpop(e, iat=True)),
    bad_proof("iat 1e400 (overflows a double)", lambda e: iat_text(e, "1e400")),
    bad_proof("iat -1e400", lambda e: iat_text(e, "-1e400")),
    bad_proof("htu a number", lambda e: dpop(e, htu=443)),
    bad_proof("htu relative (path only)", lambda e: dpop(e, htu=P)),
    bad_proof("htm an array", lambda e: dpop(e, htm=["GET"])),
    bad_proof("htm lower-case get", lambda e: dpop(e, htm="get")),
    bad_proof("htm POST for a GET", lambda e: dpop(e, htm="POST")),
    bad_proof("ath of another token", lambda e: dpop(e, ath=ath_of(jwt_token(e)))),
    bad_proof("ath a number", lambda e: dpop(e, ath=1)),
    bad_proof("ath with = padding", lambda e: (lambda t: dpop(e, token=t, ath=ath_of(t) + "="))(jwt_token(e))),
    bad_proof("ath hex of SHA-256", lambda e: (lambda t: dpop(e, token=t, ath=hashlib.sha256(t.encode()).hexdigest()))(
        jwt_token(e))),
    # -- htu values ------------------------------------------------------------------------------
    bad_proof("htu other port", lambda e: dpop(e, htu=f"https://{HOST}:8443{P}")),
    bad_proof("htu trailing slash", lambda e: dpop(e, htu=f"https://{HOST}{P}/")),
    bad_proof("htu http for an https request", lambda e: dpop(e, htu=f"http://{HOST}{P}")),
    bad_proof("htu https for an http request", lambda e: dpop(e, htu=f"https://{HOST}{P}", rq={"proto": "http"})),
    bad_proof("htu other host", lambda e: dpop(e, htu=f"https://evil.example{P}")),
    bad_proof("htu other path", lambda e: dpop(e, htu=f"https://{HOST}/allowed/other")),
    bad_proof("htu path in other case", lambda e: dpop(e, htu=f"https://{HOST}/allowed/RES")),
    bad_proof("htu with %2F where the request has /", lambda e: dpop(e, path="/allowed/a/b",
                                                                    htu=f"https://{HOST}/allowed/a%2Fb")),
    # userinfo is never sent, and requests-oauth2client keeps it in htu: it is not compared
    # (README "DPoP"); it cannot name another host or path.
    ok("htu with userinfo (not compared)", lambda e: dpop(e, htu=f"https://user@{HOST}{P}")),
    bad_proof("X-Original-Host wins over Host", lambda e: dpop(e, rq={"original_host": "other.example"})),
    bad_proof("X-Original-Host not a host[:port] (a path in it)",
              lambda e: dpop(e, htu=f"https://{HOST}/x{P}", rq={"original_host": f"{HOST}/x"})),
    bad_proof("X-Original-Host with ? (would cut the path off)",
              lambda e: dpop(e, htu=f"https://{HOST}/", rq={"original_host": f"{HOST}?"})),
    bad_proof("Host with # (would cut the path off)", lambda e: dpop(e, htu=f"https://{HOST}/", rq={"host": f"{HOST}#"})),
    bad_proof("X-Original-Host with userinfo", lambda e: dpop(e, rq={"original_host": f"someone@{HOST}"})),
    # -- header: typ, alg, jwk, crit -------------------------------------------------------------
    bad_proof("typ missing", lambda e: dpop(e, typ=DROP)),
    bad_proof("typ JWT", lambda e: dpop(e, typ="JWT")),
    bad_proof("typ at+jwt", lambda e: dpop(e, typ="at+jwt")),
    bad_proof("alg none, no signature", lambda e: dpop(e, header={"alg": "none"}, sign_alg="none")),
    bad_proof("alg missing", lambda e: dpop(e, header={"alg": DROP})),
    bad_proof("HS256 with an oct jwk", lambda e: dpop(e, key=OCT, header={"alg": "HS256"}, sign_key=OCT,
                                                      sign_alg="HS256", token=jwt_token(e, OCT))),
    bad_proof("HS256 keyed with the EC jwk's thumbprint input", lambda e: dpop(
        e, header={"alg": "HS256"}, sign_alg="HS256",
        sign_key=json.dumps(public_jwk(K_ES), sort_keys=True, separators=(",", ":")).encode())),
    bad_proof("ES384 (not on dpop_algorithms)", lambda e: dpop(e, "ES384")),
    bad_proof("RS384 (not on dpop_algorithms)", lambda e: dpop(e, "RS384")),
    bad_proof("jwk missing", lambda e: dpop(e, jwk=DROP)),
    bad_proof("jwk with d (EC private key)", lambda e: dpop(e, jwk=public_jwk(K_ES, private=True))),
    bad_proof("jwk with d (RSA private key)", lambda e: dpop(e, "RS256", jwk=public_jwk(K_RS, private=True))),
    bad_proof("jwk with d (Ed25519 private key)", lambda e: dpop(e, "EdDSA", jwk=public_jwk(K_ED, private=True))),
    bad_proof("jwk an oct key under ES256", lambda e: dpop(e, jwk=public_jwk(OCT))),
    bad_proof("jwk an EC key under RS256", lambda e: dpop(e, "RS256", jwk=public_jwk(K_ES))),
    bad_proof("jwk a P-384 key under ES256", lambda e: dpop(e, "ES256", key=K_ES, jwk=public_jwk(K_P384),
                                                           token=jwt_token(e, K_P384))),
    bad_proof("jwk an Ed25519 key under ES256", lambda e: dpop(e, jwk=public_jwk(K_ED), token=jwt_token(e, K_ED))),
    bad_proof("jwk of key A, signed by key B", lambda e: dpop(e, key=K_ES, sign_key=K_ES_B)),
    bad_proof("jwk a string", lambda e: dpop(e, jwk=json.dumps(public_jwk(K_ES)))),
    bad_proof("crit [exp] unknown", lambda e: dpop(e, header={"crit": ["exp"], "exp": 1})),
    bad_proof("signature: one character changed", flipped),
    bad_proof("signature: ES256 all zero", lambda e: mangle(dpop(e), lambda p: with_part(p, 2, b64u(bytes(64))))),
    bad_proof("signature: ES256 DER-encoded", es256_der),
    # -- duplicates, structure, encoding ---------------------------------------------------------
    bad_proof("duplicate htu in the claims (evil first)",
              lambda e: dup_member(e, "payload", "htu", "https://evil.example/x", htu_for(P))),
    bad_proof("duplicate alg in the header (none first)", lambda e: dup_member(e, "header", "alg", "none", "ES256")),
    bad_proof("duplicate jwk in the header (key B first)", lambda e: dup_member(e, "header", "jwk", public_jwk(K_ES_B),
                                                                                public_jwk(K_ES))),
    bad_proof("300-level nested JSON in the header", lambda e: dpop(e, header={"x": nested(300)})),
    bad_proof("300-level nested JSON in the claims", lambda e: dpop(e, claims={"x": nested(300)})),
    bad_proof("header not JSON", lambda e: raw_proof(e, header=b"not json at all")),
    bad_proof("header JSON with trailing garbage", lambda e: raw_proof(
        e, header=json.dumps(proof_parts(K_ES, "ES256")[0], separators=(",", ":")).encode() + b"xyz")),
    bad_proof("header a JSON array", lambda e: raw_proof(e, header=b'["ES256","dpop+jwt"]')),
    bad_proof("claims a JSON array", lambda e: raw_proof(e, payload=b'[{"htm":"GET"}]')),
    bad_proof("claims not JSON", lambda e: raw_proof(e, payload=b"htm=GET")),
    bad_proof("4 parts", lambda e: proofs_of(e, lambda t: [good_proof(t) + "." + b64u(b"extra")])),
    bad_proof("2 parts", lambda e: proofs_of(e, lambda t: [good_proof(t).rsplit(".", 1)[0]])),
    bad_proof("5 parts (JWE shape)",
              lambda e: proofs_of(e, lambda t: [".".join(b64u(secrets.token_bytes(16)) for _ in range(5))])),
    bad_proof("bad base64 (! in the header)", lambda e: proofs_of(e, lambda t: ["!" + good_proof(t)[1:]])),
    bad_proof("bad base64 (* in the claims)", lambda e: mangle(dpop(e), lambda p: with_part(p, 1, "*" + p.split(".")[1][1:]))),
    bad_proof("header with = padding", lambda e: mangle(dpop(e), lambda p: with_part(p, 0, padded(p.split(".")[0])))),
    bad_proof("not a JWS at all", lambda e: proofs_of(e, lambda t: ["not-a-jws"])),
    bad_proof("empty DPoP header", lambda e: proofs_of(e, lambda t: [""])),
    bad_proof("only dots", lambda e: proofs_of(e, lambda t: [".."])),
    bad_proof("proof of 8193 bytes", lambda e: proofs_of(e, lambda t: [sized_proof(t, MAX_PROOF + 1)])),
    bad_proof("proof of 12000 bytes", lambda e: proofs_of(e, lambda t: [sized_proof(t, 12000)])),
    # -- how many DPoP headers; replay ----------------------------------------------------------
    bad_proof("two DPoP headers (both good)", lambda e: proofs_of(e, lambda t: [good_proof(t), good_proof(t)])),
    bad_proof("DPoP scheme without a DPoP header", lambda e: proofs_of(e, lambda t: [])),
    bad_proof("one DPoP header holding two proofs joined by a comma (as Envoy joins them)",
              lambda e: proofs_of(e, lambda t: [good_proof(t) + "," + good_proof(t)])),
    bad_proof("replay of the same proof", replay),
    bad_proof("same jti and key, another proof", same_jti_same_key),
    ok("same jti with another key (another pair)", same_jti_other_key),
    bad_proof("replay of the same proof, introspected token", lambda e: replay(e, token_kind="opaque")),
    # -- the token --------------------------------------------------------------------------------
    bad_token("DPoP scheme with an unbound JWT", lambda e: dpop(e, token=jwt_token(e, bound_to=None)), ("dpop_unbound",)),
    bad_token("DPoP scheme with an unbound introspected token", lambda e: dpop(e, token=opaque_token(e, bound_to=None)),
              ("dpop_unbound",)),
    bad_token("JWT cnf.jkt of another key", lambda e: dpop(e, token=jwt_token(e, K_ES_B)), ("binding_mismatch",)),
    bad_token("introspected cnf.jkt of another key", lambda e: dpop(e, token=opaque_token(e, K_ES_B)),
              ("binding_mismatch",)),
    bad_token("expired bound JWT with a good proof", lambda e: dpop(e, token=jwt_token(e, exp=int(time.time()) - 120)),
              ("expired",)),
    bad_token("inactive introspected token with a good proof", lambda e: dpop(e, token=opaque_token(e, active=False)),
              ("inactive",)),
    ok("jwt_then_introspect: bound JWT, good proof", lambda e: dpop(e, path="/hybrid/res", token=hybrid_token(e))),
    bad_token("jwt_then_introspect: cnf.jkt of another key", lambda e: dpop(e, path="/hybrid/res",
                                                                           token=hybrid_token(e, K_ES_B)),
              ("binding_mismatch",)),
    # -- Bearer and the modes --------------------------------------------------------------------
    bearer_refused("DPoP-bound JWT sent as Bearer", lambda e: bearer(e, jwt_token(e))),
    bearer_refused("DPoP-bound JWT sent as Bearer with its good proof", lambda e: (lambda t: bearer(
        e, t, proofs=[good_proof(t)]))(jwt_token(e))),
    bearer_refused("DPoP-bound introspected token sent as Bearer", lambda e: bearer(e, opaque_token(e))),
    bearer_refused("dpop: disabled, DPoP-bound JWT as Bearer", lambda e: bearer(e, jwt_token(e), path="/disabled/res")),
    ok("Bearer unbound token with a DPoP header: decided as Bearer", lambda e: (lambda t: bearer(
        e, t, proofs=[good_proof(t)]))(jwt_token(e, bound_to=None)), kind="bearer"),
    ok("Bearer unbound token with a garbage DPoP header: ignored", lambda e: bearer(
        e, jwt_token(e, bound_to=None), proofs=["garbage"]), kind="bearer"),
    Row("dpop: required, Bearer unbound token with a DPoP header", lambda e: (lambda t: bearer(
        e, t, path="/required/res", proofs=[good_proof(t, path="/required/res")]))(jwt_token(e, bound_to=None)),
        401, "DPoP", None, ("dpop_required",)),
    Row("dpop: required, Bearer unbound introspected token", lambda e: bearer(
        e, opaque_token(e, bound_to=None), path="/required/res"), 401, "DPoP", None, ("dpop_required",)),
    Row("dpop: disabled, DPoP scheme with a good proof", lambda e: dpop(e, path="/disabled/res"),
        401, "Bearer", "invalid_request", ("dpop_unsupported",)),
    ok("dpop: disabled, Bearer unbound token", lambda e: bearer(e, jwt_token(e, bound_to=None), path="/disabled/res"),
       kind="bearer"),
    # -- server nonces ---------------------------------------------------------------------------
    Row("nonce policy: no nonce", lambda e: dpop(e, path="/nonce/res"), 401, "DPoP", "use_dpop_nonce", NONCE, nonce=True),
    Row("nonce policy: a made-up nonce", lambda e: dpop(e, path="/nonce/res", nonce=b64u(secrets.token_bytes(24))),
        401, "DPoP", "use_dpop_nonce", NONCE, nonce=True),
    ok("nonce policy: the nonce it gave", lambda e: dpop(e, path="/nonce/res", nonce=fetch_nonce(e)), nonce=True),
    bad_proof("nonce policy: the nonce it gave, wrong htu",
              lambda e: dpop(e, path="/nonce/res", nonce=fetch_nonce(e), htu=f"https://{HOST}/nonce/other"), nonce=True),
    bad_token("nonce policy: the nonce it gave, unbound token",
              lambda e: dpop(e, path="/nonce/res", nonce=fetch_nonce(e), token=jwt_token(e, bound_to=None)),
              ("dpop_unbound",), nonce=True),
    # -- public_base_url -------------------------------------------------------------------------
    ok("public_base_url: htu from it, X-Forwarded-Proto and Host ignored", lambda e: dpop(
        e, path="/public/res", htu=f"{PUBLIC_BASE}/public/res", rq={"proto": "http", "host": "evil.example"})),
    ok("public_base_url: X-Original-Host ignored too", lambda e: dpop(
        e, path="/public/res?q=1", htu=f"{PUBLIC_BASE}/public/res", rq={"original_host": "evil.example"})),
    ok("public_base_url: htu in other case", lambda e: dpop(
        e, path="/public/res", htu="HTTPS://PUBLIC.Example.Test:8443/public/res")),
    bad_proof("public_base_url: htu built from X-Forwarded-Proto and Host", lambda e: dpop(
        e, path="/public/res", htu="http://evil.example/public/res", rq={"proto": "http", "host": "evil.example"})),
    bad_proof("public_base_url: htu from the request's own host", lambda e: dpop(
        e, path="/public/res", htu=f"https://{HOST}/public/res")),
    bad_proof("public_base_url: htu without its port", lambda e: dpop(
        e, path="/public/res", htu="https://public.example.test/public/res")),
]


def _config(iss: str, fake_as: FakeAuthorizationServer, hybrid_iss: str) -> dict:
    both = ["main", "opaque"]
    introspection = {"endpoint": fake_as.url, "client_id": INTROSPECTION_CLIENT_ID,
                     "client_secret": INTROSPECTION_CLIENT_SECRET, "auth_method": "client_secret_basic",
                     "timeout_ms": 1000}
    return {
        "server": {"dpop_replay_entries": 10000, "dpop_nonce_seconds": 60},
        "issuers": [
            {"name": "main", "issuer": iss, "validation": "jwt", "audiences": [AUD], "algorithms": ["ES256"],
             "token_types": ["at+jwt"], "timeout_ms": 1500, "jwks_min_refetch_seconds": 1},
            {"name": "opaque", "issuer": OPAQUE_ISS, "validation": "introspection", "introspection": introspection},
            {"name": "hybrid", "issuer": hybrid_iss, "validation": "jwt_then_introspect", "audiences": [AUD],
             "algorithms": ["ES256"], "token_types": ["at+jwt"], "timeout_ms": 1500, "jwks_min_refetch_seconds": 1,
             "introspection": introspection},
        ],
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
        "logging": {"format": "json", "level": "info"},
        "policies": [
            {"name": "allowed", "match": {"path_prefix": "/allowed/"}, "issuers": both},   # dpop: default
            {"name": "required", "match": {"path_prefix": "/required/"}, "issuers": both, "dpop": "required"},
            {"name": "disabled", "match": {"path_prefix": "/disabled/"}, "issuers": both, "dpop": "disabled"},
            {"name": "nonce", "match": {"path_prefix": "/nonce/"}, "issuers": both, "dpop": "allowed",
             "dpop_nonce": True},
            {"name": "public", "match": {"path_prefix": "/public/"}, "issuers": both, "public_base_url": PUBLIC_BASE},
            {"name": "window", "match": {"path_prefix": "/window/"}, "issuers": both,
             "dpop_max_age_seconds": W_MAX_AGE, "dpop_iat_leeway_seconds": W_LEEWAY},
            {"name": "hybrid", "match": {"path_prefix": "/hybrid/"}, "issuers": ["hybrid"]},
        ],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    issuer = FakeIssuer().start()
    fake_as = FakeAuthorizationServer().start()
    hybrid = issuer.tenant("hybrid-issuer")
    sc = Sidecar(tmp_path_factory.mktemp("sidecar-dpop"), _config(issuer.iss, fake_as, hybrid), name="sidecar-dpop")
    e = Env(sc, fake_as, issuer.iss, hybrid)
    # The issuer's keys are fetched at start: wait (bounded) until an unbound Bearer JWT passes.
    deadline = time.monotonic() + 10
    while True:
        resp, _ = send(sc, bearer(e, jwt_token(e, bound_to=None)))
        if resp.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert resp.status == 200, f"the sidecar never allowed an unbound Bearer JWT: {resp}"
    yield e
    sc.stop()
    fake_as.stop()
    issuer.stop()


def test_table_size():
    assert len(ROWS) >= 45
    assert len({r.name for r in ROWS}) == len(ROWS), "row names must be unique"


def test_thumbprint_matches_an_independent_implementation():
    jwskate = pytest.importorskip("jwskate")   # installed with requests-oauth2client
    for key in (K_ES, K_RS, K_ED, K_P384):
        assert thumbprint(public_jwk(key)) == jwskate.Jwk(public_jwk(key)).thumbprint()


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_proof(env, row: Row):
    req = row.build(env)
    resp, rid = send(env.sc, req)
    assert resp.status < 500, f"5xx for a client's proof: {resp}"
    if row.hostile:
        assert resp.status != 200, f"hostile request allowed: {resp}"
    assert resp.status == row.status, resp
    if row.nonce:
        assert resp.header("DPoP-Nonce"), f"no DPoP-Nonce on an answer of the nonce policy: {resp}"
    else:
        assert resp.header("DPoP-Nonce") is None, f"DPoP-Nonce without server nonces: {resp}"
    if row.status == 200:
        (assert_allowed_dpop(resp, req) if row.kind == "dpop" else assert_allowed_bearer(resp))
        return
    assert_denied(resp, row.status, row.scheme, row.error)
    if row.reasons:
        check_reason(env.sc, rid, row.reasons)


def test_nonce_is_reusable_within_its_window_and_rotates_to_a_valid_one(env):
    nonce = fetch_nonce(env)
    for _ in range(2):   # a nonce is not single-use: a new proof with the same nonce passes
        req = dpop(env, path="/nonce/res", nonce=nonce)
        resp, _ = send(env.sc, req)
        assert_allowed_dpop(resp, req)
        current = resp.header("DPoP-Nonce")
        assert current, resp
    req = dpop(env, path="/nonce/res", nonce=current)   # the nonce of an allow answer is good too
    resp, _ = send(env.sc, req)
    assert_allowed_dpop(resp, req)


def test_a_nonce_claim_is_ignored_where_nonces_are_off(env):
    """Nonces are per policy: the allowed policy ignores a nonce claim and sends no DPoP-Nonce."""
    req = dpop(env, nonce="whatever")
    resp, _ = send(env.sc, req)
    assert_allowed_dpop(resp, req)
    assert resp.header("DPoP-Nonce") is None, resp


def test_hostile_proofs_never_crash_the_sidecar(env):
    """After the table: still alive, still deciding, and the new reasons are counted."""
    req = dpop(env)
    resp, _ = send(env.sc, req)
    assert_allowed_dpop(resp, req)
    assert env.sc.proc.poll() is None
    text = http_request(env.sc.base, "/metrics").body.decode()
    for reason in ("dpop_proof", "dpop_nonce", "dpop_required", "dpop_unbound", "dpop_unsupported"):
        assert re.search(r'^authz_decisions_total\{[^}]*reason="' + reason + r'"[^}]*\} [1-9]', text, re.M), \
            f"no authz_decisions_total with reason {reason}"
