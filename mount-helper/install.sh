#!/bin/sh
# Installs the stratafs binary and the mount(8) helper (run as root):
#
#   mount-helper/install.sh [BINARY]     # BINARY defaults to target/release/stratafs
#
#   BINARY                  -> /usr/local/bin/stratafs          (mode 755)
#   mount.fuse.stratafs     -> /sbin/mount.fuse.stratafs        (mode 755)
#
# Environment: BINDIR (default /usr/local/bin) and SBINDIR (default /sbin) change the targets;
# DESTDIR is prepended to both (for packaging). Each file is copied next to its target and
# renamed over it, so a running stratafs or a concurrent mount never sees a half-written file.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
binary=${1:-$repo/target/release/stratafs}
bindir=${DESTDIR:-}${BINDIR:-/usr/local/bin}
sbindir=${DESTDIR:-}${SBINDIR:-/sbin}

if [ $# -gt 1 ]; then
    echo "usage: $0 [BINARY]" >&2
    exit 2
fi
if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then
    echo "install.sh: no executable stratafs binary at $binary (build it with 'cargo build --release', or pass its path)" >&2
    exit 1
fi

# install_file SRC DIR NAME: copy SRC to DIR/NAME (mode 755) atomically.
install_file() {
    mkdir -p "$2"
    tmp=$2/.$3.install.$$
    trap 'rm -f "$tmp"' EXIT
    cp "$1" "$tmp"
    chmod 755 "$tmp"
    mv -f "$tmp" "$2/$3"
    trap - EXIT
    echo "installed $2/$3"
}

install_file "$binary" "$bindir" stratafs
# The helper falls back to where the binary was installed (without DESTDIR: the path it will
# have on the target system).
helper=$(mktemp)
trap 'rm -f "$helper"' EXIT
sed "s|^installed_bin=.*|installed_bin=${BINDIR:-/usr/local/bin}/stratafs|" \
    "$here/mount.fuse.stratafs" >"$helper"
install_file "$helper" "$sbindir" mount.fuse.stratafs
rm -f "$helper"
trap - EXIT
