#!/usr/bin/env bash
# The benchmark table of issue 9 (and issue 10's cached re-read): every workload on a fresh, cold
# regfs mount, at loopback and at a 50 ms RTT (the delay proxy, examples/delay_proxy.rs), side by
# side with curl. Starts its own docker-registry (free port, temp storage), seeds it
# (examples/seed_bench.rs), prints a table and, with --record, appends it to docs/BENCHMARKS.md.
#
# Usage: scripts/bench.sh [--quick] [--record] [--net lo|wan|both] [--rtt-ms N] [--window SIZE]
#                         [--handshake] [--profile] [WORKLOAD...] [-- REGFS_FLAGS...]
# Workloads (default: all): seq random gzip-first progressive indexed tags estargz zstd-chunked
#                           push cached
#   seq          cold sequential read of one blob (1 GiB loopback, 256 MiB at RTT) vs curl, and the
#                daemon's CPU per GiB vs sha256's (openssl)
#   random       one cold 4 KiB read in the middle of that blob: bytes fetched vs 4 KiB
#   gzip-first   first file of a cold ~60 MB gzip layer vs `curl | gunzip` of the layer
#   progressive  `cat rootfs/etc/os-release` (a symlink to usr/lib/os-release, 14 % into the tar
#                stream) in the same layer vs `curl | gunzip`
#   indexed      the same cat in a new mount whose --cache-dir holds the layer's index
#   tags         `ls tags/*/` over 10 repositories x 4 tags vs a sequential curl loop
#   estargz      first file of a 64 MiB eStargz layer: bytes fetched vs footer + TOC + file
#   zstd-chunked the same for zstd:chunked
#   push         cp of a file into uploads/ vs curl -T (monolithic POST + PUT)
#   cached       re-read of a fully cached blob in a new mount (needs --cache-dir-size, issue 10)
#   redirect     a registry that redirects blob GETs to storage, as Docker Hub, GHCR and ECR do
#                (a second docker-registry on the same storage with distribution's redirect
#                middleware, in front of examples/blob_storage; at wan each behind its own delay
#                proxy): 8 cold 4 KiB reads spread over one blob, and the cold sequential read,
#                each beside the same with --redirect-ttl 0 (every request asks the registry first)
#   tls          the cold sequential read from the same registry over https (a second
#                docker-registry on its storage with a fresh self-signed certificate; it offers
#                h2, as public registries do), vs curl --cacert (which takes h2)
# --handshake: the proxy charges each new connection one RTT (off by default, as in the figures
# issue 9 started from).
# --profile: perf record (999 Hz, flat) of the daemon during the loopback `seq` read; the
# report (by library, and the top symbols) is printed and recorded with the table. Env:
# BENCH_PERF adds `perf record` flags (e.g. "-g --call-graph dwarf -F 299"); BENCH_PERF_KEEP=FILE
# keeps the raw profile for `perf report -i FILE`; BENCH_PERF_SCOPE=-a profiles the whole machine.
# BENCH_STRACE=FILE: strace the daemon during the `seq` read (BENCH_STRACE_EVENTS, default memory;
# BENCH_STRACE_FLAGS, default -c for counts). The `seq` row at loopback also notes the ceiling:
# examples/fuse_ceiling serving the same size from memory, plain and hashing every byte.
# --quick: smaller sizes (256 MiB loopback, 64 MiB at RTT, smaller layers) for a fast check.
# Each row: time, throughput, bytes fetched (or sent), requests (from user.regfs.stats), the
# daemon's CPU (utime+stime from /proc/PID/stat) and peak RSS (VmHWM).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

all="seq random gzip-first progressive indexed tags estargz zstd-chunked push cached redirect tls"
quick=0 record=0 nets="lo wan" rtt_ms=50 window=4MiB handshake=() profile=0 workloads=() flags=()
cmdline="scripts/bench.sh $*"
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) quick=1 ;;
    --record) record=1 ;;
    --net) shift; case "$1" in both) nets="lo wan" ;; lo | wan) nets=$1 ;; *) echo "--net lo|wan|both" >&2; exit 2 ;; esac ;;
    --rtt-ms) shift; rtt_ms=$1 ;;
    --window) shift; window=$1 ;;
    --handshake) handshake=(--handshake) ;;
    --profile) profile=1 ;;
    --) shift; flags=("$@"); break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *)
        case " $all " in *" $1 "*) workloads+=("$1") ;; *) echo "unknown workload $1 (one of: $all)" >&2; exit 2 ;; esac ;;
    esac
    shift
done
[ ${#workloads[@]} -gt 0 ] || read -ra workloads <<<"$all"
wants() { case " ${workloads[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if [ $quick = 1 ]; then
    seq_mib=256 wan_mib=64 push_mib=64 toc_mib=16 rootfs_mib=60
else
    seq_mib=1024 wan_mib=256 push_mib=256 toc_mib=64 rootfs_mib=156
fi
# Requests: every counter of user.regfs.stats that is one HTTP request.
req_keys="catalog_pages tag_pages manifest_gets manifest_heads blob_heads blob_gets token_fetches pushes upload_starts upload_patches upload_cancels blob_mounts deletes retries"
accept='Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json'

ensure_deps
echo "==> building (release)"
# The examples link the library with its test-only feature: build them first, so that the
# regfs binary, built last, is the one without it.
cargo build --release --quiet --example delay_proxy --example seed_bench --example fuse_ceiling --example blob_storage
cargo build --release --quiet --bin regfs

work_setup
start_delay_proxy "$REGISTRY_ADDR" "$rtt_ms" "$window" "$work/proxy.log" "${handshake[@]}"
# The bench registry and its proxy, and the processes a workload starts beside them (the
# redirect and tls workloads' registries, storage and proxies; stopped by stop_extra at the end
# of the workload): all stopped on exit, however the script ends.
main_pids=("$REGISTRY_PID" "$PROXY_PID") extra_pids=()
trap 'kill "${extra_pids[@]}" "${main_pids[@]}" 2>/dev/null || true; work_cleanup' EXIT
stop_extra() {
    [ ${#extra_pids[@]} -eq 0 ] || { kill "${extra_pids[@]}" 2>/dev/null || true; wait "${extra_pids[@]}" 2>/dev/null || true; }
    extra_pids=()
}

# --- seeding --------------------------------------------------------------------------------

# build_rootfs_layer OUT TOTAL_MIB: a Debian-like tar.gz of this machine's files (no network
# for mmdebstrap here): a few small etc/ files, etc/os-release -> ../usr/lib/os-release,
# usr/bin until 14 % of the stream, usr/lib/os-release, then usr/lib and usr/share to TOTAL_MIB.
# Parent directories come before their entries. Sets ROOTFS_FIRST (the first regular file).
build_rootfs_layer() {
    local out=$1 total=$(($2 << 20)) list="$work/rootfs.list"
    (
        cd /
        for f in etc/bash.bashrc etc/debian_version etc/host.conf etc/issue etc/profile etc/services; do
            [ -f "$f" ] && echo "A 0 $f"
        done
        echo "A 0 etc/os-release"
        find usr/bin -xdev -type f -size -16M -printf 'B %s %p\n' | LC_ALL=C sort -k3
        echo "C 0 usr/lib/os-release"
        find usr/lib/x86_64-linux-gnu usr/share -xdev -type f -size -16M -printf 'D %s %p\n' | LC_ALL=C sort -k3
    ) | awk -v total="$total" '
        function emit(p,   n, parts, i, pre) {
            n = split(p, parts, "/"); pre = ""
            for (i = 1; i < n; i++) { pre = pre (i > 1 ? "/" : "") parts[i]; if (!(pre in seen)) { seen[pre] = 1; print pre } }
            print p
        }
        NF != 3 { next }
        $1 == "A" || $1 == "C" { emit($3); next }
        $1 == "B" && sum + $2 <= total * 0.14 { sum += $2; emit($3); next }
        $1 == "D" && sum + $2 <= total { sum += $2; emit($3) }' >"$list"
    ROOTFS_FIRST=$(cd / && while read -r p; do [ -f "$p" ] && [ ! -L "$p" ] && { echo "$p"; break; }; done <"$list")
    tar -C / --no-recursion -cf "$work/rootfs.tar" -T "$list"
    local block tsize
    block=$(tar -R -tf "$work/rootfs.tar" | awk '$3 == "usr/lib/os-release" && !done { sub(":", "", $2); print $2; done = 1 }')
    tsize=$(stat -c %s "$work/rootfs.tar")
    gzip -6 -n -c "$work/rootfs.tar" >"$out"
    rm -f "$work/rootfs.tar"
    echo "rootfs layer: $((tsize >> 20)) MiB tar, $(($(stat -c %s "$out") >> 20)) MiB gzip, $(wc -l <"$list") entries," \
        "usr/lib/os-release at $(awk -v b="$block" -v t="$tsize" 'BEGIN { printf "%.1f", b * 512 * 100 / t }') % of the stream"
}

seed_args=()
if wants seq || wants random || wants cached || wants redirect || wants tls; then
    seed_args+=(--blob "seq=$seq_mib" --blob "seqwan=$wan_mib")
fi
if wants gzip-first || wants progressive || wants indexed; then
    echo "==> building the rootfs layer"
    build_rootfs_layer "$work/rootfs.tar.gz" "$rootfs_mib"
    seed_args+=(--gzip-layer "rootfs=$work/rootfs.tar.gz")
fi
wants tags && seed_args+=(--tags 10x4)
wants estargz && seed_args+=(--estargz "$toc_mib")
wants zstd-chunked && seed_args+=(--zstd-chunked "$toc_mib")
echo "==> seeding the registry"
a=$(now)
target/release/examples/seed_bench "$REGISTRY_ADDR" "${seed_args[@]}" >"$work/seed.env"
echo "seeded in $(elapsed "$a" "$(now)") s"
# Lines are key=value with names and numbers only (written by seed_bench above).
. "$work/seed.env"
rm -f "$work/rootfs.tar.gz"

# --- measuring ------------------------------------------------------------------------------

mount_cold() { # NET [FLAGS...]: a fresh mount of the registry (through the proxy for wan)
    local net=$1
    shift
    regfs_mount "$(addr_of "$net")" "$mnt" "$work/regfs-$net-$((++mounts)).log" "${flags[@]}" "$@"
}
addr_of() { if [ "$1" = wan ]; then echo "$PROXY_ADDR"; else echo "$REGISTRY_ADDR"; fi; }
mounts=0

m_start() {
    s0=$(regfs_stats "$mnt")
    c0=$(cpu_seconds "$REGFS_PID")
    t0=$(now)
}
# m_end: sets T, CPU, MOVED (blob bytes fetched + upload bytes sent), REQS, RSS.
m_end() {
    local t1 c1 s1
    t1=$(now)
    c1=$(cpu_seconds "$REGFS_PID")
    s1=$(regfs_stats "$mnt")
    T=$(elapsed "$t0" "$t1")
    CPU=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')
    MOVED=$(($(json_sum "$s1" blob_bytes upload_bytes) - $(json_sum "$s0" blob_bytes upload_bytes)))
    # shellcheck disable=SC2086
    REQS=$(($(json_sum "$s1" $req_keys) - $(json_sum "$s0" $req_keys)))
    # Through a registry that redirects, a blob GET is two requests (the registry's 307, then
    # storage: foreign_requests), or one when it went straight to a remembered link.
    REQS=$((REQS + $(json_sum "$s1" foreign_requests) - $(json_sum "$s0" foreign_requests)))
    REQS=$((REQS - $(json_sum "$s1" redirect_reuses) + $(json_sum "$s0" redirect_reuses)))
    RSS=$(peak_rss_mib "$REGFS_PID")
}
# timed CMD...: runs CMD, sets RT to its wall time.
timed() {
    local a
    a=$(now)
    "$@"
    RT=$(elapsed "$a" "$(now)")
}

rows=() notes=()
FS=$'\t' # between the fields of a row (a reference may hold a '|')
# row WORKLOAD NET SIZE_BYTES REFERENCE REF_SECONDS TARGET MET: one line of the table, from the
# last m_end (SIZE_BYTES 0: no throughput; REF_SECONDS -: none).
row() {
    rows+=("$1${FS}$2${FS}$T${FS}$(rate "$3" "$T")${FS}$(human "$MOVED")${FS}$REQS${FS}$CPU${FS}$RSS${FS}$4${FS}$5${FS}$(rate "$3" "$5")${FS}$(speed "$5" "$T")${FS}$6${FS}$7")
}
rate() { if [ "$1" = 0 ] || [ "$2" = - ]; then echo -; else awk -v b="$1" -v t="$2" 'BEGIN { printf "%.0f", b / 1048576 / (t > 0 ? t : 0.001) }'; fi; }
speed() { if [ "$1" = - ]; then echo -; else awk -v r="$1" -v t="$2" 'BEGIN { printf "%.2f×", r / (t > 0 ? t : 0.001) }'; fi; }
human() {
    awk -v b="$1" 'BEGIN { if (b >= 1073741824) printf "%.2f GiB", b / 1073741824; else if (b >= 1048576) printf "%.1f MiB", b / 1048576;
        else if (b >= 1024) printf "%.0f KiB", b / 1024; else printf "%d B", b }'
}
# yes/no: is A OP B (numbers)?
met() { awk -v a="$1" -v b="$3" -v op="$2" 'BEGIN { ok = (op == "<=") ? a <= b : a >= b; print ok ? "yes" : "no" }'; }
blob_url() { echo "http://$(addr_of "$1")/v2/bench/$2/blobs/$3"; }

w_seq() {
    local net=$1 name=seq mib=$seq_mib digest target=">= 0.8x curl" min=0.8
    [ "$net" = wan ] && { name=seqwan mib=$wan_mib target=">= 1.5x curl" min=1.5; }
    digest=$(eval echo "\$blob_$name")
    mount_cold "$net"
    local file
    file=$(echo "$mnt/bench/$name/tags/v1/layers/00-"*.*)
    local perf_pid=
    if [ $profile = 1 ] && [ "$net" = lo ]; then
        # BENCH_PERF: extra `perf record` flags (say "-g --call-graph dwarf -F 299").
        # shellcheck disable=SC2086
        perf record -q -F 999 ${BENCH_PERF:-} ${BENCH_PERF_SCOPE:--p $REGFS_PID} -o "$work/perf.data" 2>"$work/perf.log" &
        perf_pid=$!
        sleep 0.5 # perf attaches
    fi
    local reg0 reg1 reg2 reg3 flt0 flt1
    reg0=$(cpu_seconds "$REGISTRY_PID") flt0=$(minor_faults "$REGFS_PID")
    if [ -n "${BENCH_STRACE:-}" ]; then strace -f ${BENCH_STRACE_FLAGS:--c} -e trace=${BENCH_STRACE_EVENTS:-memory} -p "$REGFS_PID" -o "$BENCH_STRACE" & sleep 0.5; fi
    m_start; cat "$file" >/dev/null; m_end
    reg1=$(cpu_seconds "$REGISTRY_PID") flt1=$(minor_faults "$REGFS_PID")
    if [ -n "${BENCH_STRACE:-}" ]; then pkill -INT -f "strace -f .* -p $REGFS_PID"; sleep 0.5; fi
    local joined
    joined=$(grep -o '"joined": [0-9]*' "$mnt/.regfs/stats" | grep -o '[0-9]*$' || echo 0)
    notes+=("seq $net: $(awk -v j="$joined" -v m="$mib" 'BEGIN { printf "%.0f", j / (m * 1048576) * 100 }') % of the bytes served were copied to join reads spanning two chunks (.regfs/stats bytes.joined)")
    notes+=("seq $net: regfs took $((flt1 - flt0)) minor page faults ($(awk -v f=$((flt1 - flt0)) -v m="$mib" 'BEGIN { printf "%.0f", f / (m * 256) * 100 }') % of the pages read)")
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
        profile_report >"$work/profile.txt"
        # BENCH_PERF_KEEP=FILE: keep the raw profile (for `perf report -i FILE`).
        [ -z "${BENCH_PERF_KEEP:-}" ] || cp "$work/perf.data" "$BENCH_PERF_KEEP"
    fi
    regfs_unmount "$mnt"
    reg2=$(cpu_seconds "$REGISTRY_PID")
    timed curl -fsS -o /dev/null "$(blob_url "$net" "$name" "$digest")"
    reg3=$(cpu_seconds "$REGISTRY_PID")
    # The registry's own CPU for each (two cores serve the registry, regfs and the reader).
    notes+=("seq $net: docker-registry CPU $(awk -v a="$reg0" -v b="$reg1" 'BEGIN { printf "%.2f", b - a }') s serving regfs's ranges, $(awk -v a="$reg2" -v b="$reg3" 'BEGIN { printf "%.2f", b - a }') s serving curl's one GET")
    row seq "$net" $((mib << 20)) "curl, one stream" "$RT" "$target" "$(met "$(awk -v r="$RT" -v t="$T" 'BEGIN { print r / t }')" '>=' "$min")"
    if [ "$net" = lo ]; then
        # The daemon's CPU per GiB, beside sha256 alone (openssl, SHA-NI) on the same bytes.
        local per_gib ref hex=${digest#sha256:}
        per_gib=$(awk -v c="$CPU" -v m="$mib" 'BEGIN { printf "%.2f", c * 1024 / m }')
        ref=$( { TIMEFORMAT='%U %S'; time openssl dgst -sha256 "$work/registry/data/docker/registry/v2/blobs/sha256/${hex:0:2}/$hex/data" >/dev/null; } 2>&1 |
            awk -v m="$mib" '{ printf "%.2f", ($1 + $2) * 1024 / m }')
        ceiling "$mib"
        ceiling "$mib" --hash
        rows+=("cpu per GiB${FS}lo${FS}-${FS}-${FS}-${FS}-${FS}$per_gib${FS}-${FS}sha256 alone (openssl dgst), CPU s per GiB${FS}$ref${FS}-${FS}-${FS}<= 1.0 s${FS}$(met "$per_gib" '<=' 1.0)")
    fi
}

# ceiling MIB [FLAGS]: what any FUSE daemon reaches on this machine, reading MIB from a mount of
# examples/fuse_ceiling (bytes from memory, regfs's kernel parameters; --hash: sha256 of every
# byte as it is served, which regfs cannot skip). A note on the seq row.
ceiling() {
    local mib=$1 dir pid c0 c1 a b dev
    shift
    dir=$(mktemp -d "$work/ceiling.XXXXXX")
    target/release/examples/fuse_ceiling "$dir" --size "${mib}MiB" "$@" >"$dir.log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do grep -q mounted "$dir.log" 2>/dev/null && break; sleep 0.1; done
    if ! mountpoint -q "$dir"; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rmdir "$dir" 2>/dev/null || true
        notes+=("seq lo ceiling${1:+ ($1)}: examples/fuse_ceiling did not mount (see $dir.log)")
        return 0
    fi
    # As regfs's session does: the mount's readahead to 1 MiB.
    dev=$(awk -v m="$dir" '$5 == m { print $3 }' /proc/self/mountinfo)
    [ -z "$dev" ] || echo 1024 >"/sys/class/bdi/$dev/read_ahead_kb" 2>/dev/null || true
    c0=$(cpu_seconds "$pid")
    a=$(now)
    cat "$dir/blob" >/dev/null
    b=$(now)
    c1=$(cpu_seconds "$pid")
    fusermount3 -u "$dir" 2>/dev/null || fusermount3 -uz "$dir" 2>/dev/null || umount -l "$dir" || true
    wait "$pid" || true
    rmdir "$dir" 2>/dev/null || true
    notes+=("seq lo ceiling${1:+ ($1)}: a FUSE daemon serving ${mib} MiB from memory$([ "${1:-}" = --hash ] && echo ", hashing each byte,") reaches $(awk -v m="$mib" -v a="$a" -v b="$b" 'BEGIN { printf "%.0f", m / (b - a) }') MiB/s with $(awk -v a="$c0" -v b="$c1" -v m="$mib" 'BEGIN { printf "%.2f", (b - a) * 1024 / m }') s CPU per GiB (examples/fuse_ceiling.rs)")
}

# profile_report: the daemon's samples by library, then its top symbols.
profile_report() {
    echo "Profile of the daemon during the cold sequential read at loopback (perf, 999 Hz, flat):"
    echo
    echo '```'
    perf report -i "$work/perf.data" --stdio --sort dso --percent-limit 1 2>/dev/null | grep -v '^#' | grep -v '^$' || true
    echo
    perf report -i "$work/perf.data" --stdio --sort sym --percent-limit 1.5 2>/dev/null | grep -v '^#' | grep -v '^$' | head -25 || true
    echo '```'
}

w_random() {
    local net=$1 name=seq mib=$seq_mib off digest
    [ "$net" = wan ] && { name=seqwan mib=$wan_mib; }
    digest=$(eval echo "\$blob_$name")
    off=$(((mib << 20) * 37 / 100 / 4096 * 4096))
    mount_cold "$net"
    local file
    file=$(echo "$mnt/bench/$name/tags/v1/layers/00-"*.*)
    stat "$file" >/dev/null
    m_start; dd if="$file" of=/dev/null bs=4096 count=1 skip=$((off / 4096)) status=none; m_end
    regfs_unmount "$mnt"
    timed curl -fsS -o /dev/null -r "$off-$((off + 4095))" "$(blob_url "$net" "$name" "$digest")"
    row random "$net" 0 "4 KiB wanted; curl -r" "$RT" "fetched <= 1 MiB" "$(met "$MOVED" '<=' 1048576)"
}

# gunzip_layer NET: the reference for the gzip workloads (curl | gunzip, the whole layer).
gunzip_layer() { curl -fsS "$(blob_url "$1" rootfs "$layer_rootfs")" | gunzip >/dev/null; }

w_gzip_first() {
    local net=$1
    mount_cold "$net"
    ls "$mnt/bench/rootfs/tags/v1/" >/dev/null # the tag, resolved: curl knows the digest too
    m_start; cat "$mnt/bench/rootfs/tags/v1/rootfs/$ROOTFS_FIRST" >/dev/null; m_end
    regfs_unmount "$mnt"
    timed gunzip_layer "$net"
    local target=- ok=-
    [ "$net" = wan ] && { target="time <= 1.2x ref"; ok=$(met "$T" '<=' "$(awk -v r="$RT" 'BEGIN { print r * 1.2 }')"); }
    row gzip-first "$net" 0 "curl \\| gunzip" "$RT" "$target" "$ok"
}

w_progressive() {
    local net=$1 got
    mount_cold "$net"
    ls "$mnt/bench/rootfs/tags/v1/" >/dev/null
    m_start; got=$(cat "$mnt/bench/rootfs/tags/v1/rootfs/etc/os-release"); m_end
    regfs_unmount "$mnt"
    [ "$got" = "$(cat /usr/lib/os-release)" ] || { echo "progressive: wrong os-release through regfs" >&2; exit 1; }
    timed gunzip_layer "$net"
    row progressive "$net" 0 "curl \\| gunzip" "$RT" "time <= 0.3x ref" "$(met "$T" '<=' "$(awk -v r="$RT" 'BEGIN { print r * 0.3 }')")"
}

w_indexed() {
    local net=$1
    mount_cold "$net" --cache-dir "$work/index-$net"
    # A listing waits for the whole index (a lookup does not), so it is stored before unmount.
    ls "$mnt/bench/rootfs/tags/v1/rootfs/usr/lib/" >/dev/null
    regfs_unmount "$mnt"
    mount_cold "$net" --cache-dir "$work/index-$net"
    ls "$mnt/bench/rootfs/tags/v1/" >/dev/null
    m_start; cat "$mnt/bench/rootfs/tags/v1/rootfs/etc/os-release" >/dev/null; m_end
    regfs_unmount "$mnt"
    timed gunzip_layer "$net"
    row indexed "$net" 0 "curl \\| gunzip" "$RT" - -
}

w_tags() {
    local net=$1 r
    mount_cold "$net"
    m_start
    for r in $(seq -f '%02g' 0 $((tags_repos - 1))); do ls "$mnt/bench/tags$r/tags/"*/ >/dev/null; done
    m_end
    regfs_unmount "$mnt"
    curl_loop() {
        local r t base="http://$(addr_of "$net")/v2/bench"
        for r in $(seq -f '%02g' 0 $((tags_repos - 1))); do
            for t in $(curl -fsS "$base/tags$r/tags/list" | tr -d '[]{}" ' | sed 's/.*tags://' | tr ',' ' '); do
                curl -fsS -o /dev/null -H "$accept" "$base/tags$r/manifests/$t"
            done
        done
    }
    timed curl_loop
    local target=- ok=-
    [ "$net" = wan ] && { target="time <= 0.5x ref"; ok=$(met "$T" '<=' "$(awk -v r="$RT" 'BEGIN { print r * 0.5 }')"); }
    row tags "$net" 0 "curl loop, ${tags_repos}x${tags_per_repo}" "$RT" "$target" "$ok"
}

# w_toc NET WORKLOAD REPO: first file of a TOC layer (eStargz or zstd:chunked).
w_toc() {
    local net=$1 w=$2 repo=$3 first meta file lsize digest
    first=$(eval echo "\$${repo}_first") meta=$(eval echo "\$${repo}_meta_bytes")
    file=$(eval echo "\$${repo}_file_bytes") lsize=$(eval echo "\$${repo}_layer_bytes")
    mount_cold "$net"
    ls "$mnt/bench/$repo/tags/v1/" >/dev/null
    digest=$(getfattr --only-values -n user.oci.digest "$mnt/bench/$repo/tags/v1/layers/"00-*.* 2>/dev/null)
    m_start; cat "$mnt/bench/$repo/tags/v1/rootfs/$first" >/dev/null; m_end
    regfs_unmount "$mnt"
    # Reference: two ranged GETs (the footer, then footer + TOC), as a reader that knows the format.
    fetch_toc() {
        curl -fsS -o /dev/null -r "$((lsize - 64))-$((lsize - 1))" "$(blob_url "$net" "$repo" "$digest")"
        curl -fsS -o /dev/null -r "$((lsize - meta))-$((lsize - 1))" "$(blob_url "$net" "$repo" "$digest")"
    }
    timed fetch_toc
    local limit=$((meta + file + 262144))
    row "$w" "$net" 0 "footer+TOC $(human "$meta") + file $(human "$file"); 2 curl -r" "$RT" \
        "fetched <= $(human "$limit")" "$(met "$MOVED" '<=' "$limit")"
}

w_push() {
    local net=$1 digest curl_digest
    [ -f "$work/push.bin" ] || head -c $((push_mib << 20)) /dev/urandom >"$work/push.bin"
    mount_cold "$net"
    mkdir "$mnt/pushbench$net"
    m_start; cp "$work/push.bin" "$mnt/pushbench$net/uploads/file"; m_end
    digest=$(getfattr --only-values -n user.oci.digest "$mnt/pushbench$net/uploads/file" 2>/dev/null || true)
    regfs_unmount "$mnt"
    timed push_file "http://$(addr_of "$net")" "bench/curlpush$net" "$work/push.bin" >"$work/push.digest"
    curl_digest=$(cat "$work/push.digest")
    [ "$digest" = "$curl_digest" ] || { echo "push: digest mismatch: $digest vs $curl_digest" >&2; exit 1; }
    row push "$net" $((push_mib << 20)) "curl -T (POST + one PUT)" "$RT" - -
}

w_cached() {
    local net=$1 name=seq mib=$seq_mib digest file
    [ "$net" = wan ] && { name=seqwan mib=$wan_mib; }
    if ! target/release/regfs --help | grep -q -- --cache-dir-size; then
        rows+=("cached${FS}$net${FS}-${FS}-${FS}-${FS}-${FS}-${FS}-${FS}skipped: regfs has no --cache-dir-size yet (issue 10)${FS}-${FS}-${FS}-${FS}0 B, CPU <= 0.1 s, >= 3x curl${FS}-")
        return
    fi
    digest=$(eval echo "\$blob_$name")
    mount_cold "$net" --cache-dir "$work/cache-$net"
    cat "$mnt/bench/$name/tags/v1/layers/00-"*.* >/dev/null
    regfs_unmount "$mnt"
    mount_cold "$net" --cache-dir "$work/cache-$net"
    file=$(echo "$mnt/bench/$name/tags/v1/layers/00-"*.*)
    m_start; cat "$file" >/dev/null; m_end
    regfs_unmount "$mnt"
    timed curl -fsS -o /dev/null "$(blob_url "$net" "$name" "$digest")"
    local ok
    ok=$(awk -v m="$MOVED" -v c="$CPU" -v r="$RT" -v t="$T" 'BEGIN { print (m == 0 && c <= 0.1 && r / t >= 3) ? "yes" : "no" }')
    row cached "$net" $((mib << 20)) "curl, one stream" "$RT" "0 B, CPU <= 0.1 s, >= 3x curl" "$ok"
}

# start_redirecting NET: a second docker-registry on the bench registry's storage whose blob GETs
# and HEADs redirect (distribution's redirect middleware) to examples/blob_storage serving that
# storage; at wan, storage and registry each sit behind their own delay proxy. Sets REDIRECT_ADDR.
start_redirecting() {
    local net=$1 dir="$work/redirecting-$net" storage i
    mkdir -p "$dir"
    target/release/examples/blob_storage --root "$work/registry/data" >"$dir/storage.log" 2>&1 &
    extra_pids+=($!)
    for i in $(seq 1 200); do
        storage=$(sed -n 's/^listening on //p' "$dir/storage.log" | head -1)
        [ -n "$storage" ] && break
        sleep 0.05
    done
    [ -n "$storage" ] || { echo "blob_storage did not start" >&2; cat "$dir/storage.log" >&2; exit 1; }
    behind_link "$net" "$storage" "$dir/storage-proxy.log"
    side_registry "$net" "$dir" "middleware:
  storage:
    - name: redirect
      options:
        baseurl: http://$LINK_ADDR/" ""
    REDIRECT_ADDR=$LINK_ADDR
}

# behind_link NET ADDR LOG: at wan, a delay proxy of its own in front of ADDR (stopped by
# stop_extra); sets LINK_ADDR to the address to use (ADDR itself at lo).
behind_link() {
    local keep_pid=$PROXY_PID keep_addr=$PROXY_ADDR
    LINK_ADDR=$2
    if [ "$1" = wan ]; then
        start_delay_proxy "$2" "$rtt_ms" "$window" "$3" "${handshake[@]}"
        extra_pids+=("$PROXY_PID")
        LINK_ADDR=$PROXY_ADDR
    fi
    PROXY_PID=$keep_pid PROXY_ADDR=$keep_addr
}

# side_registry NET DIR EXTRA_YAML HTTP_YAML: a second docker-registry on the bench registry's
# storage (stopped by stop_extra), behind its own link at wan; sets LINK_ADDR.
side_registry() {
    local keep_pid=$REGISTRY_PID keep_addr=$REGISTRY_ADDR
    ln -sfn "$work/registry/data" "$2/data"
    start_registry "$2" "$3" "$4"
    extra_pids+=("$REGISTRY_PID")
    behind_link "$1" "$REGISTRY_ADDR" "$2/proxy.log"
    REGISTRY_PID=$keep_pid REGISTRY_ADDR=$keep_addr
}

# redirect_reads NET TTL: on fresh mounts of the redirecting registry with --redirect-ttl TTL,
# 8 cold 4 KiB reads spread over the blob (one after another), then the whole blob (cat). Sets
# R_* (the random reads) and S_* (the sequential read) from m_end's T, MOVED, REQS, CPU, RSS, and
# S_REUSES (its requests sent straight to storage).
redirect_reads() {
    local net=$1 ttl=$2 name=seq mib=$seq_mib file k
    [ "$net" = wan ] && { name=seqwan mib=$wan_mib; }
    regfs_mount "$REDIRECT_ADDR" "$mnt" "$work/regfs-redirect-$net-$((++mounts)).log" "${flags[@]}" --redirect-ttl "$ttl"
    file=$(echo "$mnt/bench/$name/tags/v1/layers/00-"*.*)
    stat "$file" >/dev/null
    m_start
    for k in 1 2 3 4 5 6 7 8; do
        # Offsets k/9 of the way through, each on a page of its own.
        dd if="$file" of=/dev/null bs=4096 count=1 skip=$(((mib << 20) / 4096 * k / 9)) status=none
    done
    m_end
    R_T=$T R_MOVED=$MOVED R_REQS=$REQS R_CPU=$CPU R_RSS=$RSS
    regfs_unmount "$mnt"
    regfs_mount "$REDIRECT_ADDR" "$mnt" "$work/regfs-redirect-$net-$((++mounts)).log" "${flags[@]}" --redirect-ttl "$ttl"
    stat "$file" >/dev/null
    m_start; cat "$file" >/dev/null; m_end
    S_T=$T S_MOVED=$MOVED S_REQS=$REQS S_CPU=$CPU S_RSS=$RSS
    S_REUSES=$(json_sum "$(regfs_stats "$mnt")" redirect_reuses)
    regfs_unmount "$mnt"
}

w_redirect() {
    local net=$1 name=seq mib=$seq_mib digest rand0 seq0
    [ "$net" = wan ] && { name=seqwan mib=$wan_mib; }
    digest=$(eval echo "\$blob_$name")
    start_redirecting "$net"
    redirect_reads "$net" 0
    rand0=$R_T seq0=$S_T
    redirect_reads "$net" 60s
    T=$R_T MOVED=$R_MOVED REQS=$R_REQS CPU=$R_CPU RSS=$R_RSS
    row "redirect: 8 random 4 KiB" "$net" 0 "the same, --redirect-ttl 0" "$rand0" - -
    T=$S_T MOVED=$S_MOVED REQS=$S_REQS CPU=$S_CPU RSS=$S_RSS
    row "redirect: sequential" "$net" $((mib << 20)) "the same, --redirect-ttl 0" "$seq0" - -
    timed curl -fsSL -o /dev/null "http://$REDIRECT_ADDR/v2/bench/$name/blobs/$digest"
    notes+=("redirect $net: the sequential read sent $S_REUSES of its $S_REQS requests straight to storage; curl -L (one GET, one redirect) read the blob in $RT s ($(rate $((mib << 20)) "$RT") MiB/s)")
    stop_extra
}

# start_tls_registry NET: a second docker-registry on the bench registry's storage, over https
# with a fresh self-signed certificate for 127.0.0.1 (Go's server then offers h2); at wan behind
# its own delay proxy. Sets TLS_ADDR and TLS_CERT.
start_tls_registry() {
    local net=$1 dir="$work/tls-$net"
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 \
        -addext subjectAltName=IP:127.0.0.1 -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
    TLS_CERT=$dir/cert.pem
    side_registry "$net" "$dir" "" "  tls:
    certificate: $dir/cert.pem
    key: $dir/key.pem"
    TLS_ADDR=$LINK_ADDR
}

w_tls() {
    local net=$1 name=seq mib=$seq_mib digest target=- ok=- version
    [ "$net" = wan ] && { name=seqwan mib=$wan_mib; }
    digest=$(eval echo "\$blob_$name")
    start_tls_registry "$net"
    regfs_mount "https://$TLS_ADDR" "$mnt" "$work/regfs-tls-$net-$((++mounts)).log" "${flags[@]}" --ca-cert "$TLS_CERT"
    local file
    file=$(echo "$mnt/bench/$name/tags/v1/layers/00-"*.*)
    stat "$file" >/dev/null
    m_start; cat "$file" >/dev/null; m_end
    regfs_unmount "$mnt"
    timed curl -fsS --cacert "$TLS_CERT" -o /dev/null "https://$TLS_ADDR/v2/bench/$name/blobs/$digest"
    version=$(curl -fsS --cacert "$TLS_CERT" -o /dev/null -r 0-0 -w '%{http_version}' "https://$TLS_ADDR/v2/bench/$name/blobs/$digest")
    [ "$net" = wan ] && { target=">= 1.5x curl"; ok=$(met "$(awk -v r="$RT" -v t="$T" 'BEGIN { print r / t }')" '>=' 1.5); }
    row "seq over TLS" "$net" $((mib << 20)) "curl --cacert, one stream (HTTP/$version)" "$RT" "$target" "$ok"
    stop_extra
}

load0=$(cut -d' ' -f1-3 /proc/loadavg)
a=$(now)
for net in $nets; do
    for w in "${workloads[@]}"; do
        echo "==> $w, $net"
        case $w in
        seq) w_seq "$net" ;;
        random) w_random "$net" ;;
        gzip-first) w_gzip_first "$net" ;;
        progressive) w_progressive "$net" ;;
        indexed) w_indexed "$net" ;;
        tags) w_tags "$net" ;;
        estargz) w_toc "$net" estargz estargz ;;
        zstd-chunked) w_toc "$net" zstd-chunked zstdchunked ;;
        push) w_push "$net" ;;
        cached) w_cached "$net" ;;
        redirect) w_redirect "$net" ;;
        tls) w_tls "$net" ;;
        esac
    done
done
total_s=$(elapsed "$a" "$(now)")
# Other work on the machine stretches wall times: say how busy it was.
load="load average $load0 before, $(cut -d' ' -f1-3 /proc/loadavg) after"

table() {
    echo "| workload | net | regfs s | regfs MiB/s | fetched (sent) | requests | regfs CPU s | peak RSS MiB | reference | ref s | ref MiB/s | speed vs ref | target | met |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    local r
    for r in "${rows[@]}"; do echo "| ${r//$FS/ | } |"; done
}
out="$work/table.md"
table >"$out"
echo
cat "$out"
echo
echo "wan = ${rtt_ms} ms RTT, ${window} window per connection and direction${handshake:+, a new connection costs one RTT} (examples/delay_proxy.rs)."
echo "Workloads took ${total_s} s ($load). regfs flags: ${flags[*]:-defaults}."
echo "speed vs ref = ref s / regfs s (> 1: regfs is faster)."
for n in "${notes[@]}"; do echo "$n."; done
[ -f "$work/profile.txt" ] && { echo; cat "$work/profile.txt"; }

if [ $record = 1 ]; then
    # Before the file is opened for appending (that would count as a local change).
    head="### $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
    {
        echo
        echo "$head"
        echo
        echo "Machine: $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)."
        echo "Command: \`$cmdline\`; wan = ${rtt_ms} ms RTT, ${window} window${handshake:+, handshake}; regfs flags: ${flags[*]:-defaults}; workloads took ${total_s} s ($load)."
        echo
        cat "$out"
        [ ${#notes[@]} = 0 ] || { echo; for n in "${notes[@]}"; do echo "$n."; done; }
        [ -f "$work/profile.txt" ] && { echo; cat "$work/profile.txt"; }
    } >>docs/BENCHMARKS.md
    echo "recorded in docs/BENCHMARKS.md"
fi
