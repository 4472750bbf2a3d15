#!/usr/bin/env python3
"""Pool the rounds of one or more `benches/load.sh` runs and ask, row by row, whether a proxy's
p99 is longer than nginx's by more than the runs' noise.

    bash benches/load.sh >run1.txt 2>&1; bash benches/load.sh >run2.txt 2>&1
    python3 benches/load/rounds.py run1.txt run2.txt

Each file is what load.sh printed, standard error included: its `[load] ... round N ...` lines,
which it logs there, are what this reads. Within a round the proxies ran back to back, so each
round gives one pair: the other proxy's p99 over nginx's. For each row and each proxy other than nginx (switchyard, and nginx-b when the run
had CONTROL=1), this prints the median of the pairs' ratios, how many rounds the proxy had the
shorter p99, and an exact one-sided Wilcoxon signed-rank test of "its p99 is the longer":
a p-value under 0.05 says the difference is larger than the rounds' noise explains. A larger
one says only that the test cannot tell the difference from the noise: with a dozen rounds it
catches a difference of about 10 %, not reliably one of 5 %. nginx-b is nginx again, so its
line shows what the test says of two proxies that are the same.
"""

import math
import re
import statistics
import sys
from collections import defaultdict

ROUND = re.compile(r"\[load\] (\w+)\s+c=(\d+)\s+round (\d+) (\S+)\s+(\d+) req/s\s+p99\s+([\d.]+) ms")


def signed_rank_p(diffs):
    """P(W+ >= observed) when each difference's sign is a fair coin: the exact one-sided
    Wilcoxon signed-rank test, with average ranks for ties and zeros left out."""
    d = [x for x in diffs if x != 0]
    if not d:
        return 1.0
    order = sorted(range(len(d)), key=lambda i: abs(d[i]))
    ranks = [0.0] * len(d)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    # Ranks are whole or half numbers: count in halves so the sums are integers.
    halves = [round(2 * r) for r in ranks]
    observed = sum(h for h, x in zip(halves, d) if x > 0)
    ways = {0: 1}
    for h in halves:
        nxt = defaultdict(int)
        for total, n in ways.items():
            nxt[total] += n
            nxt[total + h] += n
        ways = nxt
    return sum(n for total, n in ways.items() if total >= observed) / 2 ** len(d)


def main(paths):
    if not paths:
        sys.exit("usage: python3 benches/load/rounds.py LOAD_SH_OUTPUT...")
    p99 = defaultdict(dict)  # (test, conns) -> {(file, round): {proxy: ms}}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = ROUND.search(line)
                if m:
                    test, conns, rnd, proxy, _, ms = m.groups()
                    p99[(test, int(conns))].setdefault((path, int(rnd)), {})[proxy] = float(ms)
    if not p99:
        sys.exit("rounds.py: no round lines found; give it load.sh's output")
    for (test, conns), rounds in sorted(p99.items()):
        # switchyard first, then the control
        others = sorted({p for r in rounds.values() for p in r} - {"nginx"}, key=lambda p: (p != "switchyard", p))
        for other in others:
            # A round where either p99 is missing or 0 (wrk's output unreadable) gives no pair.
            pairs = [(r["nginx"], r[other]) for r in rounds.values() if r.get("nginx", 0) > 0 and r.get(other, 0) > 0]
            if not pairs:
                continue
            ratios = [b / a for a, b in pairs]
            median = statistics.median(ratios)
            # log(b) - log(a), not log(b / a): the same two values in either order must give
            # differences of exactly the same size, which the test then ranks as a tie.
            p = signed_rank_p([round(math.log(b) - math.log(a), 9) for a, b in pairs])
            print(
                f"{test:>2} {conns:>5} conns  {other:<10} p99 over nginx's: median {median:.2f} over {len(ratios)} rounds, "
                f"the shorter in {sum(x < 1 for x in ratios)}; longer? p = {p:.3f}{'  LONGER' if p < 0.05 else ''}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
