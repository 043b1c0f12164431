#!/usr/bin/env bash
# Restart benchmark (issue 14): the service gap when the process serving a mount dies.
#
# An image of this machine's Python standard library (/usr/lib/python3.*, one gzip layer, built
# with umoci and pushed to a loopback distribution registry with skopeo) is pulled, indexed and
# mounted; its files are read once so the cache holds them. Then READERS threads
# (bench/restart_readers.py) read random files in a loop — each read drops the file's pages
# first (POSIX_FADV_DONTNEED), so it reaches the serving process — while the serving process is
# killed with SIGKILL RESTARTS times (the pid from `stratafs cache stats --json`), each kill
# after the next server answered reads again. Per kill:
#   gap: from the kill to the end of the first read that started after it (a read that needs
#        the new server);
#   waited: reads in flight at the kill (the kernel resends them to the new server).
# Failed reads and wrong bytes must be 0. Prints markdown and rewrites the block between the
# bench/restart.sh markers in docs/benchmarks.md.
#
# Usage: bash bench/restart.sh [RESTARTS=100] [READERS=4]   (as root, after .ci/setup)
set -euo pipefail
cd "$(dirname "$0")/.."
RESTARTS=${1:-100} READERS=${2:-4}
[ "$(id -u)" = 0 ] || { echo "bench/restart.sh: run as root (mount)" >&2; exit 1; }
log() { echo "== $*" >&2; }
. bench/lib.sh
for t in docker-registry umoci skopeo jq python3; do
  command -v "$t" >/dev/null || { echo "bench/restart.sh: $t missing (run bash .ci/setup)" >&2; exit 1; }
done

log "building stratafs (release)"
cargo build --release -q
bin=$PWD/target/release/stratafs
work=$(mktemp -d /tmp/stratafs-restart.XXXXXX)
pids=()
cleanup() {
  set +e
  "$bin" --root "$work/root" umount "$work/mnt" >/dev/null 2>&1
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

port=$(freeport)
cat >"$work/registry.yml" <<YML
version: 0.1
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
log: {level: error}
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

log "image: the Python standard library of this machine"
pylib=$(ls -d /usr/lib/python3.[0-9]* | head -1)
umoci init --layout "$work/oci" >/dev/null
umoci new --image "$work/oci:py" >/dev/null
umoci unpack --image "$work/oci:py" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/usr/lib"
cp -a "$pylib" "$work/bundle/rootfs/usr/lib/"
find "$work/bundle/rootfs/usr/lib" -name __pycache__ -prune -exec rm -rf {} +
umoci repack --image "$work/oci:py" "$work/bundle" >/dev/null
skopeo copy -q --dest-tls-verify=false "oci:$work/oci:py" "docker://127.0.0.1:$port/bench/restart:v1"
ref=127.0.0.1:$port/bench/restart:v1
S() { "$bin" --root "$work/root" -q "$@"; }
S pull --plain-http "$ref" >/dev/null
S index build --plain-http "$ref" >/dev/null
mkdir -p "$work/mnt"
STRATAFS_LOG=info S mount --plain-http "$ref" "$work/mnt" >/dev/null
files=$(find "$work/mnt" -type f | wc -l)
log "mounted: $files files; filling the cache"
find "$work/mnt" -type f -print0 | xargs -0 cat >/dev/null

log "$READERS readers, $RESTARTS kills"
python3 bench/restart_readers.py "$work/mnt" "$READERS" "$RESTARTS" "$bin" "$work/root" >"$work/result.json"
jq . "$work/result.json" >&2

r() { jq -r "$1" "$work/result.json"; }
table=$(mktemp)
{
  echo "Run $(date -u +%Y-%m-%d) on $(machine_line "$work"); stratafs $(git rev-parse --short HEAD)."
  echo "\`bash bench/restart.sh $RESTARTS $READERS\`: $READERS readers over $files files (this machine's"
  echo "Python standard library, cached), the serving process SIGKILLed $RESTARTS times."
  echo
  echo "| | median | p90 | max |"
  echo "|---|---|---|---|"
  echo "| gap: kill → first read served by the next process | $(r .gap_ms.median) ms | $(r .gap_ms.p90) ms | $(r .gap_ms.max) ms |"
  echo "| reads in flight at the kill (resent, then answered) | $(r .waited.median) | $(r .waited.p90) | $(r .waited.max) |"
  echo "| time a resent read waited | $(r .waited_ms.median) ms | $(r .waited_ms.p90) ms | $(r .waited_ms.max) ms |"
  echo
  echo "Reads: $(r .reads) checked, **$(r .failed) failed, $(r .wrong) with wrong bytes**; kills: $(r .kills)."
} >"$table"
cat "$table"
put_table docs/benchmarks.md "$table" bench/restart.sh "Restart: the service gap of a killed serving process"
rm -f "$table"
[ "$(r .failed)" = 0 ] && [ "$(r .wrong)" = 0 ]
