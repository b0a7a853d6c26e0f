#!/usr/bin/env bash
# idp-glewlwyd.sh - run a throwaway Glewlwyd (Debian package) OAuth 2.0 authorization server on
# 127.0.0.1 for the end-to-end tests and the demo:
#   * client_credentials tokens for client "system-client-mtls", authenticated with tls_client_auth
#     (RFC 8705 §2.1) by client1's certificate and bound to it (cnf.x5t#S256, RFC 8705 §3);
#   * RFC 7662 introspection for "introspection-client" (client_secret_basic).
#
# Usage:
#   scripts/idp-glewlwyd.sh WORKDIR          install (if needed), configure, start, verify
#   scripts/idp-glewlwyd.sh --stop WORKDIR   stop the glewlwyd this script started (PID in WORKDIR/glewlwyd.pid)
#
# Environment:
#   IDP_PORT       HTTPS port on 127.0.0.1 (default 4594; 4593 is the distro service's)
#   IDP_TOKEN_TTL  access-token lifetime in seconds (default 3600)
#   IDP_PKI_DIR    optional: a directory made by scripts/mkcerts.sh (ca.crt, ca.key, client1.*, client2.*);
#                  its CA signs Glewlwyd's server certificate and its client certs are the ones the
#                  tokens are bound to, so nginx and Glewlwyd trust the same client certificates.
#                  Without it the script makes its own PKI with scripts/mkcerts.sh.
#
# WORKDIR/idp.env receives every URL, path and credential the tests need (shell syntax, sourceable).
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
INTRO_SECRET=introspection-secret-$(head -c 12 /dev/urandom | base64 | tr '+/' '-_')
INTRO_SCOPE=introspect
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

if [ "${1:-}" = "--stop" ]; then
  [ $# -eq 2 ] || die "usage: $0 --stop WORKDIR"
  stop_server "$2"
  exit 0
fi
[ $# -eq 1 ] || die "usage: $0 [--stop] WORKDIR"
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
nohup glewlwyd --config-file="$CONF" > "$WORK/glewlwyd.stdout" 2>&1 < /dev/null &
PID=$!
echo "$PID" > "$WORK/glewlwyd.pid"
started_ok=no
# Any failure from here on stops the server we started (nothing is left running behind a failed run).
trap '[ "$started_ok" = yes ] || { tail -n 20 "$WORK/glewlwyd.log" "$WORK/glewlwyd.stdout" 2>/dev/null || true; stop_server "$WORK"; }' EXIT
ready=no
for _ in $(seq 1 300); do
  if curl -sf -o /dev/null --max-time 2 --cacert "$PKI/ca.crt" "$BASE_URL/config"; then ready=yes; break; fi
  [ -d /proc/"$PID" ] || break
  sleep 0.1
done
[ "$ready" = yes ] || die "glewlwyd did not become ready (log: $WORK/glewlwyd.log)"
[ "$(cat /proc/"$PID"/comm)" = glewlwyd ] || die "PID $PID is not glewlwyd"
echo "glewlwyd PID $PID is ready"

# ------------------------------------------------------------------------------ 6. scopes, plugin, clients (admin REST API)
JAR="$WORK/admin-cookies.txt"
J="$WORK/api-json"; mkdir -p "$J"
api() {  # METHOD PATH [JSON-FILE]; fails on HTTP >= 400
  local m="$1" p="$2" code
  local args=(-sS --max-time 10 -o "$WORK/api.out" -w '%{http_code}' --cacert "$PKI/ca.crt" -b "$JAR" -c "$JAR" -X "$m")
  [ $# -ge 3 ] && args+=(-H 'Content-Type: application/json' --data @"$3")
  code=$(curl "${args[@]}" "$BASE_URL/api$p")
  [ "$code" -lt 400 ] || { echo "admin API $m $p -> HTTP $code: $(cat "$WORK/api.out")" >&2; return 1; }
}
jq -n --arg u "$ADMIN_USER" --arg p "$ADMIN_PASSWORD" '{username:$u,password:$p}' > "$J/login.json"
api POST /auth/ "$J/login.json"
for s in "$MTLS_SCOPE" "$INTRO_SCOPE"; do
  jq -n --arg s "$s" '{name:$s,display_name:$s,description:("scope "+$s),password_required:false,scheme:{}}' > "$J/scope-$s.json"
  api POST /scope/ "$J/scope-$s.json"
done
jq -n --rawfile key "$PKI/jwt-signing.key" --rawfile cert "$PKI/jwt-signing.pub" \
      --arg iss "$BASE_URL/api/$PLUGIN" --arg name "$PLUGIN" --argjson ttl "$TOKEN_TTL" --arg iscope "$INTRO_SCOPE" '{
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
    "introspection-revocation-auth-scope": [$iscope]
  }}' > "$J/plugin.json"
# "introspection-revocation-auth-scope" is needed even with client_secret_basic: without it
# glewlwyd 2.7.5 only lets a client introspect its own tokens ({"active":false} for the others).
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

started_ok=yes
cat <<SUMMARY
glewlwyd PID $PID on $BASE_URL (issuer $OIDC)
  token endpoint:      $OIDC/token      (tls_client_auth: --cert client1.crt, client_id=$MTLS_CLIENT)
  introspection:       $OIDC/introspect (Basic $INTRO_CLIENT:<secret in idp.env>)
  env file:            $WORK/idp.env
  log:                 $WORK/glewlwyd.log
  stop with:           $0 --stop $WORK
SUMMARY
