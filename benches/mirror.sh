#!/usr/bin/env bash
# What mirroring costs the hot path: switchyard in front of an nginx origin, with its routes
# mirroring 0 %, 10 % and 100 % of their requests (compared) to a fast shadow (a second
# nginx), the three alternating for several rounds. Prints medians.
#
#   bash benches/mirror.sh            # DURATION=10 s per trial, ROUNDS=3, 50 connections
#   bash benches/mirror.sh --quick    # smoke test: DURATION=2, ROUNDS=1
#
# Environment (all optional): DURATION, ROUNDS, CONNS=50, WARMUP=1, WRK_THREADS=1,
# PROXY_CPU=0 (switchyard, origin and shadow), WRK_CPU=1, SKIP_BUILD=1.
#
# "proxy CPU/req ÷ origin CPU/req" is switchyard's CPU time over the origin's in the same
# trial (see load.sh); the shadow's own CPU time is not in either. Everything listens on
# and talks to 127.0.0.1 only; every process and file is removed at exit.
set -euo pipefail

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "mirror.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done
if ((QUICK)); then
    DURATION=${DURATION:-2}
    ROUNDS=${ROUNDS:-1}
    WARMUP=${WARMUP:-0}
fi
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-50}
WARMUP=${WARMUP:-1}
WRK_THREADS=${WRK_THREADS:-1}
PROXY_CPU=${PROXY_CPU:-0}
WRK_CPU=${WRK_CPU:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
LOG_TAG=mirror
PERCENTS=(0 10 100)

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

ORIGIN_PORT=$(free_port)
SHADOW_PORT=$(free_port)
SY_PORT=$(free_port)
mkdir -p "$TMP/www"

start_nginx origin "$TEMPLATES/origin.nginx.conf" "ORIGIN_PORT=$ORIGIN_PORT"
ORIGIN_PID=$STARTED_PID
wait_port "$ORIGIN_PORT" "$ORIGIN_PID" "$TMP/origin-error.log"
set_group "$ORIGIN_PID" 1
start_nginx shadow "$TEMPLATES/origin.nginx.conf" "ORIGIN_PORT=$SHADOW_PORT"
SHADOW_PID=$STARTED_PID
wait_port "$SHADOW_PORT" "$SHADOW_PID" "$TMP/shadow-error.log"
set_group "$SHADOW_PID" 1
start_switchyard switchyard "$SY_PORT" "$ORIGIN_PORT" "$TEMPLATES/switchyard-mirror.toml" "SHADOW_PORT=$SHADOW_PORT"
SY_PID=$STARTED_PID
wait_port "$SY_PORT" "$SY_PID" "$TMP/switchyard.log"
URL="http://127.0.0.1:$SY_PORT/2b"
log "switchyard :$SY_PORT in front of origin :$ORIGIN_PORT, mirroring to shadow :$SHADOW_PORT; DURATION=${DURATION}s ROUNDS=$ROUNDS CONNS=$CONNS"

declare -A RPS P99 CPUR ERRS
for pct in "${PERCENTS[@]}"; do
    ((WARMUP > 0)) && run_wrk "$TMP/warmup.txt" "$CONNS" "$WARMUP" "$URL" -H "Host: m$pct"
done
for ((r = 1; r <= ROUNDS; r++)); do
    for pct in "${PERCENTS[@]}"; do
        out="$TMP/wrk-$pct-$r.txt"
        p0=$(cpu_ticks "$SY_PID")
        o0=$(cpu_ticks "$ORIGIN_PID")
        run_wrk "$out" "$CONNS" "$DURATION" "$URL" -H "Host: m$pct"
        p1=$(cpu_ticks "$SY_PID")
        o1=$(cpu_ticks "$ORIGIN_PID")
        kill -0 "$SY_PID" 2>/dev/null || die "switchyard died during round $r at $pct %"
        rps=$(wrk_rps "$out")
        p99=$(wrk_p99_ms "$out")
        cr=$(ratio "$((p1 - p0))" "$((o1 - o0))")
        errs=$(wrk_errors "$out")
        RPS[$pct]+="$rps "
        P99[$pct]+="$p99 "
        [[ $cr != n/a ]] && CPUR[$pct]+="$cr "
        [[ -n $errs ]] && ERRS[$pct]+="round $r: $errs"
        log "$(printf 'round %d mirror %3s %%  %10.0f req/s  p99 %7.2f ms  cpu ratio %s%s' \
            "$r" "$pct" "$rps" "$p99" "$cr" "${errs:+  ERRORS: $errs}")"
    done
done

report_of() { # report_of ROUTE: the mirror-report's counts, in one line
    "$SWITCHYARD" ctl --json --socket "$TMP/switchyard.sock" mirror-report "$1" | python3 -c '
import json, sys
r = json.load(sys.stdin)
c = {k: v for k, v in r["counts"].items() if v}
print(r["sampled"], "sampled:", ", ".join(f"{k} {v}" for k, v in c.items()) or "none")'
}

# shellcheck disable=SC2086
base=$(median ${RPS[0]})
echo
echo "## Mirroring's cost on the hot path"
echo
echo "switchyard (\`worker_threads = 1\`), the origin and the shadow (nginx, fixed 2-byte body) pinned to"
echo "CPU $PROXY_CPU; wrk ($CONNS connections, $WRK_THREADS thread) on CPU $WRK_CPU. Medians of $ROUNDS round(s) of ${DURATION} s,"
echo "the three alternating. Copies are compared (\`compare = true\`)."
echo
echo "| mirrored | req/s | vs 0 % | p99 | proxy CPU/req ÷ origin CPU/req | copies |"
echo "|---:|---:|---:|---:|---:|---|"
for pct in "${PERCENTS[@]}"; do
    # shellcheck disable=SC2086
    {
        rps=$(median ${RPS[$pct]})
        p99=$(median ${P99[$pct]})
        cpu=$(median ${CPUR[$pct]:-})
    }
    printf '| %s %% | %s | %s | %s ms | %s | %s |\n' "$pct" "$(fmt "$rps" '%.0f')" "$(ratio "$rps" "$base")" \
        "$(fmt "$p99" '%.2f')" "$(fmt "$cpu" '%.2f')" "$(report_of "m$pct")"
done
for pct in "${PERCENTS[@]}"; do
    [[ -n ${ERRS[$pct]:-} ]] && echo "- **errors at $pct %**: ${ERRS[$pct]}"
done
if [[ -s $TMP/switchyard.log ]]; then
    echo "- switchyard logged (RUST_LOG=warn):"
    head -20 "$TMP/switchyard.log" | sed 's/^/    /'
fi
