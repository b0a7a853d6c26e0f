"""JWT access tokens (issue 12, DESIGN.md §9) against the real binary, with hostile input:

  1. a table of forged, malformed and borderline tokens, asked straight at the sidecar in the
     nginx form (`/authz` + X-Original-URI): status, exact Kong body, WWW-Authenticate error and
     the log reason of each — a hostile row never gets a 200;
  2. issuer faults: discovery down, JWKS 500 / HTML / oversized / slow / useless / too many keys
     -> 503 in bounded time; the last good key set is kept; key rotation and the refetch limit
     (counted at the fake issuer);
  3. routing between a jwt issuer, an introspection issuer and a jwt_then_introspect issuer
     (counted at the fake authorization servers);
  4. check-config refusing unsafe issuer configurations.

The fake issuer is a ThreadingHTTPServer on 127.0.0.1 (plain http is allowed to loopback) that
serves, per tenant under /t/<name>, OpenID discovery and a JWKS whose behaviour a test switches.
Tokens are forged byte by byte with `cryptography` (base64url + signatures), so duplicate JSON
members, stray padding, extra dots and the like are exactly what is sent.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from conftest import (INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET, KONG_DENIED, KONG_UNAVAILABLE,
                      SIDECAR_BIN, FakeAuthorizationServer, QuietHandler, Sidecar, http_request, kong_body, log_line,
                      serve, shut_down, stack, to_yaml)
from jose_support import b64u, compact, discovery_doc, enc, jwk_int, keep, rsa_key, sign

REALM = 'Bearer realm="authz-sidecar"'
AUD = "api-aud"
ALGORITHMS = ["RS256", "PS256", "ES256", "EdDSA"]


def www(error: str, scope: "str | None" = None) -> str:
    value = f'{REALM}, error="{error}"'
    return value + (f', scope="{scope}"' if scope else "")


# ---------------------------------------------------------------------------------------------
# Keys (generated once per run) and their JWKs
RSA1 = rsa_key()           # kid rsa-1, no own alg: RS256 and PS256 fit
RSA_RS = rsa_key()         # kid rsa-rs256, own alg RS256
RSA_ENC = rsa_key()        # kid rsa-enc, use enc: skipped
RSA_PRIV = rsa_key()       # kid rsa-priv, published with its private members: skipped
RSA_SMALL = rsa_key(1024)  # kid rsa-1024: below 2048 bits, skipped
EC1 = ec.generate_private_key(ec.SECP256R1())     # kid ec-1
ED1 = ed25519.Ed25519PrivateKey.generate()       # kid ed-1
OCT_SECRET = secrets.token_bytes(32)             # kid hmac-1 (kty oct): skipped
ATT_RSA = rsa_key()                              # the attacker's keys: never in any JWKS
ATT_EC = ec.generate_private_key(ec.SECP256R1())
ATT_ED = ed25519.Ed25519PrivateKey.generate()
FAULT_EC = ec.generate_private_key(ec.SECP256R1())   # the fault tenants' key (kid ec-f)


def rsa_jwk(key, kid: str, private: bool = False, **extra) -> dict:
    pub = key.public_key().public_numbers()
    jwk = {"kty": "RSA", "kid": kid, "use": "sig", "n": jwk_int(pub.n), "e": jwk_int(pub.e), **extra}
    if private:
        priv = key.private_numbers()
        jwk.update(d=jwk_int(priv.d), p=jwk_int(priv.p), q=jwk_int(priv.q), dp=jwk_int(priv.dmp1),
                   dq=jwk_int(priv.dmq1), qi=jwk_int(priv.iqmp))
    return jwk


def ec_jwk(key, kid: str, **extra) -> dict:
    pub = key.public_key().public_numbers()
    return {"kty": "EC", "kid": kid, "use": "sig", "crv": "P-256", "x": jwk_int(pub.x, 32), "y": jwk_int(pub.y, 32),
            **extra}


def ed_jwk(key, kid: str, **extra) -> dict:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "kid": kid, "use": "sig", "crv": "Ed25519", "x": b64u(raw), **extra}


def self_signed(key, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30)).sign(key, hashes.SHA256()))


CLIENT_KEY = ec.generate_private_key(ec.SECP256R1())
CLIENT_CERT = self_signed(CLIENT_KEY, "jwt-client")
OTHER_CERT = self_signed(ec.generate_private_key(ec.SECP256R1()), "someone-else")
ATT_CERT = self_signed(ATT_RSA, "attacker")


def x5t_s256(cert: x509.Certificate) -> str:
    return b64u(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def cert_header(cert: x509.Certificate) -> str:
    """The certificate as nginx's $ssl_client_escaped_cert (URL-encoded PEM)."""
    return urllib.parse.quote(cert.public_bytes(serialization.Encoding.PEM).decode(), safe="")


MAIN_KEYS = [
    rsa_jwk(RSA1, "rsa-1"),
    rsa_jwk(RSA_RS, "rsa-rs256", alg="RS256"),
    ec_jwk(EC1, "ec-1"),
    ed_jwk(ED1, "ed-1"),
    rsa_jwk(RSA_ENC, "rsa-enc", use="enc"),
    rsa_jwk(RSA_PRIV, "rsa-priv", private=True),
    rsa_jwk(RSA_SMALL, "rsa-1024"),
    {"kty": "oct", "kid": "hmac-1", "k": b64u(OCT_SECRET), "alg": "HS256"},
]
ATTACKER_JWKS = {"keys": [rsa_jwk(ATT_RSA, "attacker-1"), ec_jwk(ATT_EC, "attacker-ec")]}
USELESS_KEYS = [
    {"kty": "oct", "kid": "ec-f", "k": b64u(OCT_SECRET)},
    rsa_jwk(RSA_ENC, "enc", use="enc"),
    rsa_jwk(RSA_SMALL, "small"),
    rsa_jwk(RSA_PRIV, "priv", private=True),
    {**ec_jwk(FAULT_EC, "ec-f"), "crv": "P-999"},
    {"kty": "XYZ", "kid": "xyz", "x": "AAAA"},
    {**ec_jwk(FAULT_EC, "ec-f-enc"), "use": "enc"},
    {**ec_jwk(FAULT_EC, "ec-f-priv"), "d": jwk_int(FAULT_EC.private_numbers().private_value, 32)},
]


# ---------------------------------------------------------------------------------------------
# Forging (base64url, signing, keep: jose_support)
def jws(header, payload, key=None, alg: "str | None" = None) -> str:
    """header.payload.signature; ALG (default header["alg"]) signs the exact text sent."""
    return keep(compact(header, payload, key, alg or header["alg"]))


DEFAULT_KID = {"RS256": "rsa-1", "RS384": "rsa-1", "PS256": "rsa-1", "ES256": "ec-1", "EdDSA": "ed-1"}
DEFAULT_KEY = {"RS256": RSA1, "RS384": RSA1, "PS256": RSA1, "ES256": EC1, "EdDSA": ED1}
DROP = object()


def hdr(alg: str = "RS256", **over) -> dict:
    h = {"alg": alg, "typ": "at+jwt", "kid": DEFAULT_KID.get(alg, "rsa-1")}
    h.update(over)
    return {k: v for k, v in h.items() if v is not DROP}


def claims(iss: str, /, **over) -> dict:
    now = int(time.time())
    c = {"iss": iss, "sub": "svc-" + secrets.token_hex(4), "aud": AUD, "exp": now + 600, "iat": now - 5,
         "client_id": "jwt-client", "scope": "system-access", "jti": secrets.token_hex(12)}
    c.update(over)
    return {k: v for k, v in c.items() if v is not DROP}


def good(iss: str, /, alg: str = "RS256", key=None, header: "dict | None" = None, **over) -> str:
    return jws(header or hdr(alg), claims(iss, **over), key or DEFAULT_KEY[alg], alg)


def flip(text: str, index: int) -> str:
    """TEXT with the base64url character at INDEX replaced by another one."""
    c = text[index]
    return text[:index] + ("A" if c != "A" else "B") + text[index + 1:]


# ---------------------------------------------------------------------------------------------
# The fake issuer
class Tenant:
    """One issuer at /t/<name>: discovery, JWKS (mode: ok | 500 | html | huge | huge_chunked |
    slow | raw), counters of fetches."""

    def __init__(self, name: str, keys: list, mode: str = "ok"):
        self.name, self.keys, self.mode = name, list(keys), mode
        self.delay = 4.0
        self.raw: bytes = b""
        self.oidc_discovery = True    # false: only RFC 8414's well-known URL answers
        self.jwks_fetches = 0
        self.discovery_fetches = 0


class FakeIssuer:
    def __init__(self):
        self.tenants: dict[str, Tenant] = {}
        self.attacker_hits = 0
        self.lock = threading.Lock()
        self.port = 0
        self._server = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def iss(self, name: str) -> str:
        return f"{self.base}/t/{name}"

    def add(self, name: str, keys: list, mode: str = "ok") -> Tenant:
        t = Tenant(name, keys, mode)
        self.tenants[name] = t
        return t

    def fetches(self, name: str) -> int:
        with self.lock:
            return self.tenants[name].jwks_fetches

    def _handler(self):
        fake = self

        class Handler(QuietHandler):
            def discovery(self, t: Tenant):
                with fake.lock:
                    t.discovery_fetches += 1
                self._send(200, json.dumps(discovery_doc(fake.iss(t.name), ALGORITHMS)).encode())

            def jwks(self, t: Tenant):
                with fake.lock:
                    t.jwks_fetches += 1
                mode = t.mode
                body = json.dumps({"keys": t.keys}).encode()
                if mode == "500":
                    return self._send(500, b'{"error":"server_error"}')
                if mode == "html":
                    return self._send(200, b"<html><body>Service temporarily unavailable</body></html>", "text/html")
                if mode == "raw":
                    return self._send(200, t.raw)
                if mode == "huge":    # a valid JWKS, only too large
                    pad = "x" * (1024 * 1024 + 4096)
                    return self._send(200, json.dumps({"keys": t.keys, "padding": pad}).encode())
                if mode == "huge_chunked":   # the same without Content-Length
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    head = json.dumps({"keys": t.keys})[:-1].encode() + b',"padding":"'
                    chunks = [head] + [b"x" * 65536] * 20 + [b'"}']
                    for c in chunks:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if mode == "slow":
                    time.sleep(t.delay)
                self._send(200, body)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path.startswith("/attacker/"):
                    with fake.lock:
                        fake.attacker_hits += 1
                    if path == "/attacker/cert.pem":
                        pem = ATT_CERT.public_bytes(serialization.Encoding.PEM)
                        return self._send(200, pem, "application/pem-certificate-chain")
                    return self._send(200, json.dumps(ATTACKER_JWKS).encode())
                m = re.fullmatch(r"/t/([^/]+)/(\.well-known/openid-configuration|jwks)", path)
                m8414 = re.fullmatch(r"/\.well-known/oauth-authorization-server/t/([^/]+)", path)
                if m and m.group(1) in fake.tenants:
                    t = fake.tenants[m.group(1)]
                    if m.group(2) == "jwks":
                        return self.jwks(t)
                    if t.oidc_discovery:
                        return self.discovery(t)
                elif m8414 and m8414.group(1) in fake.tenants:
                    return self.discovery(fake.tenants[m8414.group(1)])
                self._send(404, b'{"error":"not_found"}')

        return Handler

    def start(self) -> "FakeIssuer":
        self._server = serve(self._handler(), "fake-issuer")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        shut_down(self._server)
        self._server = None


# ---------------------------------------------------------------------------------------------
# Asking the sidecar (nginx form) and reading its log
def ask(sc: Sidecar, path: str, token: "str | None" = None, headers: "dict | None" = None):
    rid = "jwt-" + secrets.token_hex(8)
    h = {"X-Original-URI": path, "X-Original-Method": "GET", "X-Request-Id": rid, **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    return http_request(sc.base, "/authz", headers=h), rid


def assert_denied(resp, status: int, error: "str | None", scope: "str | None" = None) -> None:
    assert resp.status == status, resp
    assert resp.body == kong_body(status, KONG_DENIED), resp
    assert (resp.header("Content-Type") or "").split(";")[0].strip() == "application/json", resp
    assert resp.header("X-Authz-Body") == resp.body.decode(), resp
    if error is not None:
        assert resp.header("WWW-Authenticate") == www(error, scope), resp


def assert_unavailable(resp) -> None:
    assert resp.status == 503, resp
    assert resp.body == kong_body(503, KONG_UNAVAILABLE), resp
    assert resp.header("Retry-After"), resp


def check_reason(sc: Sidecar, rid: str, expected: tuple) -> None:
    """The denial's log line names one of the EXPECTED reasons. Called after every assertion on
    the answer itself."""
    line = log_line(sc, rid, timeout=3.0)
    assert line is not None, f"no log line for request {rid}"
    got = line.get("authz.reason")
    if got in expected:
        return
    raise AssertionError(f"log reason {got!r}, expected one of {expected}: {line}")


def logging_config() -> dict:
    return {"format": "json", "level": "info"}


# ---------------------------------------------------------------------------------------------
# 1. The table
@dataclass
class Ctx:
    iss: str
    attacker: str     # base URL of the attacker's endpoints (served by the fake issuer, counted)
    iss_lax: str = ""  # issuer "lax": token_types [], allow_any_audience, same keys as main


@dataclass
class Row:
    name: str
    build: Callable[[Ctx], str]
    status: int
    error: "str | None" = None
    reasons: "tuple | None" = None     # accepted log reasons of the denial
    path: str = "/api/x"
    headers: Optional[Callable[[Ctx], dict]] = None
    check: Optional[Callable] = None   # extra assertions on a 200
    scope: "str | None" = None        # expected scope= of an insufficient_scope answer
    hostile: bool = True
    lax: bool = False                 # a token of issuer "lax" (its X-Credential-Iss)


INVALID = ("jwt_invalid",)
NOT_A_JWT = ("jwt_invalid", "no_issuer")     # also "not a JWT" by the routing rule -> no issuer
OK = dict(status=200, hostile=False)


def r401(name, build, reasons=INVALID, **kw) -> Row:
    return Row(name, build, 401, "invalid_token", reasons, **kw)


def unsigned(c: Ctx, alg: str) -> str:
    return keep(f"{enc({'alg': alg, 'typ': 'at+jwt'})}.{enc(claims(c.iss))}.")


def with_sig(token: str, sig: str) -> str:
    return keep(token.rsplit(".", 1)[0] + "." + sig)


def hs256(c: Ctx, secret: bytes, kid: str = "rsa-1") -> str:
    return jws(hdr("HS256", kid=kid), claims(c.iss), secret)


def rsa_pub_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def rsa_pub_der(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


def es256_der_signature(c: Ctx) -> str:
    h, p = enc(hdr("ES256")), enc(claims(c.iss))
    return keep(f"{h}.{p}.{b64u(EC1.sign(f'{h}.{p}'.encode(), ec.ECDSA(hashes.SHA256())))}")


def slash_plus_signature(c: Ctx) -> str:
    """A good RS256 token whose signature is written in the standard alphabet (+ /)."""
    for _ in range(50):
        t = good(c.iss)
        head, sig = t.rsplit(".", 1)
        if "-" in sig or "_" in sig:
            return keep(head + "." + sig.replace("-", "+").replace("_", "/"))
    raise AssertionError("no signature with - or _")


def slash_plus_payload(c: Ctx) -> str:
    """Payload written in the standard alphabet, signed over exactly that text."""
    for _ in range(500):
        p = enc(claims(c.iss, note="??>>" + secrets.token_hex(3)))
        if "-" in p or "_" in p:
            h = enc(hdr())
            si = f"{h}.{p.replace('-', '+').replace('_', '/')}"
            return keep(f"{si}.{b64u(sign('RS256', RSA1, si.encode()))}")
    raise AssertionError("no payload with - or _")


def padded_header(c: Ctx) -> str:
    for n in range(8):
        h = hdr(x="y" * n)
        if len(enc(h)) % 4:
            he = enc(h) + "=" * (-len(enc(h)) % 4)
            si = f"{he}.{enc(claims(c.iss))}"
            return keep(f"{si}.{b64u(sign('RS256', RSA1, si.encode()))}")
    raise AssertionError


def padded_signature(c: Ctx) -> str:
    t = good(c.iss)   # RS256: 256 bytes -> 342 characters, 2 of padding
    assert len(t.rsplit(".", 1)[1]) % 4 == 2
    return keep(t + "==")


def tampered_payload(c: Ctx) -> str:
    """A good token whose payload is re-encoded with another scope, the original signature kept."""
    h, p, sig = good(c.iss, scope="read").split(".")
    claims_ = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims_["scope"] = "system-access admin"
    return keep(f"{h}.{enc(claims_)}.{sig}")


def non_canonical_signature(c: Ctx) -> str:
    """The last character of an RS256 signature (2 bits used, 4 unused) with its unused bits set:
    a lenient decoder reads the same signature, so the token would verify under a second text
    (and a second cache key: a purge by digest would miss it)."""
    t = good(c.iss)
    head, sig = t.rsplit(".", 1)
    assert len(sig) % 4 == 2
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    return keep(f"{head}.{sig[:-1]}{alphabet[(last & 0x30) | 0x0F]}")


def nested(c: Ctx) -> str:
    inner = good(c.iss)
    return jws(hdr(cty="JWT"), inner.encode(), RSA1)


def raw_parts(header: bytes, payload: bytes, key=RSA1, alg: str = "RS256") -> str:
    return jws(header, payload, key, alg)


def dup_header(c: Ctx) -> str:
    return raw_parts(b'{"alg":"none","typ":"at+jwt","kid":"rsa-1","alg":"RS256"}',
                     json.dumps(claims(c.iss)).encode())


def dup_header_kid(c: Ctx) -> str:
    return raw_parts(b'{"alg":"RS256","typ":"at+jwt","kid":"no-such-key","kid":"rsa-1"}',
                     json.dumps(claims(c.iss)).encode())


def dup_payload_iss(c: Ctx) -> str:
    body = '{"iss":"https://evil.example/",' + json.dumps(claims(c.iss))[1:]
    return raw_parts(json.dumps(hdr()).encode(), body.encode())


def dup_payload_exp(c: Ctx) -> str:
    cl = claims(c.iss)
    del cl["exp"]
    now = int(time.time())
    body = json.dumps({"exp": now - 3600, **cl})[:-1] + f',"exp":{now + 600}}}'
    return raw_parts(json.dumps(hdr()).encode(), body.encode())


def dup_payload_aud(c: Ctx) -> str:
    cl = claims(c.iss)
    del cl["aud"]
    body = json.dumps({"aud": "someone-else", **cl})[:-1] + f',"aud":"{AUD}"}}'
    return raw_parts(json.dumps(hdr()).encode(), body.encode())


def big_header(c: Ctx, size: int) -> str:
    return jws(hdr(x="A" * size), claims(c.iss), RSA1)


def has_scope_join(resp, c):
    assert resp.header("X-Credential-Scope") == "system-access read:all", resp


def no_sub_header(resp, c):
    assert resp.header("X-Credential-Sub") is None, resp
    assert resp.header("X-Evil") is None, resp


def aud_header(expected):
    def check(resp, c):
        assert resp.header("X-Credential-Aud") == expected, resp
    return check


def cert(certificate):
    return lambda c: {"X-Client-Cert": cert_header(certificate)}


CLAIMS_OK = dict(groups=["users", "admins"], tenant="acme", level=1)


def claims_token(c: Ctx, **over) -> str:
    return good(c.iss, **{**CLAIMS_OK, **over})


ROWS: list[Row] = [
    # -- good tokens ---------------------------------------------------------------------------
    Row("valid RS256", lambda c: good(c.iss), **OK),
    Row("valid PS256", lambda c: good(c.iss, "PS256"), **OK),
    Row("valid ES256", lambda c: good(c.iss, "ES256"), **OK),
    Row("valid EdDSA", lambda c: good(c.iss, "EdDSA"), **OK),
    Row("RS256 with the key whose own alg is RS256", lambda c: good(c.iss, key=RSA_RS, header=hdr(kid="rsa-rs256")), **OK),
    Row("ES256 without kid: exactly one EC key fits", lambda c: good(c.iss, "ES256", header=hdr("ES256", kid=DROP)), **OK),
    Row("PS256 without kid: one fitting key (rsa-rs256's own alg excludes it)",
        lambda c: good(c.iss, "PS256", header=hdr("PS256", kid=DROP)), **OK),
    Row("typ application/at+jwt", lambda c: good(c.iss, header=hdr(typ="application/at+jwt")), **OK),
    Row("typ AT+JWT (case-insensitive)", lambda c: good(c.iss, header=hdr(typ="AT+JWT")), **OK),
    Row("typ Application/At+Jwt", lambda c: good(c.iss, header=hdr(typ="Application/At+Jwt")), **OK),
    Row("aud array holding the audience", lambda c: good(c.iss, aud=["other", AUD]), check=aud_header(f"other,{AUD}"), **OK),
    Row("scope array is space-joined", lambda c: good(c.iss, scope=["system-access", "read:all"]), check=has_scope_join,
        **OK),
    Row("7 KB header, within every limit", lambda c: big_header(c, 5000), **OK),
    Row("sub with CRLF: 200 without that header", lambda c: good(c.iss, sub="svc\r\nX-Evil: 1"), check=no_sub_header, **OK),
    Row("cnf.x5t#S256 with the matching certificate", lambda c: good(c.iss, cnf={"x5t#S256": x5t_s256(CLIENT_CERT)}),
        headers=cert(CLIENT_CERT), **OK),
    # -- algorithms ----------------------------------------------------------------------------
    r401("alg none", lambda c: unsigned(c, "none")),
    r401("alg NONE", lambda c: unsigned(c, "NONE")),
    r401("alg none with a real RS256 signature attached",
         lambda c: with_sig(unsigned(c, "none"), good(c.iss).rsplit(".", 1)[1])),
    r401("alg empty string", lambda c: jws(hdr(alg=""), claims(c.iss), RSA1, "RS256")),
    r401("HS256 keyed with the RSA public key PEM (confusion)", lambda c: hs256(c, rsa_pub_pem(RSA1))),
    r401("HS256 keyed with the RSA public key DER (confusion)", lambda c: hs256(c, rsa_pub_der(RSA1))),
    r401("HS256 with another secret", lambda c: hs256(c, b"another-secret-another-secret!!")),
    r401("HS256 with the JWKS's own oct key", lambda c: hs256(c, OCT_SECRET, kid="hmac-1")),
    r401("RS384: supported but not on the allow-list", lambda c: good(c.iss, "RS384")),
    r401("RS256 header, kid of the EC key", lambda c: jws(hdr(kid="ec-1"), claims(c.iss), RSA1)),
    r401("RS256 header, kid of the Ed25519 key", lambda c: jws(hdr(kid="ed-1"), claims(c.iss), RSA1)),
    r401("ES256 header, kid of the RSA key", lambda c: jws(hdr("ES256", kid="rsa-1"), claims(c.iss), EC1)),
    r401("ES256 header, kid of the Ed25519 key", lambda c: jws(hdr("ES256", kid="ed-1"), claims(c.iss), EC1)),
    r401("EdDSA header, kid of the EC key", lambda c: jws(hdr("EdDSA", kid="ec-1"), claims(c.iss), ED1)),
    r401("PS256 with the key whose own alg is RS256", lambda c: jws(hdr("PS256", kid="rsa-rs256"), claims(c.iss), RSA_RS)),
    r401("RS256 without kid: two RSA keys fit", lambda c: good(c.iss, header=hdr(kid=DROP))),
    r401("ES256 signature DER-encoded", es256_der_signature),
    r401("ES256 all-zero signature (r = s = 0)", lambda c: with_sig(good(c.iss, "ES256"), b64u(bytes(64)))),
    r401("EdDSA all-zero signature", lambda c: with_sig(good(c.iss, "EdDSA"), b64u(bytes(64)))),
    # -- keys: skipped JWKS entries, kid games, keys in the header -----------------------------
    r401("kid of a use=enc key", lambda c: jws(hdr(kid="rsa-enc"), claims(c.iss), RSA_ENC)),
    r401("kid of a key published with its private part", lambda c: jws(hdr(kid="rsa-priv"), claims(c.iss), RSA_PRIV)),
    r401("kid of a 1024-bit RSA key", lambda c: jws(hdr(kid="rsa-1024"), claims(c.iss), RSA_SMALL)),
    r401("kid ../../etc/passwd", lambda c: jws(hdr(kid="../../../../etc/passwd"), claims(c.iss), RSA1)),
    r401("kid with SQL", lambda c: jws(hdr(kid="x' OR '1'='1' --"), claims(c.iss), RSA1)),
    r401("kid empty string", lambda c: jws(hdr(kid=""), claims(c.iss), RSA1)),
    r401("kid unknown", lambda c: jws(hdr(kid="rotated-" + secrets.token_hex(4)), claims(c.iss), RSA1)),
    r401("kid as a number", lambda c: jws(hdr(kid=1), claims(c.iss), RSA1)),
    r401("jku at the attacker's JWKS", lambda c: jws(hdr(kid="attacker-1", jku=f"{c.attacker}/attacker/jwks"),
                                                     claims(c.iss), ATT_RSA)),
    r401("x5u at the attacker's certificate", lambda c: jws(hdr(kid="attacker-1", x5u=f"{c.attacker}/attacker/cert.pem"),
                                                            claims(c.iss), ATT_RSA)),
    r401("embedded jwk of the attacker", lambda c: jws(hdr(kid="attacker-1", jwk=rsa_jwk(ATT_RSA, "attacker-1")),
                                                       claims(c.iss), ATT_RSA)),
    r401("embedded jwk of the attacker under a known kid", lambda c: jws(hdr(jwk=rsa_jwk(ATT_RSA, "rsa-1")),
                                                                         claims(c.iss), ATT_RSA)),
    r401("embedded jwk, no kid", lambda c: jws(hdr("ES256", kid=DROP, jwk=ec_jwk(ATT_EC, "x")), claims(c.iss), ATT_EC)),
    r401("x5c with the attacker's certificate, no kid",
         lambda c: jws(hdr("PS256", kid=DROP, x5c=[base64.b64encode(ATT_CERT.public_bytes(serialization.Encoding.DER))
                                                   .decode()]),
                       claims(c.iss), ATT_RSA)),
    # -- signature -----------------------------------------------------------------------------
    r401("one flipped signature character", lambda c: (lambda t: keep(flip(t, len(t) - 20)))(good(c.iss))),
    r401("payload altered after signing (scope raised)", tampered_payload),
    r401("signature of another key under the same kid", lambda c: jws(hdr(), claims(c.iss), ATT_RSA)),
    r401("truncated signature", lambda c: (lambda t: keep(t[:-8]))(good(c.iss))),
    r401("empty signature", lambda c: with_sig(good(c.iss), "")),
    r401("signature of another token", lambda c: with_sig(good(c.iss), good(c.iss).rsplit(".", 1)[1])),
    r401("RS256 all-zero signature", lambda c: with_sig(good(c.iss), b64u(bytes(256)))),
    # -- structure and encoding ----------------------------------------------------------------
    r401("4 parts", lambda c: keep(good(c.iss) + "." + b64u(b"extra")), reasons=NOT_A_JWT),
    r401("trailing dot", lambda c: keep(good(c.iss) + "."), reasons=NOT_A_JWT),
    r401("5 parts (JWE shape)", lambda c: keep(f"{enc({'alg': 'RSA-OAEP', 'enc': 'A256GCM', 'typ': 'at+jwt'})}."
                                               f"{b64u(secrets.token_bytes(256))}.{b64u(secrets.token_bytes(12))}."
                                               f"{b64u(secrets.token_bytes(64))}.{b64u(secrets.token_bytes(16))}"),
         reasons=NOT_A_JWT),
    r401("2 parts", lambda c: keep(good(c.iss).rsplit(".", 1)[0]), reasons=NOT_A_JWT),
    r401("leading dot", lambda c: keep("." + good(c.iss)), reasons=NOT_A_JWT),
    Row("20 KB header (past max_header_bytes)", lambda c: big_header(c, 15000), 401, "invalid_request",
        ("request_too_large", "malformed_token")),
    r401("header not JSON", lambda c: raw_parts(b"not json at all", json.dumps(claims(c.iss)).encode()), reasons=NOT_A_JWT),
    r401("header a JSON array", lambda c: raw_parts(b'["RS256","at+jwt"]', json.dumps(claims(c.iss)).encode()),
         reasons=NOT_A_JWT),
    r401("header without alg", lambda c: raw_parts(b'{"typ":"at+jwt","kid":"rsa-1"}', json.dumps(claims(c.iss)).encode()),
         reasons=NOT_A_JWT),
    r401("payload a JSON array", lambda c: raw_parts(json.dumps(hdr()).encode(), json.dumps([claims(c.iss)]).encode()),
         reasons=NOT_A_JWT),
    r401("payload not JSON", lambda c: raw_parts(json.dumps(hdr()).encode(), b"iss=" + c.iss.encode()), reasons=NOT_A_JWT),
    r401("duplicate alg in the header", dup_header, reasons=NOT_A_JWT),
    r401("duplicate kid in the header", dup_header_kid, reasons=NOT_A_JWT),
    r401("duplicate iss in the payload", dup_payload_iss, reasons=NOT_A_JWT),
    r401("duplicate exp in the payload", dup_payload_exp, reasons=NOT_A_JWT),
    r401("duplicate aud in the payload", dup_payload_aud, reasons=NOT_A_JWT),
    Row("header with = padding", padded_header, 401, "invalid_request", ("malformed_token",)),
    r401("signature with = padding", padded_signature),
    r401("signature in the + / alphabet", slash_plus_signature),
    r401("signature base64url not canonical (unused bits set)", non_canonical_signature),
    r401("payload in the + / alphabet", slash_plus_payload, reasons=NOT_A_JWT),
    r401("nested JWT (cty JWT)", nested, reasons=NOT_A_JWT),
    # -- header typ, crit ----------------------------------------------------------------------
    r401("typ JWT (only at+jwt accepted)", lambda c: good(c.iss, header=hdr(typ="JWT"))),
    r401("typ application/jwt", lambda c: good(c.iss, header=hdr(typ="application/jwt"))),
    r401("typ missing", lambda c: good(c.iss, header=hdr(typ=DROP))),
    r401("typ at+jwt with a suffix", lambda c: good(c.iss, header=hdr(typ="at+jwt2"))),
    r401("crit [exp]", lambda c: good(c.iss, header=hdr(crit=["exp"], exp=int(time.time()) + 600))),
    r401("crit []", lambda c: good(c.iss, header=hdr(crit=[]))),
    r401("crit [b64] with b64 false", lambda c: good(c.iss, header=hdr(crit=["b64"], b64=False))),
    # -- claims --------------------------------------------------------------------------------
    r401("expired", lambda c: good(c.iss, exp=int(time.time()) - 120), reasons=("expired",)),
    r401("nbf ahead", lambda c: good(c.iss, nbf=int(time.time()) + 300), reasons=("not_yet_valid",)),
    r401("exp as a string", lambda c: good(c.iss, exp=str(int(time.time()) + 600))),
    r401("exp missing", lambda c: good(c.iss, exp=DROP)),
    r401("exp null", lambda c: good(c.iss, exp=None)),
    r401("nbf as a string", lambda c: good(c.iss, nbf=str(int(time.time()) - 5))),
    r401("iat as a string", lambda c: good(c.iss, iat=str(int(time.time()) - 5))),
    r401("iss missing", lambda c: good(c.iss, iss=DROP), reasons=NOT_A_JWT),
    r401("iss of no issuer", lambda c: good(c.iss, iss="https://evil.example/oidc"), reasons=("jwt_invalid",)),
    r401("iss with a trailing slash", lambda c: good(c.iss, iss=c.iss + "/"), reasons=("jwt_invalid",)),
    r401("iss as an array", lambda c: good(c.iss, iss=[c.iss]), reasons=NOT_A_JWT),
    r401("wrong aud", lambda c: good(c.iss, aud="someone-else"), reasons=("audience_mismatch",)),
    r401("aud array without the audience", lambda c: good(c.iss, aud=["a", "b"]), reasons=("audience_mismatch",)),
    r401("aud missing", lambda c: good(c.iss, aud=DROP), reasons=("audience_mismatch",)),
    r401("payload typ Refresh", lambda c: good(c.iss, typ="Refresh"), reasons=("token_kind",)),
    r401("payload token_type refresh_token", lambda c: good(c.iss, token_type="refresh_token"), reasons=("token_kind",)),
    r401("payload typ ID", lambda c: good(c.iss, typ="ID"), reasons=("token_kind",)),
    r401("cnf.x5t#S256 without a certificate", lambda c: good(c.iss, cnf={"x5t#S256": x5t_s256(CLIENT_CERT)}),
         reasons=("certificate_missing",)),
    r401("cnf.x5t#S256 with another certificate", lambda c: good(c.iss, cnf={"x5t#S256": x5t_s256(CLIENT_CERT)}),
         reasons=("binding_mismatch",), headers=cert(OTHER_CERT)),
    r401("cnf.jkt sent as Bearer", lambda c: good(c.iss, cnf={"jkt": b64u(hashlib.sha256(b"k").digest())}),
         reasons=("unsupported_binding",)),
    Row("no scope -> insufficient_scope with scope=", lambda c: good(c.iss, scope=DROP), 403, "insufficient_scope",
        ("insufficient_scope",), scope="system-access"),
    # -- policies: audiences override, accepted issuers, required_claims ------------------------
    r401("policy audiences override the issuer's", lambda c: good(c.iss), reasons=("audience_mismatch",), path="/aud/x"),
    Row("policy audience held", lambda c: good(c.iss, aud="other-aud"), path="/aud/x", **OK),
    r401("issuer the policy does not accept", lambda c: good(c.iss), reasons=("jwt_invalid",), path="/ghost/x"),
    Row("required_claims hit", lambda c: claims_token(c), path="/claims/x", **OK),
    Row("required_claims hit, other tenant of the list", lambda c: claims_token(c, tenant="umbrella", groups="admins"),
        path="/claims/x", **OK),
    Row("required_claims miss: groups", lambda c: claims_token(c, groups=["users"]), 403, "insufficient_scope",
        ("claims",), path="/claims/x"),
    Row("required_claims miss: tenant", lambda c: claims_token(c, tenant="initech"), 403, "insufficient_scope",
        ("claims",), path="/claims/x"),
    Row("required_claims miss: tenant absent", lambda c: claims_token(c, tenant=DROP), 403, "insufficient_scope",
        ("claims",), path="/claims/x"),
    Row('required_claims miss: level "1" is not 1', lambda c: claims_token(c, level="1"), 403, "insufficient_scope",
        ("claims",), path="/claims/x"),
    Row("required_claims miss: space-separated string is not split", lambda c: claims_token(c, groups="users admins"),
        403, "insufficient_scope", ("claims",), path="/claims/x"),
    # -- an issuer with token_types: [] and allow_any_audience: true: only those checks relax ----
    Row("token_types []: typ missing accepted", lambda c: good(c.iss_lax, header=hdr(typ=DROP)), path="/lax/x", lax=True,
        **OK),
    Row("token_types []: typ JWT accepted", lambda c: good(c.iss_lax, header=hdr(typ="JWT")), path="/lax/x", lax=True, **OK),
    Row("allow_any_audience: any aud accepted", lambda c: good(c.iss_lax, aud="whoever"), path="/lax/x", lax=True, **OK),
    Row("allow_any_audience: no aud accepted", lambda c: good(c.iss_lax, aud=DROP), path="/lax/x", lax=True, **OK),
    r401("lax issuer: alg none still refused", lambda c: unsigned(Ctx(c.iss_lax, c.attacker), "none"), path="/lax/x"),
    r401("lax issuer: foreign signature still refused", lambda c: jws(hdr(typ=DROP), claims(c.iss_lax, aud="x"), ATT_RSA),
         path="/lax/x"),
    r401("lax issuer: expired still refused", lambda c: good(c.iss_lax, exp=int(time.time()) - 60), reasons=("expired",),
         path="/lax/x"),
    Row("required_claims path, scope missing -> scope=", lambda c: claims_token(c, scope="read"), 403,
        "insufficient_scope", ("insufficient_scope",), path="/claims/x", scope="system-access"),
]


def _table_config(issuer: FakeIssuer) -> dict:
    return {
        "issuers": [
            {"name": "main", "issuer": issuer.iss("main"), "validation": "jwt", "audiences": [AUD],
             "algorithms": ALGORITHMS, "token_types": ["at+jwt"], "timeout_ms": 1500,
             "jwks_min_refetch_seconds": 1},
            {"name": "ghost", "issuer": issuer.iss("ghost"), "validation": "jwt", "audiences": [AUD]},
            {"name": "lax", "issuer": issuer.iss("lax"), "validation": "jwt", "allow_any_audience": True,
             "token_types": [], "jwks_min_refetch_seconds": 1},
        ],
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
        "logging": logging_config(),
        "policies": [
            {"name": "claims", "match": {"path_prefix": "/claims/"}, "issuers": ["main"],
             "required_scopes": ["system-access"],
             "required_claims": {"groups": "admins", "tenant": ["acme", "umbrella"], "level": 1}},
            {"name": "aud", "match": {"path_prefix": "/aud/"}, "issuers": ["main"], "audiences": ["other-aud"]},
            {"name": "ghost-only", "match": {"path_prefix": "/ghost/"}, "issuers": ["ghost"]},
            {"name": "lax", "match": {"path_prefix": "/lax/"}, "issuers": ["lax"]},
            {"name": "api", "match": {"path_prefix": "/api/"}, "issuers": ["main"], "required_scopes": ["system-access"],
             "certificate_header": "X-Client-Cert", "certificate_format": "auto"},
        ],
    }


@pytest.fixture(scope="module")
def issuer():
    srv = FakeIssuer()
    srv.add("main", MAIN_KEYS)
    srv.add("ghost", [ec_jwk(ATT_EC, "ghost-1")])
    srv.add("lax", MAIN_KEYS)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def table_sidecar(tmp_path_factory, issuer):
    sc = Sidecar(tmp_path_factory.mktemp("sidecar-jwt-table"), _table_config(issuer), name="sidecar-jwt-table")
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def ctx(issuer) -> Ctx:
    return Ctx(iss=issuer.iss("main"), attacker=issuer.base, iss_lax=issuer.iss("lax"))


def test_table_has_enough_rows():
    assert len(ROWS) >= 45
    assert len({r.name for r in ROWS}) == len(ROWS), "row names must be unique"


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_token(table_sidecar, ctx, row: Row):
    token = row.build(ctx)
    headers = row.headers(ctx) if row.headers else None
    first_rid = None
    for attempt in ("first", "again (cached)"):
        resp, rid = ask(table_sidecar, row.path, token, headers)
        first_rid = first_rid or rid
        if row.hostile:
            assert resp.status != 200, f"hostile token allowed ({attempt}): {resp}"
        assert resp.status == row.status, (attempt, resp)
        if row.status == 200:
            assert resp.body == b"", resp
            assert resp.header("X-Credential-Token-Type") == "Bearer", resp
            assert resp.header("X-Credential-Iss") == (ctx.iss_lax if row.lax else ctx.iss), resp
            assert resp.header("X-Anonymous") is None, resp
            if row.check:
                row.check(resp, ctx)
            continue
        assert_denied(resp, row.status, row.error, row.scope)
    if row.status != 200 and row.reasons:
        check_reason(table_sidecar, first_rid, row.reasons)


def test_verified_claims_are_not_cached_past_exp(table_sidecar, ctx):
    exp = int(time.time()) + 2
    token = good(ctx.iss, exp=exp)
    resp, _ = ask(table_sidecar, "/api/x", token)
    assert resp.status == 200, resp
    assert resp.header("X-Credential-Exp") == str(exp), resp
    time.sleep(max(0.0, exp + 1.2 - time.time()))
    resp, rid = ask(table_sidecar, "/api/x", token)
    assert_denied(resp, 401, "invalid_token")
    check_reason(table_sidecar, rid, ("expired",))


def test_keys_in_the_token_are_never_fetched(table_sidecar, issuer, ctx):
    for build in (lambda: jws(hdr(kid="attacker-1", jku=f"{issuer.base}/attacker/jwks"), claims(ctx.iss), ATT_RSA),
                  lambda: jws(hdr(kid="attacker-1", x5u=f"{issuer.base}/attacker/cert.pem"), claims(ctx.iss), ATT_RSA)):
        resp, _ = ask(table_sidecar, "/api/x", build())
        assert resp.status == 401, resp
    assert issuer.attacker_hits == 0, "the sidecar fetched a URL named in a token"


def test_jwt_metrics(table_sidecar):
    resp = http_request(table_sidecar.base, "/metrics")
    assert resp.status == 200, resp
    text = resp.body.decode()

    def value(name: str) -> float:
        m = re.search(r"^" + re.escape(name) + r" ([0-9.e+]+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    assert value('authz_jwt_verifications_total{issuer="main",outcome="valid"}') >= 10
    assert value('authz_jwt_verifications_total{issuer="main",outcome="invalid"}') >= 30
    assert value('authz_jwks_fetches_total{issuer="main",outcome="ok"}') >= 1


# ---------------------------------------------------------------------------------------------
# 2. Issuer faults: one sidecar, one issuer entry (and one policy, /<name>/) per fault
FAULT_TIMEOUT_MS = 700
N_KEYS = lambda n: [ec_jwk(FAULT_EC, "ec-f")] + [ec_jwk(FAULT_EC, f"k{i}") for i in range(n - 1)]


def fault_token(issuer: FakeIssuer, name: str, kid: str = "ec-f", key=FAULT_EC, **over) -> str:
    return jws(hdr("ES256", kid=kid), claims(issuer.iss(name), **over), key, "ES256")


@pytest.fixture(scope="module")
def fault_issuer():
    srv = FakeIssuer()
    good_keys = [ec_jwk(FAULT_EC, "ec-f")]
    for name in ("lastgood", "rotate", "flood", "flood2", "rfc8414", "huge", "huge_chunked", "slow", "e500", "html"):
        srv.add(name, good_keys)
    srv.tenants["huge"].mode = "huge"
    srv.tenants["huge_chunked"].mode = "huge_chunked"
    srv.tenants["slow"].mode = "slow"
    srv.tenants["e500"].mode = "500"
    srv.tenants["html"].mode = "html"
    srv.tenants["rfc8414"].oidc_discovery = False
    srv.tenants["flood2"].mode, srv.tenants["flood2"].delay = "slow", 0.3   # a fetch in flight for a while
    srv.add("nousable", USELESS_KEYS)
    srv.add("thousand", N_KEYS(1000))
    srv.add("k101", N_KEYS(101))
    srv.add("k100", N_KEYS(100))
    near = srv.add("nearlimit", good_keys, mode="raw")
    body = json.dumps({"keys": good_keys, "padding": ""})
    near.raw = (body[:-2] + "x" * (1_000_000 - len(body)) + '"}').encode()
    assert len(near.raw) == 1_000_000
    srv.start()
    yield srv
    srv.stop()


FAULT_NAMES = ["down", "e500", "slow", "nousable", "html", "huge", "huge_chunked", "thousand", "k101", "k100",
               "nearlimit", "lastgood", "rotate", "flood", "flood2", "rfc8414"]
REFETCH = {"lastgood": 1, "rotate": 2, "flood": 30, "flood2": 3}


@pytest.fixture(scope="module")
def dead_port():
    return stack.free_port()


@pytest.fixture(scope="module")
def fault_sidecar(tmp_path_factory, fault_issuer, dead_port):
    issuers, policies = [], []
    for name in FAULT_NAMES:
        iss = f"http://127.0.0.1:{dead_port}/t/down" if name == "down" else fault_issuer.iss(name)
        entry = {"name": name, "issuer": iss, "validation": "jwt", "audiences": [AUD], "algorithms": ALGORITHMS,
                 "timeout_ms": FAULT_TIMEOUT_MS, "jwks_min_refetch_seconds": REFETCH.get(name, 1)}
        if name in ("huge", "k100"):
            entry["jwks_uri"] = f"{iss}/jwks"      # no discovery for these
        issuers.append(entry)
        policies.append({"name": f"p-{name}", "match": {"path_prefix": f"/{name}/"}, "issuers": [name]})
    config = {"issuers": issuers, "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
              "logging": logging_config(), "policies": policies}
    sc = Sidecar(tmp_path_factory.mktemp("sidecar-jwt-faults"), config, name="sidecar-jwt-faults")
    yield sc
    sc.stop()


def fault_iss(fault_issuer, dead_port, name):
    return f"http://127.0.0.1:{dead_port}/t/down" if name == "down" else fault_issuer.iss(name)


@pytest.mark.parametrize("name", ["down", "e500", "slow", "nousable", "html", "huge", "huge_chunked", "thousand", "k101"])
def test_keys_never_obtained_is_503_in_bounded_time(fault_sidecar, fault_issuer, dead_port, name):
    for _ in range(2):
        token = keep(jws(hdr("ES256", kid="ec-f"), claims(fault_iss(fault_issuer, dead_port, name)), FAULT_EC, "ES256"))
        started = time.monotonic()
        resp, _ = ask(fault_sidecar, f"/{name}/x", token)
        elapsed = time.monotonic() - started
        print(f"\n{name}: 503 after {elapsed:.3f} s")
        assert_unavailable(resp)
        # discovery + JWKS, each within timeout_ms, and slack: never the 4 s of the slow issuer
        assert elapsed < 2 * FAULT_TIMEOUT_MS / 1000 + 1.0, f"{name}: answered after {elapsed:.2f} s"


def ask_once_keys_are_in(sc, path: str, token: str):
    """The sidecar fetches every issuer's key set at start, all at once: on this one Python fake
    issuer, beside the slow and huge tenants, a fetch may miss its timeout_ms then. An issuer
    without keys retries at most once a second (a 503 in between), so ask again, boundedly."""
    resp = None
    for _ in range(4):
        resp, rid = ask(sc, path, token)
        if resp.status != 503:
            break
        time.sleep(1.2)
    return resp


@pytest.mark.parametrize("name", ["k100", "nearlimit"])
def test_keys_at_the_limits_are_used(fault_sidecar, fault_issuer, name):
    resp = ask_once_keys_are_in(fault_sidecar, f"/{name}/x", fault_token(fault_issuer, name))
    assert resp.status == 200, resp


def test_rfc8414_discovery_when_openid_configuration_is_absent(fault_sidecar, fault_issuer):
    resp = ask_once_keys_are_in(fault_sidecar, "/rfc8414/x", fault_token(fault_issuer, "rfc8414"))
    assert resp.status == 200, resp


def test_last_good_key_set_is_kept(fault_sidecar, fault_issuer):
    t = fault_issuer.tenants["lastgood"]
    resp, _ = ask(fault_sidecar, "/lastgood/x", fault_token(fault_issuer, "lastgood"))
    assert resp.status == 200, resp
    t.mode = "500"
    time.sleep(REFETCH["lastgood"] + 0.3)
    before = fault_issuer.fetches("lastgood")
    resp, _ = ask(fault_sidecar, "/lastgood/x", fault_token(fault_issuer, "lastgood"))
    assert resp.status == 200, f"known key after the JWKS started failing: {resp}"
    resp, _ = ask(fault_sidecar, "/lastgood/x", fault_token(fault_issuer, "lastgood", kid="new-" + secrets.token_hex(3)))
    assert_unavailable(resp)
    assert fault_issuer.fetches("lastgood") > before, "an unknown kid must refetch"
    resp, _ = ask(fault_sidecar, "/lastgood/x", fault_token(fault_issuer, "lastgood"))
    assert resp.status == 200, f"known key after a failed refetch: {resp}"


def test_key_rotation_and_refetch_limit(fault_sidecar, fault_issuer):
    t = fault_issuer.tenants["rotate"]
    resp, _ = ask(fault_sidecar, "/rotate/x", fault_token(fault_issuer, "rotate"))
    assert resp.status == 200, resp
    new_key = ec.generate_private_key(ec.SECP256R1())
    t.keys = t.keys + [ec_jwk(new_key, "rotated")]
    time.sleep(REFETCH["rotate"] + 0.3)
    n0 = fault_issuer.fetches("rotate")
    resp, _ = ask(fault_sidecar, "/rotate/x", fault_token(fault_issuer, "rotate", kid="rotated", key=new_key))
    assert resp.status == 200, f"a new key must be found by one refetch: {resp}"
    assert fault_issuer.fetches("rotate") == n0 + 1
    # within jwks_min_refetch_seconds of that fetch: unknown -> 401 without a fetch
    resp, _ = ask(fault_sidecar, "/rotate/x", fault_token(fault_issuer, "rotate", kid="unknown-1"))
    assert_denied(resp, 401, "invalid_token")
    assert fault_issuer.fetches("rotate") == n0 + 1, "refetched within jwks_min_refetch_seconds"
    time.sleep(REFETCH["rotate"] + 0.3)
    resp, _ = ask(fault_sidecar, "/rotate/x", fault_token(fault_issuer, "rotate", kid="unknown-2"))
    assert_denied(resp, 401, "invalid_token")
    assert fault_issuer.fetches("rotate") == n0 + 2, "one refetch for an unknown kid after the interval"


def test_flood_of_forged_kids_fetches_at_most_twice(fault_sidecar, fault_issuer):
    resp, _ = ask(fault_sidecar, "/flood/x", fault_token(fault_issuer, "flood"))
    assert resp.status == 200, resp
    n0 = fault_issuer.fetches("flood")
    tokens = [fault_token(fault_issuer, "flood", kid=f"forged-{i}-{secrets.token_hex(3)}", key=ATT_EC) for i in range(200)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(lambda tok: ask(fault_sidecar, "/flood/x", tok)[0].status, tokens, timeout=30))
    assert set(statuses) == {401}, sorted(set(statuses))
    fetched = fault_issuer.fetches("flood") - n0
    print(f"\nflood: 200 forged kids -> {fetched} JWKS fetch(es)")
    assert fetched <= 2, f"{fetched} JWKS fetches for 200 forged kids within jwks_min_refetch_seconds"


def test_flood_when_a_refetch_is_due_fetches_once(fault_sidecar, fault_issuer):
    """The refetch interval has passed: 200 concurrent forged kids share one (slow) refetch."""
    resp, _ = ask(fault_sidecar, "/flood2/x", fault_token(fault_issuer, "flood2"))
    assert resp.status == 200, resp
    time.sleep(REFETCH["flood2"] + 0.2)
    n0 = fault_issuer.fetches("flood2")
    tokens = [fault_token(fault_issuer, "flood2", kid=f"forged-{i}-{secrets.token_hex(3)}", key=ATT_EC) for i in range(200)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(lambda tok: ask(fault_sidecar, "/flood2/x", tok)[0].status, tokens, timeout=30))
    took = time.monotonic() - started
    assert set(statuses) == {401}, sorted(set(statuses))
    fetched = fault_issuer.fetches("flood2") - n0
    print(f"\nflood2: 200 forged kids in {took:.2f} s -> {fetched} JWKS fetch(es)")
    assert fetched >= 1, "an unknown kid after jwks_min_refetch_seconds must refetch"
    assert fetched <= (1 if took < REFETCH["flood2"] else 2), f"{fetched} fetches in {took:.2f} s"


def test_fault_metrics(fault_sidecar):
    text = http_request(fault_sidecar.base, "/metrics").body.decode()
    assert re.search(r'^authz_jwks_fetches_total\{issuer="e500",outcome="error"\} [1-9]', text, re.M), text[-2000:]
    assert re.search(r'^authz_jwks_fetches_total\{issuer="lastgood",outcome="ok"\} [1-9]', text, re.M)
    assert re.search(r'^authz_jwks_fetches_total\{issuer="lastgood",outcome="error"\} [1-9]', text, re.M)
    assert re.search(r'^authz_jwt_verifications_total\{issuer="flood",outcome="invalid"\} ([2-9]\d\d|\d{4,})', text, re.M)


# ---------------------------------------------------------------------------------------------
# 3. Routing between issuers
@pytest.fixture(scope="module")
def routing(tmp_path_factory):
    iss_srv = FakeIssuer()
    iss_srv.add("ra", [ec_jwk(FAULT_EC, "ec-f")])
    iss_srv.add("rb", [ec_jwk(FAULT_EC, "ec-f")])
    iss_srv.start()
    as_intro = FakeAuthorizationServer().start()
    as_both = FakeAuthorizationServer().start()

    def intro(srv):
        return {"endpoint": srv.url, "client_id": INTROSPECTION_CLIENT_ID, "client_secret": INTROSPECTION_CLIENT_SECRET,
                "auth_method": "client_secret_basic", "timeout_ms": 1000}

    config = {
        "issuers": [
            {"name": "ra", "issuer": iss_srv.iss("ra"), "validation": "jwt", "audiences": [AUD]},
            {"name": "opaque", "issuer": "https://opaque.example/as", "validation": "introspection",
             "introspection": intro(as_intro)},
            {"name": "rb", "issuer": iss_srv.iss("rb"), "validation": "jwt_then_introspect", "audiences": [AUD],
             "introspection": intro(as_both)},
        ],
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 5},
        "logging": logging_config(),
        "policies": [
            {"name": "mixed", "match": {"path_prefix": "/mixed/"}, "issuers": ["ra", "opaque"]},
            {"name": "jwtonly", "match": {"path_prefix": "/jwtonly/"}, "issuers": ["ra"]},
            {"name": "both", "match": {"path_prefix": "/both/"}, "issuers": ["rb"]},
        ],
    }
    sc = Sidecar(tmp_path_factory.mktemp("sidecar-jwt-routing"), config, name="sidecar-jwt-routing")
    yield sc, iss_srv, as_intro, as_both
    sc.stop()
    as_intro.stop()
    as_both.stop()
    iss_srv.stop()


def active(**extra) -> dict:
    now = int(time.time())
    return {"active": True, "scope": "system-access", "client_id": "c", "exp": now + 600, "iat": now - 5,
            "iss": "https://opaque.example/as", **extra}


def test_opaque_token_goes_to_the_introspection_issuer(routing):
    sc, _, as_intro, as_both = routing
    token = as_intro.add_token("opaque-" + secrets.token_urlsafe(24), active())
    resp, _ = ask(sc, "/mixed/x", token)
    assert resp.status == 200, resp
    assert as_intro.calls[token] == 1 and as_both.calls[token] == 0


def test_jwt_of_the_jwt_issuer_never_reaches_the_introspection_server(routing):
    sc, iss_srv, as_intro, as_both = routing
    before = as_intro.total_calls
    token = fault_token(iss_srv, "ra")
    resp, _ = ask(sc, "/mixed/x", token)
    assert resp.status == 200, resp
    assert resp.header("X-Credential-Token-Type") == "Bearer", resp
    forged = fault_token(iss_srv, "ra", key=ATT_EC)
    resp, _ = ask(sc, "/mixed/x", forged)
    assert_denied(resp, 401, "invalid_token")
    assert as_intro.total_calls == before, "a JWT of a jwt issuer was introspected (never a fallback)"


def test_jwt_of_an_unknown_issuer_goes_to_the_introspection_issuer(routing):
    sc, _, as_intro, _ = routing
    stranger = jws(hdr("ES256", kid="x"), claims("https://stranger.example/"), ATT_EC, "ES256")
    resp, _ = ask(sc, "/mixed/x", stranger)
    assert_denied(resp, 401, "invalid_token")       # the fake AS does not know it: inactive
    assert as_intro.calls[stranger] == 1
    known = as_intro.add_token(jws(hdr("ES256", kid="x"), claims("https://stranger.example/"), ATT_EC, "ES256"), active())
    resp, _ = ask(sc, "/mixed/x", known)
    assert resp.status == 200, resp                 # the introspection answer decides
    assert as_intro.calls[known] == 1


def test_no_accepted_introspection_issuer_is_401(routing):
    sc, _, as_intro, _ = routing
    token = as_intro.add_token("opaque-" + secrets.token_urlsafe(24), active())
    resp, rid = ask(sc, "/jwtonly/x", token)
    assert_denied(resp, 401, "invalid_token")
    assert as_intro.calls[token] == 0
    # The policy accepts one JWT issuer: the token goes there and is refused as no JWT of it.
    check_reason(sc, rid, ("jwt_invalid",))


def test_jwt_then_introspect(routing):
    sc, iss_srv, _, as_both = routing
    before = as_both.total_calls
    for forged in (fault_token(iss_srv, "rb", key=ATT_EC),
                   jws(hdr("none", kid="ec-f"), claims(iss_srv.iss("rb")), alg="none"),
                   with_sig(fault_token(iss_srv, "rb"), "")):
        as_both.add_token(forged, active(iss=iss_srv.iss("rb"), aud=AUD))   # even an AS that would say yes is not asked
        resp, _ = ask(sc, "/both/x", forged)
        assert_denied(resp, 401, "invalid_token")
        assert as_both.calls[forged] == 0
    assert as_both.total_calls == before, "a forged JWT reached the AS"
    inactive = fault_token(iss_srv, "rb")
    resp, _ = ask(sc, "/both/x", inactive)
    assert_denied(resp, 401, "invalid_token")
    assert as_both.calls[inactive] == 1
    good_tok = fault_token(iss_srv, "rb")
    as_both.add_token(good_tok, active(iss=iss_srv.iss("rb"), aud=AUD))
    for _ in range(2):
        resp, _ = ask(sc, "/both/x", good_tok)
        assert resp.status == 200, resp
    assert as_both.calls[good_tok] == 1, "the introspection answer is cached"


# ---------------------------------------------------------------------------------------------
# 4. check-config
def _cc_config(**variant) -> dict:
    cfg = {
        "issuers": [
            {"name": "idp", "issuer": "https://idp.example/realms/a", "validation": "jwt", "audiences": [AUD],
             "algorithms": ALGORITHMS},
            {"name": "legacy", "issuer": "https://legacy.example/as", "validation": "introspection",
             "introspection": {"endpoint": "https://legacy.example/introspect", "client_id": "cid",
                               "client_secret": "s3cr3t-value-never-printed"}},
        ],
        "policies": [{"name": "api", "match": {"path_prefix": "/"}, "issuers": ["idp", "legacy"]}],
    }
    for key, fn in variant.items():
        fn(cfg)
    return cfg


def _check_config(tmp_path, cfg: dict) -> "tuple[int, str]":
    f = tmp_path / "config.yaml"
    f.write_text(to_yaml(cfg) + "\n")
    out = subprocess.run([SIDECAR_BIN, "check-config", "--config", str(f)], capture_output=True, text=True, timeout=20)
    return out.returncode, out.stdout + out.stderr


def _set(path, value):
    def apply(cfg):
        target = cfg
        for p in path[:-1]:
            target = target[p]
        if value is DROP:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
    return apply


def _add_second_introspection(cfg):
    cfg["issuers"].append({"name": "legacy2", "issuer": "https://legacy2.example/as", "validation": "introspection",
                           "introspection": {"endpoint": "https://legacy2.example/introspect", "client_id": "cid",
                                             "client_secret": "x"}})
    cfg["policies"][0]["issuers"] = ["idp", "legacy", "legacy2"]


BAD_CONFIGS = [
    ("HS256 in algorithms", {"a": _set(["issuers", 0, "algorithms"], ["RS256", "HS256"])}, ["algorithms", "HS"]),
    ("none in algorithms", {"a": _set(["issuers", 0, "algorithms"], ["none"])}, ["algorithms", "none"]),
    ("two introspection issuers in one policy", {"a": _add_second_introspection}, ["legacy", "legacy2"]),
    ("jwt issuer without audiences", {"a": _set(["issuers", 0, "audiences"], DROP)}, ["audiences"]),
    ("duplicate issuer names", {"a": _set(["issuers", 1, "name"], "idp")}, ["issuers[1].name"]),
    ("unknown issuer in a policy", {"a": _set(["policies", 0, "issuers"], ["idp", "nobody"])}, ["policies[0].issuers"]),
    ("introspection mode without introspection", {"a": _set(["issuers", 1, "introspection"], DROP)}, ["introspection"]),
]


@pytest.mark.parametrize("name, variant, words", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_check_config_refuses(tmp_path, name, variant, words):
    rc, out = _check_config(tmp_path, _cc_config(**variant))
    assert rc == 1, out
    for w in words:
        assert w in out, f"{w!r} not named in:\n{out}"
    assert "s3cr3t-value-never-printed" not in out


def test_check_config_good_lists_the_issuers(tmp_path):
    rc, out = _check_config(tmp_path, _cc_config())
    assert rc == 0, out
    for w in ("idp", "https://idp.example/realms/a", "legacy", "https://legacy.example/as", "jwt", "introspection"):
        assert w in out, f"{w!r} not in:\n{out}"
    assert "s3cr3t-value-never-printed" not in out


def test_serve_refuses_an_unsafe_algorithm(tmp_path):
    cfg = _cc_config(a=_set(["issuers", 0, "algorithms"], ["HS256"]))
    cfg["server"] = {"listen": f"127.0.0.1:{stack.free_port()}"}
    f = tmp_path / "config.yaml"
    f.write_text(to_yaml(cfg) + "\n")
    out = subprocess.run([SIDECAR_BIN, "serve", "--config", str(f)], capture_output=True, text=True, timeout=10)
    assert out.returncode != 0, out
    assert "algorithms" in out.stdout + out.stderr
