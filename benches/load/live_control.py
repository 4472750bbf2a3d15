"""The controller of benches/live.sh: alternates quiet phases with busy ones, in which it sends
a `set-weights` every 10 ms on the admin socket, while wrk keeps the proxy saturated. At each
phase's edges it reads the origin's request count (nginx stub_status) and the proxy's CPU
time (schedstat of every thread, in ns), so that each phase yields requests/s and CPU per
request. Phases come in pairs, quiet-busy then busy-quiet (ABBA), so that a steady drift of
the machine cancels out; a short unmeasured gap after each phase keeps one phase's after-
effects (a coalesced state write) out of the next.

    live_control.py SOCKET STATUS_URL PID ORIGIN_PIDS PAIRS PHASE_S GAP_S MODE OUT_JSON
    live_control.py idle SOCKET PID SECONDS MODE

The second form sends changes with no HTTP traffic and prints the proxy's CPU per change,
in all and in its control thread (µs).

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
    """Sends the changes, alternating two splits so that each one is a real change."""

    def __init__(self, path, kept):
        self.path, self.kept, self.conn, self.sent = path, kept, None, 0

    def change(self):
        if self.conn is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(self.path)
            self.conn = (sock, sock.makefile("rb"))
        sock, reader = self.conn
        sock.sendall(SPLITS[self.sent % 2])
        self.sent += 1
        answer = reader.readline()
        if not self.kept:
            self.close()
        if b'"ok":true' not in answer or b'"unchanged"' in answer:
            sys.exit(f"live_control: set-weights not carried out: {answer!r}")

    def restore(self):
        """Leaves the route on the split the next run starts from (its first change is
        SPLITS[0]), outside any measurement: a run that sent an odd number of changes
        would otherwise make the next run's first change no change at all."""
        if self.sent % 2:
            self.change()
        self.close()

    def close(self):
        """Closes the connection; the next change opens one. A kept connection is closed
        after each busy phase: the socket cuts clients silent for 10 s."""
        if self.conn is not None:
            sock, reader = self.conn
            reader.close()
            sock.close()
            self.conn = None


def phase(busy, seconds, admin, url, pid, origin):
    r0, (c0, k0), (o0, _) = origin_requests(url), cpu_ns([pid]), cpu_ns(origin)
    t0 = time.monotonic()
    end, tick, changes = t0 + seconds, t0, 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if busy and now >= tick:
            admin.change()
            changes += 1
            tick += INTERVAL
        time.sleep(max(0.0, min(end, tick if busy else end) - time.monotonic()))
    t1 = time.monotonic()
    admin.close()
    (c1, k1), (o1, _), r1 = cpu_ns([pid]), cpu_ns(origin), origin_requests(url)
    # minus one: the status request that closed the phase counted itself
    return {"busy": busy, "seconds": t1 - t0, "requests": r1 - r0 - 1, "cpu_ns": c1 - c0, "origin_ns": o1 - o0,
            "control_ns": k1 - k0, "changes": changes}


def idle(path, pid, seconds, mode):
    """The proxy's CPU per change with no other traffic: what one change costs it."""
    admin = Admin(path, mode == "kept")
    (c0, k0), t0, changes = cpu_ns([pid]), time.monotonic(), 0
    while time.monotonic() < t0 + seconds:
        admin.change()
        changes += 1
        time.sleep(max(0.0, t0 + changes * INTERVAL - time.monotonic()))
    c1, k1 = cpu_ns([pid])
    admin.restore()
    print(f"{(c1 - c0) / changes / 1000:.0f} {(k1 - k0) / changes / 1000:.0f}")


def main():
    idle_run = sys.argv[1] == "idle"
    mode = sys.argv[5] if idle_run else sys.argv[8]
    if mode not in ("new", "kept"):
        sys.exit(f"live_control: unknown mode {mode!r}: new or kept")
    if idle_run:
        path, pid, seconds = sys.argv[2:5]
        return idle(path, pid, float(seconds), mode)
    path, url, pid, origin, pairs, seconds, gap, mode, out = sys.argv[1:10]
    origin = origin.split(",")
    pairs, seconds, gap = int(pairs), float(seconds), float(gap)
    if pairs < 2 or pairs % 2:
        sys.exit("live_control: PAIRS must be even and at least 2 (ABBA: drift cancels over two pairs)")
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
    admin.restore()
    with open(out, "w") as f:
        json.dump(phases, f)
    print(summary(mode, phases))


def spread(values):
    """Median and quartiles of busy/quiet ratios, as percentages of change."""
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    pct = lambda r: f"{(r - 1) * 100:+.1f} %"
    return f"{pct(median)} ({pct(low)} to {pct(high)})"


def summary(mode, phases):
    """One markdown row: totals per kind of phase, then the median and quartiles of each
    pair's busy/quiet ratio."""
    if any(p["requests"] <= 0 or p["origin_ns"] <= 0 for p in phases):
        sys.exit("live_control: a phase saw no request or no origin CPU time; did wrk stop?")
    kinds = {busy: [p for p in phases if p["busy"] == busy] for busy in (False, True)}
    total = lambda busy, key: sum(p[key] for p in kinds[busy])
    rate = lambda p: p["requests"] / p["seconds"]
    # The proxy's CPU over the origin's in the same phase: the machine's speed cancels out.
    cpu = lambda p: p["cpu_ns"] / p["origin_ns"]
    # The same, for the threads that serve requests alone (the control thread left out).
    hot = lambda p: (p["cpu_ns"] - p["control_ns"]) / p["origin_ns"]
    pairs = [{p["busy"]: p for p in phases[i:i + 2]} for i in range(0, len(phases) - 1, 2)]
    ratios = lambda f: spread([f(pair[True]) / f(pair[False]) for pair in pairs])
    changes = total(True, "changes")
    how = "a new connection per change" if mode == "new" else "one connection kept open"
    return (f"| {how} | {len(pairs)} "
            f"| {total(False, 'requests') / total(False, 'seconds'):.0f} → {total(True, 'requests') / total(True, 'seconds'):.0f} "
            f"| {ratios(rate)} "
            f"| {total(False, 'cpu_ns') / total(False, 'origin_ns'):.2f} → {total(True, 'cpu_ns') / total(True, 'origin_ns'):.2f} "
            f"| {ratios(cpu)} | {ratios(hot)} "
            f"| {changes / total(True, 'seconds'):.0f} | {total(True, 'control_ns') / max(changes, 1) / 1000:.0f} µs |")


if __name__ == "__main__":
    main()
