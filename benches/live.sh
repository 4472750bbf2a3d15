#!/usr/bin/env bash
# What live changes cost the hot path: switchyard's requests/s and CPU per request with a
# `set-weights` every 10 ms, against none (issue 3's target: within 3 %).
#
#   bash benches/live.sh            # PAIRS=20 pairs of 1-s phases, for each way of sending
#   bash benches/live.sh --quick    # smoke test: PAIRS=2, PHASE=0.5
#
# Set-up as in load.sh: switchyard (one worker thread) and an nginx origin pinned to
# PROXY_CPU, wrk pinned to WRK_CPU with CONNS connections. The route's split is between two
# backends on the same origin. wrk keeps the proxy saturated for the whole run, while
# benches/load/live_control.py, on WRK_CPU too, alternates quiet and busy phases (ABBA) and
# sends the changes in the busy ones, on a new connection each (as `switchyard ctl` does) and
# then on one connection kept open. Requests are counted at the origin, and the CPU time of
# the proxy and of the origin is read from schedstat (ns, every thread) at each phase's edges.
#
# Environment (all optional): PAIRS=20, PHASE=1 (seconds), GAP=0.2 (unmeasured seconds
# after each phase), CONNS=50, MODES="new kept", PROXY_CPU=0, WRK_CPU=1, CONTROL_CPU (the
# controller's; WRK_CPU by default), SKIP_BUILD=1, SWITCHYARD=PATH.
#
# Before the load, each way is also measured alone: 3 s of changes with no other traffic
# give the proxy's CPU per change.
#
# Everything listens on and talks to 127.0.0.1 only; every process and file is removed at exit.
set -euo pipefail

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "live.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done
if ((QUICK)); then
    PAIRS=${PAIRS:-2}
    PHASE=${PHASE:-0.5}
fi
PAIRS=${PAIRS:-20}
((PAIRS >= 2 && PAIRS % 2 == 0)) || { echo "live.sh: PAIRS must be even and at least 2" >&2; exit 2; }
PHASE=${PHASE:-1}
GAP=${GAP:-0.2}
CONNS=${CONNS:-50}
MODES=${MODES:-new kept}
for mode in $MODES; do
    [[ $mode == new || $mode == kept ]] || { echo "live.sh: unknown mode $mode in MODES (new, kept)" >&2; exit 2; }
done
WRK_THREADS=1
PROXY_CPU=${PROXY_CPU:-0}
WRK_CPU=${WRK_CPU:-1}
CONTROL_CPU=${CONTROL_CPU:-$WRK_CPU}
SKIP_BUILD=${SKIP_BUILD:-0}
LOG_TAG=live

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

ORIGIN_PORT=$(free_port)
SY_PORT=$(free_port)
start_nginx origin "$TEMPLATES/origin.nginx.conf" "ORIGIN_PORT=$ORIGIN_PORT"
ORIGIN_PID=$STARTED_PID
wait_port "$ORIGIN_PORT" "$ORIGIN_PID" "$TMP/origin-error.log"
set_group "$ORIGIN_PID" 1
start_switchyard switchyard "$SY_PORT" "$ORIGIN_PORT" "$TEMPLATES/switchyard-live.toml"
SY_PID=$STARTED_PID
wait_port "$SY_PORT" "$SY_PID" "$TMP/switchyard.log"
check_body switchyard "http://127.0.0.1:$SY_PORT/2b" 2
log "origin :$ORIGIN_PORT, switchyard :$SY_PORT; $PAIRS pairs of ${PHASE}-s phases per way, $CONNS connections"

# Seconds the controller runs: the phases, their gaps, and a margin for its own start.
span=$(awk -v p="$PAIRS" -v s="$PHASE" -v g="$GAP" 'BEGIN { printf "%d", 2 * p * (s + g) + 3 }')
ROWS=()
declare -A IDLE
for mode in $MODES; do
    IDLE[$mode]=$(taskset -c "$CONTROL_CPU" python3 "$TEMPLATES/live_control.py" idle "$TMP/switchyard.sock" "$SY_PID" 3 "$mode") ||
        die "the controller failed (idle, $mode)"
    log "$mode, no other traffic: the proxy's CPU per change (all, control thread) in µs: ${IDLE[$mode]}"
    out="$TMP/wrk-$mode.txt"
    # wrk outlasts the controller; one unmeasured second first fills the connection pools.
    # (taskset execs wrk, so the PID is wrk's own, and cleanup stops it if the run fails.)
    taskset -c "$WRK_CPU" wrk -t 1 -c "$CONNS" -d "$((span + 2))s" "http://127.0.0.1:$SY_PORT/2b" >"$out" 2>&1 &
    wrk_pid=$!
    PIDS+=("$wrk_pid")
    sleep 1
    row=$(taskset -c "$CONTROL_CPU" python3 "$TEMPLATES/live_control.py" "$TMP/switchyard.sock" \
        "http://127.0.0.1:$ORIGIN_PORT/status" "$SY_PID" "$(pids_of "$ORIGIN_PID" | tr ' ' ,)" "$PAIRS" "$PHASE" "$GAP" "$mode" "$TMP/phases-$mode.json") ||
        die "the controller failed ($mode)"
    wait "$wrk_pid" || { cat "$out" >&2; die "wrk failed ($mode)"; }
    kill -0 "$SY_PID" 2>/dev/null || die "switchyard died ($mode)"
    errs=$(wrk_errors "$out")
    [[ -z $errs ]] || die "failed requests while the split changed ($mode): $errs"
    log "$mode: $row"
    ROWS+=("$row")
done

echo
echo "## requests/s and CPU per request with a set-weights every 10 ms, against none"
echo
echo "switchyard (worker_threads = 1) and its nginx origin on CPU $PROXY_CPU; wrk ($CONNS connections) and the"
echo "controller on CPU $CONTROL_CPU. Busy and quiet ${PHASE}-s phases alternate (ABBA): totals per kind of phase, and the"
echo "median (quartiles) of each pair's busy/quiet ratio. The proxy's CPU is over the origin's in the same phase, which"
echo "cancels the machine's own changes of speed. wrk saw no failed request."
echo
echo "| changes sent on | pairs | req/s, quiet → busy | req/s change | proxy CPU ÷ origin CPU, quiet → busy | its change | its change, control thread left out | changes/s | control thread per change |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
for mode in $MODES; do
    read -r all control <<<"${IDLE[$mode]}"
    echo "- With no other traffic, a change ($mode connection) cost the proxy $all µs of CPU, $control µs of it on the control thread."
done
