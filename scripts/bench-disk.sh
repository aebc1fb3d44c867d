#!/usr/bin/env bash
# Benchmark: the disk tier. (1) A blob read once through regfs with --cache-dir, then re-read by a
# new mount: bytes fetched, daemon CPU seconds and throughput (passthrough) versus curl of the
# same blob. (2) The same read with --cache-dir-size 300MiB: bytes left on disk.
# Usage: scripts/bench-disk.sh [SIZE_MIB=1024]   (REGFS_BIN=path uses that binary instead of a
# release build)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
size_mib=${1:-1024}

ensure_deps
bin=${REGFS_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --quiet --bin regfs
    bin=target/release/regfs
fi

work_setup

echo "==> making a ${size_mib} MiB random blob"
head -c $((size_mib * 1024 * 1024)) /dev/urandom >"$work/blob"
layer=$(push_file "$base" bench/disk "$work/blob")
rm -f "$work/blob"
file="$mnt/bench/disk/blobs/sha256/${layer#sha256:}"

# cpu_s PID: user + system CPU seconds of a process.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
mount_with() {
    "$bin" --log-file "$work/regfs.log" --chunk-size 1MiB --cache-dir "$@" "$REGISTRY_ADDR" "$mnt"
    pid=$(pgrep -f "regfs --log-file $work/regfs.log" | head -1)
}
# unmount_wait: unmount and wait (at most 60 s) for the daemon to finish its disk writes and exit.
unmount_wait() {
    fusermount3 -u "$mnt"
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    echo "regfs $pid did not exit" >&2; return 1
}
stat_of() { getfattr --absolute-names --only-values -n user.regfs.stats "$mnt" | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }

mount_with "$work/cache"
a=$(date +%s.%N); cat "$file" >/dev/null; b=$(date +%s.%N)
fill_s=$(elapsed "$a" "$b")
unmount_wait

mount_with "$work/cache"
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
c0=$(cpu_s "$pid")
a=$(date +%s.%N); cat "$file" >/dev/null; b=$(date +%s.%N)
c1=$(cpu_s "$pid")
reread_s=$(elapsed "$a" "$b")
fetched=$(stat_of blob_bytes); opens=$(stat_of disk_passthrough_opens); hits=$(stat_of disk_hits)
unmount_wait

sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
a=$(date +%s.%N); curl -fsS -o /dev/null "$base/v2/bench/disk/blobs/$layer"; b=$(date +%s.%N)
curl_s=$(elapsed "$a" "$b")

mount_with "$work/capped" --cache-dir-size 300MiB
cat "$file" >/dev/null
unmount_wait
on_disk=$(du -sm --apparent-size "$work/capped/blocks" "$work/capped/blobs" | awk '{ s += $1 } END { print s }')

echo
echo "| what | size | seconds | MiB/s |"
echo "|---|---|---|---|"
echo "| regfs, first mount: cat (fills the disk tier) | ${size_mib} MiB | $fill_s | $(mibps "$size_mib" "$fill_s") |"
echo "| regfs, new mount: cat of the cached blob (passthrough) | ${size_mib} MiB | $reread_s | $(mibps "$size_mib" "$reread_s") |"
echo "| curl: GET of the same blob | ${size_mib} MiB | $curl_s | $(mibps "$size_mib" "$curl_s") |"
echo
echo "re-read: $fetched bytes fetched, daemon CPU $(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }') s, passthrough opens $opens, blocks served by the daemon $hits"
echo "--cache-dir-size 300MiB after a ${size_mib} MiB read: $on_disk MiB on disk"
