#!/usr/bin/env bash
# scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...] - build the libFuzzer targets in Fuzz/ and run
# each for SECONDS_PER_TARGET (default 600), one after another on one core.
#
#   TARGET: FuzzBearer FuzzCertificate FuzzXFCC FuzzIntrospectionResponse FuzzPaths FuzzJOSE FuzzRESP (the
#           default: the parsers of untrusted input), FuzzConfig (operator YAML), or "all" for
#           the seven.
#
# Seeds come from Fuzz/corpus/<Target> (committed, small); the run works on a copy in
# $SCRATCH/corpus-work/<Target> (kept between runs), crash/timeout/oom inputs land in
# $SCRATCH/artifacts/<Target>/, the full log in $SCRATCH/logs/<Target>.log.
# Exits 1 if any target found a crash, leak, timeout or OOM.
#
# Environment: FUZZ_SCRATCH (default .build-fuzz, gitignored), FUZZ_BUILD_JOBS (swift build -j),
# FUZZ_NO_BUILD=1 (use the binaries already built), FUZZ_ARGS (extra libFuzzer flags).
#
# Build notes (Swift 6.3, Linux), both checked by looking for __sancov sections in the objects:
# - SwiftPM's --sanitize=fuzzer is needed: SwiftPM links a Linux executable with
#   `--defsym main=<Target>_main` (its entry-point renaming) unless the fuzzer sanitizer is on,
#   so with -Xswiftc alone the link fails with "undefined symbol 'FuzzBearer_main'";
#   --sanitize=fuzzer drops the renaming and libFuzzer's own main() is linked. Each target is a
#   single file not named main.swift, so SwiftPM compiles it with -parse-as-library.
# - -Xswiftc -sanitize=fuzzer,address is needed too: SwiftPM passes `-sanitize=fuzzer
#   -sanitize=address` to swiftc, and the driver keeps only the last -sanitize= (ASan without
#   coverage: libFuzzer then sees no coverage at all in Swift code). The combined flag comes
#   last and wins. --sanitize also instruments the C dependencies (BoringSSL, libyaml).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRATCH=${FUZZ_SCRATCH:-$ROOT/.build-fuzz}
SECONDS_PER_TARGET=${1:-600}
[[ $# -gt 0 ]] && shift
DEFAULT_TARGETS=(FuzzBearer FuzzCertificate FuzzXFCC FuzzIntrospectionResponse FuzzPaths FuzzJOSE FuzzRESP)
ALL_TARGETS=("${DEFAULT_TARGETS[@]}" FuzzConfig)
if [[ $# -eq 0 ]]; then
    TARGETS=("${DEFAULT_TARGETS[@]}")
elif [[ $# -eq 1 && $1 == all ]]; then
    TARGETS=("${ALL_TARGETS[@]}")
else
    TARGETS=("$@")
fi
[[ $SECONDS_PER_TARGET =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...|all]" >&2; exit 2; }

# -max_len per target: a little over the parser's own bound, so the bound itself is exercised.
max_len() {
    case $1 in
        FuzzBearer) echo 10240 ;;                 # BearerToken.maxLength 8192 (+64 for the header)
        FuzzCertificate) echo 40960 ;;            # ClientCertificate.maxHeaderLength 32 KiB
        FuzzXFCC) echo 16384 ;;
        FuzzIntrospectionResponse) echo 65536 ;;  # IntrospectionConfiguration.maxResponseBytes 64 KiB
        FuzzConfig) echo 16384 ;;
        FuzzPaths) echo 4096 ;;
        FuzzJOSE) echo 12288 ;;                  # a JWT within BearerToken.maxLength, small key sets
        FuzzRESP) echo 8192 ;;                   # the fuzz parser's bounds are 4 KiB bulk, 64 elements
        *) echo "unknown target $1 (known: ${ALL_TARGETS[*]})" >&2; return 1 ;;
    esac
}
for t in "${TARGETS[@]}"; do max_len "$t" >/dev/null; done

BUILD_FLAGS=(-c release --package-path "$ROOT/Fuzz" --scratch-path "$SCRATCH"
    --sanitize=fuzzer --sanitize=address -Xswiftc -sanitize=fuzzer,address)
if [[ ${FUZZ_NO_BUILD:-0} != 1 ]]; then
    # Same dependency versions as the main build, when it has resolved them.
    if [[ ! -f $ROOT/Fuzz/Package.resolved && -f $ROOT/Package.resolved ]]; then
        cp "$ROOT/Package.resolved" "$ROOT/Fuzz/Package.resolved"
    fi
    echo "== building the fuzz targets in $SCRATCH"
    swift build "${BUILD_FLAGS[@]}" ${FUZZ_BUILD_JOBS:+-j "$FUZZ_BUILD_JOBS"}
fi
BIN=$(swift build "${BUILD_FLAGS[@]}" --show-bin-path)

if [[ -z ${ASAN_SYMBOLIZER_PATH:-} ]]; then
    for s in "$(dirname "$(command -v swift)")/llvm-symbolizer" "$(command -v llvm-symbolizer || true)"; do
        [[ -x $s ]] && { export ASAN_SYMBOLIZER_PATH=$s; break; }
    done
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:symbolize=1:detect_leaks=1}
# Swift's own crash backtracer reads the crashed process's memory in a way ASan reports as a
# second crash ("unknown-crash ... memserver_read"), burying the real one: leave crashes
# (fatalError, bounds checks: SIGILL) to libFuzzer's handler, which prints ASan's stack.
export SWIFT_BACKTRACE=${SWIFT_BACKTRACE:-enable=no}
demangle() { swift demangle --simplified 2>/dev/null || cat; }

failed=0
summary=()
for t in "${TARGETS[@]}"; do
    work=$SCRATCH/corpus-work/$t
    artifacts=$SCRATCH/artifacts/$t
    log=$SCRATCH/logs/$t.log
    mkdir -p "$work" "$artifacts" "$(dirname "$log")"
    cp -n "$ROOT/Fuzz/corpus/$t/"* "$work/" 2>/dev/null || true
    dict=()
    [[ -f $ROOT/Fuzz/dict/$t.dict ]] && dict=(-dict="$ROOT/Fuzz/dict/$t.dict")
    before=$(ls "$artifacts")
    echo "== $t: ${SECONDS_PER_TARGET}s, -max_len=$(max_len "$t"), corpus $work ($(ls "$work" | wc -l) units)"
    set +e
    "$BIN/$t" "$work" -max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$t")" -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 -artifact_prefix="$artifacts/" "${dict[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1
    status=$?
    set -e
    stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
    execs=$(stat number_of_executed_units)
    rate=$(stat average_exec_per_sec)
    units=$(stat new_units_added)
    rss=$(stat peak_rss_mb)
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9a-zA-Z]+' "$log" | tail -1 || true)
    new=$(comm -13 <(echo "$before") <(ls "$artifacts") | grep -E '^(crash|leak|timeout|oom)-' || true)
    result=none
    if [[ -n $new || ($status -ne 0 && -z $execs) ]]; then
        result="FOUND (exit $status)"
        failed=1
    fi
    echo "   executions: ${execs:-?}  exec/s: ${rate:-?}  ${cov:-cov: ?}  new units: ${units:-?}  peak rss: ${rss:-?} MB  crash: $result"
    if [[ $result != none ]]; then
        { grep -E -m3 'Fatal error|==ERROR|SUMMARY|ERROR: libFuzzer|invariant violated' "$log" || true; } | demangle | sed 's/^/   | /'
        # the top frames outside libFuzzer, the sanitizer runtime and libc
        { grep -E '^ *#[0-9]+ 0x' "$log" || true; } | grep -v -E 'compiler-rt/lib|libc\.so|libc-start|libc_start' \
            | head -12 | demangle | sed 's/^/   | /'
        for a in $new; do
            echo "   artifact: $artifacts/$a ($(wc -c <"$artifacts/$a") bytes)"
            [[ $(wc -c <"$artifacts/$a") -le 4096 ]] && echo "   base64: $(base64 -w0 "$artifacts/$a")"
            echo "   reproduce: $BIN/$t $artifacts/$a"
            echo "   minimise:  $BIN/$t -minimize_crash=1 -runs=100000 -max_len=$(max_len "$t") -artifact_prefix=$artifacts/min- $artifacts/$a"
        done
        echo "   log: $log"
    fi
    summary+=("$t: ${execs:-?} executions, ${cov:-?}, crash: $result")
done

echo "== summary"
printf '   %s\n' "${summary[@]}"
exit $failed
