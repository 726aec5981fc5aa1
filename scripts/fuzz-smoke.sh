#!/usr/bin/env bash
# Bounded fuzzing smoke run (CI): builds the cargo-fuzz targets of rust/fuzz with libFuzzer and
# AddressSanitizer, runs each for FUZZ_SECONDS (default 25) and exits non-zero if any target
# crashes (panic, failed invariant, sanitizer report, leak, timeout or out-of-memory).
#
#   bash scripts/fuzz-smoke.sh [target...]        # default: every target
#   FUZZ_SECONDS=300 bash scripts/fuzz-smoke.sh esp_decap_struct
#
# Installs what it needs: a C++ compiler (for libFuzzer, via apt-get when root) and the pinned
# cargo-fuzz. Stable Rust is enough: RUSTC_BOOTSTRAP=1 lets it take the -Zsanitizer flag.
# Corpora persist in rust/fuzz/corpus/<target>, crash inputs land in rust/fuzz/artifacts/<target>
# (both git-ignored); reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir rust/fuzz <target> <artifact>
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS=${FUZZ_SECONDS:-25}
# FUZZ_RUNS=N runs each target for N executions instead (long runs outside CI, e.g. 10000000).
FUZZ_RUNS=${FUZZ_RUNS:-}
# FUZZ_SANITIZER=none drops AddressSanitizer (the targets are safe Rust) for faster long runs.
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
FUZZ_DIR=rust/fuzz
export RUSTC_BOOTSTRAP=1

if ! command -v c++ >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "fuzz-smoke: installing g++ (libFuzzer is C++)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++ >/dev/null
    else
        echo "fuzz-smoke: a C++ compiler is needed to build libFuzzer (apt-get install g++)" >&2
        exit 1
    fi
fi

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "fuzz-smoke: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked --quiet cargo-fuzz --version "=$CARGO_FUZZ_VERSION"
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$FUZZ_DIR")
fi

logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT

echo "fuzz-smoke: building ${targets[*]}"
if ! cargo fuzz build -s "$FUZZ_SANITIZER" --fuzz-dir "$FUZZ_DIR" >"$logdir/build.log" 2>&1; then
    cat "$logdir/build.log" >&2
    echo "fuzz-smoke: build failed" >&2
    exit 1
fi

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "$FUZZ_DIR/corpus/$t"
    log="$logdir/$t.log"
    if [ -n "$FUZZ_RUNS" ]; then
        limit=(-runs="$FUZZ_RUNS")
        echo "fuzz-smoke: $t for $FUZZ_RUNS runs"
    else
        limit=(-max_total_time="$FUZZ_SECONDS")
        echo "fuzz-smoke: $t for ${FUZZ_SECONDS}s"
    fi
    rc=0
    started=$SECONDS
    cargo fuzz run -s "$FUZZ_SANITIZER" --fuzz-dir "$FUZZ_DIR" "$t" -- \
        "${limit[@]}" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n1 | cut -d' ' -f2 || true)
    corpus=$(find "$FUZZ_DIR/corpus/$t" -type f | wc -l)
    if [ "$rc" -eq 0 ]; then
        summary+=("$(printf '%-20s ok     %10s runs  cov %-5s corpus %s  %ss' "$t" "${runs:-?}" "${cov:-?}" "$corpus" "$((SECONDS - started))")")
    else
        summary+=("$(printf '%-20s FAILED %10s runs  (exit %s)' "$t" "${runs:-?}" "$rc")")
        failed+=("$t")
        {
            echo "---- $t:"
            grep -m1 -A14 -E 'panicked at|==[0-9]+==ERROR|ERROR: libFuzzer' "$log" || tail -n 30 "$log"
            grep -E 'Test unit written to' "$log" || true
            echo "----"
        } >&2
    fi
done

echo "fuzz-smoke summary (${FUZZ_SECONDS}s per target):"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz-smoke: FAILED: ${failed[*]} (crash inputs in $FUZZ_DIR/artifacts/)" >&2
    exit 1
fi
