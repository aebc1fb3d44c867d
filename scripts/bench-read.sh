#!/usr/bin/env bash
# Benchmark: `cat` of a cold blob through regfs versus `curl` of the same blob from the same
# loopback registry, and regfs's peak RSS (VmHWM) during the cat.
# Usage: scripts/bench-read.sh [SIZE_MIB=1024] [extra regfs flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
size_mib=${1:-1024}
shift || true

ensure_deps
cargo build --release --quiet --bin regfs

work_setup

echo "==> making a ${size_mib} MiB random blob"
head -c $((size_mib * 1024 * 1024)) /dev/urandom >"$work/blob"
printf '{"architecture":"amd64","os":"linux"}' >"$work/config.json"
t0=$(date +%s.%N)
layer=$(push_file "$base" bench/big "$work/blob")
t1=$(date +%s.%N)
config=$(push_file "$base" bench/big "$work/config.json")
cat >"$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
 "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$config","size":$(stat -c %s "$work/config.json")},
 "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"$layer","size":$(stat -c %s "$work/blob")}]}
JSON
curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary @"$work/manifest.json" "$base/v2/bench/big/manifests/v1" -o /dev/null
rm -f "$work/blob"

target/release/regfs --log-file "$work/regfs.log" "$@" "$REGISTRY_ADDR" "$mnt"
pid=$(pgrep -f "regfs --log-file $work/regfs.log" | head -1)
file=$(echo "$mnt"/bench/big/tags/v1/layers/00-*.tar)


sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
a=$(date +%s.%N); cat "$file" >/dev/null; b=$(date +%s.%N)
cat_s=$(elapsed "$a" "$b")
hwm=$(peak_rss_mib "$pid")
stats=$(getfattr --only-values -n user.regfs.stats "$mnt")

sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
a=$(date +%s.%N); curl -fsS -o /dev/null "$base/v2/bench/big/blobs/$layer"; b=$(date +%s.%N)
curl_s=$(elapsed "$a" "$b")
push_s=$(elapsed "$t0" "$t1")

echo
echo "| what | size | seconds | MiB/s |"
echo "|---|---|---|---|"
echo "| regfs: cat of a cold blob (flags: ${*:-defaults}) | ${size_mib} MiB | $cat_s | $(mibps "$size_mib" "$cat_s") |"
echo "| curl: GET of the same blob | ${size_mib} MiB | $curl_s | $(mibps "$size_mib" "$curl_s") |"
echo "| curl -T: monolithic upload (seeding) | ${size_mib} MiB | $push_s | $(mibps "$size_mib" "$push_s") |"
echo
echo "regfs peak RSS (VmHWM) during the cat: $hwm MiB"
echo "regfs counters: $stats"
