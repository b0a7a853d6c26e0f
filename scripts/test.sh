#!/usr/bin/env bash
# test.sh - everything CI runs (.ci/run execs this):
#   1. prerequisites: apt packages for the integration suite, pytest, cryptography,
#      requests-oauth2client and opentelemetry-proto (into .venv/ if needed)
#   2. swift build --build-tests           (one build of the package and its tests)
#   3. swift test --skip-build             (Swift unit tests)
#   4. pytest tests/integration -q         (nginx + sidecar + fake AS, and Glewlwyd end to end)
#
# Usage: scripts/test.sh [--unit-only | --integration-only] [--sanitize thread|address]
#   --sanitize KIND   build and run the Swift tests under ThreadSanitizer or AddressSanitizer
#                     (own build folder .build-tsan / .build-asan; implies --unit-only)
# Environment: AUTHZ_SIDECAR_BIN (integration: use this binary; default: the one just built)
# Exits non-zero when any part fails.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"

RUN_UNIT=yes RUN_INTEGRATION=yes SANITIZE=""
usage() { echo "usage: $0 [--unit-only | --integration-only] [--sanitize thread|address]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --unit-only) RUN_INTEGRATION=no ;;
    --integration-only) RUN_UNIT=no ;;
    --sanitize) shift; SANITIZE="${1:-}"; RUN_INTEGRATION=no ;;
    --sanitize=*) SANITIZE="${1#--sanitize=}"; RUN_INTEGRATION=no ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) usage ;;
  esac
  shift
done
case "$SANITIZE" in
  ""|thread|address) ;;
  *) usage ;;
esac
SWIFT_FLAGS=()
[ -n "$SANITIZE" ] && SWIFT_FLAGS=(--sanitize="$SANITIZE" --scratch-path ".build-${SANITIZE:0:1}san")
# swift-otel does not compile under the sanitizers with Swift 6.3 (see Package.swift); the unit
# tests do not need it (they trace into swift-distributed-tracing's in-memory tracer).
[ -n "$SANITIZE" ] && export AUTHZ_WITHOUT_OTEL=1

header() { printf '\n==================== %s ====================\n' "$*"; }
declare -a RESULTS=()
FAILED=0
record() {  # part rc
  if [ "$2" -eq 0 ]; then RESULTS+=("PASS  $1"); else RESULTS+=("FAIL  $1 (exit $2)"); FAILED=1; fi
}
finish() {
  header "Summary"
  printf '%s\n' "${RESULTS[@]}"
  exit "$FAILED"
}

# ------------------------------------------------------------------------------ prerequisites
header "Prerequisites"
command -v swift >/dev/null || { echo "swift is not on PATH"; record "prerequisites" 1; finish; }
swift --version 2>&1 | head -1
PYTEST=()
if [ "$RUN_INTEGRATION" = yes ]; then
  if ! ensure_packages nginx libnginx-mod-http-headers-more-filter glewlwyd sqlite3 jq curl openssl \
       ca-certificates python3 prometheus redis-server redis-tools; then
    record "prerequisites (apt)" 1; finish
  fi
  # Python modules the integration suite imports: pytest, cryptography (the JWT tests forge
  # and sign tokens with it), requests-oauth2client (the DPoP client of scripts/dpop_client.py,
  # RFC 9449) and opentelemetry-proto (tests/integration/otlp_receiver.py decodes the OTLP/HTTP
  # trace exports of the sidecar and Envoy with it). Into python3 itself when pytest is there (pip
  # may refuse an externally managed interpreter: then everything goes into .venv).
  PY_IMPORTS='import pytest, cryptography, requests_oauth2client, opentelemetry.proto.collector.trace.v1.trace_service_pb2'
  # requests-oauth2client is held to 1.8.x: scripts/dpop_client.py documents (and the DPoP tests
  # rely on) how 1.8 builds htu and answers a resource server's 401s. opentelemetry-proto is held
  # to 1.45.x (it brings its protobuf runtime, >=5,<8; tested with protobuf 7.36).
  PY_PACKAGES=(cryptography 'requests-oauth2client==1.8.*' 'opentelemetry-proto==1.45.*')
  if python3 -c 'import pytest' 2>/dev/null && ! python3 -c "$PY_IMPORTS" 2>/dev/null; then
    echo "${PY_PACKAGES[*]}: not all importable; pip-installing them into $(command -v python3)"
    python3 -m pip install -q "${PY_PACKAGES[@]}" 2>/dev/null || echo "(pip refused; using $REPO/.venv instead)"
  fi
  if python3 -c "$PY_IMPORTS" 2>/dev/null; then
    PYTEST=(python3 -m pytest)
  else
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "$PY_IMPORTS" 2>/dev/null; then
      echo "pytest or one of ${PY_PACKAGES[*]} is not importable: installing them into $REPO/.venv"
      [ -x .venv/bin/python ] || python3 -m venv .venv 2>/dev/null \
        || { ensure_packages python3-venv && python3 -m venv .venv; } \
        || { record "prerequisites (venv)" 1; finish; }
      .venv/bin/python -m pip install -q pytest "${PY_PACKAGES[@]}" \
        || { record "prerequisites (pip install pytest ${PY_PACKAGES[*]})" 1; finish; }
    fi
    PYTEST=(.venv/bin/python -m pytest)
  fi
  echo "pytest: $("${PYTEST[@]}" --version 2>&1 | head -1)"
  ENVOY_BIN=$(bash scripts/install-envoy.sh) || { record "prerequisites (envoy)" 1; finish; }
  export ENVOY_BIN
  echo "envoy: $("$ENVOY_BIN" --version 2>&1 | tr -s ' \n' ' ')"
fi
# zlib for the gRPC transport's link step; openssl for the certificate fixtures' tests.
ensure_packages zlib1g-dev openssl || { record "prerequisites (apt)" 1; finish; }
record "prerequisites" 0

# ------------------------------------------------------------------------------ build
if [ "$RUN_UNIT" = yes ]; then
  header "swift build --build-tests ${SWIFT_FLAGS[*]}"
  swift build --build-tests "${SWIFT_FLAGS[@]}"
  rc=$?
else
  header "swift build --product authz-sidecar"
  swift build --product authz-sidecar
  rc=$?
fi
record "swift build" "$rc"
[ "$rc" -eq 0 ] || finish

# ------------------------------------------------------------------------------ unit tests
if [ "$RUN_UNIT" = yes ]; then
  header "Swift unit tests (swift test --skip-build)"
  # The real-Glewlwyd test must run here, not skip: it is what shows the client works with a real AS.
  ensure_packages glewlwyd sqlite3 jq curl || { record "prerequisites (glewlwyd)" 1; finish; }
  # Leaks in XCTest's own runner are suppressed (scripts/lsan.supp); ours are still reported.
  # The suite takes seconds; a run that has not finished in 15 minutes is hung (a continuation
  # never resumed): stop it with a clear failure rather than let it use up CI's time limit.
  LSAN_OPTIONS="suppressions=$REPO/scripts/lsan.supp:print_suppressions=0" \
    AUTHZ_REQUIRE_IDP=1 timeout --kill-after=30 900 swift test --skip-build "${SWIFT_FLAGS[@]}"
  rc=$?
  [ "$rc" -eq 124 ] && echo "swift test: no result after 15 minutes; stopped (a test is hung)" >&2
  record "swift test" "$rc"
fi

# ------------------------------------------------------------------------------ integration tests
if [ "$RUN_INTEGRATION" = yes ]; then
  header "Integration tests (pytest tests/integration)"
  if [ -z "${AUTHZ_SIDECAR_BIN:-}" ]; then
    AUTHZ_SIDECAR_BIN="$(swift build --show-bin-path)/authz-sidecar"
  fi
  export AUTHZ_SIDECAR_BIN
  echo "AUTHZ_SIDECAR_BIN=$AUTHZ_SIDECAR_BIN"
  "${PYTEST[@]}" tests/integration -q -p no:cacheprovider
  record "pytest tests/integration" $?
fi

finish
