#!/usr/bin/env bash
# Builds the cold-start benchmark image (bench/coldstart.sh) on this machine, or reuses the copy
# cached from an earlier run, and prints the path of its OCI layout. Three layers, each made by
# `umoci repack` of the changes to one bundle:
#   1. base:    debootstrap --variant=minbase bookworm, from the Debian mirror in the apt sources
#   2. runtime: python3 and python3-pip, apt-get install in a chroot
#   3. libs:    numpy, pandas and requests from PyPI, pip install in the chroot (host CA bundle)
# Tags in the layout: `gzip` (the image) and `bigfile` (one layer holding one BIG_MIB MiB file made
# of the image's own files, for the warm sequential read: the image has no file of 50 MB or more).
# The layout and the final rootfs are kept under CACHE/VERSION; bump VERSION when this changes.
# Usage: bash bench/image.sh [CACHE=/var/cache/stratafs-bench]   (as root; needs the network once)
set -euo pipefail
CACHE=${1:-${STRATAFS_BENCH_CACHE:-/var/cache/stratafs-bench}}
VERSION=bookworm-py311-numpy2.3.5-pandas2.3.3-requests2.32.5-v2
PIP_PACKAGES=(numpy==2.3.5 pandas==2.3.3 requests==2.32.5)
BIG_MIB=256
out=$CACHE/$VERSION
[ -f "$out/done" ] && { echo "$out/oci"; exit 0; }
[ "$(id -u)" = 0 ] || { echo "bench/image.sh: run as root (debootstrap, chroot)" >&2; exit 1; }
log() { echo "== image: $*" >&2; }

need=()
for p in debootstrap umoci ca-certificates; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The Debian mirror: the first `deb` URI for suite bookworm in the apt sources (deb822 or one-line).
mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN {RS = ""} /(^|\n)Types:[^\n]*deb( |\n|$)/ && /(^|\n)Suites:[^\n]* bookworm( |\n|$)/ {
      if (match($0, /URIs: *[^ \n]+/)) { u = substr($0, RSTART, RLENGTH); sub(/URIs: */, "", u); print u; exit } }' "$f"
  done
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
    awk '$1 == "deb" && $0 ~ / bookworm / {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {print $i; exit}}'
}
MIRROR=${MIRROR:-$(mirror | head -1 || true)}
[ -n "$MIRROR" ] || { echo "bench/image.sh: no bookworm mirror in the apt sources; set MIRROR=URL" >&2; exit 1; }

tmp=$out.tmp
rootfs=$tmp/bundle/rootfs
unmount_chroot() {
  local m
  for m in "$rootfs/dev/pts" "$rootfs/dev" "$rootfs/proc" "$rootfs/sys"; do
    mountpoint -q "$m" 2>/dev/null && umount -l "$m"
  done
  return 0
}
trap unmount_chroot EXIT
unmount_chroot
rm -rf "$tmp"
mkdir -p "$tmp"
in_chroot() {
  mount -t proc proc "$rootfs/proc"
  mount --bind /dev "$rootfs/dev"
  mount -t devpts devpts "$rootfs/dev/pts" 2>/dev/null || true
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  local rc=0
  chroot "$rootfs" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@" || rc=$?
  : >"$rootfs/etc/resolv.conf"
  unmount_chroot
  return $rc
}
tidy() {
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/apt/* "$rootfs"/root/.cache "$rootfs"/tmp/* "$rootfs"/var/cache/debconf/*-old
  # Modification times in whole seconds, truncated, as docker's and containerd's layer writers
  # store them: umoci rounds to the nearest second instead, and a pip-installed module's .py
  # then looks newer than the time its .pyc records, so python would compile every such module
  # again on each start (and a writable rootfs would write the .pyc files back) — v1 of this
  # image had 1,834 of its 2,034 PyPI .pyc files stale that way.
  python3 - "$rootfs" <<'PY'
import os, sys
for root, dirs, files in os.walk(sys.argv[1]):
    for name in dirs + files:
        p = os.path.join(root, name)
        st = os.lstat(p)
        if st.st_mtime_ns % 1_000_000_000:
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - st.st_mtime_ns % 1_000_000_000), follow_symlinks=False)
PY
}
repack() {  # repack COMMENT: a new layer with the bundle's changes since the last repack
  umoci repack --refresh-bundle --history.created_by "$1" --image "$tmp/oci:gzip" "$tmp/bundle"
}

log "layer 1: debootstrap --variant=minbase bookworm from $MIRROR"
umoci init --layout "$tmp/oci"
umoci new --image "$tmp/oci:gzip"
umoci config --image "$tmp/oci:gzip" --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env LANG=C.UTF-8 --config.workingdir / --config.cmd python3
umoci unpack --image "$tmp/oci:gzip" "$tmp/bundle" >/dev/null
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 ||
  { tail -20 "$tmp/debootstrap.log" >&2; exit 1; }
: >"$rootfs/etc/resolv.conf"
tidy
repack "debootstrap --variant=minbase bookworm"

log "layer 2: apt-get install python3 python3-pip"
in_chroot sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-pip >/dev/null && apt-get clean'
tidy
repack "apt-get install python3 python3-pip"

log "layer 3: pip install ${PIP_PACKAGES[*]}"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/tmp/host-ca.crt"   # minbase has no CA bundle
in_chroot pip3 install -q --no-cache-dir --break-system-packages --root-user-action=ignore \
  --cert /tmp/host-ca.crt "${PIP_PACKAGES[@]}"
rm -f "$rootfs/tmp/host-ca.crt"
tidy
repack "pip install ${PIP_PACKAGES[*]}"
in_chroot python3 -c 'import numpy, pandas, requests'   # the benchmark's command works

log "bigfile: one $BIG_MIB MiB file made of the image's own files"
find "$rootfs" -xdev -type f -size +4k -print0 | sort -z | xargs -0 cat 2>/dev/null | head -c "${BIG_MIB}M" >"$tmp/big.bin" || true
while [ "$(stat -c %s "$tmp/big.bin")" -lt $((BIG_MIB << 20)) ]; do
  head -c "$((BIG_MIB << 20))" "$tmp/big.bin" >>"$tmp/big.bin"
  truncate -s "$((BIG_MIB << 20))" "$tmp/big.bin"
done
umoci new --image "$tmp/oci:bigfile"
umoci insert --image "$tmp/oci:bigfile" "$tmp/big.bin" /data/big.bin >/dev/null
rm -f "$tmp/big.bin"
umoci gc --layout "$tmp/oci"
rm -rf "$tmp/bundle"
echo "$VERSION $(date -u +%FT%TZ) mirror $MIRROR" >"$tmp/done"
rm -rf "$out" && mv "$tmp" "$out"
log "cached in $out"
echo "$out/oci"
