#!/usr/bin/env bash
# scripts/soak.sh - bounded-in-time soak of authz-sidecar on loopback:
#   client (16 keep-alive mTLS connections) -> nginx (deploy/nginx.conf) -> authz-sidecar -> fake AS
# with the fake AS killed every 30 s, every answer checked against the truth, and the sidecar's
# RSS, open fds and liveness watched. See scripts/soak.py for the details.
#
#   scripts/soak.sh              # 10 minutes
#   scripts/soak.sh --quick      # 1 minute
#   scripts/soak.sh --minutes N  [--concurrency 16] [--seed S] [--workdir DIR] [--keep-work] ...
#
# Uses .build/release/authz-sidecar (else .build/debug/authz-sidecar), or $AUTHZ_SIDECAR_BIN; the
# binary is copied into the work directory first, so a concurrent rebuild cannot disturb the run.
# Exit status: 0 pass, 1 fail (wrong decision, sidecar died, fd growth), 2 harness error.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

ensure_packages nginx libnginx-mod-http-headers-more-filter openssl ca-certificates python3
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || { echo "soak.sh: $PYTHON not found" >&2; exit 2; }
# exec: signals (Ctrl-C, SIGTERM) reach soak.py directly, which stops everything it started.
exec "$PYTHON" "$HERE/soak.py" "$@"
