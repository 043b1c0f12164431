#!/usr/bin/env bash
# FUSE mount benchmark (issue: the FUSE driver). Builds three images from this machine's files
# (a large 3-layer image, one ~600 MB file, a ~10k-file image), serves them from a local
# distribution registry and measures:
#   1. cold: `stratafs mount` + a command reading FILES small files of the large image, with a
#      fresh store and dropped page cache, through a shaped link (network namespace + veth +
#      tbf at MBIT, RTT_MS added by bench/delayline.py): time and bytes the registry served —
#      with the published layer indexes, without them, and the eager baseline (skopeo copy +
#      umoci unpack through the same link, then the same command on the unpacked tree);
#   2. warm: sequential read of the cached large file (passthrough and -o nopassthrough) against
#      the same file on local disk; the small files again; `find | xargs stat` of the mount
#      against the unpacked tree;
#   3. daemon memory (VmHWM) with the ~10k-file image (and the large image) mounted.
# Prints a markdown table and puts it in docs/benchmarks.md ("Mount (FUSE driver)").
# Usage: bash bench/mount.sh [RUNS=3] [RTT_MS=20] [MBIT=100] [FILES=300]   (as root, after .ci/setup)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3} RTT_MS=${2:-20} MBIT=${3:-100} FILES=${4:-300}
[ "$(id -u)" = 0 ] || { echo "bench/mount.sh: run as root (netns, tc, drop_caches, mount)" >&2; exit 1; }
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/stratafs
repo=$PWD
work=$(mktemp -d /tmp/stratafs-mount-bench.XXXXXX)
ns=sfbench$$ net=10.213.$(($$ % 250))
pids=() daemons=()
cleanup() {
  set +e
  for p in "${daemons[@]}"; do kill -TERM "$p" 2>/dev/null; done
  sleep 1
  findmnt -rn -o TARGET | grep "^$work/" | sort -r | while read -r m; do umount -l "$m"; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  ip netns del "$ns" 2>/dev/null; ip link del "${ns}h" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
log() { echo "== $*" >&2; }
. bench/lib.sh
mb() { echo "$1 / 1000000" | bc -l; }
inns() { nsenter --net="/run/netns/$ns" "$@"; }

# Registry on loopback; a delay line on the host end of a veth pair; clients in the netns.
port=$(freeport) slow=$(freeport)
cat >"$work/registry.yml" <<YML
version: 0.1
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: "127.0.0.1:$port"}
log: {level: error, accesslog: {disabled: false}}
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 & pids+=($!)
pids+=("$(shaped_link "$ns" "$net" "$port" "$slow" "$MBIT" "$RTT_MS")")
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
sleep 0.5
local_reg=127.0.0.1:$port shaped_reg=$net.1:$slow
printf '' >"$work/default.toml"
export STRATAFS_CONFIG=$work/default.toml   # not /etc/stratafs/config.toml
printf '[index]\npublished = false\n' >"$work/noindex.toml"

log "building images with umoci: large (3 layers), bigfile (one 600 MiB file), files10k"
umoci init --layout "$work/oci" >/dev/null
umoci new --image "$work/oci:large"
for d in /usr/lib/x86_64-linux-gnu /usr/lib/python3.11 /usr/share/doc; do umoci insert --image "$work/oci:large" "$d" "$d" >/dev/null; done
find /usr/lib/x86_64-linux-gnu /usr/lib/jvm /usr/bin /usr/share -type f -print0 2>/dev/null |
  xargs -0 cat 2>/dev/null | head -c 600M >"$work/big.bin" || true
umoci new --image "$work/oci:bigfile"
umoci insert --image "$work/oci:bigfile" "$work/big.bin" /data/big.bin >/dev/null
umoci new --image "$work/oci:files10k"
for d in /usr/include /usr/lib/python3.11 /usr/share/zoneinfo; do umoci insert --image "$work/oci:files10k" "$d" "$d" >/dev/null; done
for t in large bigfile files10k; do
  skopeo copy -q --dest-tls-verify=false "oci:$work/oci:$t" "docker://$local_reg/bench/$t:1"
  "$bin" --root "$work/pusher" index push --bind "$local_reg/bench/$t:1" >/dev/null
done
rm -rf "$work/pusher"
manifest=$(skopeo inspect --raw --tls-verify=false "docker://$local_reg/bench/large:1")
jq -r '.layers[].digest' <<<"$manifest" >"$work/layers"
layer_bytes=$(jq '[.layers[].size] | add' <<<"$manifest")
nlayers=$(jq '.layers | length' <<<"$manifest")

# served MARK: "LAYER_BYTES OTHER_BYTES" the registry sent since log offset MARK.
served() {
  tail -c +$(($1 + 1)) "$work/registry.log" | grep -ao '"GET /v2/[^ ]* HTTP/[0-9.]*" 2[0-9]* [0-9]*' |
    awk -v L="$work/layers" 'BEGIN {while ((getline d < L) > 0) layer[d] = 1}
      {n = split($2, p, "/"); if (p[n] in layer) l += $5; else o += $5} END {print l + 0, o + 0}'
}
mark() { stat -c %s "$work/registry.log"; }
# sfmount WRAP ROOT MNT REF [mount args]: mount (WRAP: inns = inside the shaped netns, env = not).
sfmount() {
  local wrap=$1 root=$2 mnt=$3 ref=$4 out; shift 4
  mkdir -p "$mnt"
  out=$($wrap "$bin" --root "$root" mount "$@" "$ref" "$mnt")
  dpid=$(grep -o 'serving pid [0-9]*' <<<"$out" | awk '{print $3}')
  daemons+=("$(grep -o 'holder pid [0-9]*' <<<"$out" | awk '{print $3}')")
}
sfumount() { "$bin" --root "$1" umount "$2" >/dev/null; }
# readfiles DIR: the cold command — FILES .py files of /usr/lib/python3.11, read whole.
readfiles() { find "$1/usr/lib/python3.11" -name '*.py' | sort | awk -v n="$FILES" 'NR <= n' | xargs -d '\n' cat | wc -c; }
hwm() { awk '/VmHWM/ {print $2 * 1024}' "/proc/$1/status"; }
rows=()
row() { rows+=("| $1 | $2 |"); }

# 1. Cold. cold_lazy LABEL CONFIG [mount options]: median time and bytes of RUNS fresh mounts.
cold_lazy() {
  local label=$1 cfg=$2 ts=() tm=() bl=() bo=(); shift 2
  for i in $(seq "$RUNS"); do
    rm -rf "$work/cold"; drop; local m; m=$(mark) t0=$(now)
    sfmount inns "$work/cold" "$work/mnt" "$shaped_reg/bench/large:1" --plain-http --config "$cfg" "$@"
    tm+=("$(since "$t0")")
    read_bytes=$(readfiles "$work/mnt")
    ts+=("$(since "$t0")")
    sfumount "$work/cold" "$work/mnt"
    read -r l o <<<"$(served "$m")"; bl+=("$l") bo+=("$o")
    log "$label run $i: ${ts[-1]} s (mount ${tm[-1]} s), layer bytes $l, other $o"
  done
  row "cold, $label" "$(printf '**%.2f s** (mount returns in %.2f s); layer bytes %s (%.1f%% of %s); index, manifest and config %s bytes' \
    "$(median "${ts[@]}")" "$(median "${tm[@]}")" "$(median "${bl[@]}")" "$(echo "100 * $(median "${bl[@]}") / $layer_bytes" | bc -l)" "$layer_bytes" "$(median "${bo[@]}")")"
}
log "cold runs through $MBIT Mbit/s + $RTT_MS ms RTT ($RUNS each)"
cold_lazy "lazy, published index (-o nobackground)" "$work/default.toml" -o nobackground
cold_lazy "lazy, published index, default options (background fill from the mount on)" "$work/default.toml"
rows[-1]=$(sed 's/; layer bytes.*/ |/' <<<"${rows[-1]}")
cold_lazy "lazy, no published index (mount streams every layer to index it)" "$work/noindex.toml" -o nobackground
ts=() td=()
for i in $(seq "$RUNS"); do
  rm -rf "$work/eager"; mkdir -p "$work/eager"; drop; m=$(mark) t0=$(now)
  inns skopeo copy -q --src-tls-verify=false "docker://$shaped_reg/bench/large:1" "oci:$work/eager/oci:large"
  td+=("$(since "$t0")")
  umoci unpack --image "$work/eager/oci:large" "$work/eager/bundle" >/dev/null
  eager_bytes=$(readfiles "$work/eager/bundle/rootfs")
  ts+=("$(since "$t0")")
  read -r l o <<<"$(served "$m")"
  log "eager run $i: ${ts[-1]} s (download ${td[-1]} s), layer bytes $l"
done
row "cold, eager: skopeo copy + umoci unpack, then the command" "$(printf '**%.2f s** (download %.2f s); layer bytes %s (100%%)' "$(median "${ts[@]}")" "$(median "${td[@]}")" "$l")"
[ "$read_bytes" = "$eager_bytes" ] || log "WARNING: mount read $read_bytes bytes, unpacked tree $eager_bytes"

# 2. Warm. seqread FILE [drop]: MB/s of one sequential read (dd, 1 MiB blocks).
seqread() {
  [ -n "${2:-}" ] && drop
  local t0; t0=$(now)
  dd if="$1" of=/dev/null bs=1M status=none
  echo "$(stat -c %s "$1") / $(since "$t0") / 1000000" | bc -l
}
# seq3 FILE: "COLD HOT" medians (page cache dropped before each / read once beforehand).
seq3() {
  local c=() h=()
  for _ in $(seq "$RUNS"); do c+=("$(seqread "$1" drop)"); done
  seqread "$1" >/dev/null
  for _ in $(seq "$RUNS"); do h+=("$(seqread "$1")"); done
  echo "$(median "${c[@]}") $(median "${h[@]}")"
}
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
# timeit CMD...: seconds, page cache dropped first.
timeit() { drop; local t0; t0=$(now); "$@" >/dev/null; since "$t0"; }
statall() { find "$1" -type f -print0 | xargs -0 stat >/dev/null; }
log "warm: sequential read of a 600 MiB file, small files, find + stat (loopback registry)"
sfmount env "$work/warm" "$work/mnt" "$local_reg/bench/bigfile:1" -o nobackground
cat "$work/mnt/data/big.bin" >/dev/null   # fetch: every span cached
t0=$(now); cat "$work/mnt/data/big.bin" >/dev/null; assemble=$(since "$t0")   # this open assembles the local copy
read -r disk_c disk_h <<<"$(seq3 "$work/big.bin")"
c0=$(cpu "$dpid"); read -r pt_c pt_h <<<"$(seq3 "$work/mnt/data/big.bin")"; pt_cpu=$(echo "$(cpu "$dpid") - $c0" | bc -l)
sfumount "$work/warm" "$work/mnt"
sfmount env "$work/warm" "$work/mnt" "$local_reg/bench/bigfile:1" -o nobackground,nopassthrough
c0=$(cpu "$dpid"); read -r np_c np_h <<<"$(seq3 "$work/mnt/data/big.bin")"; np_cpu=$(echo "$(cpu "$dpid") - $c0" | bc -l)
sfumount "$work/warm" "$work/mnt"
row "warm sequential read, 600 MiB file (629 MB): local disk" "$(printf '%.0f MB/s page cache dropped; %.0f MB/s from page cache' "$disk_c" "$disk_h")"
row "same file through the mount, passthrough" "$(printf '**%.0f MB/s = %.2f×** disk, page cache dropped; %.0f MB/s = %.2f× from page cache; daemon CPU %.2f s for %s reads' \
  "$pt_c" "$(echo "$pt_c / $disk_c" | bc -l)" "$pt_h" "$(echo "$pt_h / $disk_h" | bc -l)" "$pt_cpu" "$((2 * RUNS + 1))")"
row "same file, -o nopassthrough" "$(printf '%.0f MB/s = %.2f× disk, page cache dropped; %.0f MB/s = %.2f× from page cache; daemon CPU %.2f s' \
  "$np_c" "$(echo "$np_c / $disk_c" | bc -l)" "$np_h" "$(echo "$np_h / $disk_h" | bc -l)" "$np_cpu")"
row "first open of the cached file (assembles the passthrough copy, then reads it)" "$(printf '%.2f s' "$assemble")"

# Small files and metadata, from the large image's cache filled by a streamed index build.
sfmount env "$work/meta" "$work/mnt" "$local_reg/bench/large:1" --config "$work/noindex.toml" -o nobackground
first=$(timeit readfiles "$work/mnt")
pt=() np=() dk=() sm=() sd=()
for _ in $(seq "$RUNS"); do pt+=("$(timeit readfiles "$work/mnt")") dk+=("$(timeit readfiles "$work/eager/bundle/rootfs")"); done
for _ in $(seq "$RUNS"); do sm+=("$(timeit statall "$work/mnt")") sd+=("$(timeit statall "$work/eager/bundle/rootfs")"); done
statall "$work/mnt"; statall "$work/eager/bundle/rootfs"
t0=$(now); statall "$work/mnt"; sm_hot=$(since "$t0"); t0=$(now); statall "$work/eager/bundle/rootfs"; sd_hot=$(since "$t0")
nfiles=$(find "$work/mnt" -type f | wc -l)
large_hwm=$(hwm "$dpid")
sfumount "$work/meta" "$work/mnt"
sfmount env "$work/meta" "$work/mnt" "$local_reg/bench/large:1" -o nobackground,nopassthrough
for _ in $(seq "$RUNS"); do np+=("$(timeit readfiles "$work/mnt")"); done
sfumount "$work/meta" "$work/mnt"
row "warm: the $FILES files ($read_bytes bytes), all cached, page cache dropped" "$(printf 'disk %.3f s; mount: %.3f s first open of each (passthrough copy assembled), then %.3f s passthrough, %.3f s -o nopassthrough' \
  "$(median "${dk[@]}")" "$first" "$(median "${pt[@]}")" "$(median "${np[@]}")")"
row "\`find \\| xargs stat\`, $nfiles files of the large image" "$(printf 'mount **%.2f s**, unpacked tree %.2f s (page cache dropped); %.2f s vs %.2f s hot' \
  "$(median "${sm[@]}")" "$(median "${sd[@]}")" "$sm_hot" "$sd_hot")"

# 3. Memory: VmHWM of the daemon serving the ~10k-file image.
log "daemon memory"
sfmount env "$work/rss" "$work/mnt" "$local_reg/bench/files10k:1" -o nobackground
h0=$(hwm "$dpid"); statall "$work/mnt"; h1=$(hwm "$dpid")
find "$work/mnt" -type f -print0 | xargs -0 cat >/dev/null; h2=$(hwm "$dpid")
n10k=$(find "$work/mnt" -type f | wc -l) e10k=$(find "$work/mnt" | wc -l)
sfumount "$work/rss" "$work/mnt"
row "daemon VmHWM, ${n10k}-file image ($e10k entries, 3 layers)" "$(printf '**%.1f MiB** after mount; %.1f MiB after find + stat; %.1f MiB after reading every file' \
  "$(echo "$h0 / 1048576" | bc -l)" "$(echo "$h1 / 1048576" | bc -l)" "$(echo "$h2 / 1048576" | bc -l)")"
row "daemon VmHWM, large image ($nfiles files)" "$(printf '%.1f MiB after the warm reads and find + stat above' "$(echo "$large_hwm / 1048576" | bc -l)")"

# Output: the table on stdout and between markers in docs/benchmarks.md.
{
  printf 'Large image: %s layers, %s bytes gzip (`/usr/lib/x86_64-linux-gnu`, `/usr/lib/python3.11`, `/usr/share/doc`), %s files. ' "$nlayers" "$layer_bytes" "$nfiles"
  printf 'Command: `find MNT/usr/lib/python3.11 -name '"'*.py'"' | sort | head -%s | xargs cat` (%s bytes). ' "$FILES" "$read_bytes"
  printf 'Link: %s Mbit/s (tbf on a veth pair into a network namespace) + %s ms RTT (bench/delayline.py); median of %s runs.\n\n' "$MBIT" "$RTT_MS" "$RUNS"
  printf '| measure (%s) | value |\n|---|---|\n' "$(date +%F)"
  printf '%s\n' "${rows[@]}"
  printf '\nMachine: %s. Reproduce: `bash bench/mount.sh %s %s %s %s`\n' \
    "$(machine_line "$work")" "$RUNS" "$RTT_MS" "$MBIT" "$FILES"
} >"$work/table.md"
cat "$work/table.md"
put_table "$repo/docs/benchmarks.md" "$work/table.md" bench/mount.sh "Mount (FUSE driver)"
