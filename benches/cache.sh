#!/usr/bin/env bash
# Instructions and cache misses per proxied request: switchyard vs nginx, counted by
# valgrind's cachegrind under wrk load, in front of the same origin as benches/load.sh.
#
#   bash benches/cache.sh
#
# load.sh measures time, which on a shared 2-core virtual machine moves by ±10 % between runs.
# This measures what the proxy's own code does per request, which barely moves: user-space
# instructions, and misses in a simulation of this CPU's caches (one core's L1i, L1d and L2,
# read from /sys; the last level, L3, is shared and not simulated). It cannot see the kernel,
# where both proxies spend most of their time, nor what a miss costs on the real CPU.
#
# Environment (all optional):
#   CONNS="50 1000"    client connection counts
#   DURATION=8         seconds of wrk per proxy and connection count (a proxy serves 10 to 15
#                      times fewer requests under valgrind: 8 s is 20,000 to 30,000 here)
#   PROXY_CPU=0        CPU for the proxies and the origin;  WRK_CPU=1  CPU for wrk
#   SKIP_BUILD=1       use the existing target/release/switchyard
#   SWITCHYARD=PATH    measure this switchyard binary instead
#
# The counts cover the proxy's whole run: start-up and idle add about 1.3 % to nginx's
# per-request figures (its config parse) and under 0.3 % to switchyard's.
#
# Everything listens on and talks to 127.0.0.1 only. Temporary files live in one mktemp -d
# directory, removed at exit together with every process this script started.
set -euo pipefail

case "${1:-}" in
    "") ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "cache.sh: unknown argument: $1" >&2; exit 2 ;;
esac

CONNS=${CONNS:-50 1000}
DURATION=${DURATION:-8}
PROXY_CPU=${PROXY_CPU:-0}
WRK_CPU=${WRK_CPU:-1}
WRK_THREADS=1
SKIP_BUILD=${SKIP_BUILD:-0}
LOG_TAG=cache

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

if ! command -v valgrind >/dev/null 2>&1; then
    log "installing valgrind"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq valgrind >/dev/null
fi

# cache_geometry LEVEL TYPE: "size,ways,line" of CPU 0's cache, for valgrind's --I1/--D1/--LL
cache_geometry() {
    local d
    for d in /sys/devices/system/cpu/cpu0/cache/index*; do
        [[ $(cat "$d/level" 2>/dev/null) == "$1" && $(cat "$d/type" 2>/dev/null) == "$2" ]] || continue
        local size
        size=$(cat "$d/size")
        case "$size" in *K) size=$((${size%K} * 1024)) ;; *M) size=$((${size%M} * 1024 * 1024)) ;; esac
        echo "$size,$(cat "$d/ways_of_associativity"),$(cat "$d/coherency_line_size")"
        return 0
    done
}
SIM=()
I1=$(cache_geometry 1 Instruction)
D1=$(cache_geometry 1 Data)
L2=$(cache_geometry 2 Unified)
if [[ -n $I1 && -n $D1 && -n $L2 ]]; then
    SIM=("--I1=$I1" "--D1=$D1" "--LL=$L2")
    log "simulated caches (size,ways,line): L1i $I1, L1d $D1, L2 $L2"
else
    log "cache sizes not readable from /sys; valgrind picks its own (its LL is then the last level)"
fi

ORIGIN_PORT=$(free_port)
start_nginx origin "$TEMPLATES/origin.nginx.conf" "ORIGIN_PORT=$ORIGIN_PORT"
wait_port "$ORIGIN_PORT" "$STARTED_PID" "$TMP/origin-error.log"
check_body origin "http://127.0.0.1:$ORIGIN_PORT/2b" 2
# Each proxy is one process that serves, as the worker of load.sh's nginx is.
NGINX_GLOBALS="daemon off; master_process off;"

# finish PID OUT: stops the proxy, waiting up to 60 s for cachegrind to write OUT
finish() {
    stop_started "$1" 60
    [[ -s $2 ]] || die "cachegrind wrote no counts to $2"
}

# per_request OUT REQUESTS: "Ir I1mr D1mr+D1mw ILmr+DLmr+DLmw", each per request (LL is the simulated L2)
per_request() {
    awk -v n="$2" '
        /^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
        /^summary:/ {
            printf "%.0f %.0f %.0f %.0f\n", $col["Ir"] / n, $col["I1mr"] / n,
                ($col["D1mr"] + $col["D1mw"]) / n, ($col["ILmr"] + $col["DLmr"] + $col["DLmw"]) / n
        }' "$1"
}

declare -A RESULT
for c in $CONNS; do
    for p in nginx switchyard; do
        port=$(free_port)
        out="$TMP/$p-$c.cachegrind"
        WRAP=(valgrind --tool=cachegrind --cache-sim=yes "${SIM[@]}" --cachegrind-out-file="$out")
        if [[ $p == nginx ]]; then
            start_nginx "nginx-proxy-$c" "$TEMPLATES/proxy.nginx.conf" "PORT=$port" "UPSTREAM_PORT=$ORIGIN_PORT"
            logfile="$TMP/nginx-proxy-$c.out"
        else
            start_switchyard "switchyard-$c" "$port" "$ORIGIN_PORT"
            logfile="$TMP/switchyard-$c.log"
        fi
        WRAP=()
        pid=$STARTED_PID
        wait_port "$port" "$pid" "$logfile"
        log "$p, $c connections: ${DURATION} s of wrk under cachegrind"
        run_wrk "$TMP/wrk-$p-$c.txt" "$c" "$DURATION" "http://127.0.0.1:$port/2b" --timeout 30s
        requests=$(wrk_requests "$TMP/wrk-$p-$c.txt")
        errors=$(wrk_errors "$TMP/wrk-$p-$c.txt")
        [[ -z $errors ]] || log "warning: $p, $c connections: $errors"
        finish "$pid" "$out"
        RESULT[$p/$c]="$requests $(per_request "$out" "$requests")"
    done
done

echo
echo "## Per proxied request (2-byte body), user space only, by cachegrind"
echo
echo "Simulated caches: L1i ${I1:-auto}, L1d ${D1:-auto}, L2 ${L2:-auto} (size in bytes, ways, line)."
echo
echo "| connections | proxy | requests | instructions | L1i misses | L1d misses | L2 misses |"
echo "|---:|---|---:|---:|---:|---:|---:|"
for c in $CONNS; do
    for p in nginx switchyard; do
        # shellcheck disable=SC2086
        set -- ${RESULT[$p/$c]}
        printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$c" "$p" "$1" "$2" "$3" "$4" "$5"
    done
    # shellcheck disable=SC2086
    {
        set -- ${RESULT[nginx/$c]}
        n=("$2" "$3" "$4" "$5")
        set -- ${RESULT[switchyard/$c]}
        s=("$2" "$3" "$4" "$5")
    }
    printf '| %s | switchyard ÷ nginx | | %s | %s | %s | %s |\n' "$c" \
        "$(ratio "${s[0]}" "${n[0]}")" "$(ratio "${s[1]}" "${n[1]}")" "$(ratio "${s[2]}" "${n[2]}")" \
        "$(ratio "${s[3]}" "${n[3]}")"
done
