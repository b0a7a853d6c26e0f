"""JOSE pieces shared by the hostile suites (test_jwt_hostile.py, test_dpop_hostile.py): base64url,
JWK integers, RSA test keys, signing with every algorithm they send (the refused ones included),
compact JWS assembly over the exact text sent, remembering tokens for test_zz_no_tokens_in_logs,
and the fake issuers' discovery document.

Everything is built here with `cryptography`, byte by byte, so that a test controls exactly what
goes on the wire (duplicate members, stray padding, odd encodings).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from conftest import ALL_TOKENS


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_int(n: int, size: "int | None" = None) -> str:
    """A JWK integer member: N big-endian in SIZE bytes (default: as few as hold it), base64url."""
    return b64u(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


def rsa_key(bits: int = 2048):
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def enc(part) -> str:
    """base64url of a part: bytes / str as they are, anything else as compact JSON."""
    if isinstance(part, bytes):
        return b64u(part)
    if isinstance(part, str):
        return b64u(part.encode())
    return b64u(json.dumps(part, separators=(",", ":")).encode())


_HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def sign(alg: str, key, data: bytes) -> bytes:
    """The JWS signature of DATA with ALG (none, HS*, RS*, PS*, ES* in the r||s form, EdDSA)."""
    if alg.lower() == "none":
        return b""
    if alg == "EdDSA":
        return key.sign(data)
    h = _HASH[alg[2:]]
    if alg.startswith("HS"):
        return hmac.new(key, data, getattr(hashlib, "sha" + alg[2:])).digest()
    if alg.startswith("RS"):
        return key.sign(data, padding.PKCS1v15(), h())
    if alg.startswith("PS"):
        return key.sign(data, padding.PSS(mgf=padding.MGF1(h()), salt_length=h.digest_size), h())
    if alg.startswith("ES"):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h())))
        size = (key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    raise ValueError(alg)


def compact(header, payload, key, alg: str) -> str:
    """header.payload.signature, ALG signing the exact text sent (HEADER / PAYLOAD: see enc)."""
    signing_input = f"{enc(header)}.{enc(payload)}"
    return f"{signing_input}.{b64u(sign(alg, key, signing_input.encode()))}"


def keep(token: str) -> str:
    ALL_TOKENS.add(token)   # test_zz_no_tokens_in_logs: no token may appear in a sidecar log
    return token


def discovery_doc(iss: str, algs: "list[str]") -> dict:
    """The OpenID discovery document of a fake issuer at ISS (JWKS at ISS/jwks)."""
    return {"issuer": iss, "jwks_uri": f"{iss}/jwks", "token_endpoint": f"{iss}/token",
            "authorization_endpoint": f"{iss}/auth", "response_types_supported": ["code"],
            "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": algs}
