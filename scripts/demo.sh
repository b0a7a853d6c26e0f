#!/usr/bin/env bash
# demo.sh - authz-sidecar end to end on loopback, on a fresh Debian 12 machine:
#
#   curl --mTLS + Bearer--> nginx :8443 --auth_request--> authz-sidecar :9191 --RFC 7662--> Glewlwyd :4594
#                             \--> echo upstream :9292 (answers with the headers it received)
#
# It installs what is missing (apt: nginx, headers-more, glewlwyd, sqlite3, jq, curl, openssl),
# builds the sidecar (swift build --product authz-sidecar), makes a throwaway PKI, starts Glewlwyd
# (scripts/idp-glewlwyd.sh), the sidecar, the echo upstream and nginx (deploy/nginx.conf rendered
# into demo-work/), replays the scenario with curl, and stops everything it started on exit.
#
# Then the same stack with JWT access tokens verified locally: Glewlwyd's access tokens are RS256
# JWTs (RFC 9068); the sidecar is restarted with an `issuers:` entry (validation: jwt) that takes
# the keys from Glewlwyd's discovery document and JWKS, and no introspection at all.
#
# Last, DPoP (RFC 9449): Glewlwyd is switched to DPoP mode (scripts/idp-glewlwyd.sh --dpop) and a
# real DPoP client, requests-oauth2client (scripts/dpop_client.py; pip-installed into python3 or
# <repo>/.venv when missing), gets a token bound to its key and calls the API with a fresh proof
# per request; the same token replayed by another client, without the key, is refused.
#
# Usage: scripts/demo.sh            (as root, from anywhere)
# Environment:
#   AUTHZ_SIDECAR_BIN   use this binary instead of building one
#   DEMO_NGINX_PORT (8443) DEMO_SIDECAR_PORT (9191) DEMO_ECHO_PORT (9292) IDP_PORT (4594)
#   DEMO_WORK           work directory (default: <repo>/demo-work, wiped at start)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
WORK="${DEMO_WORK:-$REPO/demo-work}"
NGINX_PORT="${DEMO_NGINX_PORT:-8443}"
SIDECAR_PORT="${DEMO_SIDECAR_PORT:-9191}"
ECHO_PORT="${DEMO_ECHO_PORT:-9292}"
export IDP_PORT="${IDP_PORT:-4594}"

if [ -t 1 ]; then section() { printf '\n\033[1m=== %s\033[0m\n' "$*"; }; else section() { printf '\n=== %s\n' "$*"; }; fi
die() { printf 'demo.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------------------ cleanup
NGINX_PID="" SIDECAR_PID="" ECHO_PID="" IDP_STARTED=no
cleanup() {
  local rc=$?
  section "Stopping what the demo started"
  stop_pid "$NGINX_PID" nginx
  stop_pid "$SIDECAR_PID" authz-sidecar
  stop_pid "$ECHO_PID" "echo upstream"
  if [ "$IDP_STARTED" = yes ]; then bash "$REPO/scripts/idp-glewlwyd.sh" --stop "$WORK/idp" || true; fi
  echo "logs are in $WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------ 1. packages
section "1. Packages"
ensure_packages nginx libnginx-mod-http-headers-more-filter glewlwyd sqlite3 jq curl openssl \
  ca-certificates python3 || die "cannot install the packages"
echo "nginx $(nginx -v 2>&1 | sed 's/.*\///'), glewlwyd $(dpkg-query -W -f='${Version}' glewlwyd), $(openssl version)"

# ------------------------------------------------------------------------------ 2. build
section "2. The sidecar"
if [ -n "${AUTHZ_SIDECAR_BIN:-}" ]; then
  BIN="$AUTHZ_SIDECAR_BIN"
  echo "using AUTHZ_SIDECAR_BIN=$BIN"
else
  command -v swift >/dev/null || die "swift is not on PATH (https://www.swift.org/install/), or set AUTHZ_SIDECAR_BIN"
  (cd "$REPO" && swift build --product authz-sidecar)
  BIN="$(cd "$REPO" && swift build --show-bin-path)/authz-sidecar"
fi
[ -x "$BIN" ] || die "$BIN is not an executable"

# ------------------------------------------------------------------------------ 3. work dir, PKI
section "3. Work directory and certificates"
for p in "$NGINX_PORT" "$SIDECAR_PORT" "$ECHO_PORT" "$IDP_PORT"; do
  port_free "$p" || die "127.0.0.1:$p is in use (see the DEMO_*_PORT / IDP_PORT variables)"
done
rm -rf "$WORK"
mkdir -p "$WORK/logs"
bash "$REPO/scripts/mkcerts.sh" "$WORK/certs"

# ------------------------------------------------------------------------------ 4. Glewlwyd
section "4. Authorization server (Glewlwyd on 127.0.0.1:$IDP_PORT)"
IDP_STARTED=yes
IDP_PKI_DIR="$WORK/certs" bash "$REPO/scripts/idp-glewlwyd.sh" "$WORK/idp"
# shellcheck disable=SC1091
. "$WORK/idp/idp.env"

# ------------------------------------------------------------------------------ 5. echo upstream
section "5. Echo upstream on 127.0.0.1:$ECHO_PORT"
: > "$WORK/upstream.jsonl"
python3 "$REPO/scripts/echo_upstream.py" --port "$ECHO_PORT" --log "$WORK/upstream.jsonl" \
  > "$WORK/logs/echo.log" 2>&1 &
ECHO_PID=$!
python3 "$REPO/scripts/stack.py" wait-port "127.0.0.1:$ECHO_PORT"
echo "PID $ECHO_PID"

# ------------------------------------------------------------------------------ 6. sidecar
section "6. authz-sidecar on 127.0.0.1:$SIDECAR_PORT"
start_sidecar() {  # CONFIG-FILE -> check-config, serve, wait for /healthz; sets SIDECAR_PID
  AUTHZ_INTROSPECTION_CLIENT_SECRET="$IDP_INTROSPECTION_CLIENT_SECRET" \
    "$BIN" check-config --config "$1" > "$WORK/logs/check-config.txt" 2>&1 \
    || { cat "$WORK/logs/check-config.txt"; die "check-config failed"; }
  AUTHZ_INTROSPECTION_CLIENT_SECRET="$IDP_INTROSPECTION_CLIENT_SECRET" \
    "$BIN" serve --config "$1" >> "$WORK/logs/sidecar.log" 2>&1 &
  SIDECAR_PID=$!
  python3 "$REPO/scripts/stack.py" wait-http "http://127.0.0.1:$SIDECAR_PORT/healthz" \
    || { tail -20 "$WORK/logs/sidecar.log"; die "the sidecar did not start"; }
  echo "PID $SIDECAR_PID"
}
cat > "$WORK/sidecar.yaml" <<YAML
server:
  listen: 127.0.0.1:$SIDECAR_PORT
introspection:
  endpoint: $IDP_INTROSPECT_URL
  client_id: $IDP_INTROSPECTION_CLIENT_ID
  # client_secret comes from AUTHZ_INTROSPECTION_CLIENT_SECRET
  auth_method: client_secret_basic
  ca_file: $IDP_CA
  timeout_ms: 1500
cache:
  ttl_seconds: 30
  negative_ttl_seconds: 5
policies:
  - name: token-mtls
    match: { path_prefix: /token-mtls/ }
    required_scopes: [system-access]
    certificate_header: X-Client-Cert
    certificate_format: auto
  - name: admin
    match: { path_prefix: /admin-api/ }
    required_scopes: [admin]
    certificate_header: X-Client-Cert
    certificate_format: auto
YAML
cat "$WORK/sidecar.yaml"
start_sidecar "$WORK/sidecar.yaml"

# ------------------------------------------------------------------------------ 7. nginx
section "7. nginx (mTLS) on https://localhost:$NGINX_PORT"
CONF=$(python3 "$REPO/scripts/stack.py" render-nginx --workdir "$WORK/nginx" --certs "$WORK/certs" \
  --nginx-port "$NGINX_PORT" --sidecar-port "$SIDECAR_PORT" --upstream-port "$ECHO_PORT")
nginx -t -q -e "$WORK/nginx/logs/error.log" -c "$CONF"
start_nginx() {  # sets NGINX_PID
  nginx -e "$WORK/nginx/logs/error.log" -c "$CONF" >> "$WORK/logs/nginx.stdout" 2>&1 &
  NGINX_PID=$!
  python3 "$REPO/scripts/stack.py" wait-port "127.0.0.1:$NGINX_PORT" \
    || { tail -20 "$WORK/nginx/logs/error.log"; die "nginx did not start"; }
}
start_nginx
echo "PID $NGINX_PID, config $CONF (rendered from deploy/nginx.conf)"

# ------------------------------------------------------------------------------ 8. scenario
C="$WORK/certs"
get_token() {  # a client_credentials token for client1 (RFC 8705 tls_client_auth)
  curl -sS --max-time 10 --cacert "$IDP_CA" --cert "$IDP_CLIENT1_CERT" --key "$IDP_CLIENT1_KEY" \
    -d grant_type=client_credentials -d client_id="$IDP_MTLS_CLIENT_ID" -d scope="$IDP_MTLS_SCOPE" \
    "$IDP_TOKEN_URL" | jq -r .access_token
}
section "8. Tokens from Glewlwyd"
TOKEN=$(get_token)
SPARE_TOKEN=$(get_token)     # never shown to the sidecar before the AS goes away (not in its cache)
[ -n "$TOKEN" ] && [ "$TOKEN" != null ] || die "no token from $IDP_TOKEN_URL"
echo "client1's token: ${TOKEN:0:8}...${TOKEN: -8} bound to x5t#S256 $("$BIN" thumbprint "$C/client1.crt")"

FAILS=0
N=0
# scenario TITLE EXPECTED_STATUS CERT TOKEN PATH
scenario() {
  local title="$1" want="$2" cert="$3" token="$4" path="$5" before after status
  N=$((N + 1))
  section "Scenario $N: $title"
  local args=(-sS --max-time 15 --cacert "$C/ca.crt" --cert "$C/$cert.crt" --key "$C/$cert.key"
              -D "$WORK/headers.txt" -o "$WORK/body.txt" -w '%{http_code}')
  local shown="curl --cacert ca.crt --cert $cert.crt --key $cert.key"
  if [ -n "$token" ]; then
    args+=(-H "Authorization: Bearer $token")
    shown="$shown -H 'Authorization: Bearer ${token:0:8}...${token: -8}'"
  fi
  echo "\$ $shown https://localhost:$NGINX_PORT$path"
  before=$(wc -l < "$WORK/upstream.jsonl")
  status=$(curl "${args[@]}" "https://localhost:$NGINX_PORT$path" || true)
  after=$(wc -l < "$WORK/upstream.jsonl")
  echo "status: $status"
  grep -iE '^(content-type|www-authenticate|retry-after):' "$WORK/headers.txt" | sed 's/^/  /' || true
  if [ "$after" -gt "$before" ]; then
    echo "body (from the echo upstream): $(jq -c '{method, path, header_count: (.headers | length)}' "$WORK/body.txt")"
    echo "X-Credential-* headers the upstream saw:"
    tail -n 1 "$WORK/upstream.jsonl" | jq -r '.raw_headers[] | select(.[0] | test("^x-credential-"; "i")) | "  \(.[0]): \(.[1])"'
  else
    echo "body: $(cat "$WORK/body.txt")"
    echo "(the upstream was not called)"
  fi
  if [ "$status" = "$want" ]; then echo "-> $status as expected"; else echo "-> UNEXPECTED: wanted $want"; FAILS=$((FAILS + 1)); fi
}

scenario "client1 with its own bound token -> 200" 200 client1 "$TOKEN" /token-mtls/resource
scenario "client2 presents client1's token -> 401 (RFC 8705 binding)" 401 client2 "$TOKEN" /token-mtls/resource
scenario "no token -> 401 Unauthenticated." 401 client1 "" /token-mtls/resource
scenario "token without the route's scope (admin) -> 403" 403 client1 "$TOKEN" /admin-api/users

section "Stopping the authorization server"
bash "$REPO/scripts/idp-glewlwyd.sh" --stop "$WORK/idp"
IDP_STARTED=no
scenario "authorization server down, token not cached -> 503" 503 client1 "$SPARE_TOKEN" /token-mtls/resource
scenario "authorization server down, cached token still allowed -> 200" 200 client1 "$TOKEN" /token-mtls/resource

# ------------------------------------------------------------------------------ 9. JWT access tokens
section "9. JWT access tokens verified locally"
echo "Glewlwyd's access tokens are JWTs signed with a key it publishes (jwks_uri of its discovery"
echo "document): the sidecar can verify them itself, with no call to the authorization server."
bash "$REPO/scripts/idp-glewlwyd.sh" --start "$WORK/idp"
IDP_STARTED=yes
JWT_TOKEN=$(get_token)
JWT_SPARE=$(get_token)       # obtained now, first shown to the sidecar after the AS has gone away
[ -n "$JWT_TOKEN" ] && [ "$JWT_TOKEN" != null ] && [ -n "$JWT_SPARE" ] && [ "$JWT_SPARE" != null ] \
  || die "no token from $IDP_TOKEN_URL"
jwt_part() {  # TOKEN N -> the JSON of part N (1 = header, 2 = payload)
  python3 -c 'import base64, json, sys; p = sys.argv[1].split(".")[int(sys.argv[2]) - 1]
print(json.dumps(json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))), separators=(",", ":")))' "$1" "$2"
}
echo "a token's header:  $(jwt_part "$JWT_TOKEN" 1)"
echo "and its claims:    $(jwt_part "$JWT_TOKEN" 2 | jq -c '{iss, aud, client_id, scope, exp, cnf}')"
echo "discovery:         $IDP_DISCOVERY_URL -> jwks_uri $(curl -sS --max-time 10 --cacert "$IDP_CA" "$IDP_DISCOVERY_URL" | jq -r .jwks_uri)"

echo "restarting the sidecar (same port, same nginx) with an issuers: entry and no introspection:"
stop_pid "$NGINX_PID" nginx
NGINX_PID=""
stop_pid "$SIDECAR_PID" authz-sidecar
SIDECAR_PID=""
cat > "$WORK/sidecar-jwt.yaml" <<YAML
server:
  listen: 127.0.0.1:$SIDECAR_PORT
cache:
  ttl_seconds: 30
  negative_ttl_seconds: 5
issuers:
  - name: glewlwyd
    issuer: $IDP_ISSUER
    # verified locally: signature (keys from discovery + JWKS), iss, exp, aud, typ at+jwt, cnf
    validation: jwt
    audiences: [system-access]
    # trust roots for <issuer>/.well-known/openid-configuration and the jwks_uri it names
    ca_file: $IDP_CA
    jwks_cache_seconds: 300
    jwks_min_refetch_seconds: 1
policies:
  - name: token-mtls
    match: { path_prefix: /token-mtls/ }
    required_scopes: [system-access]
    certificate_header: X-Client-Cert
    certificate_format: auto
  - name: admin
    match: { path_prefix: /admin-api/ }
    required_scopes: [admin]
    certificate_header: X-Client-Cert
    certificate_format: auto
YAML
cat "$WORK/sidecar-jwt.yaml"
start_sidecar "$WORK/sidecar-jwt.yaml"
start_nginx
echo "nginx PID $NGINX_PID"

scenario "JWT: client1 with its bound JWT -> 200, verified by the sidecar" 200 client1 "$JWT_TOKEN" /token-mtls/resource
scenario "JWT: client2 presents client1's JWT -> 401 (cnf.x5t#S256 binding)" 401 client2 "$JWT_TOKEN" /token-mtls/resource

N=$((N + 1))
section "Scenario $N: JWT: no introspection call was made"
METRICS=$(curl -sS --max-time 10 "http://127.0.0.1:$SIDECAR_PORT/metrics")
grep -E '^authz_(introspection_calls|jwks_fetches|jwt_verifications)_total' <<<"$METRICS" | sed 's/^/  /' || true
CALLS=$(awk '/^authz_introspection_calls_total/ { n += $NF } END { print n + 0 }' <<<"$METRICS")
echo "authz_introspection_calls_total: $CALLS"
if [ "$CALLS" = 0 ]; then echo "-> 0 as expected"; else echo "-> UNEXPECTED: wanted 0"; FAILS=$((FAILS + 1)); fi

section "Stopping the authorization server again"
bash "$REPO/scripts/idp-glewlwyd.sh" --stop "$WORK/idp"
IDP_STARTED=no
scenario "JWT: authorization server down, a JWT never seen before -> 200 (keys already fetched)" 200 client1 "$JWT_SPARE" /token-mtls/resource

# ------------------------------------------------------------------------------ 10. DPoP
section "10. DPoP (RFC 9449): a token bound to a key the client proves it holds"
echo "No client certificate is needed for this: the token's cnf.jkt names the client's key, and every"
echo "request carries a new proof signed by it (DPoP header: method, URL, time, token hash, unique id)."
dpop_python() {  # a python3 that imports requests-oauth2client 1.8 (scripts/dpop_client.py); prints its path
  local imports='import requests_oauth2client' venv="$REPO/.venv"
  if python3 -c "$imports" 2>/dev/null; then command -v python3; return 0; fi
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$imports" 2>/dev/null; then echo "$venv/bin/python"; return 0; fi
  echo "installing requests-oauth2client 1.8 (PyPI)" >&2
  if python3 -m pip install -q 'requests-oauth2client==1.8.*' >&2 2>/dev/null && python3 -c "$imports" 2>/dev/null; then
    command -v python3; return 0
  fi
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2 2>/dev/null \
    || { ensure_packages python3-venv >&2 && python3 -m venv "$venv" >&2; } || return 1
  "$venv/bin/python" -m pip install -q 'requests-oauth2client==1.8.*' >&2 || return 1
  echo "$venv/bin/python"
}
DPOP_PY=$(dpop_python) || die "cannot install requests-oauth2client (pip install 'requests-oauth2client==1.8.*')"
bash "$REPO/scripts/idp-glewlwyd.sh" --start "$WORK/idp"
IDP_STARTED=yes
bash "$REPO/scripts/idp-glewlwyd.sh" --dpop "$WORK/idp" on
# shellcheck disable=SC1091
. "$WORK/idp/idp.env"

echo "restarting the sidecar with a policy that requires DPoP (same port, same nginx configuration):"
stop_pid "$NGINX_PID" nginx
NGINX_PID=""
stop_pid "$SIDECAR_PID" authz-sidecar
SIDECAR_PID=""
cat > "$WORK/sidecar-dpop.yaml" <<YAML
server:
  listen: 127.0.0.1:$SIDECAR_PORT
cache:
  ttl_seconds: 30
  negative_ttl_seconds: 5
issuers:
  - name: glewlwyd
    issuer: $IDP_ISSUER
    validation: jwt
    audiences: [system-access]
    ca_file: $IDP_CA
policies:
  - name: dpop-api
    match: { path_prefix: /dpop-api/ }
    required_scopes: [system-access]
    # Authorization: DPoP <token> + a valid proof only; a Bearer token is refused. The proof's htu
    # is checked against X-Forwarded-Proto://X-Original-Host + the path, which nginx sends.
    dpop: required
  - name: token-mtls
    match: { path_prefix: /token-mtls/ }
    required_scopes: [system-access]
    certificate_header: X-Client-Cert
    certificate_format: auto
YAML
cat "$WORK/sidecar-dpop.yaml"
start_sidecar "$WORK/sidecar-dpop.yaml"
start_nginx
echo "nginx PID $NGINX_PID"

echo
echo "\$ python3 scripts/dpop_client.py token --idp-env idp.env --save dpop-state.json"
"$DPOP_PY" "$REPO/scripts/dpop_client.py" token --idp-env "$WORK/idp/idp.env" --save "$WORK/dpop-state.json" \
  > "$WORK/dpop-token.txt" || { cat "$WORK/dpop-token.txt"; die "no DPoP token from $IDP_TOKEN_URL"; }
grep -E '^(token_type|jkt|jwt cnf|introspection):' "$WORK/dpop-token.txt" | sed 's/^/  /'

DPOP_URL="https://localhost:$NGINX_PORT/dpop-api/resource"
# dpop_scenario TITLE EXPECTED_STATUS CERT [dpop_client.py call options...]
dpop_scenario() {
  local title="$1" want="$2" cert="$3" out statuses before after
  shift 3
  N=$((N + 1))
  section "Scenario $N: $title"
  echo "\$ python3 scripts/dpop_client.py call $DPOP_URL --state dpop-state.json --cacert ca.crt --cert $cert.crt --key $cert.key $*"
  before=$(wc -l < "$WORK/upstream.jsonl")
  out=$("$DPOP_PY" "$REPO/scripts/dpop_client.py" call "$DPOP_URL" --state "$WORK/dpop-state.json" \
        --cacert "$C/ca.crt" --cert "$C/$cert.crt" --key "$C/$cert.key" "$@" 2>&1) || true
  after=$(wc -l < "$WORK/upstream.jsonl")
  grep -iE '^(--- request|HTTP [0-9]|www-authenticate:|dpop-nonce:|\(proof sent|\(no DPoP|\(answered)' <<<"$out" \
    | sed 's/^/  /' || true
  if [ "$after" -gt "$before" ]; then
    echo "X-Credential-* headers the upstream saw (last request):"
    tail -n 1 "$WORK/upstream.jsonl" | jq -r '.raw_headers[] | select(.[0] | test("^x-credential-(token-type|jkt|client-id|scope)$"; "i")) | "  \(.[0]): \(.[1])"'
  else
    echo "(the upstream was not called)"
  fi
  statuses=$(grep -oE '^HTTP [0-9]+' <<<"$out" | awk '{print $2}' | sort -u | tr '\n' ' ' | sed 's/ $//')
  if [ "$statuses" = "$want" ]; then echo "-> $statuses as expected"; else echo "-> UNEXPECTED: got '$statuses', wanted $want"; FAILS=$((FAILS + 1)); fi
}
dpop_scenario "DPoP: the client with its key, a new proof per request (2 requests) -> 200" 200 client1 --count 2 --show-proof
dpop_scenario "DPoP: the token stolen and replayed from client2 with the thief's own key -> 401" 401 client2 --steal other-key
dpop_scenario "DPoP: the stolen token replayed without a proof -> 401" 401 client2 --steal no-proof
dpop_scenario "DPoP: the stolen token replayed as a Bearer token -> 401" 401 client2 --steal bearer

section "Summary"
if [ "$FAILS" -eq 0 ]; then
  echo "all $N scenarios answered as expected"
else
  echo "$FAILS of $N scenarios answered unexpectedly (logs: $WORK/logs, $WORK/nginx/logs)"
  exit 1
fi
