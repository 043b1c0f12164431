# Shared by the bench/ scripts (sourced, not run): timing and statistics helpers, and the
# shaped link — a network namespace reached through a veth pair capped by `tc tbf`, plus
# bench/delayline.py on the host end for the round-trip delay (this kernel has no netem).
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l; }
calc() { echo "$*" | bc -l; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# shaped_link NS NET PORT SLOW MBIT RTT_MS: namespace NS with address NET.2, the host end NET.1;
# a delay line listening on NET.1:SLOW relays to 127.0.0.1:PORT with RTT_MS of round trip;
# both veth ends capped at MBIT. Run clients with `nsenter --net=/run/netns/NS`. Prints the
# delay line's pid (the caller stops it; `ip netns del NS` and `ip link del NSh` undo the rest).
shaped_link() {
  local ns=$1 net=$2 port=$3 slow=$4 mbit=$5 rtt=$6
  ip netns add "$ns"
  ip link add "${ns}h" type veth peer name "${ns}n"
  ip link set "${ns}n" netns "$ns"
  ip addr add "$net.1/24" dev "${ns}h" && ip link set "${ns}h" up
  nsenter --net="/run/netns/$ns" sh -c "ip addr add $net.2/24 dev ${ns}n && ip link set ${ns}n up && ip link set lo up"
  tc qdisc add dev "${ns}h" root tbf rate "${mbit}mbit" burst 256kb latency 50ms
  nsenter --net="/run/netns/$ns" tc qdisc add dev "${ns}n" root tbf rate "${mbit}mbit" burst 256kb latency 50ms
  python3 bench/delayline.py "$net.1:$slow" "$port" "$(calc "$rtt / 2")" >/dev/null 2>&1 &
  echo $!
}

# machine_line: "CPU model, N cores, M GiB, kernel K, FSTYPE on DEVICE" for DIR ($1).
machine_line() {
  printf '%s, %s cores, %s GiB, kernel %s, %s on `%s`' \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" "$(nproc)" "$(free -g | awk '/Mem/ {print $2}')" \
    "$(uname -r)" "$(findmnt -n -o FSTYPE -T "$1")" "$(findmnt -n -o SOURCE -T "$1")"
}

# put_table DOC TABLE SCRIPT TITLE: replaces the block between SCRIPT's markers in DOC with the
# file TABLE, or appends a section TITLE holding it.
put_table() {
  python3 - "$@" <<'PY'
import sys
path, table, script, title = sys.argv[1:5]
doc, table = open(path).read(), open(table).read()
begin, end = f"<!-- {script}: begin -->\n", f"<!-- {script}: end -->\n"
if begin in doc and end in doc:
    doc = doc[: doc.index(begin) + len(begin)] + table + doc[doc.index(end):]
else:
    doc = doc.rstrip("\n") + f"\n\n## {title}\n\n" + begin + table + end
open(path, "w").write(doc)
PY
}
