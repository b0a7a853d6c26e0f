#!/usr/bin/env bash
# mkcerts.sh OUTDIR - throwaway PKI for local tests and the demo (never for production).
#
#   ca.crt / ca.key             test CA (trusted by nginx for client certs, and by clients for the server)
#   server.crt / server.key     serverAuth, SAN DNS:localhost, IP:127.0.0.1
#   client1.crt / client1.key   clientAuth, CN=client1
#   client2.crt / client2.key   clientAuth, CN=client2
#   rogue-ca.crt / rogue-ca.key another CA that nothing trusts
#   rogue.crt / rogue.key       clientAuth, CN=rogue, issued by rogue-ca
#
# Files already in OUTDIR are overwritten. Needs only openssl.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
command -v openssl >/dev/null || { echo "mkcerts.sh: openssl is not installed" >&2; exit 1; }
OUT="$1"
DAYS="${MKCERTS_DAYS:-30}"
mkdir -p "$OUT"
cd "$OUT"

make_ca() {  # name CN
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" -keyout "$1.key" -out "$1.crt" \
    -subj "/O=Example Org/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

issue() {  # name ca subject extensions
  local name="$1" ca="$2" subj="$3" ext="$4"
  openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
  printf '%b\n' "$ext" > "$name.ext"
  openssl x509 -req -sha256 -days "$DAYS" -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" \
    -CAcreateserial -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

CLIENT_EXT="basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
SERVER_EXT="basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1"

make_ca ca "Example Org Test CA"
issue server ca "/O=Example Org/CN=localhost" "$SERVER_EXT"
issue client1 ca "/O=Example Org/CN=client1" "$CLIENT_EXT"
issue client2 ca "/O=Example Org/CN=client2" "$CLIENT_EXT"
make_ca rogue-ca "Rogue Test CA"
issue rogue rogue-ca "/O=Rogue Org/CN=rogue" "$CLIENT_EXT"
rm -f ./*.srl
chmod 600 ./*.key

for c in server client1 client2; do openssl verify -CAfile ca.crt "$c.crt" >/dev/null; done
openssl verify -CAfile rogue-ca.crt rogue.crt >/dev/null
if openssl verify -CAfile ca.crt rogue.crt >/dev/null 2>&1; then
  echo "mkcerts.sh: rogue.crt unexpectedly verifies against ca.crt" >&2; exit 1
fi
echo "certificates written to $(pwd): ca server client1 client2 rogue-ca rogue (.crt/.key)"
