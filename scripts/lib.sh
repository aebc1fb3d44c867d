# Shared shell helpers for scripts/*.sh. Source it; do not run it.

# Install what regfs and its tests need, only what is missing (Debian, as root).
ensure_deps() {
    local missing=()
    command -v fusermount3 >/dev/null || missing+=(fuse3)
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    command -v skopeo >/dev/null || missing+=(skopeo)
    command -v umoci >/dev/null || missing+=(umoci)
    command -v getfattr >/dev/null || missing+=(attr)
    command -v curl >/dev/null || missing+=(curl)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        echo "cargo is required (https://rustup.rs)" >&2
        return 1
    fi
    [ -e /dev/fuse ] || { echo "/dev/fuse is missing: FUSE is not available here" >&2; return 1; }
}

# start_registry DIR [EXTRA_YAML] [HTTP_YAML]: run docker-registry on 127.0.0.1 with a free port
# and storage in DIR/data (top-level EXTRA_YAML appended to its config, HTTP_YAML to its http:
# section, e.g. tls). Sets REGISTRY_PID and REGISTRY_ADDR.
start_registry() {
    local dir=$1 extra=${2:-} http_extra=${3:-}
    mkdir -p "$dir/data"
    cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:0
  secret: regfs-local
$http_extra
$extra
YAML
    docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
    REGISTRY_PID=$!
    local i port=""
    for i in $(seq 1 200); do
        port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$dir/registry.log" | head -1)
        [ -n "$port" ] && break
        sleep 0.05
    done
    if [ -z "$port" ]; then
        echo "docker-registry did not start:" >&2
        cat "$dir/registry.log" >&2
        return 1
    fi
    REGISTRY_ADDR="127.0.0.1:$port"
}

# push_file BASE_URL REPO FILE: monolithic upload (POST, then PUT of the whole file with curl -T).
# Prints the digest.
push_file() {
    local base=$1 repo=$2 file=$3 digest loc
    digest="sha256:$(sha256sum "$file" | cut -d' ' -f1)"
    loc=$(curl -fsS -X POST -D - -o /dev/null "$base/v2/$repo/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
    case "$loc" in http*) ;; *) loc="$base$loc" ;; esac
    case "$loc" in *\?*) loc="$loc&digest=$digest" ;; *) loc="$loc?digest=$digest" ;; esac
    curl -fsS -X PUT -H 'Content-Type: application/octet-stream' -T "$file" "$loc" -o /dev/null
    echo "$digest"
}

# Arithmetic for benchmark tables.
mibps() { awk -v s="$1" -v t="$2" 'BEGIN { printf "%.0f", s / t }'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# peak_rss_mib PID: VmHWM of a process, in MiB.
peak_rss_mib() { awk '/VmHWM/ { printf "%d", $2 / 1024 }' "/proc/$1/status"; }

# work_setup: a fresh work dir ($work) with a mount point ($mnt), a loopback registry
# ($REGISTRY_ADDR, $base), and an EXIT trap that unmounts, stops the registry and cleans up
# (never deleting through a live mount).
work_setup() {
    work=$(mktemp -d -t regfs.XXXXXX)
    mnt="$work/mnt"
    mkdir -p "$mnt"
    trap work_cleanup EXIT
    start_registry "$work/registry"
    base="http://$REGISTRY_ADDR"
}

work_cleanup() {
    cd /
    fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || true
    [ -n "${REGFS_PID:-}" ] && kill "$REGFS_PID" 2>/dev/null || true
    [ -n "${PROXY_PID:-}" ] && kill "$PROXY_PID" 2>/dev/null || true
    [ -n "${REGISTRY_PID:-}" ] && kill "$REGISTRY_PID" 2>/dev/null || true
    # REGFS_KEEP_LOGS=DIR: keep the daemon logs (regfs*.log) of this run there.
    if [ -n "${REGFS_KEEP_LOGS:-}" ]; then mkdir -p "$REGFS_KEEP_LOGS" && cp "$work"/regfs*.log "$REGFS_KEEP_LOGS"/ 2>/dev/null || true; fi
    if ! mountpoint -q "$mnt"; then rm -rf "$work"; fi
}

# now: the time in seconds, with nanoseconds.
now() { date +%s.%N; }

# cpu_seconds PID: user + system CPU time of a process so far, in seconds (/proc/PID/stat
# fields 14 and 15; the command name in field 2 may hold spaces, so count after its ')').
cpu_seconds() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    # shellcheck disable=SC2086
    set -- ${stat##*) }
    awk -v u="${12}" -v s="${13}" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (u + s) / hz }'
}

# minor_faults PID: minor page faults of a process so far (/proc/PID/stat field 10).
minor_faults() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    # shellcheck disable=SC2086
    set -- ${stat##*) }
    echo "$8"
}

# regfs_stats MNT: the user.regfs.stats JSON of a mount ({} when unreadable).
regfs_stats() { getfattr --only-values -n user.regfs.stats "$1" 2>/dev/null || echo '{}'; }

# json_sum JSON KEY...: the sum of these numeric fields of a flat JSON object (0 if absent).
json_sum() {
    local json=$1
    shift
    echo "$json" | tr -d '{}" ' | tr ',' '\n' |
        awk -F: -v keys="$*" 'BEGIN { n = split(keys, k, " "); for (i = 1; i <= n; i++) want[k[i]] = 1 }
            ($1 in want) { s += $2 } END { printf "%d", s }'
}

# regfs_mount ADDR MNT LOG [FLAGS...]: target/release/regfs in the foreground, as a background
# job of this shell (so its PID is exact); waits, bounded, until MNT is mounted. Sets REGFS_PID.
regfs_mount() {
    local addr=$1 mp=$2 log=$3 i
    shift 3
    target/release/regfs -f "$addr" "$mp" "$@" 2>"$log" &
    REGFS_PID=$!
    for i in $(seq 1 400); do
        mountpoint -q "$mp" && return 0
        kill -0 "$REGFS_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "regfs did not mount $mp:" >&2
    cat "$log" >&2
    return 1
}

# regfs_unmount MNT: unmount and wait, bounded, for REGFS_PID to exit.
regfs_unmount() {
    local i
    fusermount3 -u "$1" 2>/dev/null || fusermount3 -uz "$1" 2>/dev/null || true
    for i in $(seq 1 200); do
        kill -0 "$REGFS_PID" 2>/dev/null || break
        sleep 0.05
    done
    kill "$REGFS_PID" 2>/dev/null || true
    wait "$REGFS_PID" 2>/dev/null || true
    REGFS_PID=
}

# start_delay_proxy UPSTREAM RTT_MS WINDOW LOG [FLAGS...]: target/release/examples/delay_proxy
# in front of UPSTREAM (a WAN on loopback). Sets PROXY_PID and PROXY_ADDR.
start_delay_proxy() {
    local i
    target/release/examples/delay_proxy --upstream "$1" --rtt-ms "$2" --window "$3" "${@:5}" >"$4" 2>&1 &
    PROXY_PID=$!
    for i in $(seq 1 200); do
        PROXY_ADDR=$(sed -n 's/^listening on //p' "$4" | head -1)
        [ -n "$PROXY_ADDR" ] && return 0
        sleep 0.05
    done
    echo "the delay proxy did not start:" >&2
    cat "$4" >&2
    return 1
}
