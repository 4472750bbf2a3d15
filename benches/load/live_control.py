"""The controller of benches/live.sh: alternates quiet phases with busy ones, in which it sends
a `set-weights` every 10 ms on the admin socket, while wrk keeps the proxy saturated. At each
phase's edges it reads the origin's request count (nginx stub_status) and the proxy's CPU
time (schedstat of every thread, in ns), so that each phase yields requests/s and CPU per
request. Phases come in pairs, quiet-busy then busy-quiet (ABBA), so that a steady drift of
the machine cancels out; a short unmeasured gap after each phase keeps one phase's after-
effects (a coalesced state write) out of the next.

    live_control.py SOCKET STATUS_URL PID PAIRS PHASE_S GAP_S MODE OUT_JSON

MODE is "new" (a new connection per command, as `switchyard ctl` makes) or "kept" (one
connection for every command). Writes the per-phase figures to OUT_JSON and prints a
summary row of the markdown table benches/live.sh prints.
"""

import glob
import json
import socket
import statistics
import sys
import time
import urllib.request

INTERVAL = 0.010
SPLITS = (b"set-weights bench a=60 b=40\n", b"set-weights bench a=50 b=50\n")


def origin_requests(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        # "Active connections: N" / "server accepts handled requests" / " A H R" / ...
        return int(r.read().decode().splitlines()[2].split()[2])


def cpu_ns(pids):
    """CPU time of every thread of PIDS: (all, the control thread's), in ns."""
    total = control = 0
    for task in (t for pid in pids for t in glob.glob(f"/proc/{pid}/task/*")):
        try:
            with open(f"{task}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"{task}/comm") as f:
                name = f.read().strip()
        except OSError:  # a thread that ended between the listing and the read
            continue
        total += ns
        if name.startswith("switchyard-cont"):
            control += ns
    return total, control


class Admin:
    def __init__(self, path, kept):
        self.path, self.kept, self.conn = path, kept, None

    def send(self, line):
        if self.conn is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(self.path)
            self.conn = (sock, sock.makefile("rb"))
        sock, reader = self.conn
        sock.sendall(line)
        answer = reader.readline()
        if not self.kept:
            reader.close()
            sock.close()
            self.conn = None
        if b'"ok":true' not in answer:
            sys.exit(f"live_control: set-weights refused: {answer!r}")


def phase(busy, seconds, admin, url, pid, origin):
    r0, (c0, k0), (o0, _) = origin_requests(url), cpu_ns([pid]), cpu_ns(origin)
    t0 = time.monotonic()
    end, tick, changes = t0 + seconds, t0, 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if busy and now >= tick:
            admin.send(SPLITS[changes % 2])
            changes += 1
            tick += INTERVAL
        time.sleep(max(0.0, min(end, tick if busy else end) - time.monotonic()))
    t1 = time.monotonic()
    (c1, k1), (o1, _), r1 = cpu_ns([pid]), cpu_ns(origin), origin_requests(url)
    # minus one: the status request that opened the phase is counted in r1
    return {"busy": busy, "seconds": t1 - t0, "requests": r1 - r0 - 1, "cpu_ns": c1 - c0, "origin_ns": o1 - o0,
            "control_ns": k1 - k0, "changes": changes}


def main():
    path, url, pid, origin, pairs, seconds, gap, mode, out = sys.argv[1:10]
    origin = origin.split(",")
    pairs, seconds, gap = int(pairs), float(seconds), float(gap)
    admin = Admin(path, mode == "kept")
    phases = []
    for p in range(pairs):
        for busy in ((False, True) if p % 2 == 0 else (True, False)):
            phases.append(phase(busy, seconds, admin, url, pid, origin))
            last = phases[-1]
            print(f"[live] {mode} pair {p + 1} {'busy ' if busy else 'quiet'}: "
                  f"{last['requests'] / last['seconds']:8.0f} req/s {last['cpu_ns'] / max(last['requests'], 1) / 1000:6.2f} µs/req "
                  f"{last['cpu_ns'] / max(last['origin_ns'], 1):5.2f} x origin's CPU",
                  file=sys.stderr)
            time.sleep(gap)
    with open(out, "w") as f:
        json.dump(phases, f)
    print(summary(mode, phases))


def quartiles(values):
    v = sorted(values)
    return v[len(v) // 4], statistics.median(v), v[(3 * len(v)) // 4]


def summary(mode, phases):
    """One markdown row: totals per kind of phase, and the pairs' ratios (busy over quiet)."""
    kinds = {busy: [p for p in phases if p["busy"] == busy] for busy in (False, True)}
    rate = {k: sum(p["requests"] for p in v) / sum(p["seconds"] for p in v) for k, v in kinds.items()}
    cpu = {k: sum(p["cpu_ns"] for p in v) / sum(p["requests"] for p in v) for k, v in kinds.items()}
    pairs = [phases[i:i + 2] for i in range(0, len(phases) - 1, 2)]
    by_kind = [{p["busy"]: p for p in pair} for pair in pairs]
    rps_ratios = [(b[True]["requests"] / b[True]["seconds"]) / (b[False]["requests"] / b[False]["seconds"]) for b in by_kind]
    cpu_ratios = [(b[True]["cpu_ns"] / b[True]["requests"]) / (b[False]["cpu_ns"] / b[False]["requests"]) for b in by_kind]
    # The proxy's CPU over the origin's in the same phase: the machine's speed cancels out.
    norm = {k: sum(p["cpu_ns"] for p in v) / sum(p["origin_ns"] for p in v) for k, v in kinds.items()}
    norm_ratios = [(b[True]["cpu_ns"] / b[True]["origin_ns"]) / (b[False]["cpu_ns"] / b[False]["origin_ns"]) for b in by_kind]
    changes = sum(p["changes"] for p in kinds[True])
    per_change_us = sum(p["control_ns"] for p in kinds[True]) / max(changes, 1) / 1000
    pct = lambda r: f"{(r - 1) * 100:+.1f} %"
    rq, rm, r3 = quartiles(rps_ratios)
    cq, cm, c3 = quartiles(cpu_ratios)
    nq, nm, n3 = quartiles(norm_ratios)
    how = "a new connection per change" if mode == "new" else "one connection kept open"
    return (f"| {how} | {len(pairs)} | {rate[False]:.0f} | {rate[True]:.0f} | {pct(rm)} ({pct(rq)} to {pct(r3)}) "
            f"| {cpu[False] / 1000:.2f} µs | {cpu[True] / 1000:.2f} µs | {pct(cm)} ({pct(cq)} to {pct(c3)}) "
            f"| {norm[False]:.2f} | {norm[True]:.2f} | {pct(nm)} ({pct(nq)} to {pct(n3)}) "
            f"| {changes / sum(p['seconds'] for p in kinds[True]):.0f} | {per_change_us:.0f} µs |")


if __name__ == "__main__":
    main()
