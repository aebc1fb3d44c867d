#!/usr/bin/env bash
# Fuzz every target of fuzz/ (cargo-fuzz, nightly) for SECONDS each (default 60), one after the
# other, one process each (plain mode: with -jobs=1 libFuzzer would log to fuzz-0.log instead).
# Seeds the corpora from the test images first (tests/fuzz_regressions.rs, `write_seeds`), prints
# executions and crashes per target, and exits non-zero on any crash.
# Crash inputs land in fuzz/artifacts/<target>/; minimise one with
#   cargo +nightly fuzz tmin -a <target> fuzz/artifacts/<target>/crash-…
# then check it into fuzz/regressions/<target>/ with a test in tests/fuzz_regressions.rs.
# Not part of scripts/test.sh: CI replays the regressions only. See docs/FUZZING.md.
#
# Environment: FUZZ_TARGETS="a b" to run only some targets; FUZZ_TARGET_DIR for the fuzz build
# (default fuzz/target); FUZZ_RSS_MB (default 2048) is libFuzzer's memory limit; FUZZ_KEEP_GOING=1
# runs in libFuzzer's fork mode and goes on after a crash (each crash still leaves an artifact).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
root=$PWD

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs a nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo fuzz --help >/dev/null 2>&1; then
    cargo install cargo-fuzz
fi

# Seeds: from the test images, with the stable toolchain and the main crate's own target dir.
REGFS_FUZZ_CORPUS="$root/fuzz/corpus" cargo test -q --test fuzz_regressions -- --ignored write_seeds \
    >/dev/null

targets=${FUZZ_TARGETS:-$(cd fuzz && cargo +nightly fuzz list)}
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$root/fuzz/target}
# -a: debug assertions and overflow checks on, so an overflow is a crash, as in a debug build.
(cd fuzz && cargo +nightly fuzz build -a)

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
keep_going=()
if [ -n "${FUZZ_KEEP_GOING:-}" ]; then
    keep_going=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
fi
total=0
crashed=0
printf '%-18s %8s %12s %8s\n' target seconds executions crashes
for t in $targets; do
    mkdir -p "fuzz/artifacts/$t" "fuzz/corpus/$t"
    before=$(find "fuzz/artifacts/$t" -type f -name '[a-z]*-*' ! -name last-run.log ! -name 'slow-unit-*' | wc -l)
    status=0
    (cd fuzz && cargo +nightly fuzz run -a "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 \
        -rss_limit_mb="${FUZZ_RSS_MB:-2048}" -timeout=10 "${keep_going[@]}") >"$logs/$t.log" 2>&1 ||
        status=$?
    # The final stats, else (a crash, fork mode) the last `#N` progress line.
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$' | tail -1 || true)
    [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$logs/$t.log" | tail -1 | tr -d '#' || true)
    execs=${execs:-0}
    after=$(find "fuzz/artifacts/$t" -type f -name '[a-z]*-*' ! -name last-run.log ! -name 'slow-unit-*' | wc -l)
    crashes=$((after - before))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1 # a failure that left no artifact (build error, OOM of the driver)
    fi
    if [ "$crashes" -gt 0 ]; then
        crashed=1
        grep -m3 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$logs/$t.log" | sed "s/^/  $t: /" || true
        cp "$logs/$t.log" "fuzz/artifacts/$t/last-run.log"
    fi
    total=$((total + execs))
    printf '%-18s %8s %12s %8s\n' "$t" "$seconds" "$execs" "$crashes"
done
printf '%-18s %8s %12s\n' total "" "$total"
exit "$crashed"
