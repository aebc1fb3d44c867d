#!/usr/bin/env bash
# The demo: install what is missing, build regfs, start a loopback registry with sample images,
# mount it, and look around with ls, cat, sha256sum and getfattr. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_deps
echo "==> building regfs (release)"
# Two builds: the seeding example needs the test-only fake registry (dev-dependency features),
# and building it alongside the binary would put the fake into target/release/regfs too.
cargo build --release --quiet --bin regfs
cargo build --release --quiet --example seed

work_setup
echo "==> registry on $REGISTRY_ADDR (pid $REGISTRY_PID), seeding sample images"
target/release/examples/seed "$REGISTRY_ADDR"

echo "==> regfs $REGISTRY_ADDR $mnt"
target/release/regfs --log-file "$work/regfs.log" "$REGISTRY_ADDR" "$mnt"

run() { echo; echo "\$ $*"; "$@"; }
cd "$mnt"
run ls
run ls debian/min
run ls debian/min/tags/
run ls -l debian/min/tags/bookworm/layers/
run cat debian/min/tags/bookworm/config.json
run sha256sum debian/min/tags/bookworm/layers/00-*.tar.gz
run getfattr -n user.oci.digest debian/min/tags/bookworm/manifest.json
run ls multi/arch/tags/latest/
run ls -l debian/min/tags/bookworm/rootfs/
run cat debian/min/tags/bookworm/rootfs/etc/os-release
run cat debian/min/index.json
big=$(echo apps/big/tags/v1/layers/00-*.tar)
run ls -l "$big"
run dd if="$big" of=/dev/null bs=4k count=1 status=none
echo "(read 4 KiB of a 64 MiB layer; request counters:)"
run getfattr --only-values -n user.regfs.stats .
echo
echo "Pushing is copying:"
run mkdir demo
run cp /etc/hostname demo/uploads/hostname
run getfattr -n user.oci.digest demo/uploads/hostname
run mkdir -p demo/app/tags/v1
run cp debian/min/tags/bookworm/manifest.json demo/app/tags/v1/manifest.json
echo "(promoted without moving layer bytes: blobs were mounted across repositories)"
run ls demo/app/tags/ demo/app/tags/v1/
echo
cd /
if [ -t 0 ]; then
    echo "The mount stays at $mnt until you press Enter."
    read -r _
fi
