#!/usr/bin/env bash
# Cold-start benchmark (issue 6): how much sooner a container's first command ends when the image
# is read lazily, against containerd's eager pull, over a shaped link.
#
# Image (bench/image.sh, cached): Debian bookworm minbase + python3/pip (Debian packages) + numpy,
# pandas and requests (PyPI), 3 layers. Variants in a local distribution registry: gzip as built;
# the same with a published stratafs index (`stratafs index push`); eStargz and zstd:chunked
# (`ctr-remote images convert`); zstd (`skopeo copy --dest-compress --dest-compress-format zstd`). The registry
# storage with the variants is cached too; the index is pushed afresh by each run.
#
# Link: the registry listens on loopback; bench/delayline.py relays to it from the host end of a
# veth pair (adding RTT_MS of round trip), `tc tbf` caps both ends at MBIT; every client (ctr,
# ctr-remote, containerd, stratafs) runs in the other end's network namespace (nsenter --net).
#
# Cold runs (median of RUNS, in rounds: one run of every client and case per round; page cache dropped (then the runtime's and stratafs's binaries read back in), fresh containerd root/state and stratafs roots):
# time from the pull's start to the end of `python3 -c 'import numpy, pandas, requests'`, and the
# bytes the registry served (its access log), for
#   eager:    ctr images pull --plain-http + ctr run --rm (overlayfs snapshotter), containerd 1.6
#   mount:    stratafs mount REF DIR + chroot DIR python3 -c …
#   snapshot: ctr-remote images rpull --snapshotter stratafs + ctr run --snapshotter stratafs,
#             with `stratafs snapshotter` as containerd's proxy snapshotter (rows say "not
#             available" when this build has no `stratafs snapshotter`)
# each against the time the link needs for just the bytes the lazy run downloaded; after each
# eager and snapshotter run, `ctr run --rm … true` on the image just used times the container's
# own start and teardown (the part of a `ctr run` row that `chroot` has none of). The gzip
# (published index) and eStargz images also run with a recorded startup profile: one warm-up
# mount on loopback records what the command reads, `stratafs profile push --tag V-profile`
# binds it to the image, and cold mounts of that tag replay it.
# "Bytes the command reads": the command under strace in a chroot of the unpacked image; every
# regular file it opens, compressed on its own with zlib level 6, summed — and the link time
# of those bytes, the floor a lazy start could reach.
# Also: metadata-only `stratafs pull` through the link; warm (loopback registry, cache filled):
# the import, sequential reads of the image's largest file and of a 256 MiB file, find + stat of
# the tree, each against the image unpacked on local disk (umoci unpack); daemon VmHWM.
# Prints markdown and rewrites the block between the bench/coldstart.sh markers in
# docs/benchmarks.md.
#
# Usage: bash bench/coldstart.sh [RUNS=3] [RTT_MS=20] [MBIT=100]   (as root, after .ci/setup)
#   VARIANTS="gzip estargz zstd zstdchunked" (default: all) picks the image variants;
#   STRATAFS_BENCH_CACHE=/var/cache/stratafs-bench is where the image and variants are kept;
#   CASES="gzip gzip-profile" runs only those `stratafs mount` cases (no table; SNAPSHOTTER=1
#   adds their snapshotter runs), and
#   KEEP_LOGS=DIR keeps each mount run's registry log and daemon log there (the daemon at
#   --log-level debug: each read that waited, each fetch with its layer range, its kind —
#   `read`, `open`, `siblings`, `neighbours` — and its time; the snapshotter's each call), with
#   the run's layer indexes and recorded startup profile (`layers/`, `profiles/`);
#   COMMAND="pip3 --version" times that command instead of the python import (words split at
#   spaces; the profiles are recorded from it too);
#   MOUNT_TOML='profile_parallel = 4' adds lines to the stratafs runs' [mount] table;
#   REDIRECT=1 has the registry redirect blob GETs to a stand-in object store behind the same
#   link (bench/objstore.py; its answers are counted as the registry's);
#   BACKGROUND=1 leaves background fill on (the default `[mount] background_fetch`) in the
#   stratafs runs, which otherwise measure lazy fetching alone.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3} RTT_MS=${2:-20} MBIT=${3:-100}
VARIANTS=${VARIANTS:-gzip estargz zstd zstdchunked}
CACHE=${STRATAFS_BENCH_CACHE:-/var/cache/stratafs-bench}
PYCMD='import numpy, pandas, requests'
# The first command timed (COMMAND="pip3 --version" times that instead: words, no quoting).
if [ -n "${COMMAND:-}" ]; then read -ra CMD <<<"$COMMAND"; else CMD=(python3 -c "$PYCMD"); fi
NS=stratafs-bench   # containerd namespace
[ "$(id -u)" = 0 ] || { echo "bench/coldstart.sh: run as root (netns, tc, drop_caches, mount, containerd)" >&2; exit 1; }
log() { echo "== $*" >&2; }

need=()
for p in debootstrap containerd runc stargz-snapshotter skopeo umoci docker-registry fuse3 bc jq curl python3 ca-certificates strace; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/stratafs
repo=$PWD
oci=$(bash bench/image.sh "$CACHE")
reg_cache=$(dirname "$oci")/registry-v3   # bump when the variants change

work=$(mktemp -d /tmp/stratafs-coldstart.XXXXXX)
ns=sfcold$$ net=10.214.$(($$ % 250))
pids=() daemons=() ctd_pid='' ctd_wrap='' snap_pid=''
ctd=$work/ctd
ctr_() { $ctd_wrap ctr --address "$ctd/containerd.sock" --namespace "$NS" "$@"; }
ctrr_() { $ctd_wrap ctr-remote --address "$ctd/containerd.sock" --namespace "$NS" "$@"; }
inns() { nsenter --net="/run/netns/$ns" "$@"; }
# discard DIR…: renames each aside, into $work/trash, deleted with $work when the bench ends.
# Not deleted before the next run: on ext4 without a journal (this VM's root filesystem), a
# file created within seconds of thousands being deleted waits while ext4 skips the recently
# freed inodes (`recently_deleted`), so deleting one run's cache or containerd root right
# before the next run charged that run for it (eStargz + profile: 5.11 s in a full run, 3.9 s
# alone) — a cost no node pays for a cold start.
discard() {
  local d
  mkdir -p "$work/trash"
  for d in "$@"; do
    [ -e "$d" ] && mv "$d" "$(mktemp -d "$work/trash/XXXXXX")/"
  done
  return 0
}
unmount_under() {   # deepest first
  { findmnt -rn -o TARGET | grep "^$1/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done; } || true
}
stop_pid() {   # stop_pid PID: SIGTERM, SIGKILL after 10 s, reap
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
ctd_stop() {
  [ -n "$ctd_pid" ] || return 0
  local t c
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks rm -f "$t" >/dev/null 2>&1; done
  for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers rm "$c" >/dev/null 2>&1; done
  stop_pid "$ctd_pid"
  ctd_pid=''
  unmount_under "$ctd"
  discard "$ctd"
}
snap_stop() {
  [ -n "$snap_pid" ] || return 0
  stop_pid "$snap_pid"
  snap_pid=''
  # Its lazy mounts' daemons outlive it by design: stop them (each unmounts, saves its profile
  # and exits) before the store goes.
  pkill -TERM -f -- "--root $work/snaproot " 2>/dev/null || true
  for _ in $(seq 100); do pgrep -f -- "--root $work/snaproot " >/dev/null || break; sleep 0.1; done
  unmount_under "$work/snaproot"
  discard "$work/snaproot"
}
cleanup() {
  set +e
  ctd_stop
  snap_stop
  for p in "${daemons[@]}"; do kill -TERM "$p" 2>/dev/null; done
  sleep 1
  unmount_under "$work"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  ip netns del "$ns" 2>/dev/null; ip link del "${ns}h" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
. bench/lib.sh
# cold: the page cache dropped (the image's files, containerd's unpacked layers, stratafs's
# cache are read from disk or the registry again), then the binaries of the container runtime
# and of stratafs read back in: a node that runs containers has those in memory, and a cold
# exec of each costs 20-35 ms here — the same in every row that runs it, but none of it is
# the image's.
cold() {
  drop
  cat "$bin" "$(command -v ctr)" "$(command -v ctr-remote)" "$(command -v runc)" \
    "$(command -v containerd-shim-runc-v2)" >/dev/null
}
mib() { printf '%.1f MiB' "$(calc "$1 / 1048576")"; }
mbytes() { printf '%.1f MB' "$(calc "$1 / 1000000")"; }
hwm() { awk '/VmHWM/ {print $2 * 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }
# cpu PID: user + system CPU seconds process PID has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# containerd (1.6) with its own root, state, sockets and opt dir under $ctd; CRI off.
# ctd_start WRAP [SNAPSHOTTER_SOCKET]: WRAP is inns (in the shaped netns) or env (host netns).
ctd_start() {
  ctd_stop
  ctd_wrap=$1
  mkdir -p "$ctd"
  cat >"$ctd/config.toml" <<TOML
version = 2
root = "$ctd/root"
state = "$ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$ctd/containerd.sock"
[ttrpc]
  address = "$ctd/containerd.sock.ttrpc"
[debug]
  address = "$ctd/debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$ctd/opt"
TOML
  [ -z "${2:-}" ] || printf '[proxy_plugins.stratafs]\n  type = "snapshot"\n  address = "%s"\n' "$2" >>"$ctd/config.toml"
  # Started directly (not through the inns function, whose subshell would be the pid in $!).
  local pre=()
  [ "$ctd_wrap" != inns ] || pre=(nsenter --net="/run/netns/$ns")
  "${pre[@]}" containerd --config "$ctd/config.toml" >"$ctd/containerd.log" 2>&1 &
  ctd_pid=$!
  for _ in $(seq 300); do
    [ -S "$ctd/containerd.sock" ] && ctr_ version >/dev/null 2>&1 && return 0
    kill -0 "$ctd_pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$ctd/containerd.log" >&2
  echo "bench/coldstart.sh: containerd did not start" >&2
  exit 1
}
# ctr run of the benchmark command; RUN_ID numbers the containers.
RUN_ID=0
ctr_run() {   # ctr_run SNAPSHOTTER REF
  RUN_ID=$((RUN_ID + 1))
  mkdir -p "$ctd/fifo" "$ctd/runc"
  ctr_ run --rm --fifo-dir "$ctd/fifo" --runc-root "$ctd/runc" --snapshotter "$1" "$2" "bench$RUN_ID" \
    "${CMD[@]}" </dev/null
}

# Registry on loopback (storage from the cache when there is one), delay line, netns.
port=$(freeport) slow=$(freeport)
local_reg=127.0.0.1:$port shaped_reg=$net.1:$slow
if [ -f "$reg_cache/done" ]; then
  log "registry storage with the image variants from $reg_cache"
  cp -a "$reg_cache/storage" "$work/registry"
else
  mkdir -p "$work/registry"
fi
# REDIRECT=1: the registry answers blob GETs with a redirect to a stand-in object store
# (bench/objstore.py on another address of the link's host end, behind a delay line of its
# own), as registries backed by a CDN or object store do; the store logs into the registry's log.
redirect_yml=""
if [ "${REDIRECT:-0}" = 1 ]; then
  store_port=$(freeport) store_slow=$(freeport)
  redirect_yml="middleware: {storage: [{name: redirect, options: {baseurl: \"http://$net.3:$store_slow\"}}]}"
fi
cat >"$work/registry.yml" <<YML
version: 0.1
storage: {filesystem: {rootdirectory: $work/registry}, delete: {enabled: true}}
http: {addr: "127.0.0.1:$port"}
log: {level: error, accesslog: {disabled: false}}
$redirect_yml
YML
docker-registry serve "$work/registry.yml" >>"$work/registry.log" 2>&1 & pids+=($!)
reg_pid=$!
pids+=("$(shaped_link "$ns" "$net" "$port" "$slow" "$MBIT" "$RTT_MS")")
if [ -n "$redirect_yml" ]; then
  ip addr add "$net.3/24" dev "${ns}h"
  python3 bench/objstore.py "$store_port" "$work/registry" "$work/registry.log" & pids+=($!)
  python3 bench/delayline.py "$net.3:$store_slow" "$store_port" "$(calc "$RTT_MS / 2")" >/dev/null 2>&1 & pids+=($!)
fi
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
for _ in $(seq 50); do inns curl -fs "http://$shaped_reg/v2/" >/dev/null && break; sleep 0.1; done
BACKGROUND_FETCH=false; [ "${BACKGROUND:-0}" = 1 ] && BACKGROUND_FETCH=true
cat >"$work/sf.toml" <<TOML
[mount]
background_fetch = $BACKGROUND_FETCH
${MOUNT_TOML:-}

[hosts."$shaped_reg"]
plain_http = true

[hosts."$local_reg"]
plain_http = true
TOML
sed 's/^\[mount\]$/[index]\npublished = false\n\n[mount]/' "$work/sf.toml" >"$work/sf-noindex.toml"
sed 's/^background_fetch = .*/background_fetch = true/' "$work/sf.toml" >"$work/sf-default.toml"
export STRATAFS_CONFIG=$work/sf.toml   # never /etc/stratafs/config.toml

# The variants, built once and cached with the registry storage.
if [ ! -f "$reg_cache/done" ]; then
  log "pushing the image: gzip (as built), zstd (skopeo), bigfile"
  skopeo copy -q --dest-tls-verify=false "oci:$oci:gzip" "docker://$local_reg/bench/py:gzip"
  skopeo copy -q --dest-tls-verify=false "oci:$oci:bigfile" "docker://$local_reg/bench/bigfile:1"
  # Through a dir: layout: copied straight to the registry, skopeo would reuse the gzip blobs
  # the repository already holds instead of recompressing.
  { skopeo copy -q --dest-compress --dest-compress-format zstd "oci:$oci:gzip" "dir:$work/zstd" &&
    skopeo copy -q --dest-tls-verify=false "dir:$work/zstd" "docker://$local_reg/bench/py:zstd"; } ||
    log "skopeo cannot write zstd layers: no zstd variant"
  rm -rf "$work/zstd"
  log "converting with ctr-remote: eStargz, zstd:chunked"
  ctd_start env
  ctr_ images pull --plain-http "$local_reg/bench/py:gzip" >/dev/null
  ctrr_ images convert --estargz --oci "$local_reg/bench/py:gzip" "$local_reg/bench/py:estargz" >/dev/null
  ctr_ images push --plain-http "$local_reg/bench/py:estargz" >/dev/null
  if ctrr_ images convert --zstdchunked --oci "$local_reg/bench/py:gzip" "$local_reg/bench/py:zstdchunked" >/dev/null; then
    ctr_ images push --plain-http "$local_reg/bench/py:zstdchunked" >/dev/null
  else
    log "ctr-remote cannot make zstd:chunked: no zstdchunked variant"
  fi
  ctd_stop
  rm -rf "$reg_cache.tmp" && mkdir -p "$reg_cache.tmp"
  cp -a "$work/registry" "$reg_cache.tmp/storage"
  echo "$(ctr-remote --version 2>/dev/null | head -1); $(skopeo --version)" >"$reg_cache.tmp/done"
  rm -rf "$reg_cache" && mv "$reg_cache.tmp" "$reg_cache"
fi
manifest() {   # manifest REPO:TAG — the image manifest (first entry of an index)
  local m
  m=$(skopeo inspect --raw --tls-verify=false "docker://$local_reg/$1")
  if jq -e '.manifests' <<<"$m" >/dev/null; then
    m=$(skopeo inspect --raw --tls-verify=false "docker://$local_reg/${1%:*}@$(jq -r '.manifests[0].digest' <<<"$m")")
  fi
  echo "$m"
}
declare -A REF LAYERS MEDIA
avail=()
for v in $VARIANTS; do
  case $v in gzip | estargz | zstd | zstdchunked) ;; *) echo "bench/coldstart.sh: unknown variant $v" >&2; exit 1 ;; esac
  m=$(manifest "bench/py:$v" 2>/dev/null) || { log "variant $v is not in the registry: skipped"; continue; }
  REF[$v]=bench/py:$v
  LAYERS[$v]=$(jq '[.layers[].size] | add' <<<"$m")
  MEDIA[$v]=$(jq -r '.layers[0].mediaType' <<<"$m")
  jq -r '.layers[].digest' <<<"$m" >>"$work/layers"
  avail+=("$v")
done
manifest bench/bigfile:1 | jq -r '.layers[].digest' >>"$work/layers"
log "publishing stratafs indexes (gzip image, bigfile)"
"$bin" --root "$work/pusher" index push --bind "$local_reg/bench/py:gzip" >/dev/null
"$bin" --root "$work/pusher" index push --bind "$local_reg/bench/bigfile:1" >/dev/null
rm -rf "$work/pusher"

# Startup profiles: one warm-up mount on loopback records what the command reads; the profile
# is bound to the image under the tag V-profile, which the cold runs of the profile cases pull.
for v in gzip estargz; do
  [ -n "${REF[$v]:-}" ] || continue
  log "recording the startup profile of $v"
  discard "$work/recroot"; mkdir -p "$work/mnt"
  "$bin" --root "$work/recroot" mount -o nobackground "$local_reg/${REF[$v]}" "$work/mnt" >/dev/null
  chroot "$work/mnt" "${CMD[@]}"
  "$bin" --root "$work/recroot" umount "$work/mnt" >/dev/null
  "$bin" --root "$work/recroot" profile show "$local_reg/${REF[$v]}" >&2
  "$bin" --root "$work/recroot" profile push --tag "$v-profile" "$local_reg/${REF[$v]}" >/dev/null
  REF[$v-profile]=bench/py:$v-profile
  if [ "$v" = gzip ]; then
    # The same profile without its pack: the replay fetches its spans from the layers.
    "$bin" --root "$work/recroot" profile push --no-pack --tag "$v-ranges" "$local_reg/${REF[$v]}" >/dev/null
    REF[$v-ranges]=bench/py:$v-ranges
  fi
  discard "$work/recroot"
done

# served MARK: "LAYER_BYTES OTHER_BYTES" the registry sent since log offset MARK.
served() {
  tail -c +$(($1 + 1)) "$work/registry.log" | { grep -ao '"GET /v2/[^ ]* HTTP/[0-9.]*" 2[0-9]* [0-9]*' || true; } |
    awk -v L="$work/layers" 'BEGIN {while ((getline d < L) > 0) layer[d] = 1}
      {n = split($2, p, "/"); if (p[n] in layer) l += $5; else o += $5} END {print l + 0, o + 0}'
}
mark() { stat -c %s "$work/registry.log"; }
snap_ok=''
if "$bin" snapshotter --help >/dev/null 2>&1; then snap_ok=1; else log "this stratafs has no snapshotter: its rows say not available"; fi

# Results: T (median s), P (median s of the pull/mount part), L and O (median layer/other bytes),
# H (median peak RSS bytes of the stratafs process), RC (median CPU s of the registry during the
# run: it shares the machine's cores with the client), keyed CLIENT:CASE; CSTART the median
# `ctr run` of `true`, keyed VARIANT (overlayfs) or snap:CASE.
declare -A T P L O H RC NOTE CSTART
# Each run adds its figures to ACC[KEY/FIELD] (fields t, p, l, o, h, rc, cs; space-separated):
# the runs of every client and case take turns (round 1 of each, then round 2, …), so a
# machine that is slower for some minutes slows eager and lazy runs alike.
declare -A ACC
acc() {   # acc KEY FIELD VALUE…
  local k=$1 f=$2; shift 2
  ACC[$k/$f]+=" $*"
}
# shellcheck disable=SC2086 # the accumulated figures are words
record() {   # record KEY: the medians of what its runs added
  local k=$1
  [ -n "${ACC[$k/t]:-}" ] || return 0
  T[$k]=$(median ${ACC[$k/t]}) P[$k]=$(median ${ACC[$k/p]}) L[$k]=$(median ${ACC[$k/l]}) O[$k]=$(median ${ACC[$k/o]})
  [ -z "${ACC[$k/h]:-}" ] || H[$k]=$(median ${ACC[$k/h]})
  [ -z "${ACC[$k/rc]:-}" ] || RC[$k]=$(median ${ACC[$k/rc]})
  return 0
}
# cold_eager VARIANT RUN: one eager run
cold_eager() {
  local v=$1 i=$2 m t0 t1 tp ts r0 rc l o cs k=eager:$1
  ctd_start inns
  cold; m=$(mark); t0=$(now) r0=$(cpu "$reg_pid")
  ctr_ images pull --plain-http "$shaped_reg/${REF[$v]}" >/dev/null
  tp=$(since "$t0")
  ctr_run overlayfs "$shaped_reg/${REF[$v]}"
  ts=$(since "$t0") rc=$(calc "$(cpu "$reg_pid") - $r0")
  read -r l o <<<"$(served "$m")"
  # containerd's and runc's own cost of starting a container, with the image unpacked:
  # part of every `ctr run` row, none of `chroot`'s.
  t1=$(now); RUN_ID=$((RUN_ID + 1))
  ctr_ run --rm --fifo-dir "$ctd/fifo" --runc-root "$ctd/runc" --snapshotter overlayfs "$shaped_reg/${REF[$v]}" "bench$RUN_ID" true </dev/null
  cs=$(since "$t1")
  ctd_stop
  acc "$k" t "$ts"; acc "$k" p "$tp"; acc "$k" l "$l"; acc "$k" o "$o"; acc "$k" rc "$rc"; acc "$k" cs "$cs"
  log "eager $v run $i: $ts s (pull $tp s), layer bytes $l, other $o, registry CPU $rc s"
}
# cold_mount CASE VARIANT CONFIG RUN: one `stratafs mount` + `chroot` run (the image: REF[CASE]
# if set, else REF[VARIANT])
cold_mount() {
  local c=$1 v=$2 cfg=$3 i=$4 m t0 tp ts r0 rc l o out dpid dcpu hw k=mount:$1 ref=${REF[$1]:-${REF[$2]}}
  discard "$work/sfroot"; mkdir -p "$work/mnt"
  cold; m=$(mark); t0=$(now) r0=$(cpu "$reg_pid")
  out=$(inns "$bin" --root "$work/sfroot" --config "$cfg" ${KEEP_LOGS:+--log-level warn,stratafs=debug} mount "$shaped_reg/$ref" "$work/mnt")
  tp=$(since "$t0")
  dpid=$(grep -o 'serving pid [0-9]*' <<<"$out" | awk '{print $3}'); daemons+=("$(grep -o 'holder pid [0-9]*' <<<"$out" | awk '{print $3}')")
  chroot "$work/mnt" "${CMD[@]}"
  ts=$(since "$t0") rc=$(calc "$(cpu "$reg_pid") - $r0")
  hw=$(hwm "$dpid") dcpu=$(cpu "$dpid")
  "$bin" --root "$work/sfroot" umount "$work/mnt" >/dev/null
  read -r l o <<<"$(served "$m")"
  acc "$k" t "$ts"; acc "$k" p "$tp"; acc "$k" l "$l"; acc "$k" o "$o"; acc "$k" rc "$rc"; acc "$k" h "$hw"
  log "mount $c run $i: $ts s (mount $tp s), layer bytes $l, other $o, daemon VmHWM $hw, daemon CPU $dcpu s, registry CPU $rc s"
  if [ -n "${KEEP_LOGS:-}" ]; then   # where the time went: the registry's log and the daemon's
    mkdir -p "$KEEP_LOGS/$c-$i"
    tail -c +$((m + 1)) "$work/registry.log" >"$KEEP_LOGS/$c-$i/registry.log"
    cp -r "$work/sfroot/logs" "$KEEP_LOGS/$c-$i/" 2>/dev/null || true
    # the layer indexes and the recorded profile: which spans a fetch took, and which were read
    cp -r "$work/sfroot/layers" "$work/sfroot/profiles" "$KEEP_LOGS/$c-$i/" 2>/dev/null || true
  fi
  discard "$work/sfroot"
}
# cold_snap CASE VARIANT CONFIG RUN: one `ctr-remote images rpull` + `ctr run` run through the
# stratafs snapshotter; after a failure (NOTE[snap:CASE]) the case's later rounds are skipped
cold_snap() {
  local c=$1 v=$2 cfg=$3 i=$4 m t0 t1 tp ts r0 rc l o hw cs k=snap:$1 sock=$work/snap.sock ref=${REF[$1]:-${REF[$2]}}
  [ -z "${NOTE[$k]:-}" ] || return 0
  snap_stop; rm -f "$sock"
  nsenter --net="/run/netns/$ns" "$bin" --root "$work/snaproot" --config "$cfg" ${KEEP_LOGS:+--log-level warn,stratafs=debug} snapshotter --address "$sock" >"$work/snap.log" 2>&1 &
  snap_pid=$!
  for _ in $(seq 300); do [ -S "$sock" ] && break; kill -0 "$snap_pid" 2>/dev/null || break; sleep 0.1; done
  ctd_start inns "$sock"
  # containerd answers `snapshots ls` itself: probe the proxy with a real call.
  if ! { ctr_ snapshots --snapshotter stratafs prepare probe >/dev/null && ctr_ snapshots --snapshotter stratafs rm probe >/dev/null; }; then
    NOTE[$k]="not available: the snapshotter did not answer (see its log)"
    tail -5 "$work/snap.log" >&2
    ctd_stop; snap_stop; return 0
  fi
  cold; m=$(mark); t0=$(now) r0=$(cpu "$reg_pid")
  if ! ctrr_ images rpull --plain-http --snapshotter stratafs "$shaped_reg/$ref" >/dev/null; then
    NOTE[$k]="failed: rpull (see the snapshotter's log)"; tail -5 "$work/snap.log" >&2; ctd_stop; snap_stop; return 0
  fi
  tp=$(since "$t0")
  if ! ctr_run stratafs "$shaped_reg/$ref"; then
    NOTE[$k]="failed: ctr run (see the snapshotter's log)"; tail -5 "$work/snap.log" >&2; ctd_stop; snap_stop; return 0
  fi
  ts=$(since "$t0") rc=$(calc "$(cpu "$reg_pid") - $r0")
  hw=$(hwm "$snap_pid")
  # The run's bytes before `true` fetches its own (/usr/bin/true).
  read -r l o <<<"$(served "$m")"
  # The same start and teardown with the layers now cached: the snapshotter's share of a
  # `ctr run` beside overlayfs's (the eager runs' `true`).
  t1=$(now); RUN_ID=$((RUN_ID + 1))
  ctr_ run --rm --fifo-dir "$ctd/fifo" --runc-root "$ctd/runc" --snapshotter stratafs "$shaped_reg/$ref" "bench$RUN_ID" true </dev/null
  cs=$(since "$t1")
  if [ -n "${KEEP_LOGS:-}" ]; then
    mkdir -p "$KEEP_LOGS/snap-$c-$i"
    tail -c +$((m + 1)) "$work/registry.log" >"$KEEP_LOGS/snap-$c-$i/registry.log"
    cp -r "$work/snaproot/logs" "$work/snap.log" "$KEEP_LOGS/snap-$c-$i/" 2>/dev/null || true
  fi
  ctd_stop; snap_stop
  acc "$k" t "$ts"; acc "$k" p "$tp"; acc "$k" l "$l"; acc "$k" o "$o"; acc "$k" rc "$rc"; acc "$k" h "$hw"; acc "$k" cs "$cs"
  log "snapshotter $c run $i: $ts s (rpull $tp s), layer bytes $l, other $o, VmHWM $hw, then \`ctr run\` of true $cs s, registry CPU $rc s"
}

# The cases: "CASE VARIANT CONFIG" per `stratafs mount` case (each with its snapshotter runs).
cases=()
for v in "${avail[@]}"; do
  if [ "$v" = gzip ]; then
    cases+=("gzip-noindex gzip $work/sf-noindex.toml" "gzip gzip $work/sf.toml" "gzip-default gzip $work/sf-default.toml")
  else
    cases+=("$v $v $work/sf.toml")
  fi
  [ -z "${REF[$v-profile]:-}" ] || cases+=("$v-profile $v $work/sf.toml")
  [ -z "${REF[$v-ranges]:-}" ] || cases+=("$v-ranges $v $work/sf.toml")
done
# CASES="gzip gzip-profile …": only these mount cases (and with SNAPSHOTTER=1 their snapshotter
# runs), no eager runs and no table (a look at where the time goes, with KEEP_LOGS=DIR).
log "cold runs through $MBIT Mbit/s + $RTT_MS ms RTT, $RUNS each, in rounds: variants ${avail[*]}"
for i in $(seq "$RUNS"); do
  for v in "${avail[@]}"; do
    [ -n "${CASES:-}" ] || cold_eager "$v" "$i"
    for cs in "${cases[@]}"; do
      read -r c cv cfg <<<"$cs"
      [ "$cv" = "$v" ] || continue
      if [ -n "${CASES:-}" ]; then
        [[ " $CASES " == *" $c "* ]] || continue
        cold_mount "$c" "$cv" "$cfg" "$i"
        [ "${SNAPSHOTTER:-0}" != 1 ] || [ -z "$snap_ok" ] || cold_snap "$c" "$cv" "$cfg" "$i"
        continue
      fi
      cold_mount "$c" "$cv" "$cfg" "$i"
      if [ -n "$snap_ok" ]; then cold_snap "$c" "$cv" "$cfg" "$i"; else NOTE[snap:$c]="not available (this build has no \`stratafs snapshotter\`)"; fi
    done
  done
done
for v in "${avail[@]}"; do
  record "eager:$v"
  # shellcheck disable=SC2086 # the accumulated figures are words
  [ -z "${ACC[eager:$v/cs]:-}" ] || CSTART[$v]=$(median ${ACC[eager:$v/cs]})
done
for cs in "${cases[@]}"; do
  read -r c _ <<<"$cs"
  record "mount:$c"; record "snap:$c"
  # shellcheck disable=SC2086
  [ -z "${ACC[snap:$c/cs]:-}" ] || CSTART[snap:$c]=$(median ${ACC[snap:$c/cs]})
done

[ -z "${CASES:-}" ] || exit 0
log "metadata-only pull through the link"
declare -A PULL
for c in "gzip gzip $work/sf.toml" "gzip-noindex gzip $work/sf-noindex.toml" "estargz estargz $work/sf.toml"; do
  read -r k v cfg <<<"$c"
  [ -n "${REF[$v]:-}" ] || continue
  ts=() bo=()
  for _ in $(seq "$RUNS"); do
    discard "$work/sfroot"; cold; m=$(mark); t0=$(now)
    inns "$bin" --root "$work/sfroot" --config "$cfg" pull "$shaped_reg/${REF[$v]}" >/dev/null
    ts+=("$(since "$t0")")
    read -r l o <<<"$(served "$m")"; bo+=("$((l + o))")
  done
  PULL[$k]="$(median "${ts[@]}") $(median "${bo[@]}")"
done
discard "$work/sfroot"

log "warm: the gzip image (published index) mounted from the loopback registry, cache filled"
umoci unpack --image "$oci:gzip" "$work/unpacked" >/dev/null
disk=$work/unpacked/rootfs
read -r big_size big_path <<<"$(cd "$disk" && find . -type f -printf '%s %p\n' | sort -n | tail -1)"
big_path=${big_path#.}
nfiles=$(find "$disk" -type f | wc -l)

log "bytes the command reads: strace of the command in a chroot of the unpacked image"
strace -f -qq -e trace=open,openat -o "$work/strace" chroot "$disk" "${CMD[@]}"
read -r READ_N READ_RAW READ_C <<<"$(python3 - "$work/strace" "$disk" <<'PY'
import os, re, sys, zlib
trace, root = sys.argv[1:3]
seen, raw, comp = set(), 0, 0
for line in open(trace, errors="replace"):
    m = re.search(r'open(?:at)?\((?:[^,]*, )?"([^"]*)".*\) = (\d+)', line)
    if not m:
        continue
    path = os.path.normpath(os.path.join(root, m.group(1).lstrip("/")))
    if path in seen or not os.path.isfile(path) or os.path.islink(path):
        continue
    seen.add(path)
    data = open(path, "rb").read()
    raw += len(data)
    comp += len(zlib.compress(data, 6))
print(len(seen), raw, comp)
PY
)"
log "the command opens $READ_N files, $READ_RAW bytes, $READ_C compressed"
mkdir -p "$work/mnt"
out=$("$bin" --root "$work/warm" mount "$local_reg/bench/py:gzip" "$work/mnt"); dpid=$(grep -o 'serving pid [0-9]*' <<<"$out" | awk '{print $3}'); daemons+=("$(grep -o 'holder pid [0-9]*' <<<"$out" | awk '{print $3}')")
chroot "$work/mnt" "${CMD[@]}"
# A file's passthrough copy is made in the background at its second open, once all cached.
copied() {   # copied SIZE: waits (at most 30 s) for the warm mount's local copy of a SIZE-byte file
  local _
  for _ in $(seq 300); do compgen -G "$work/warm/cache/files/*-$1" >/dev/null && return 0; sleep 0.1; done
  log "no local copy of the $1-byte file after 30 s: its warm reads go through the daemon"
}
cat "$work/mnt$big_path" >/dev/null; cat "$work/mnt$big_path" >/dev/null   # fetch; copy for passthrough
copied "$big_size"
seqread() {   # seqread FILE: MB/s of one sequential read, page cache dropped
  drop
  local t0; t0=$(now)
  dd if="$1" of=/dev/null bs=1M status=none
  calc "$(stat -c %s "$1") / $(since "$t0") / 1000000"
}
timeit() { drop; local t0; t0=$(now); "$@" >/dev/null; since "$t0"; }
statall() { find "$1" -print0 | xargs -0 stat >/dev/null; }
# One sequential read takes 0.02-0.15 s and swings by ±15% here: at least 7 pairs each.
SEQ_RUNS=$((RUNS > 7 ? RUNS : 7))
a=() b=()
for _ in $(seq "$SEQ_RUNS"); do a+=("$(seqread "$work/mnt$big_path")") b+=("$(seqread "$disk$big_path")"); done
c=() d=() e=() f=()
for _ in $(seq "$RUNS"); do
  c+=("$(timeit statall "$work/mnt")") d+=("$(timeit statall "$disk")")
  e+=("$(timeit chroot "$work/mnt" "${CMD[@]}")") f+=("$(timeit chroot "$disk" "${CMD[@]}")")
done
seq_mnt=$(median "${a[@]}") seq_disk=$(median "${b[@]}") stat_mnt=$(median "${c[@]}") stat_disk=$(median "${d[@]}")
imp_mnt=$(median "${e[@]}") imp_disk=$(median "${f[@]}")
warm_hwm=$(hwm "$dpid")
"$bin" --root "$work/warm" umount "$work/mnt" >/dev/null
umoci unpack --image "$oci:bigfile" "$work/bigfile" >/dev/null
out=$("$bin" --root "$work/warm" mount "$local_reg/bench/bigfile:1" "$work/mnt"); daemons+=("$(grep -o 'holder pid [0-9]*' <<<"$out" | awk '{print $3}')")
bigf=/data/big.bin
cat "$work/mnt$bigf" >/dev/null; cat "$work/mnt$bigf" >/dev/null
copied "$(stat -c %s "$work/bigfile/rootfs$bigf")"
a=() b=()
for _ in $(seq "$SEQ_RUNS"); do a+=("$(seqread "$work/mnt$bigf")") b+=("$(seqread "$work/bigfile/rootfs$bigf")"); done
seq2_mnt=$(median "${a[@]}") seq2_disk=$(median "${b[@]}") seq2_size=$(stat -c %s "$work/bigfile/rootfs$bigf")
"$bin" --root "$work/warm" umount "$work/mnt" >/dev/null
rm -rf "$work/warm" "$work/bigfile"

# Output.
label() {
  case $1 in
    gzip-noindex) echo "gzip, no index (\`[index] published = false\`)" ;;
    gzip) echo "gzip + published stratafs index" ;;
    gzip-default) echo "gzip + published index, default options (background fill on)" ;;
    gzip-profile) echo "gzip + published index + recorded profile" ;;
    gzip-ranges) echo "gzip + published index + recorded profile without its pack (spans from the layers)" ;;
    estargz) echo "eStargz (ctr-remote convert)" ;;
    estargz-profile) echo "eStargz + recorded profile" ;;
    zstd) echo "zstd (skopeo)" ;;
    zstdchunked) echo "zstd:chunked (ctr-remote convert)" ;;
  esac
}
link_s() { calc "$1 * 8 / ($MBIT * 1000000) + 4 * $RTT_MS / 1000"; }   # bytes over the link + 4 RTTs
bytes_cell() { printf '%s (layers %s + other %s)' "$(mbytes "$(($1 + $2))")" "$(mbytes "$1")" "$(mbytes "$2")"; }
declare -A SPEED RATIO
rows=()
for v in "${avail[@]}"; do
  e=eager:$v
  rows+=("| $([ "$v" = gzip ] && echo gzip || label "$v") | eager: \`ctr images pull\` + \`ctr run\` (overlayfs) | **$(printf '%.2f' "${T[$e]}") s** (pull $(printf '%.2f' "${P[$e]}") s) | 1× | $(bytes_cell "${L[$e]}" "${O[$e]}") | $(printf '%.2f' "$(link_s "$((L[$e] + O[$e]))")") s | $(printf '%.2f×' "$(calc "${T[$e]} / $(link_s "$((L[$e] + O[$e]))")")") |")
  for cs in "${cases[@]}"; do
    read -r c cv _ <<<"$cs"
    [ "$cv" = "$v" ] || continue
    for client in mount snap; do
      k=$client:$c
      if [ "$client" = mount ]; then what="\`stratafs mount\` + \`chroot\`"; part=mount; else what="\`ctr-remote images rpull --snapshotter stratafs\` + \`ctr run\`"; part=rpull; fi
      lbl=$(label "$c")
      if [ -z "${T[$k]:-}" ]; then
        rows+=("| $lbl | $what | ${NOTE[$k]:-not run} | | | | |")
        continue
      fi
      tl=$(link_s "$((L[$k] + O[$k]))")
      SPEED[$k]=$(calc "${T[$e]} / ${T[$k]}") RATIO[$k]=$(calc "${T[$k]} / $tl")
      rows+=("| $lbl | $what | **$(printf '%.2f' "${T[$k]}") s** ($part $(printf '%.2f' "${P[$k]}") s) | **$(printf '%.1f×' "${SPEED[$k]}")** | $(bytes_cell "${L[$k]}" "${O[$k]}") | $(printf '%.2f' "$tl") s | $(printf '%.2f×' "${RATIO[$k]}") |")
    done
  done
done
target() {   # target TEXT VALUE OK
  rows2+=("| $1 | $2 | $([ "$3" = 1 ] && echo met || echo '**missed**') |")
}
rows2=()
read_link=$(link_s "$READ_C")
k=mount:gzip
if [ -n "${SPEED[$k]:-}" ]; then
  target "$(label gzip), stratafs mount, first cold start (no profile): ≥ 4× faster than eager" "$(printf '%.1f×' "${SPEED[$k]}")" "$(calc "${SPEED[$k]} >= 4")"
  target "$(label gzip), stratafs mount: layer bytes fetched ≤ 1.5× the compressed bytes of the files the command reads ($(mbytes "$READ_C"))" "$(printf '%.2f×' "$(calc "${L[$k]} / $READ_C")")" "$(calc "${L[$k]} <= 1.5 * $READ_C")"
fi
k=mount:gzip-profile
if [ -n "${SPEED[$k]:-}" ]; then
  target "$(label gzip-profile), stratafs mount: ≥ 6× faster than eager" "$(printf '%.1f×' "${SPEED[$k]}")" "$(calc "${SPEED[$k]} >= 6")"
  target "$(label gzip-profile), stratafs mount: ≤ 1.3× the link time of the compressed bytes the command reads ($(printf '%.2f' "$read_link") s)" "$(printf '%.2f×' "$(calc "${T[$k]} / $read_link")")" "$(calc "${T[$k]} <= 1.3 * $read_link")"
fi
for c in estargz estargz-profile; do
  k=mount:$c
  [ -z "${SPEED[$k]:-}" ] || target "$(label "$c"), stratafs mount: ≥ 4× faster than eager" "$(printf '%.1f×' "${SPEED[$k]}")" "$(calc "${SPEED[$k]} >= 4")"
done
for c in gzip gzip-profile estargz; do
  [ -n "${T[snap:$c]:-}" ] && [ -n "${T[mount:$c]:-}" ] || continue
  d=$(calc "${T[snap:$c]} - ${T[mount:$c]}")
  target "$(label "$c"): snapshotter + \`ctr run\` within 0.3 s of mount + chroot" "$(printf '%+.2f s' "$d")" "$(calc "$d <= 0.3")"
done
k=mount:gzip-noindex
[ -z "${SPEED[$k]:-}" ] || target "gzip, no index, stratafs mount: ≥ 1.5× faster than eager" "$(printf '%.2f×' "${SPEED[$k]}")" "$(calc "${SPEED[$k]} >= 1.5")"
worst=0
for cs in "${cases[@]}"; do read -r c _ <<<"$cs"; [ -z "${H[mount:$c]:-}" ] || worst=$(calc "if (${H[mount:$c]} > $worst) ${H[mount:$c]} else $worst"); done
target "mount daemon peak RSS (VmHWM) during the cold import ≤ 64 MiB (worst case)" "$(mib "$worst")" "$(calc "$worst <= 64 * 1048576")"
target "warm sequential read ≥ 0.9× local disk (${seq2_size}-byte file; image's largest file)" \
  "$(printf '%.2f×; %.2f×' "$(calc "$seq2_mnt / $seq2_disk")" "$(calc "$seq_mnt / $seq_disk")")" "$(calc "$seq2_mnt / $seq2_disk >= 0.9")"
rows3=()
rows3+=("| bytes the command reads (strace in a chroot of the unpacked image) | $READ_N files, $(mbytes "$READ_RAW"); **$(mbytes "$READ_C") compressed** (zlib level 6 per file), $(printf '%.2f' "$read_link") s of link time |")
for k in gzip gzip-noindex estargz; do
  [ -n "${PULL[$k]:-}" ] || continue
  read -r t b <<<"${PULL[$k]}"
  rows3+=("| metadata-only \`stratafs pull\`, $(label "$k"), through the link | $(printf '**%.2f s**, %s served' "$t" "$(mbytes "$b")") |")
done
[ -z "${CSTART[snap:gzip]:-}" ] || rows3+=("| \`ctr run --rm\` of \`true\` right after the cold run, gzip + published stratafs index, layers cached (stratafs snapshotter): its start and teardown of a container | $(printf '**%.2f s**' "${CSTART[snap:gzip]}") |")
[ -z "${CSTART[gzip]:-}" ] || rows3+=("| \`ctr run --rm\` of \`true\`, gzip image already pulled and unpacked (overlayfs): containerd's and runc's own start of a container, in every \`ctr run\` row and none of \`chroot\`'s | $(printf '**%.2f s**' "${CSTART[gzip]}") |")
rows3+=("| warm import (cache filled, page cache dropped) | mount $(printf '%.2f s, unpacked tree %.2f s' "$imp_mnt" "$imp_disk") |")
rows3+=("| warm sequential read, the image's largest file (\`$big_path\`, $big_size bytes) | mount $(printf '**%.0f MB/s = %.2f×** disk (%.0f MB/s), median of %s reads each, page cache dropped' "$seq_mnt" "$(calc "$seq_mnt / $seq_disk")" "$seq_disk" "$SEQ_RUNS") |")
rows3+=("| warm sequential read, $seq2_size-byte file (one-layer image made of the image's files) | mount $(printf '**%.0f MB/s = %.2f×** disk (%.0f MB/s), median of %s reads each, page cache dropped' "$seq2_mnt" "$(calc "$seq2_mnt / $seq2_disk")" "$seq2_disk" "$SEQ_RUNS") |")
rows3+=("| \`find \\| xargs stat\` of the whole tree ($nfiles files) | mount $(printf '**%.2f s**, unpacked tree %.2f s, page cache dropped' "$stat_mnt" "$stat_disk") |")
hw=""
for cs in "${cases[@]}"; do read -r c _ <<<"$cs"; [ -z "${H[mount:$c]:-}" ] || hw+="${hw:+; }$(label "$c") $(mib "${H[mount:$c]}")"; done
rows3+=("| mount daemon VmHWM after the cold import | $hw |")
rc=""
for k in "eager:gzip:eager, gzip" "mount:gzip:mount, gzip + index" "mount:gzip-profile:mount, gzip + index + profile" \
  "mount:estargz:mount, eStargz" "snap:gzip:snapshotter, gzip + index"; do
  IFS=: read -r a b what <<<"$k"
  [ -z "${RC[$a:$b]:-}" ] || rc+="${rc:+; }$what $(printf '%.2f s' "${RC[$a:$b]}")"
done
[ -z "$rc" ] || rows3+=("| the registry's CPU per cold run (it shares this machine's cores with the client; per range request it reads up to 4 MiB of the blob into a fresh buffer) | $rc |")
rows3+=("| mount daemon VmHWM after the warm reads, import and find + stat above | $(mib "$warm_hwm") |")
hw=""
for cs in "${cases[@]}"; do read -r c _ <<<"$cs"; [ -z "${H[snap:$c]:-}" ] || hw+="${hw:+; }$(label "$c") $(mib "${H[snap:$c]}")"; done
[ -z "$hw" ] || rows3+=("| snapshotter VmHWM after the cold run | $hw |")

{
  sizes=""
  for v in "${avail[@]}"; do sizes+="${sizes:+, }$v $(mbytes "${LAYERS[$v]}")"; done
  printf 'Image: Debian bookworm minbase + python3, python3-pip (Debian) + numpy 2.3.5, pandas 2.3.3, requests 2.32.5 (PyPI), 3 layers, %s files; layer bytes per variant: %s. ' "$nfiles" "$sizes"
  printf 'First command: `%s`. ' "${COMMAND:-python3 -c '$PYCMD'}"
  printf 'Link: %s Mbit/s (tbf on a veth pair into a network namespace) + %s ms RTT (bench/delayline.py); every client in the namespace. ' "$MBIT" "$RTT_MS"
  printf 'Cold: median of %s runs, taken in rounds (each round one run of every client and case, so a slower minute of the machine falls on all of them), page cache dropped (then the binaries of containerd'"'"'s shim, runc, ctr, ctr-remote and stratafs read back in: a node has those in memory), fresh containerd root and stratafs roots; stratafs with `[mount] background_fetch = %s` (but for the default-options rows). ' "$RUNS" "$BACKGROUND_FETCH"
  printf '"Link time" = bytes the registry served in that run × 8 / %s Mbit/s + 4 RTTs; "other" bytes are manifests, configs, published indexes and their checkpoint windows, the startup profile and its pack (the spans its replay fetches, zstd-compressed again: `stratafs profile push`). ' "$MBIT"
  printf 'The profile rows replay the profile with its pack, but for the one that says otherwise.\n\n'
  printf '| image (%s) | client | time to the end of the command | speed-up vs eager, same image | registry served | link time for those bytes | time / link time |\n|---|---|---|---|---|---|---|\n' "$(date +%F)"
  printf '%s\n' "${rows[@]}"
  printf '\n| target | result | |\n|---|---|---|\n'
  printf '%s\n' "${rows2[@]}"
  printf '\n| measure | value |\n|---|---|\n'
  printf '%s\n' "${rows3[@]}"
  printf '\nMachine: %s; containerd %s, ctr-remote %s. Reproduce (as root, after `.ci/setup`): `bash bench/coldstart.sh %s %s %s`%s\n' \
    "$(machine_line "$work")" "$(containerd --version | awk '{print $3}')" \
    "$(ctr-remote --version 2>/dev/null | awk '{print $3}')" "$RUNS" "$RTT_MS" "$MBIT" \
    "$([ "$VARIANTS" = "gzip estargz zstd zstdchunked" ] || echo " with \`VARIANTS=\"$VARIANTS\"\`")"
} >"$work/table.md"
cat "$work/table.md"
put_table "$repo/docs/benchmarks.md" "$work/table.md" bench/coldstart.sh "Cold start (containerd eager pull vs lazy)"
