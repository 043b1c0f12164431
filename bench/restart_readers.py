"""Readers and a killer for bench/restart.sh.

Usage: restart_readers.py MNT READERS KILLS STRATAFS ROOT; prints a JSON summary.
Each reader reads random files under MNT whole (pages dropped first), checking each against
the bytes read before the first kill; the main thread kills the serving process KILLS times.
"""
import json, os, random, subprocess, sys, threading, time

mnt, readers, kills, stratafs, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]


def read(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


files = []
for d, _, names in os.walk(mnt):
    files += [os.path.join(d, n) for n in names if os.path.isfile(os.path.join(d, n))]
want = {f: read(f) for f in files}
stop = threading.Event()
log, failures, wrong = [], [], []  # (start, end) of every read; errors; mismatches
lock = threading.Lock()


def reader(seed):
    rng = random.Random(seed)
    while not stop.is_set():
        f = rng.choice(files)
        t0 = time.monotonic()
        try:
            data = read(f)
        except OSError as e:
            with lock:
                failures.append(f"{f}: {e}")
            continue
        t1 = time.monotonic()
        with lock:
            log.append((t0, t1))
            if data != want[f]:
                wrong.append(f)


def serving():
    out = subprocess.run([stratafs, "--root", root, "cache", "stats", "--json"], capture_output=True, check=True)
    for m in json.loads(out.stdout)["mounts"]:
        if m["mountpoint"] == mnt:
            return m["pid"]
    return None


threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
for t in threads:
    t.start()
time.sleep(1)
killed = []
pid = serving()
for _ in range(kills):
    t = time.monotonic()
    os.kill(pid, 9)
    killed.append(t)
    deadline = t + 30
    while True:
        new = serving()
        if new and new != pid and os.path.exists(f"/proc/{new}"):
            break
        if time.monotonic() > deadline:
            stop.set()
            sys.exit(f"no new serving process 30 s after killing {pid} (kill {len(killed)})")
        time.sleep(0.005)
    pid = new
    # The next kill once the new server answered reads (and a little work happened).
    while True:
        with lock:
            served = sum(1 for s, e in log if s > t)
        if served >= 20:
            break
        time.sleep(0.005)
    time.sleep(random.uniform(0.02, 0.1))
stop.set()
for t in threads:
    t.join()


def stats(xs):
    xs = sorted(xs)
    if not xs:
        return {"median": 0, "p90": 0, "max": 0}
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {"median": round(pick(0.5), 1), "p90": round(pick(0.9), 1), "max": round(xs[-1], 1)}


gaps, waited, waited_ms = [], [], []
for k in killed:
    after = [e for s, e in log if s > k]
    gaps.append((min(after) - k) * 1000)
    inflight = [(s, e) for s, e in log if s < k < e]
    waited.append(len(inflight))
    waited_ms += [(e - k) * 1000 for s, e in inflight]
print(json.dumps({
    "kills": len(killed), "reads": len(log), "failed": len(failures), "wrong": len(wrong),
    "failures": failures[:10], "gap_ms": stats(gaps), "waited": stats(waited), "waited_ms": stats(waited_ms),
}))
