#!/usr/bin/env bash
# idp-glewlwyd.sh - run a throwaway Glewlwyd (Debian package) OAuth 2.0 authorization server on
# 127.0.0.1 for the end-to-end tests and the demo:
#   * client_credentials tokens for client "system-client-mtls", authenticated with tls_client_auth
#     (RFC 8705 §2.1) by client1's certificate and bound to it (cnf.x5t#S256, RFC 8705 §3);
#   * RFC 7662 introspection for "introspection-client" (client_secret_basic).
#
#   * access tokens are RS256 JWTs (header typ at+jwt, RFC 9068) whose keys are published at the
#     issuer's jwks_uri (discovery: <issuer>/.well-known/openid-configuration);
#   * RFC 8707 resource indicators: resource=$IDP_RESOURCE at the token endpoint gives aud=$IDP_RESOURCE
#     (without it aud is the scope name, "system-access").
#
# Usage:
#   scripts/idp-glewlwyd.sh WORKDIR          install (if needed), configure, start, verify
#   scripts/idp-glewlwyd.sh --stop WORKDIR   stop the glewlwyd this script started (PID in WORKDIR/glewlwyd.pid)
#   scripts/idp-glewlwyd.sh --start WORKDIR  start a stopped WORKDIR again (same port, database, clients, keys)
#   scripts/idp-glewlwyd.sh --rotate WORKDIR STEP
#                                            change the access-token signing keys through the admin API
#                                            (GET/PUT /api/mod/plugin/oidc, then PUT .../reset), then verify
#                                            the published JWKS and the kid of a fresh token. STEP:
#                                              BA  publish [B, A]: new tokens are signed by key B (ES256,
#                                                  made on first use), tokens signed by A still verify
#                                              B   publish [B] only: key A is retired
#                                              A   publish [A] only again (the key the server started with)
#                                            Key A is the RS256 key of the initial setup, with its kid.
#                                            WORKDIR/keys.env receives the kids (also written at setup):
#                                              IDP_KEYS_STEP, IDP_KID_A, IDP_ALG_A, IDP_KID_B, IDP_ALG_B,
#                                              IDP_SIGNING_KID, IDP_SIGNING_ALG, IDP_PUBLISHED_KIDS (comma list)
#   scripts/idp-glewlwyd.sh --dpop WORKDIR [on|nonce|off]
#                                            DPoP (RFC 9449) on a running server, through the admin API
#                                            (GET/PUT /api/mod/plugin/oidc, then PUT .../reset):
#                                              on     oauth-dpop-allowed, -iat-duration, -iat-gap-duration (default)
#                                              nonce  the same, and oauth-dpop-nonce-mandatory: a proof without the
#                                                     client's current nonce gets 400 use_dpop_nonce + DPoP-Nonce
#                                              off    back to a fresh setup's values: oauth-dpop-allowed false,
#                                                     iat-duration 0, iat-gap-duration 0, no nonce (see below)
#                                            and a client "dpop-client" (client_secret_basic, client_credentials,
#                                            scope system-access). Then it checks, with a proof it makes itself
#                                            (openssl + python3's standard library): token_type DPoP and cnf.jkt =
#                                            the RFC 7638 thumbprint of the proof's key, in the JWT and in
#                                            introspection; the mTLS client with a proof gets x5t#S256 and jkt.
#                                            idp.env receives IDP_DPOP_* (below).
#   Glewlwyd's DPoP, as checked against 2.7.5: the proof's htu must be exactly
#   external_url/api/oidc/token (string comparison: no case folding, no default-port removal, no
#   query); a bad proof gets 403 {"error":"invalid_dpop_proof"} (no WWW-Authenticate); a replayed jti
#   is refused; typ is matched as a substring ("xdpop+jwtx" passes); a jwk with "d" is refused. With
#   nonces the first request gets 400 {"error":"use_dpop_nonce"} and a DPoP-Nonce header; the nonce
#   is per client (not per key) and is replaced every oauth-dpop-nonce-counter + 1 DPoP token
#   requests, the new one announced in the DPoP-Nonce header of the 200 that replaced it. Without a
#   proof the same client gets token_type "bearer" (lower case) and no cnf.
#   The token endpoint checks a proof whenever one is sent, even with oauth-dpop-allowed false (that
#   switch only hides dpop_signing_alg_values_supported in discovery): without --dpop, or after
#   "--dpop WORKDIR off", iat-duration and iat-gap-duration are 0, so a proof whose iat is the
#   current second still gets a DPoP-bound token and any other is 403 invalid_dpop_proof. Glewlwyd
#   cannot be told to refuse or ignore DPoP.
#
# Environment:
#   IDP_PORT       HTTPS port on 127.0.0.1 (default 4594; 4593 is the distro service's)
#   IDP_TOKEN_TTL  access-token lifetime in seconds (default 3600)
#   IDP_RESOURCE   the RFC 8707 resource allowed for the scope system-access (default https://api.example.test/)
#   IDP_DPOP       on|nonce: at setup, switch DPoP on as --dpop does (default: not configured)
#   IDP_DPOP_IAT_DURATION (60), IDP_DPOP_IAT_GAP (5), IDP_DPOP_NONCE_COUNTER (10): the oauth-dpop-* values
#   IDP_PKI_DIR    optional: a directory made by scripts/mkcerts.sh (ca.crt, ca.key, client1.*, client2.*);
#                  its CA signs Glewlwyd's server certificate and its client certs are the ones the
#                  tokens are bound to, so nginx and Glewlwyd trust the same client certificates.
#                  Without it the script makes its own PKI with scripts/mkcerts.sh.
#
# WORKDIR/idp.env receives every URL, path and credential the tests need (shell syntax, sourceable).
# With DPoP configured it also has IDP_DPOP_MODE, IDP_DPOP_CLIENT_ID, IDP_DPOP_CLIENT_SECRET,
# IDP_DPOP_SCOPE, IDP_DPOP_HTU (the exact htu the token endpoint wants), IDP_DPOP_ALGS (discovery's
# dpop_signing_alg_values_supported, comma list), IDP_DPOP_IAT_DURATION, IDP_DPOP_IAT_GAP,
# IDP_DPOP_NONCE (true|false), IDP_DPOP_NONCE_COUNTER.
# Needs root for apt-get when packages are missing (Debian 12). Only 127.0.0.1 is contacted.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PORT="${IDP_PORT:-4594}"
TOKEN_TTL="${IDP_TOKEN_TTL:-3600}"
HOST=127.0.0.1
PLUGIN=oidc
MTLS_CLIENT=system-client-mtls
MTLS_SCOPE=system-access
INTRO_CLIENT=introspection-client
DPOP_CLIENT=dpop-client   # made by --dpop (or IDP_DPOP at setup)
# The caller's DPoP settings, read before any idp.env is sourced (idp.env records the values in force).
DPOP_IAT_DURATION="${IDP_DPOP_IAT_DURATION:-60}"
DPOP_IAT_GAP="${IDP_DPOP_IAT_GAP:-5}"
DPOP_NONCE_COUNTER="${IDP_DPOP_NONCE_COUNTER:-10}"
INTRO_SECRET=introspection-secret-$(head -c 12 /dev/urandom | base64 | tr '+/' '-_')
INTRO_SCOPE=introspect
RESOURCE="${IDP_RESOURCE:-https://api.example.test/}"
ADMIN_USER=admin          # Glewlwyd's default admin account (init.sqlite3.sql)
ADMIN_PASSWORD=password

log() { printf '==> %s\n' "$*"; }
die() { printf 'idp-glewlwyd.sh: ERROR: %s\n' "$*" >&2; exit 1; }

stop_server() {   # $1 = workdir; stops only the PID recorded there, and only if it is glewlwyd
  local dir="$1" pid
  [ -f "$dir/glewlwyd.pid" ] || { echo "no $dir/glewlwyd.pid - nothing to stop"; return 0; }
  pid=$(cat "$dir/glewlwyd.pid")
  if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "glewlwyd" ]; then
    echo "stopping glewlwyd PID $pid"
    kill "$pid"
    for _ in $(seq 1 100); do [ -d /proc/"$pid" ] || break; sleep 0.1; done
    if [ -d /proc/"$pid" ]; then echo "PID $pid still alive after 10 s, sending SIGKILL"; kill -9 "$pid"; fi
  else
    echo "PID ${pid:-?} is not a running glewlwyd - nothing to stop"
  fi
  rm -f "$dir/glewlwyd.pid"
}

start_glewlwyd() {   # uses WORK, BASE_URL, CA; starts glewlwyd on WORK/glewlwyd.conf, sets PID, waits until ready
  nohup glewlwyd --config-file="$WORK/glewlwyd.conf" >> "$WORK/glewlwyd.stdout" 2>&1 < /dev/null &
  PID=$!
  echo "$PID" > "$WORK/glewlwyd.pid"
  local ready=no
  for _ in $(seq 1 300); do
    if curl -sf -o /dev/null --max-time 2 --cacert "$CA" "$BASE_URL/config"; then ready=yes; break; fi
    [ -d /proc/"$PID" ] || break
    sleep 0.1
  done
  [ "$ready" = yes ] || die "glewlwyd did not become ready (log: $WORK/glewlwyd.log)"
  [ "$(cat /proc/"$PID"/comm)" = glewlwyd ] || die "PID $PID is not glewlwyd"
  echo "glewlwyd PID $PID is ready"
}

api() {  # METHOD PATH [JSON-FILE]; uses WORK, BASE_URL, CA, JAR; fails on HTTP >= 400 (body in WORK/api.out)
  local m="$1" p="$2" code
  local args=(-sS --max-time 10 -o "$WORK/api.out" -w '%{http_code}' --cacert "$CA" -b "$JAR" -c "$JAR" -X "$m")
  [ $# -ge 3 ] && args+=(-H 'Content-Type: application/json' --data @"$3")
  code=$(curl "${args[@]}" "$BASE_URL/api$p")
  [ "$code" -lt 400 ] || { echo "admin API $m $p -> HTTP $code: $(cat "$WORK/api.out")" >&2; return 1; }
}

b64url_json() {   # the JSON of one base64url part of a JWT
  local s
  s=$(printf '%s' "$1" | tr '_-' '/+')
  while [ $(( ${#s} % 4 )) -ne 0 ]; do s="$s="; done
  printf '%s' "$s" | base64 -d
}

private_jwk() {   # KEYFILE KID ALG -> the private JWK (RFC 7517/7518) of an RSA or P-256 PEM key, on stdout
  openssl pkcs8 -topk8 -nocrypt -in "$1" -outform DER | python3 -c '
import base64, hashlib, json, sys
der, kid, alg = sys.stdin.buffer.read(), sys.argv[1], sys.argv[2]
def items(b):   # the (tag, value) list of a DER SEQUENCE body
    out, i = [], 0
    while i < len(b):
        tag, n = b[i], b[i + 1]; i += 2
        if n & 0x80:
            k = n & 0x7F; n = int.from_bytes(b[i:i + k], "big"); i += k
        out.append((tag, b[i:i + n])); i += n
    return out
def b64u(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def uint(b): return b64u(b.lstrip(b"\0") or b"\0")
version, algid, inner = items(items(der)[0][1])[:3]        # PKCS#8 PrivateKeyInfo
oids = [v for t, v in items(algid[1]) if t == 0x06]
if oids[0] == bytes.fromhex("2a864886f70d010101"):         # rsaEncryption: PKCS#1 RSAPrivateKey
    f = [v for t, v in items(items(inner[1])[0][1])]
    jwk = dict(zip(("n", "e", "d", "p", "q", "dp", "dq", "qi"), map(uint, f[1:9])), kty="RSA")
elif oids[0] == bytes.fromhex("2a8648ce3d0201") and oids[1] == bytes.fromhex("2a8648ce3d030107"):   # EC P-256
    sec1 = dict(items(items(inner[1])[0][1]))              # ECPrivateKey: 0x04 private key, 0xa1 [1] public key
    pub = items(sec1[0xA1])[0][1][1:]                      # BIT STRING: unused-bits byte, then 04 || x || y
    assert pub[0] == 4 and len(pub) == 65, "uncompressed P-256 point expected"
    jwk = {"kty": "EC", "crv": "P-256", "x": b64u(pub[1:33]), "y": b64u(pub[33:]),
           "d": b64u(sec1[0x04].rjust(32, b"\0"))}
else:
    sys.exit("unsupported key type (RSA or P-256 only)")
if kid == "thumbprint":                                   # RFC 7638 JWK thumbprint
    members = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canon = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True).encode()
    kid = b64u(hashlib.sha256(canon).digest())
jwk.update(kid=kid, alg=alg)
print(json.dumps(jwk))
' "$2" "$3"
}

client1_token() {   # [RESOURCE] -> a client_credentials access token for client1 (tls_client_auth); uses idp.env values
  local args=(-sS --max-time 10 --cacert "$IDP_CA" --cert "$IDP_CLIENT1_CERT" --key "$IDP_CLIENT1_KEY"
              -d grant_type=client_credentials -d client_id="$IDP_MTLS_CLIENT_ID" -d scope="$IDP_MTLS_SCOPE")
  [ -n "${1:-}" ] && args+=(-d "resource=$1")
  curl "${args[@]}" "$IDP_TOKEN_URL" | jq -r '.access_token // empty'
}

# ------------------------------------------------------------------------------ DPoP (RFC 9449) helpers
# A DPoP proof made with openssl and the Python standard library only (no PyPI package): the
# script must be able to check the AS on a machine that has nothing but Debian's packages.
dpop_proof() {   # KEYFILE (P-256 PEM) HTM HTU [NONCE] -> a compact ES256 DPoP proof (typ dpop+jwt, jwk header)
  local jwk
  jwk=$(private_jwk "$1" thumbprint ES256)
  python3 -c '
import base64, json, subprocess, sys, time, uuid
key, htm, htu, nonce, jwk = sys.argv[1:6]
jwk = json.loads(jwk)
def b64u(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def enc(o): return b64u(json.dumps(o, separators=(",", ":")).encode())
claims = {"jti": str(uuid.uuid4()), "htm": htm, "htu": htu, "iat": int(time.time())}
if nonce: claims["nonce"] = nonce
header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": {k: jwk[k] for k in ("kty", "crv", "x", "y")}}
signing_input = (enc(header) + "." + enc(claims)).encode()
der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing_input,
                     capture_output=True, check=True).stdout
def items(b):   # the INTEGERs of the ECDSA-Sig-Value SEQUENCE (short lengths only: P-256)
    assert b[0] == 0x30
    body, out, i = b[2:], [], 0
    while i < len(body):
        n = body[i + 1]; out.append(body[i + 2:i + 2 + n]); i += 2 + n
    return out
r, s = items(der)
print(signing_input.decode() + "." + b64u(r.lstrip(b"\0").rjust(32, b"\0") + s.lstrip(b"\0").rjust(32, b"\0")))
' "$1" "$2" "$3" "${4:-}" "$jwk"
}

dpop_token_request() {   # OUTFILE KEYFILE [NONCE] [mtls] -> HTTP status; body in OUTFILE, headers in OUTFILE.hdr
  local out="$1" key="$2" nonce="${3:-}" mode="${4:-}" args
  args=(-sS --max-time 10 -o "$out" -D "$out.hdr" -w '%{http_code}' --cacert "$IDP_CA"
        -H "DPoP: $(dpop_proof "$key" POST "$IDP_DPOP_HTU" "$nonce")"
        -d grant_type=client_credentials)
  if [ "$mode" = mtls ]; then
    args+=(--cert "$IDP_CLIENT1_CERT" --key "$IDP_CLIENT1_KEY" -d client_id="$IDP_MTLS_CLIENT_ID" -d scope="$IDP_MTLS_SCOPE")
  else
    args+=(-u "$IDP_DPOP_CLIENT_ID:$IDP_DPOP_CLIENT_SECRET" -d scope="$IDP_DPOP_SCOPE")
  fi
  curl "${args[@]}" "$IDP_TOKEN_URL"
}

dpop_token() {   # OUTFILE KEYFILE [mtls] -> a DPoP token answer in OUTFILE (retries once with the AS's DPoP-Nonce)
  local code nonce
  code=$(dpop_token_request "$1" "$2" "" "${3:-}")
  if [ "$code" = 400 ] && [ "$(jq -r '.error // empty' "$1" 2>/dev/null)" = use_dpop_nonce ]; then
    nonce=$(sed -n 's/^[Dd][Pp][Oo][Pp]-[Nn][Oo][Nn][Cc][Ee]: *//p' "$1.hdr" | tr -d '\r')
    [ -n "$nonce" ] || { echo "use_dpop_nonce without a DPoP-Nonce header" >&2; return 1; }
    echo "  the AS asked for a nonce (400 use_dpop_nonce, DPoP-Nonce: $nonce); retrying with it" >&2
    code=$(dpop_token_request "$1" "$2" "$nonce" "${3:-}")
  fi
  [ "$code" = 200 ] || { echo "DPoP token request -> HTTP $code: $(cat "$1")" >&2; return 1; }
}

configure_dpop() {   # MODE (on|nonce|off); uses WORK, BASE_URL, CA and the IDP_* values of idp.env
  local mode="$1" allowed=true nonce=false J="$WORK/api-json" key jkt at payload intro x5t secret
  local iat="$DPOP_IAT_DURATION" gap="$DPOP_IAT_GAP" counter="$DPOP_NONCE_COUNTER"
  case "$mode" in
    on) ;;
    nonce) nonce=true ;;
    off) allowed=false iat=0 gap=0 ;;   # the values of a fresh setup (Glewlwyd's own defaults are 10 and 0)
    *) die "unknown DPoP mode '$mode' (on, nonce or off)" ;;
  esac
  JAR="$WORK/admin-cookies.txt"
  mkdir -p "$J"
  jq -n --arg u "$IDP_ADMIN_USER" --arg p "$IDP_ADMIN_PASSWORD" '{username:$u,password:$p}' > "$J/login.json"
  api POST /auth/ "$J/login.json"
  api GET /mod/plugin/oidc
  # oauth-dpop-iat-duration: how old a proof's iat may be; -iat-gap-duration: how far ahead.
  # oauth-dpop-nonce-mandatory: proofs must carry the client's current nonce (a 400 use_dpop_nonce
  # with a DPoP-Nonce header tells it); the nonce changes after -nonce-counter DPoP token requests.
  (umask 077; jq --argjson allowed "$allowed" --argjson nonce "$nonce" --argjson iat "$iat" --argjson gap "$gap" \
     --argjson counter "$counter" '{display_name, parameters: (.parameters + {
       "oauth-dpop-allowed": $allowed, "oauth-dpop-iat-duration": $iat, "oauth-dpop-iat-gap-duration": $gap,
       "oauth-dpop-nonce-mandatory": $nonce, "oauth-dpop-nonce-counter": $counter})}' \
     "$WORK/api.out" > "$J/dpop-plugin.json")   # holds the signing key: private, and removed below
  api PUT /mod/plugin/oidc "$J/dpop-plugin.json"
  api PUT /mod/plugin/oidc/reset        # a PUT alone does not reload the plugin
  rm -f "$J/dpop-plugin.json"

  # The client_secret_basic client for DPoP tokens (made once; its secret is kept in idp.env).
  secret="${IDP_DPOP_CLIENT_SECRET:-}"
  if ! api GET "/client/$DPOP_CLIENT" 2>/dev/null || [ -z "$secret" ]; then
    [ -n "$secret" ] || secret=dpop-secret-$(head -c 12 /dev/urandom | base64 | tr '+/' '-_')
    jq -n --arg id "$DPOP_CLIENT" --arg scope "$MTLS_SCOPE" --arg secret "$secret" '{
      client_id: $id, name: $id, description: "RFC 9449 DPoP client (client_secret_basic, client_credentials)",
      enabled: true, confidential: true, scope: [$scope], redirect_uri: [],
      authorization_type: ["client_credentials"],
      token_endpoint_auth_method: ["client_secret_basic"],
      client_secret: $secret }' > "$J/client-dpop.json"
    chmod 600 "$J/client-dpop.json"
    if api GET "/client/$DPOP_CLIENT" 2>/dev/null; then api PUT "/client/$DPOP_CLIENT" "$J/client-dpop.json"
    else api POST /client/ "$J/client-dpop.json"; fi
  fi
  rm -f "$JAR" "$WORK/api.out"

  # Glewlwyd compares a proof's htu with external_url + "/" + api_prefix + "/" + plugin name + "/token"
  # as an exact string: no normalisation, no query.
  local algs
  algs=$(curl -sS --max-time 10 --cacert "$CA" "$IDP_DISCOVERY_URL" | jq -r '(.dpop_signing_alg_values_supported // []) | join(",")')
  sed -i '/^IDP_DPOP_/d' "$WORK/idp.env"
  cat >> "$WORK/idp.env" <<ENV
IDP_DPOP_MODE=$mode
IDP_DPOP_CLIENT_ID=$DPOP_CLIENT
IDP_DPOP_CLIENT_SECRET=$secret
IDP_DPOP_SCOPE=$MTLS_SCOPE
IDP_DPOP_HTU=$IDP_ISSUER/token
IDP_DPOP_ALGS=$algs
IDP_DPOP_IAT_DURATION=$iat
IDP_DPOP_IAT_GAP=$gap
IDP_DPOP_NONCE=$nonce
IDP_DPOP_NONCE_COUNTER=$counter
ENV
  set -a; . "$WORK/idp.env"; set +a
  echo "DPoP $mode: oauth-dpop-allowed=$allowed iat-duration=$iat iat-gap-duration=$gap nonce-mandatory=$nonce;" \
       "discovery dpop_signing_alg_values_supported=[$algs]"
  if [ "$mode" = off ]; then
    [ -z "$algs" ] || die "discovery still announces DPoP algorithms [$algs]"
    return 0
  fi
  [ -n "$algs" ] || die "discovery announces no dpop_signing_alg_values_supported"

  # Verify with a throwaway P-256 key: token_type DPoP, cnf.jkt = RFC 7638 thumbprint, in the JWT and
  # in introspection; the mTLS client with a proof gets both cnf members.
  key="$WORK/dpop-check.key"
  (umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$key" 2>/dev/null)
  jkt=$(private_jwk "$key" thumbprint ES256 | jq -r .kid)
  dpop_token "$J/dpop-token.json" "$key" || die "no DPoP token for $DPOP_CLIENT"
  [ "$(jq -r .token_type "$J/dpop-token.json")" = DPoP ] || die "token_type is not DPoP: $(jq -c 'del(.access_token)' "$J/dpop-token.json")"
  at=$(jq -r .access_token "$J/dpop-token.json")
  payload=$(b64url_json "$(cut -d. -f2 <<<"$at")")
  [ "$(jq -r '.cnf.jkt // empty' <<<"$payload")" = "$jkt" ] || die "the token's cnf is $(jq -c .cnf <<<"$payload"), expected jkt $jkt"
  intro=$(curl -sS --max-time 10 --cacert "$CA" -u "$IDP_INTROSPECTION_CLIENT_ID:$IDP_INTROSPECTION_CLIENT_SECRET" \
          -d "token=$at" "$IDP_INTROSPECT_URL")
  [ "$(jq -r .active <<<"$intro")" = true ] && [ "$(jq -r '.cnf.jkt // empty' <<<"$intro")" = "$jkt" ] \
    || die "introspection of the DPoP token: $(jq -c '{active, token_type, cnf}' <<<"$intro")"
  echo "$DPOP_CLIENT: token_type DPoP, cnf.jkt = RFC 7638 thumbprint of the proof's key ($jkt), introspection: $(jq -c '{active, token_type, cnf}' <<<"$intro")"
  dpop_token "$J/dpop-token-mtls.json" "$key" mtls || die "no DPoP token for $IDP_MTLS_CLIENT_ID"
  at=$(jq -r .access_token "$J/dpop-token-mtls.json")
  payload=$(b64url_json "$(cut -d. -f2 <<<"$at")")
  x5t=$(openssl x509 -in "$IDP_CLIENT1_CERT" -outform DER | openssl dgst -sha256 -binary | openssl base64 -A | tr '+/' '-_' | tr -d '=')
  [ "$(jq -r .token_type "$J/dpop-token-mtls.json")" = DPoP ] && [ "$(jq -r '.cnf.jkt // empty' <<<"$payload")" = "$jkt" ] \
    && [ "$(jq -r '.cnf["x5t#S256"] // empty' <<<"$payload")" = "$x5t" ] \
    || die "the mTLS client's DPoP token: token_type $(jq -r .token_type "$J/dpop-token-mtls.json"), cnf $(jq -c .cnf <<<"$payload")"
  echo "$IDP_MTLS_CLIENT_ID with client1's certificate and a proof: token_type DPoP, cnf $(jq -c .cnf <<<"$payload")"
  rm -f "$key" "$J"/dpop-token*.json*
}

write_keys_env() {   # STEP SIGNING_KID SIGNING_ALG PUBLISHED_KIDS; uses WORK, KID_A, KID_B
  cat > "$WORK/keys.env.tmp" <<KEYS
# written by scripts/idp-glewlwyd.sh - the access-token signing keys (source it)
IDP_KEYS_STEP=$1
IDP_KID_A=$KID_A
IDP_ALG_A=RS256
IDP_KID_B=$KID_B
IDP_ALG_B=${KID_B:+ES256}
IDP_SIGNING_KID=$2
IDP_SIGNING_ALG=$3
IDP_PUBLISHED_KIDS=$4
KEYS
  mv "$WORK/keys.env.tmp" "$WORK/keys.env"
}

load_env() {   # WORKDIR -> sets WORK and the IDP_* variables of its idp.env
  WORK=$(cd "$1" 2>/dev/null && pwd) || die "$1 is not a directory"
  [ -e "$WORK/.idp-work" ] && [ -f "$WORK/idp.env" ] && [ -f "$WORK/glewlwyd.conf" ] \
    || die "$WORK was not set up by this script (run: $0 WORKDIR)"
  # shellcheck disable=SC1091
  . "$WORK/idp.env"
  BASE_URL=$IDP_BASE_URL CA=$IDP_CA PORT=$IDP_PORT
}

running() {   # true when WORK/glewlwyd.pid names a running glewlwyd
  local pid
  [ -f "$WORK/glewlwyd.pid" ] || return 1
  pid=$(cat "$WORK/glewlwyd.pid")
  [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = glewlwyd ]
}

if [ "${1:-}" = "--stop" ]; then
  [ $# -eq 2 ] || die "usage: $0 --stop WORKDIR"
  stop_server "$2"
  exit 0
fi

if [ "${1:-}" = "--start" ]; then
  [ $# -eq 2 ] || die "usage: $0 --start WORKDIR"
  load_env "$2"
  if running; then echo "glewlwyd PID $(cat "$WORK/glewlwyd.pid") is already running on $BASE_URL"; exit 0; fi
  . "$HERE/lib.sh"
  port_free "$PORT" || die "something already listens on $HOST:$PORT"
  log "starting glewlwyd again on $BASE_URL"
  started_ok=no
  trap '[ "$started_ok" = yes ] || { tail -n 20 "$WORK/glewlwyd.log" 2>/dev/null || true; stop_server "$WORK"; }' EXIT
  start_glewlwyd
  sed -i "s/^IDP_PID=.*/IDP_PID=$PID/" "$WORK/idp.env"
  started_ok=yes
  exit 0
fi

if [ "${1:-}" = "--dpop" ]; then
  [ $# -eq 2 ] || [ $# -eq 3 ] || die "usage: $0 --dpop WORKDIR [on|nonce|off]"
  load_env "$2"
  running || die "glewlwyd of $WORK is not running (start it with: $0 --start $WORK)"
  command -v python3 >/dev/null || die "python3 is needed to make DPoP proofs"
  set -a; . "$WORK/idp.env"; set +a
  trap 'rm -f "$WORK/admin-cookies.txt"' EXIT
  log "DPoP mode ${3:-on} on $BASE_URL"
  configure_dpop "${3:-on}"
  echo "IDP_DPOP_* in $WORK/idp.env"
  exit 0
fi

if [ "${1:-}" = "--rotate" ]; then
  [ $# -eq 3 ] || die "usage: $0 --rotate WORKDIR BA|B|A"
  STEP="$3"
  case "$STEP" in BA|B|A) ;; *) die "unknown rotation step '$STEP' (BA, B or A)" ;; esac
  load_env "$2"
  running || die "glewlwyd of $WORK is not running (start it with: $0 --start $WORK)"
  command -v python3 >/dev/null || die "python3 is needed to turn the PEM keys into JWKs"
  [ -n "${IDP_JWT_KID:-}" ] || die "$WORK/idp.env has no IDP_JWT_KID (made by an older version of this script)"
  PKI="$WORK/pki"
  KID_A=$IDP_JWT_KID
  KID_B=""
  if [ "$STEP" != A ] && [ ! -f "$PKI/jwt-signing-b.key" ]; then
    (umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/jwt-signing-b.key" 2>/dev/null)
  fi
  [ -f "$PKI/jwt-signing-b.key" ] && KID_B=$(private_jwk "$PKI/jwt-signing-b.key" thumbprint ES256 | jq -r .kid)
  JWK_A=$(private_jwk "$PKI/jwt-signing.key" "$KID_A" RS256)
  case "$STEP" in
    BA) JWKS=$(jq -n --argjson b "$(private_jwk "$PKI/jwt-signing-b.key" "$KID_B" ES256)" --argjson a "$JWK_A" '{keys: [$b, $a]}')
        SIGN_KID=$KID_B SIGN_ALG=ES256 PUBLISHED="$KID_B,$KID_A" ;;
    B)  JWKS=$(jq -n --argjson b "$(private_jwk "$PKI/jwt-signing-b.key" "$KID_B" ES256)" '{keys: [$b]}')
        SIGN_KID=$KID_B SIGN_ALG=ES256 PUBLISHED="$KID_B" ;;
    A)  JWKS=$(jq -n --argjson a "$JWK_A" '{keys: [$a]}')
        SIGN_KID=$KID_A SIGN_ALG=RS256 PUBLISHED="$KID_A" ;;
  esac
  log "rotation step $STEP: publishing [$PUBLISHED], new tokens signed by $SIGN_KID ($SIGN_ALG)"
  JAR="$WORK/admin-cookies.txt"
  J="$WORK/api-json"; mkdir -p "$J"
  trap 'rm -f "$JAR" "$J/rotate-new.json"' EXIT
  jq -n --arg u "$IDP_ADMIN_USER" --arg p "$IDP_ADMIN_PASSWORD" '{username:$u,password:$p}' > "$J/login.json"
  api POST /auth/ "$J/login.json"
  api GET /mod/plugin/oidc
  # The first key of jwks-private signs access tokens (default-kid is ignored for them); the PEM
  # key/cert of the initial setup must go, or it would still be used.
  (umask 077; jq --arg jwks "$JWKS" --arg kid "$SIGN_KID" \
     '{display_name, parameters: (.parameters + {"jwks-private": $jwks, "default-kid": $kid} | del(.key, .cert))}' \
     "$WORK/api.out" > "$J/rotate-new.json")
  api PUT /mod/plugin/oidc "$J/rotate-new.json"
  api PUT /mod/plugin/oidc/reset        # a PUT alone does not reload the plugin
  rm -f "$WORK/api.out"
  GOT=$(curl -sS --max-time 10 --cacert "$CA" "$IDP_JWKS_URL" | jq -r '[.keys[].kid] | join(",")')
  [ "$GOT" = "$PUBLISHED" ] || die "the JWKS publishes [$GOT], expected [$PUBLISHED]"
  AT=$(client1_token)
  [ -n "$AT" ] || die "no access token after the rotation"
  HDR=$(b64url_json "${AT%%.*}")
  [ "$(jq -r .kid <<<"$HDR")" = "$SIGN_KID" ] && [ "$(jq -r .alg <<<"$HDR")" = "$SIGN_ALG" ] \
    || die "a new token's header is $HDR, expected kid $SIGN_KID alg $SIGN_ALG"
  write_keys_env "$STEP" "$SIGN_KID" "$SIGN_ALG" "$PUBLISHED"
  echo "JWKS [$GOT]; a new token's header: $(jq -c . <<<"$HDR"); kids in $WORK/keys.env"
  exit 0
fi

[ $# -eq 1 ] || die "usage: $0 [--stop|--start] WORKDIR | --rotate WORKDIR STEP | --dpop WORKDIR [on|nonce|off]"
case "${IDP_DPOP:-}" in ""|on|nonce) ;; *) die "IDP_DPOP must be on or nonce (got '$IDP_DPOP')" ;; esac
WORK="$1"

# ------------------------------------------------------------------------------ 1. packages
# shellcheck source=scripts/lib.sh
. "$HERE/lib.sh"
ensure_packages glewlwyd sqlite3 openssl curl jq ca-certificates || die "cannot install the packages"
SCHEMA=/usr/share/doc/glewlwyd/database/init.sqlite3.sql.gz
[ -f "$SCHEMA" ] || die "schema $SCHEMA not found (glewlwyd package layout changed?)"

# ------------------------------------------------------------------------------ 2. work dir
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
if [ -e "$WORK/.idp-work" ]; then
  log "re-using $WORK: stopping its previous server and wiping it"
  stop_server "$WORK"
  find "$WORK" -mindepth 1 -delete
elif [ -n "$(ls -A "$WORK")" ]; then
  die "$WORK is not empty and was not made by this script - choose another directory"
fi
touch "$WORK/.idp-work"
if ! port_free "$PORT"; then
  die "something already listens on $HOST:$PORT (set IDP_PORT to another port)"
fi

# ------------------------------------------------------------------------------ 3. PKI
PKI="$WORK/pki"
mkdir -p "$PKI"
if [ -n "${IDP_PKI_DIR:-}" ]; then
  log "PKI: re-using the CA and client certificates of $IDP_PKI_DIR"
  for f in ca.crt ca.key client1.crt client1.key client2.crt client2.key; do
    [ -f "$IDP_PKI_DIR/$f" ] || die "IDP_PKI_DIR=$IDP_PKI_DIR has no $f (make it with scripts/mkcerts.sh)"
    cp "$IDP_PKI_DIR/$f" "$PKI/$f"
  done
  # Glewlwyd's own server certificate, issued by the shared CA.
  (
    cd "$PKI"
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/O=Example Org/CN=localhost" 2>/dev/null
    printf '%b\n' "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1" > server.ext
    openssl x509 -req -sha256 -days 30 -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -CAserial server.srl -extfile server.ext -out server.crt 2>/dev/null
    rm -f server.csr server.ext server.srl
  )
else
  log "PKI: new throwaway CA in $PKI"
  bash "$HERE/mkcerts.sh" "$PKI" >/dev/null
fi
openssl genrsa -out "$PKI/jwt-signing.key" 2048 2>/dev/null          # RS256 key of the OIDC plugin
openssl rsa -in "$PKI/jwt-signing.key" -pubout -out "$PKI/jwt-signing.pub" 2>/dev/null
chmod 600 "$PKI"/*.key
openssl verify -CAfile "$PKI/ca.crt" "$PKI/server.crt" "$PKI/client1.crt" "$PKI/client2.crt" >/dev/null
# Glewlwyd compares tls_client_auth_subject_dn with the RFC 4514 rendering, e.g. "CN=client1,O=Example Org"
CLIENT1_DN=$(openssl x509 -in "$PKI/client1.crt" -noout -subject -nameopt RFC2253 | sed 's/^subject=//')

# ------------------------------------------------------------------------------ 4. config + database
DB="$WORK/glewlwyd.db"
zcat "$SCHEMA" | sqlite3 "$DB"
# The shipped client-module "data-format" whitelist omits tls_client_auth_subject_dn, which would be
# dropped silently; add it so the mTLS client can be bound to client1's subject DN.
sqlite3 "$DB" "UPDATE g_client_module_instance SET gcmi_parameters = json_set(gcmi_parameters,
  '\$.\"data-format\".tls_client_auth_subject_dn', json('{\"multiple\":false,\"read\":true,\"write\":true}'))
  WHERE gcmi_name='database';"

BASE_URL="https://$HOST:$PORT"
CONF="$WORK/glewlwyd.conf"
cat > "$CONF" <<CONF
# generated by scripts/idp-glewlwyd.sh - loopback-only Glewlwyd for tests
port=$PORT
bind_address="$HOST"
external_url="$BASE_URL"
login_url="login.html"
api_prefix="api"
allow_origin="*"
log_mode="file"
log_level="INFO"
log_file="$WORK/glewlwyd.log"
cookie_secure=1
session_expiration=3600
session_key="GLEWLWYD2_SESSION_ID"
admin_session_authentication="cookie"
profile_session_authentication="cookie"
admin_scope="g_admin"
profile_scope="g_profile"
user_module_path="/usr/lib/glewlwyd/user"
client_module_path="/usr/lib/glewlwyd/client"
user_auth_scheme_module_path="/usr/lib/glewlwyd/scheme"
plugin_module_path="/usr/lib/glewlwyd/plugin"
# HTTPS; secure_connection_ca_file makes the server request (not require) a client certificate
# and verify it against this CA.
use_secure_connection=true
secure_connection_key_file="$PKI/server.key"
secure_connection_pem_file="$PKI/server.crt"
secure_connection_ca_file="$PKI/ca.crt"
hash_algorithm="SHA512"
database =
{
  type = "sqlite3"
  path = "$DB"
};
CONF

# ------------------------------------------------------------------------------ 5. start
log "starting glewlwyd on $BASE_URL"
started_ok=no
# Any failure from here on stops the server we started (nothing is left running behind a failed run).
trap '[ "$started_ok" = yes ] || { tail -n 20 "$WORK/glewlwyd.log" "$WORK/glewlwyd.stdout" 2>/dev/null || true; stop_server "$WORK"; }' EXIT
CA="$PKI/ca.crt"
: > "$WORK/glewlwyd.stdout"
start_glewlwyd

# ------------------------------------------------------------------------------ 6. scopes, plugin, clients (admin REST API)
JAR="$WORK/admin-cookies.txt"
J="$WORK/api-json"; mkdir -p "$J"
jq -n --arg u "$ADMIN_USER" --arg p "$ADMIN_PASSWORD" '{username:$u,password:$p}' > "$J/login.json"
api POST /auth/ "$J/login.json"
for s in "$MTLS_SCOPE" "$INTRO_SCOPE"; do
  jq -n --arg s "$s" '{name:$s,display_name:$s,description:("scope "+$s),password_required:false,scheme:{}}' > "$J/scope-$s.json"
  api POST /scope/ "$J/scope-$s.json"
done
jq -n --rawfile key "$PKI/jwt-signing.key" --rawfile cert "$PKI/jwt-signing.pub" \
      --arg iss "$BASE_URL/api/$PLUGIN" --arg name "$PLUGIN" --argjson ttl "$TOKEN_TTL" --arg iscope "$INTRO_SCOPE" \
      --arg scope "$MTLS_SCOPE" --arg resource "$RESOURCE" '{
  module: "oidc", name: $name, display_name: "OIDC for authz-sidecar tests", enabled: true,
  parameters: {
    iss: $iss, "jwt-type": "rsa", "jwt-key-size": "256", key: $key, cert: $cert,
    "access-token-duration": $ttl, "refresh-token-duration": 1209600, "code-duration": 600,
    "allow-non-oidc": true,
    "auth-type-client-enabled": true,
    "auth-type-code-enabled": false, "auth-type-token-enabled": false, "auth-type-implicit-enabled": false,
    "auth-type-password-enabled": false, "auth-type-refresh-enabled": false, "auth-type-device-enabled": false,
    "client-cert-source": "TLS",
    "client-cert-use-endpoint-aliases": false,
    "client-cert-self-signed-allowed": false,
    "introspection-revocation-allowed": true,
    "introspection-revocation-allow-target-client": true,
    "introspection-revocation-auth-scope": [$iscope],
    "resource-allowed": true, "resource-scope": {($scope): [$resource]}, "resource-scope-and-client-property": false
  }}' > "$J/plugin.json"
# "introspection-revocation-auth-scope" is needed even with client_secret_basic: without it
# glewlwyd 2.7.5 only lets a client introspect its own tokens ({"active":false} for the others).
# "resource-*" (RFC 8707): a token request with resource=$RESOURCE gets aud=$RESOURCE; without a
# resource parameter aud stays the scope name.
api POST /mod/plugin/ "$J/plugin.json"
jq -n --arg id "$MTLS_CLIENT" --arg scope "$MTLS_SCOPE" --arg dn "$CLIENT1_DN" '{
  client_id: $id, name: $id, description: "RFC 8705 tls_client_auth client bound to client1",
  enabled: true, confidential: true, scope: [$scope], redirect_uri: [],
  authorization_type: ["client_credentials"],
  token_endpoint_auth_method: ["tls_client_auth"],
  tls_client_auth_subject_dn: $dn }' > "$J/client-mtls.json"
api POST /client/ "$J/client-mtls.json"
jq -n --arg id "$INTRO_CLIENT" --arg scope "$INTRO_SCOPE" --arg secret "$INTRO_SECRET" '{
  client_id: $id, name: $id, description: "RFC 7662 introspection client (client_secret_basic)",
  enabled: true, confidential: true, scope: [$scope], redirect_uri: [],
  authorization_type: ["client_credentials"],
  token_endpoint_auth_method: ["client_secret_basic"],
  client_secret: $secret }' > "$J/client-introspection.json"
api POST /client/ "$J/client-introspection.json"
rm -f "$JAR"

OIDC="$BASE_URL/api/$PLUGIN"
umask 077
cat > "$WORK/idp.env" <<ENV
# written by scripts/idp-glewlwyd.sh - source it
IDP_PID=$PID
IDP_PORT=$PORT
IDP_BASE_URL=$BASE_URL
IDP_ISSUER=$OIDC
IDP_DISCOVERY_URL=$OIDC/.well-known/openid-configuration
IDP_TOKEN_URL=$OIDC/token
IDP_INTROSPECT_URL=$OIDC/introspect
IDP_REVOKE_URL=$OIDC/revoke
IDP_JWKS_URL=$OIDC/jwks
IDP_CA=$PKI/ca.crt
IDP_CA_KEY=$PKI/ca.key
IDP_CLIENT1_CERT=$PKI/client1.crt
IDP_CLIENT1_KEY=$PKI/client1.key
IDP_CLIENT2_CERT=$PKI/client2.crt
IDP_CLIENT2_KEY=$PKI/client2.key
IDP_MTLS_CLIENT_ID=$MTLS_CLIENT
IDP_MTLS_SCOPE=$MTLS_SCOPE
IDP_INTROSPECTION_CLIENT_ID=$INTRO_CLIENT
IDP_INTROSPECTION_CLIENT_SECRET=$INTRO_SECRET
IDP_ADMIN_USER=$ADMIN_USER
IDP_ADMIN_PASSWORD=$ADMIN_PASSWORD
IDP_WORKDIR=$WORK
IDP_RESOURCE=$RESOURCE
IDP_KEYS_ENV=$WORK/keys.env
ENV
umask 022

# ------------------------------------------------------------------------------ 7. verify
log "verifying: a client1-bound token and its introspection"
CURL=(curl -sS --max-time 10 --cacert "$PKI/ca.crt")
TOKEN_JSON=$("${CURL[@]}" --cert "$PKI/client1.crt" --key "$PKI/client1.key" \
  -d grant_type=client_credentials -d client_id="$MTLS_CLIENT" -d scope="$MTLS_SCOPE" "$OIDC/token")
AT=$(jq -r '.access_token // empty' <<<"$TOKEN_JSON")
[ -n "$AT" ] || die "no access token from $OIDC/token: $TOKEN_JSON"
INTRO=$("${CURL[@]}" -u "$INTRO_CLIENT:$INTRO_SECRET" -d "token=$AT" "$OIDC/introspect")
echo "introspection of client1's token:"
jq . <<<"$INTRO"
EXPECTED=$(openssl x509 -in "$PKI/client1.crt" -outform DER | openssl dgst -sha256 -binary | openssl base64 -A | tr '+/' '-_' | tr -d '=')
GOT=$(jq -r '.cnf["x5t#S256"] // empty' <<<"$INTRO")
echo "base64url(sha256(DER(client1.crt))) = $EXPECTED"
echo "introspection cnf.x5t#S256           = $GOT"
[ "$(jq -r .active <<<"$INTRO")" = true ] || die "token is not active"
[ "$(jq -r .scope <<<"$INTRO")" = "$MTLS_SCOPE" ] || die "unexpected scope"
[ "$GOT" = "$EXPECTED" ] || die "cnf.x5t#S256 is not client1's thumbprint"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' --cert "$PKI/client2.crt" --key "$PKI/client2.key" \
  -d grant_type=client_credentials -d client_id="$MTLS_CLIENT" -d scope="$MTLS_SCOPE" "$OIDC/token")
[ "$code" = 403 ] || die "client2 got HTTP $code from the token endpoint (want 403)"
echo "client2's certificate is refused by the token endpoint (HTTP 403), as it must be"

log "verifying: the access token is a JWT signed by the key the JWKS publishes"
KIDS=$("${CURL[@]}" "$OIDC/jwks" | jq -r '[.keys[].kid] | join(",")')
HDR=$(b64url_json "${AT%%.*}")
echo "token header: $(jq -c . <<<"$HDR"); JWKS kids: [$KIDS]"
[ "$(jq -r .typ <<<"$HDR")" = at+jwt ] && [ "$(jq -r .alg <<<"$HDR")" = RS256 ] || die "unexpected token header $HDR"
[ -n "$KIDS" ] && [ "$KIDS" = "$(jq -r .kid <<<"$HDR")" ] || die "the JWKS publishes [$KIDS], the token names $(jq -r .kid <<<"$HDR")"
echo "IDP_JWT_KID=$KIDS" >> "$WORK/idp.env"
KID_A=$KIDS KID_B=""
write_keys_env initial "$KIDS" RS256 "$KIDS"
set -a; . "$WORK/idp.env"; set +a
RAT=$(client1_token "$RESOURCE")
[ -n "$RAT" ] && [ "$(b64url_json "$(cut -d. -f2 <<<"$RAT")" | jq -r .aud)" = "$RESOURCE" ] \
  || die "a token requested with resource=$RESOURCE does not have aud=$RESOURCE"
echo "resource=$RESOURCE at the token endpoint gives aud=$RESOURCE (RFC 8707)"
if [ -n "${IDP_DPOP:-}" ]; then
  log "DPoP mode $IDP_DPOP (IDP_DPOP)"
  configure_dpop "$IDP_DPOP"
fi

started_ok=yes
cat <<SUMMARY
glewlwyd PID $PID on $BASE_URL (issuer $OIDC)
  token endpoint:      $OIDC/token      (tls_client_auth: --cert client1.crt, client_id=$MTLS_CLIENT)
  introspection:       $OIDC/introspect (Basic $INTRO_CLIENT:<secret in idp.env>)
  JWKS:                $OIDC/jwks       (kid $KIDS; rotate with: $0 --rotate $WORK BA|B|A)
  env file:            $WORK/idp.env
  log:                 $WORK/glewlwyd.log
  stop with:           $0 --stop $WORK   (start again with --start)
  DPoP:                ${IDP_DPOP:-not configured} (switch with: $0 --dpop $WORK on|nonce|off)
SUMMARY
