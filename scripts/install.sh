#!/usr/bin/env bash
# Build regfs in release mode and install it, with its man page, shell completions and mount(8)
# helper. Idempotent: run it again to upgrade. On Debian as root it installs what is missing
# (fuse3, and the build's C dependencies); Rust itself comes from https://rustup.rs.
#
# Installs (PREFIX=/usr/local):
#   $PREFIX/bin/regfs
#   $PREFIX/share/man/man1/regfs.1                          regfs(1), from the clap definitions
#   $PREFIX/share/bash-completion/completions/regfs         bash completion
#   $PREFIX/share/zsh/site-functions/_regfs                 zsh completion
#   $PREFIX/share/fish/vendor_completions.d/regfs.fish      fish completion
#   $SBINDIR/mount.fuse.regfs (SBINDIR=/sbin)              for `mount -t fuse.regfs` and fstab
#
# Environment:
#   PREFIX=/usr/local   where to install
#   DESTDIR=            staging root prepended to every path (packaging)
#   SBINDIR=/sbin       where mount(8) looks for helpers; empty: no helper
#   REGFS_BIN=          install this binary instead of building one (tests, packaging)
#   NO_DEPS=1           do not apt-get anything
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
SBINDIR=${SBINDIR-/sbin}
BINDIR=$PREFIX/bin
SHARE=$PREFIX/share

say() { echo "==> $*"; }

# What the build and the mounts need, only what is missing (Debian, as root).
install_deps() {
    [ "${NO_DEPS:-}" = 1 ] && return 0
    local missing=()
    [ -x /sbin/mount.fuse3 ] || [ -x /usr/sbin/mount.fuse3 ] || missing+=(fuse3)
    if [ -z "${REGFS_BIN:-}" ]; then
        command -v cc >/dev/null || missing+=(gcc libc6-dev)
        command -v pkg-config >/dev/null || missing+=(pkg-config)
        dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "install.sh: missing ${missing[*]}; install them (as root: apt-get install ${missing[*]})" >&2
        return 1
    fi
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The regfs binary to install: REGFS_BIN, or a fresh release build.
build() {
    if [ -n "${REGFS_BIN:-}" ]; then
        [ -x "$REGFS_BIN" ] || { echo "install.sh: REGFS_BIN=$REGFS_BIN is not executable" >&2; return 1; }
        BIN=$REGFS_BIN
        return 0
    fi
    local cargo
    cargo=$(command -v cargo || echo "${CARGO_HOME:-$HOME/.cargo}/bin/cargo")
    [ -x "$cargo" ] || { echo "install.sh: cargo is required (https://rustup.rs)" >&2; return 1; }
    say "cargo build --release"
    "$cargo" build --release --locked --bin regfs
    BIN=${CARGO_TARGET_DIR:-target}/release/regfs
}

# install_generated PATH COMMAND...: write COMMAND's output to PATH (under DESTDIR), replacing
# the old file only once the new one is whole.
install_generated() {
    local path=$1 dest=$DESTDIR$1 tmp
    shift
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$dest.XXXXXX")
    if ! "$@" >"$tmp"; then
        rm -f "$tmp"
        return 1
    fi
    chmod 644 "$tmp"
    mv -f "$tmp" "$dest"
    echo "    $path"
}

install_deps
build
say "installing into ${DESTDIR}${PREFIX}"
install -D -m 755 "$BIN" "$DESTDIR$BINDIR/regfs"
echo "    $BINDIR/regfs"
install_generated "$SHARE/man/man1/regfs.1" "$BIN" --generate man
install_generated "$SHARE/bash-completion/completions/regfs" "$BIN" --generate bash
install_generated "$SHARE/zsh/site-functions/_regfs" "$BIN" --generate zsh
install_generated "$SHARE/fish/vendor_completions.d/regfs.fish" "$BIN" --generate fish
if [ -n "$SBINDIR" ]; then
    # The helper with this install's bin directory; `|` cannot occur in a directory we accept.
    case $BINDIR in *'|'*) echo "install.sh: PREFIX must not contain '|'" >&2; exit 1 ;; esac
    install_generated "$SBINDIR/mount.fuse.regfs" \
        sed "s|^REGFS_BINDIR_DEFAULT=.*|REGFS_BINDIR_DEFAULT=$BINDIR|" scripts/mount.fuse.regfs
    chmod 755 "$DESTDIR$SBINDIR/mount.fuse.regfs"
fi
"$DESTDIR$BINDIR/regfs" --version
say "done: mount -t fuse.regfs HOST[:PORT] DIR -o OPTIONS, or an fstab line (man regfs)"
