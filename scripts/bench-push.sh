#!/usr/bin/env bash
# Benchmark: `cp FILE MNT/<repo>/uploads/` (a chunked push through regfs) versus a monolithic
# `curl -T` upload of the same file to the same loopback registry, and regfs's peak RSS during the cp.
# Usage: scripts/bench-push.sh [SIZE_MIB=1024] [extra regfs flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
size_mib=${1:-1024}
shift || true

ensure_deps
cargo build --release --quiet --bin regfs

work_setup

echo "==> making a ${size_mib} MiB random file"
head -c $((size_mib * 1024 * 1024)) /dev/urandom >"$work/file"
sha256sum "$work/file" >/dev/null # warm the page cache for both contenders

target/release/regfs --log-file "$work/regfs.log" "$@" "$REGISTRY_ADDR" "$mnt"
pid=$(pgrep -f "regfs --log-file $work/regfs.log" | head -1)
mkdir "$mnt/bench-cp"
a=$(date +%s.%N); cp "$work/file" "$mnt/bench-cp/uploads/file"; b=$(date +%s.%N)
cp_s=$(elapsed "$a" "$b")
hwm=$(peak_rss_mib "$pid")
stats=$(getfattr --only-values -n user.regfs.stats "$mnt" 2>/dev/null)
digest=$(getfattr --only-values -n user.oci.digest "$mnt/bench-cp/uploads/file" 2>/dev/null)

a=$(date +%s.%N); curl_digest=$(push_file "$base" bench/curl "$work/file"); b=$(date +%s.%N)
curl_s=$(elapsed "$a" "$b")
[ "$digest" = "$curl_digest" ] || { echo "digest mismatch: $digest vs $curl_digest" >&2; exit 1; }

echo
echo "| what | size | seconds | MiB/s |"
echo "|---|---|---|---|"
echo "| regfs: cp into uploads/ (flags: ${*:-defaults}) | ${size_mib} MiB | $cp_s | $(mibps "$size_mib" "$cp_s") |"
echo "| curl -T: monolithic POST + PUT | ${size_mib} MiB | $curl_s | $(mibps "$size_mib" "$curl_s") |"
echo
echo "regfs peak RSS (VmHWM) during the cp: $hwm MiB"
echo "regfs counters: $stats"
