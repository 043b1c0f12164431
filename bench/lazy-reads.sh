#!/usr/bin/env bash
# Lazy-read benchmark (issue: lazy layer reads). Builds one large plain-gzip layer from this
# machine's files, serves it from a local distribution registry, and measures:
#   1. index build throughput (one streaming pass) against `gzip -dc` of the same blob;
#   2. published index size per entry;
#   3. reading N small files scattered through the layer from a fresh store, through a link
#      with RTT_MS of added round-trip delay and MBIT bandwidth: wall time, range requests,
#      bytes fetched — against an eager download of the whole blob through the same link.
# Usage: bash bench/lazy-reads.sh [N=500] [RTT_MS=20] [MBIT=100]   (as root, after .ci/setup)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-500}
RTT_MS=${2:-20}
MBIT=${3:-100}
cargo build --release --quiet
bin=$PWD/target/release/stratafs
work=$(mktemp -d /tmp/stratafs-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

port=$(freeport)
cat > "$work/registry.yml" <<YML
version: 0.1
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: "127.0.0.1:$port"}
log: {level: error, accesslog: {disabled: false}}
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 & pids+=($!)
slow=$(freeport)
python3 bench/delayline.py "$slow" "$port" "$(python3 -c "print($RTT_MS/2)")" "$MBIT" & pids+=($!)
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

echo "building a one-layer image from /usr/lib/python3.11 /usr/share/doc /usr/share/locale ..." >&2
umoci init --layout "$work/oci" >/dev/null
umoci new --image "$work/oci:big"
umoci unpack --image "$work/oci:big" "$work/bundle" >/dev/null
for d in /usr/lib/python3.11 /usr/share/doc /usr/share/locale; do
  mkdir -p "$work/bundle/rootfs$(dirname "$d")" && cp -a "$d" "$work/bundle/rootfs$(dirname "$d")/"
done
umoci repack --image "$work/oci:big" "$work/bundle" >/dev/null
ref="127.0.0.1:$port/bench/big:1"
slowref="127.0.0.1:$slow/bench/big:1"
skopeo copy -q --dest-tls-verify=false "oci:$work/oci:big" "docker://$ref"
manifest="$work/oci/blobs/sha256/$(jq -r '.manifests[0].digest' "$work/oci/index.json" | cut -d: -f2)"
layer=$(jq -r '.layers[-1].digest' "$manifest")
blob="$work/oci/blobs/sha256/${layer#sha256:}"
blob_size=$(stat -c %s "$blob")

# 1. Index build throughput against gzip -dc.
t0=$(date +%s.%N); gzip -dc "$blob" >/dev/null; t1=$(date +%s.%N)
gz=$(echo "$t1 - $t0" | bc -l)
t0=$(date +%s.%N); curl -fs "http://127.0.0.1:$port/v2/bench/big/blobs/$layer" | gzip -dc >/dev/null; t1=$(date +%s.%N)
curl_gz=$(echo "$t1 - $t0" | bc -l)
"$bin" --root "$work/a" pull "$ref" >/dev/null
t0=$(date +%s.%N); "$bin" --root "$work/a" index build "$ref" >/dev/null; t1=$(date +%s.%N)
build=$(echo "$t1 - $t0" | bc -l)
"$bin" --root "$work/a" index push --bind "$ref" >/dev/null
index_json=$(ls -S "$work"/a/layers/*.json | head -1)
entries=$(jq '.entries | length' "$index_json")
index_bytes=$(stat -c %s "$index_json")
index_gz=$(gzip -c "$index_json" | wc -c)
uncompressed=$(jq '.size' "$index_json")

# 3. Scattered small files, read cold from a fresh store through the delay line.
jq -r '.entries[] | select(.type == "file" and .size > 0 and .size < 16384) | .path' "$index_json" >"$work/small"
total_small=$(wc -l <"$work/small")
awk -v n="$N" -v t="$total_small" 'NR % int(t / n) == 0 && c < n { print "/" $0; c++ }' "$work/small" >"$work/pick"
picked=$(wc -l <"$work/pick")
"$bin" --root "$work/b" pull "$slowref" >/dev/null
mark=$(stat -c %s "$work/registry.log")
t0=$(date +%s.%N); xargs -a "$work/pick" -d '\n' "$bin" --root "$work/b" cat "$slowref" >"$work/out"; t1=$(date +%s.%N)
lazy=$(echo "$t1 - $t0" | bc -l)
read_bytes=$(wc -c <"$work/out")
ranges=$(tail -c +$((mark + 1)) "$work/registry.log" | grep -ac "blobs/$layer HTTP/1.1\" 206" || true)
fetched=$(tail -c +$((mark + 1)) "$work/registry.log" | grep -a "blobs/$layer HTTP/1.1\" 206" | awk '{s+=$10} END {print s+0}')
ratio=$(echo "$blob_size / $uncompressed" | bc -l)
needed=$(echo "$read_bytes * $ratio" | bc -l)

# Eager baseline: the whole blob through the same link.
t0=$(date +%s.%N); curl -fs "http://127.0.0.1:$slow/v2/bench/big/blobs/$layer" -o /dev/null; t1=$(date +%s.%N)
eager=$(echo "$t1 - $t0" | bc -l)

printf '| measure | value |\n|---|---|\n'
printf '| layer | %s bytes gzip, %s bytes tar, %s entries |\n' "$blob_size" "$uncompressed" "$entries"
printf '| gzip -dc of the blob (local file) | %.2f s |\n' "$gz"
printf '| curl from the registry piped to gzip -dc | %.2f s |\n' "$curl_gz"
printf '| stratafs index build from the registry (release) | %.2f s (%.2fx gzip -dc, %.2fx curl+gzip -dc) |\n' "$build" "$(echo "$gz / $build" | bc -l)" "$(echo "$curl_gz / $build" | bc -l)"
printf '| layer index JSON | %s bytes, %.0f bytes/entry; published gzip %s bytes (%.0f bytes/entry) |\n' "$index_bytes" "$(echo "$index_bytes / $entries" | bc -l)" "$index_gz" "$(echo "$index_gz / $entries" | bc -l)"
printf '| scattered read: files / bytes read | %s files, %s bytes (compressed about %.0f) |\n' "$picked" "$read_bytes" "$needed"
printf '| range requests (round trips) | %s |\n' "$ranges"
printf '| bytes fetched | %s (%.1f%% of the blob) |\n' "$fetched" "$(echo "100 * $fetched / $blob_size" | bc -l)"
printf '| wall time, cold, RTT +%s ms, %s Mbit/s | %.2f s (one round trip per file would be >= %.1f s) |\n' "$RTT_MS" "$MBIT" "$lazy" "$(echo "$picked * $RTT_MS / 1000" | bc -l)"
printf '| eager download of the blob, same link | %.2f s |\n' "$eager"
