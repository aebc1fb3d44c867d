#!/usr/bin/env bash
# Benchmark: reading one file inside a large gzip layer.
#   1. `cat rootfs/etc/os-release` on a cold mount (the layer is indexed on the way);
#   2. the same on a new mount once the index exists (--cache-dir), cold chunk cache;
#   3. what `skopeo copy` + `tar -x` of the same image takes to get the same file.
# The layer is a tar.gz of this machine's /etc, /usr/bin and /usr/lib/os-release (over 100 MiB
# uncompressed), since there is no network to run mmdebstrap against.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_deps
export RUST_LOG=regfs=info
cargo build --release --quiet --bin regfs

work_setup

echo "==> building the layer"
tar -C / -cf "$work/layer.tar" usr/bin etc usr/lib/os-release 2>/dev/null || true
usize=$(stat -c %s "$work/layer.tar")
diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
gzip -6 -c "$work/layer.tar" >"$work/layer.tar.gz"
csize=$(stat -c %s "$work/layer.tar.gz")
rm "$work/layer.tar"
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["%s"]}}' "$diff_id" >"$work/config.json"
layer=$(push_file "$base" bench/rootfs "$work/layer.tar.gz")
config=$(push_file "$base" bench/rootfs "$work/config.json")
cat >"$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
 "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$config","size":$(stat -c %s "$work/config.json")},
 "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"$layer","size":$csize}]}
JSON
curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary @"$work/manifest.json" "$base/v2/bench/rootfs/manifests/v1" -o /dev/null
echo "layer: $((usize / 1048576)) MiB uncompressed, $((csize / 1048576)) MiB gzip"

bytes_fetched() { getfattr --only-values -n user.regfs.stats "$mnt" 2>/dev/null | sed 's/.*"blob_bytes":\([0-9]*\).*/\1/'; }

# 1. Cold mount: index the layer on the way.
target/release/regfs --cache-dir "$work/cache" --log-file "$work/regfs1.log" "$@" "$REGISTRY_ADDR" "$mnt"
pid=$(pgrep -f "regfs --cache-dir $work/cache --log-file $work/regfs1.log" | head -1)
a=$(date +%s.%N); cat "$mnt/bench/rootfs/tags/v1/rootfs/etc/os-release" >/dev/null; b=$(date +%s.%N)
cold_s=$(elapsed "$a" "$b"); cold_b=$(bytes_fetched); cold_rss=$(peak_rss_mib "$pid")
idx_line=$(grep -o 'indexed layer.*' "$work/regfs1.log" | head -1 || true)
fusermount3 -u "$mnt"; sleep 0.5

# 2. New mount, index on disk, cold chunk cache.
target/release/regfs --cache-dir "$work/cache" --log-file "$work/regfs2.log" "$@" "$REGISTRY_ADDR" "$mnt"
a=$(date +%s.%N); cat "$mnt/bench/rootfs/tags/v1/rootfs/etc/os-release" >/dev/null; b=$(date +%s.%N)
warm_s=$(elapsed "$a" "$b"); warm_b=$(bytes_fetched)
# A file deep in the layer, too.
deep=$(tar -tvzf "$work/layer.tar.gz" | awk '/^-/ && $6 ~ /^usr\/bin\// { f = $6 } END { print f }')
a=$(date +%s.%N); cat "$mnt/bench/rootfs/tags/v1/rootfs/$deep" >/dev/null; b=$(date +%s.%N)
deep_s=$(elapsed "$a" "$b"); deep_b=$(( $(bytes_fetched) - warm_b ))
fusermount3 -u "$mnt"

# 3. skopeo copy + tar -x.
a=$(date +%s.%N)
skopeo copy -q --src-tls-verify=false --insecure-policy "docker://$REGISTRY_ADDR/bench/rootfs:v1" "oci:$work/oci:v1"
mkdir "$work/x"
tar -xzf "$work/oci/blobs/sha256/${layer#sha256:}" -C "$work/x" etc/os-release usr/lib/os-release
cat "$work/x/etc/os-release" >/dev/null
b=$(date +%s.%N)
skopeo_s=$(elapsed "$a" "$b")

echo
echo "| what | seconds | bytes fetched |"
echo "|---|---|---|"
echo "| regfs, cold mount: first cat rootfs/etc/os-release (indexes the layer) | $cold_s | $cold_b |"
echo "| regfs, new mount with the index in --cache-dir: cat rootfs/etc/os-release | $warm_s | $warm_b |"
echo "| regfs, same mount: cat rootfs/$deep | $deep_s | $deep_b |"
echo "| skopeo copy + tar -x of etc/os-release | $skopeo_s | $csize (the whole layer) |"
echo
echo "regfs peak RSS during the cold cat: $cold_rss MiB"
echo "index: ${idx_line:-?}"
echo "index on disk: $(du -k "$work/cache" | tail -1 | cut -f1) KiB"
