#!/usr/bin/env bash
# Load comparison: switchyard vs nginx as reverse proxies in front of the same origin.
#
#   bash benches/load.sh            # full run: DURATION=10 s per trial, ROUNDS=6, 50 and 1000 connections
#   bash benches/load.sh --quick    # smoke test: DURATION=2, ROUNDS=1, 50 connections, tiny long-poll test
#
# Environment (all optional):
#   DURATION=10        seconds per wrk trial
#   ROUNDS=6           rounds; each round runs every proxy once per test, and the next round
#                      starts one proxy further on, so with a multiple of the number of proxies
#                      (2, or 3 with CONTROL=1) each runs in each place equally often
#   CONNS="50 1000"    client connection counts
#   WARMUP=1           seconds of unmeasured wrk before each test on each proxy (0 = none)
#   WRK_THREADS=1      wrk threads (wrk is pinned to one CPU, so 1 is the efficient choice)
#   LP_CONNS=1000      concurrent long-polls in the memory test
#   LP_DURATION=5      seconds the long-poll test runs
#   LP_DELAY=1         seconds the long-poll origin holds each request
#   PROXY_CPU=0        CPU for the proxies and origins;  WRK_CPU=1  CPU for wrk
#   SKIP_BUILD=1       use the existing target/release/switchyard
#   SWITCHYARD=PATH    measure this switchyard binary instead (another build, to compare two)
#   CONTROL=1          also run a second nginx proxy, identical to the first, in every round, and
#                      print how far nginx's own figures move against themselves: the noise floor
#                      of every ratio in the table. The run takes half as long again.
#
# To pool the rounds of several runs and test each row's p99, keep each run's output with its
# standard error (the rounds are logged there) and give the files to benches/load/rounds.py.
#
# Everything listens on and talks to 127.0.0.1 only. All temporary files live in one
# mktemp -d directory, removed at exit together with every process this script started.
#
# The key figure is "proxy CPU/req ÷ origin CPU/req": the proxy's CPU time (utime+stime of
# all its processes, from /proc/PID/stat) over the origin's CPU time in the same trial. The
# request count cancels, and the origin (nginx returning a fixed body) is the yardstick, so
# the figure is fairly robust against the machine being busy with other work.
set -euo pipefail

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h | --help) sed -n '2,34p' "$0"; exit 0 ;;
        *) echo "load.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

if ((QUICK)); then
    DURATION=${DURATION:-2}
    ROUNDS=${ROUNDS:-1}
    CONNS=${CONNS:-50}
    WARMUP=${WARMUP:-0}
    LP_CONNS=${LP_CONNS:-50}
    LP_DURATION=${LP_DURATION:-2}
fi
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-6}
CONNS=${CONNS:-50 1000}
WARMUP=${WARMUP:-1}
WRK_THREADS=${WRK_THREADS:-1}
LP_CONNS=${LP_CONNS:-1000}
LP_DURATION=${LP_DURATION:-5}
LP_DELAY=${LP_DELAY:-1}
PROXY_CPU=${PROXY_CPU:-0}
WRK_CPU=${WRK_CPU:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
CONTROL=${CONTROL:-0}
TESTS=(2b 4k)

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

# ---------------------------------------------------------------- start

ORIGIN_PORT=$(free_port)
NGINX_PORT=$(free_port)
SY_PORT=$(free_port)
mkdir -p "$TMP/www"
head -c 4096 /dev/zero | tr '\0' 'x' >"$TMP/www/4k"

log "temp dir $TMP; CLK_TCK=$CLK_TCK; ulimit -n $NOFILE; proxies+origin on CPU $PROXY_CPU, wrk on CPU $WRK_CPU"
log "DURATION=${DURATION}s ROUNDS=$ROUNDS CONNS=($CONNS) WARMUP=${WARMUP}s LP_CONNS=$LP_CONNS LP_DURATION=${LP_DURATION}s CONTROL=$CONTROL"

start_nginx origin "$TEMPLATES/origin.nginx.conf" "ORIGIN_PORT=$ORIGIN_PORT"
ORIGIN_PID=$STARTED_PID
wait_port "$ORIGIN_PORT" "$ORIGIN_PID" "$TMP/origin-error.log"
set_group "$ORIGIN_PID" 1

start_nginx nginx-proxy "$TEMPLATES/proxy.nginx.conf" "PORT=$NGINX_PORT" "UPSTREAM_PORT=$ORIGIN_PORT"
NGINX_PID=$STARTED_PID
wait_port "$NGINX_PORT" "$NGINX_PID" "$TMP/nginx-proxy-error.log"
set_group "$NGINX_PID" 1

start_switchyard switchyard "$SY_PORT" "$ORIGIN_PORT"
SY_PID=$STARTED_PID
wait_port "$SY_PORT" "$SY_PID" "$TMP/switchyard.log"

declare -A PORT_OF=([nginx]=$NGINX_PORT [switchyard]=$SY_PORT)
declare -A PID_OF=([nginx]=$NGINX_PID [switchyard]=$SY_PID)
declare -A LEN_OF=([2b]=2 [4k]=4096)
PROXIES=(nginx switchyard)

# The control: the same nginx proxy again, on its own port. Its figures against nginx's show
# what the method reads as a difference between two identical proxies.
if ((CONTROL)); then
    NGINX_B_PORT=$(free_port)
    start_nginx nginx-b "$TEMPLATES/proxy.nginx.conf" "PORT=$NGINX_B_PORT" "UPSTREAM_PORT=$ORIGIN_PORT"
    PID_OF[nginx-b]=$STARTED_PID
    PORT_OF[nginx-b]=$NGINX_B_PORT
    wait_port "$NGINX_B_PORT" "$STARTED_PID" "$TMP/nginx-b-error.log"
    set_group "$STARTED_PID" 1
    PROXIES+=(nginx-b)
fi

for t in "${TESTS[@]}"; do
    check_body origin "http://127.0.0.1:$ORIGIN_PORT/$t" "${LEN_OF[$t]}"
    for p in "${PROXIES[@]}"; do
        check_body "$p" "http://127.0.0.1:${PORT_OF[$p]}/$t" "${LEN_OF[$t]}"
    done
done
log "origin, nginx (:$NGINX_PORT) and switchyard (:$SY_PORT)${NGINX_B_PORT:+ and nginx-b (:$NGINX_B_PORT)} answer /2b and /4k correctly"

# ---------------------------------------------------------------- throughput trials

declare -A RPS P99 CPUR CPUABS ERRS OCONN
ROWS=()
for t in "${TESTS[@]}"; do
    for c in $CONNS; do
        key="$t/$c"
        ROWS+=("$key")
        if ((WARMUP > 0)); then
            for p in "${PROXIES[@]}"; do
                run_wrk "$TMP/warmup.txt" "$c" "$WARMUP" "http://127.0.0.1:${PORT_OF[$p]}/$t"
            done
        fi
        for ((r = 1; r <= ROUNDS; r++)); do
            # Where a proxy runs in its round may matter: a second nginx, third in every round,
            # had a shorter p99 than the first in 9 of 10 rounds with 2-byte bodies at 1,000
            # connections. So the order turns by one each round.
            for ((i = 0; i < ${#PROXIES[@]}; i++)); do
                p=${PROXIES[(r - 1 + i) % ${#PROXIES[@]}]}
                out="$TMP/wrk-$t-$c-$p-$r.txt"
                a0=$(origin_accepts)
                p0=$(cpu_ticks "${PID_OF[$p]}")
                o0=$(cpu_ticks "$ORIGIN_PID")
                run_wrk "$out" "$c" "$DURATION" "http://127.0.0.1:${PORT_OF[$p]}/$t"
                p1=$(cpu_ticks "${PID_OF[$p]}")
                o1=$(cpu_ticks "$ORIGIN_PID")
                a1=$(origin_accepts)
                # minus one: the second status request's own connection
                oconn=$(awk -v a="$a0" -v b="$a1" 'BEGIN { if (a == "nan" || b == "nan") print "nan"; else print b - a - 1 }')
                kill -0 "${PID_OF[$p]}" 2>/dev/null || die "$p died during $key round $r"
                rps=$(wrk_rps "$out")
                reqs=$(wrk_requests "$out")
                p99=$(wrk_p99_ms "$out")
                dp=$((p1 - p0))
                do_=$((o1 - o0))
                cr=$(ratio "$dp" "$do_")
                # proxy CPU per request in µs
                cabs=$(awk -v t="$dp" -v n="$reqs" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "nan" }')
                errs=$(wrk_errors "$out")
                RPS[$key/$p]+="$rps "
                P99[$key/$p]+="$p99 "
                [[ $cr != n/a ]] && CPUR[$key/$p]+="$cr "
                CPUABS[$key/$p]+="$cabs "
                OCONN[$key/$p]+="$oconn "
                [[ -n $errs ]] && ERRS[$key/$p]+="round $r: $errs"
                log "$(printf '%-3s c=%-5s round %d %-10s %10.0f req/s  p99 %8.2f ms  proxy %5d ticks  origin %5d ticks  cpu ratio %s  proxy %s µs/req  origin conns opened %s%s' \
                    "$t" "$c" "$r" "$p" "$rps" "$p99" "$dp" "$do_" "$cr" "$cabs" "$oconn" "${errs:+  ERRORS: $errs}")"
            done
        done
    done
done

# ---------------------------------------------------------------- long-poll memory test

log "long-poll memory test: $LP_CONNS concurrent requests held ${LP_DELAY}s each at the origin, ${LP_DURATION}s per proxy"
stop_started "$NGINX_PID"
stop_started "$SY_PID"
if ((CONTROL)); then stop_started "${PID_OF[nginx-b]}"; fi

LP_ORIGIN_PORT=$(free_port)
start_longpoll_origin "$LP_ORIGIN_PORT"
LP_ORIGIN_PID=$STARTED_PID
wait_port "$LP_ORIGIN_PORT" "$LP_ORIGIN_PID" "$TMP/lp-origin.log"

declare -A LP_IDLE LP_PEAK LP_PSS LP_REQS LP_ERRS
LP_PROXIES=(nginx switchyard)
for p in "${LP_PROXIES[@]}"; do
    port=$(free_port)
    if [[ $p == nginx ]]; then
        start_nginx nginx-lp "$TEMPLATES/proxy.nginx.conf" "PORT=$port" "UPSTREAM_PORT=$LP_ORIGIN_PORT"
        pid=$STARTED_PID
        wait_port "$port" "$pid" "$TMP/nginx-lp-error.log"
        set_group "$pid" 1
    else
        start_switchyard switchyard-lp "$port" "$LP_ORIGIN_PORT"
        pid=$STARTED_PID
        wait_port "$port" "$pid" "$TMP/switchyard-lp.log"
    fi
    check_body "$p (long-poll)" "http://127.0.0.1:$port/lp" 2
    sleep 0.5
    LP_IDLE[$p]=$(rss_kib "$pid")
    out="$TMP/wrk-lp-$p.txt"
    run_wrk "$out" "$LP_CONNS" "$LP_DURATION" "http://127.0.0.1:$port/lp" --timeout 30s &
    wrk_pid=$!
    peak=0
    peak_pss=0
    # sample RSS every 0.1 s while wrk runs (bounded: at most LP_DURATION + 30 s)
    for ((i = 0; i < (LP_DURATION + 30) * 10; i++)); do
        kill -0 "$wrk_pid" 2>/dev/null || break
        v=$(rss_kib "$pid")
        if ((v > peak)); then
            peak=$v
            peak_pss=$(pss_kib "$pid")
        fi
        sleep 0.1
    done
    wait "$wrk_pid" || die "wrk long-poll run against $p failed"
    kill -0 "$pid" 2>/dev/null || die "$p died during the long-poll test"
    LP_PEAK[$p]=$peak
    LP_PSS[$p]=$peak_pss
    LP_REQS[$p]=$(wrk_requests "$out")
    LP_ERRS[$p]=$(wrk_errors "$out")
    log "$(printf 'long-poll %-10s idle RSS %6d KiB  peak RSS %6d KiB (PSS %d KiB)  %s requests  p99 %s ms %s' \
        "$p" "${LP_IDLE[$p]}" "$peak" "$peak_pss" "${LP_REQS[$p]}" "$(wrk_p99_ms "$out")" "${LP_ERRS[$p]:+ ERRORS: ${LP_ERRS[$p]}}")"
    stop_started "$pid"
done

# ---------------------------------------------------------------- report

ms() { awk -v v="$1" 'BEGIN { if (v == "nan") print "n/a"; else if (v < 10) printf "%.2f ms\n", v; else printf "%.1f ms\n", v }'; }

# paired "NGINX_P99S" "OTHER_P99S" [OTHER]: the rounds side by side. The proxies of a round
# ran back to back, so a round's ratio cancels most of the machine's drift between rounds,
# which moves a single p99 by 10 % or more; their median is the steadier figure.
paired() {
    local who=${3:-switchyard} ratios shorter list
    # One line each: the rounds' ratios, how many are under 1, the pairs as printed.
    { read -r ratios; read -r shorter; read -r list; } < <(awk -v n="$1" -v s="$2" 'BEGIN {
        k = split(n, a, " "); split(s, b, " ")
        for (i = 1; i <= k; i++) if (a[i] + 0 <= 0 || b[i] + 0 <= 0) { print "n/a"; exit }
        for (i = 1; i <= k; i++) {
            printf("%s%s", i > 1 ? " " : "", b[i] / a[i]); if (b[i] < a[i]) shorter++
            list = list sprintf(a[i] < 10 ? "%s%.2f/%.2f" : "%s%.1f/%.1f", i > 1 ? ", " : "", a[i], b[i])
        }
        printf "\n%d\n%s\n", shorter, list
    }')
    if [[ $ratios == n/a ]]; then
        printf 'rounds n/a'
        return 0
    fi
    # shellcheck disable=SC2086
    printf "median of the rounds' ratios %s; %s's the shorter in %d of %d rounds; nginx/%s ms: %s" \
        "$(fmt "$(median $ratios)" '%.2f')" "$who" "$shorter" "$(wc -w <<<"$ratios")" "$who" "$list"
}

echo
echo "## switchyard vs nginx as reverse proxy"
echo
echo "One worker each (nginx \`worker_processes 1\`, switchyard \`worker_threads = 1\`), proxy and origin"
echo "pinned to CPU $PROXY_CPU, wrk ($WRK_THREADS thread) pinned to CPU $WRK_CPU; origin: nginx returning a fixed body."
echo "Medians of $ROUNDS round(s) of ${DURATION} s per proxy, the proxies alternating, each round starting one proxy further on."
echo "CPU/req ÷ origin CPU/req: the proxy's utime+stime over the origin's in the same trial (lower is better)."
echo
echo "| test | connections | nginx req/s | switchyard req/s | ratio | nginx p99 | switchyard p99 | nginx CPU/req ÷ origin CPU/req | switchyard CPU/req ÷ origin CPU/req | ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
DETAILS=()
for key in "${ROWS[@]}"; do
    t=${key%/*}
    c=${key#*/}
    # shellcheck disable=SC2086
    {
        n_rps=$(median ${RPS[$key/nginx]})
        s_rps=$(median ${RPS[$key/switchyard]})
        n_p99=$(median ${P99[$key/nginx]})
        s_p99=$(median ${P99[$key/switchyard]})
        n_cpu=$(median ${CPUR[$key/nginx]:-})
        s_cpu=$(median ${CPUR[$key/switchyard]:-})
        n_abs=$(median ${CPUABS[$key/nginx]})
        s_abs=$(median ${CPUABS[$key/switchyard]})
        n_oc=$(median ${OCONN[$key/nginx]})
        s_oc=$(median ${OCONN[$key/switchyard]})
    }
    label=$([[ $t == 2b ]] && echo "2-byte body" || echo "4 KiB body")
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$c" \
        "$(fmt "$n_rps" '%.0f')" "$(fmt "$s_rps" '%.0f')" "$(ratio "$s_rps" "$n_rps")" \
        "$(ms "$n_p99")" "$(ms "$s_p99")" \
        "$(fmt "$n_cpu" '%.2f')" "$(fmt "$s_cpu" '%.2f')" "$(ratio "$s_cpu" "$n_cpu")"
    DETAILS+=("$(printf -- '- %s, %s connections: p99 ratio switchyard/nginx %s (%s); proxy CPU per request: nginx %s µs, switchyard %s µs (ratio %s); connections opened to the origin per trial: nginx %s, switchyard %s' \
        "$label" "$c" "$(ratio "$s_p99" "$n_p99")" "$(paired "${P99[$key/nginx]}" "${P99[$key/switchyard]}")" "$(fmt "$n_abs" '%.2f')" "$(fmt "$s_abs" '%.2f')" "$(ratio "$s_abs" "$n_abs")" \
        "$(fmt "$n_oc" '%.0f')" "$(fmt "$s_oc" '%.0f')")")
    if ((CONTROL)); then
        # shellcheck disable=SC2086
        DETAILS+=("$(printf -- '  - control, nginx against a second nginx: req/s ratio %s, p99 ratio %s (%s), CPU/req ÷ origin CPU/req ratio %s' \
            "$(ratio "$(median ${RPS[$key/nginx-b]})" "$n_rps")" "$(ratio "$(median ${P99[$key/nginx-b]})" "$n_p99")" \
            "$(paired "${P99[$key/nginx]}" "${P99[$key/nginx-b]}" nginx-b)" "$(ratio "$(median ${CPUR[$key/nginx-b]:-})" "$n_cpu")")")
    fi
    for p in "${PROXIES[@]}"; do
        [[ -n ${ERRS[$key/$p]:-} ]] && DETAILS+=("  - **$p errors** ($label, $c connections): ${ERRS[$key/$p]}")
    done
done
echo
n_peak=${LP_PEAK[nginx]}
s_peak=${LP_PEAK[switchyard]}
printf '**Memory, %d concurrent %s-s long-polls:** peak RSS nginx %.1f MiB, switchyard %.1f MiB, ratio %s (idle: nginx %.1f MiB, switchyard %.1f MiB).\n' \
    "$LP_CONNS" "$LP_DELAY" "$(awk -v k="$n_peak" 'BEGIN{print k/1024}')" "$(awk -v k="$s_peak" 'BEGIN{print k/1024}')" \
    "$(ratio "$s_peak" "$n_peak")" \
    "$(awk -v k="${LP_IDLE[nginx]}" 'BEGIN{print k/1024}')" "$(awk -v k="${LP_IDLE[switchyard]}" 'BEGIN{print k/1024}')"
echo
echo "Details:"
for d in "${DETAILS[@]}"; do echo "$d"; done
for p in "${LP_PROXIES[@]}"; do
    printf -- '- long-poll through %s: %s requests in %s s; RSS growth under load %.1f KiB per long-poll; PSS at peak %.1f MiB%s\n' \
        "$p" "${LP_REQS[$p]}" "$LP_DURATION" \
        "$(awk -v a="${LP_PEAK[$p]}" -v b="${LP_IDLE[$p]}" -v n="$LP_CONNS" 'BEGIN{print (a-b)/n}')" \
        "$(awk -v k="${LP_PSS[$p]}" 'BEGIN{print k/1024}')" \
        "${LP_ERRS[$p]:+; **errors**: ${LP_ERRS[$p]}}"
done
echo "- RSS is VmRSS summed over the proxy's processes (nginx: master + worker, which counts their shared pages twice); PSS splits shared pages."
if [[ -s $TMP/switchyard.log || -s $TMP/switchyard-lp.log ]]; then
    echo "- switchyard logged (RUST_LOG=warn):"
    cat "$TMP/switchyard.log" "$TMP/switchyard-lp.log" 2>/dev/null | head -20 | sed 's/^/    /'
fi
