# Shared by the load scripts in benches/ (load.sh, mirror.sh, live.sh, cache.sh): tools, the build, processes
# and their cleanup, CPU and memory readings, wrk and its numbers. Source it after setting
# the scripts' variables (PROXY_CPU, WRK_CPU, WRK_THREADS, SKIP_BUILD); it installs nginx and
# wrk if missing, builds switchyard, and makes the temporary directory $TMP, removed at exit
# with every process started through it.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TEMPLATES="$ROOT/benches/load"
SWITCHYARD=${SWITCHYARD:-"$ROOT/target/release/switchyard"}

log() { printf '[%s] %s\n' "${LOG_TAG:-load}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${LOG_TAG:-load}" "$*" >&2; exit 1; }

# ---------------------------------------------------------------- tools

need_apt=()
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
if ((${#need_apt[@]})); then
    log "installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
for tool in nginx wrk python3 taskset getconf; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
NGINX=$(command -v nginx)
CLK_TCK=$(getconf CLK_TCK)

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
NOFILE=$(ulimit -n)
if [[ $NOFILE != unlimited ]] && ((NOFILE < 4096)); then
    log "warning: ulimit -n is only $NOFILE; 1000 connections may fail"
fi
[[ $NOFILE == unlimited ]] && NOFILE=65536

if ((SKIP_BUILD)) && [[ -x $SWITCHYARD ]]; then
    log "using existing $SWITCHYARD"
else
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
fi
[[ -x $SWITCHYARD ]] || die "$SWITCHYARD missing after the build"

# ---------------------------------------------------------------- processes and cleanup

TMP=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-load.XXXXXX")
PIDS=()

stop_pid() { # stop_pid PID [SECONDS]: TERM, wait up to SECONDS (5), then KILL
    local pid=$1 tenths=$((${2:-5} * 10)) i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < tenths; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

children_of() { # children_of PID: direct children of PID
    local f rest ppid
    if [[ -r /proc/$1/task/$1/children ]]; then
        cat "/proc/$1/task/$1/children" 2>/dev/null || true
        return 0
    fi
    for f in /proc/[0-9]*/stat; do
        rest=$(cat "$f" 2>/dev/null) || continue
        rest=${rest##*) } # after "pid (comm) "
        ppid=$(set -- $rest; echo "$2")
        if [[ $ppid == "$1" ]]; then
            f=${f#/proc/}
            echo "${f%/stat}"
        fi
    done
}

declare -A GROUP
set_group() { # set_group PID MIN_CHILDREN: remember PID + its children (nginx master + workers)
    local pid=$1 min=$2 kids i
    for ((i = 0; i < 100; i++)); do
        kids=$(children_of "$pid" | xargs)
        if (($(wc -w <<<"$kids") >= min)); then
            GROUP[$pid]="$pid $kids"
            return 0
        fi
        sleep 0.1
    done
    die "process $pid has no worker processes after 10 s"
}

pids_of() { echo "${GROUP[$1]:-$1}"; }

pss_kib() { # pss_kib PID: Pss of PID and its children, KiB (shared pages split between them)
    local total=0 pid v
    for pid in $(pids_of "$1"); do
        v=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null) || continue
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

cpu_ticks() { # cpu_ticks PID: utime+stime of PID and its children, in clock ticks
    local total=0 pid stat fields
    for pid in $(pids_of "$1"); do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        fields=${stat##*) }
        # fields after comm: state(3) ppid(4) ... utime(14) stime(15) => positions 12, 13 here
        total=$((total + $(set -- $fields; echo "$(( ${12} + ${13} ))")))
    done
    echo "$total"
}

rss_kib() { # rss_kib PID: VmRSS of PID and its children, KiB
    local total=0 pid v
    for pid in $(pids_of "$1"); do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # wait_port PORT PID LOGFILE: bounded wait (10 s) until 127.0.0.1:PORT accepts
    local port=$1 pid=$2 logfile=$3 i
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "process $pid exited; its log ($logfile):"
            cat "$logfile" >&2 || true
            die "process on port $port did not start"
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    cat "$logfile" >&2 || true
    die "nothing listening on 127.0.0.1:$port after 10 s"
}

render() { # render TEMPLATE OUT KEY=VALUE...: replace @KEY@ with VALUE
    local template=$1 out=$2 kv content
    shift 2
    content=$(<"$template")
    for kv in "$@"; do
        content=${content//@${kv%%=*}@/${kv#*=}}
    done
    printf '%s\n' "$content" >"$out"
}

USER_LINE=""
((EUID == 0)) && USER_LINE="user root;" # workers need the 0700 temp dir

# A command the next start_nginx or start_switchyard runs its server under (cache.sh: valgrind),
# and nginx's global directives (cache.sh adds `master_process off;`, one process that serves).
WRAP=()
NGINX_GLOBALS="daemon off;"

start_nginx() { # start_nginx NAME TEMPLATE KEY=VALUE... ; sets STARTED_PID
    local name=$1 template=$2
    shift 2
    local conf="$TMP/$name.conf"
    render "$template" "$conf" "DIR=$TMP" "NAME=$name" "USER_LINE=$USER_LINE" "NOFILE=$NOFILE" "$@"
    "$NGINX" -t -q -p "$TMP" -e "$TMP/$name-startup.log" -c "$conf" >"$TMP/$name.out" 2>&1 ||
        { cat "$TMP/$name.out" >&2; die "nginx config $name is invalid"; }
    taskset -c "$PROXY_CPU" "${WRAP[@]}" "$NGINX" -p "$TMP" -e "$TMP/$name-startup.log" -c "$conf" -g "$NGINX_GLOBALS" \
        >>"$TMP/$name.out" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

start_switchyard() { # start_switchyard NAME PORT UPSTREAM_PORT [TEMPLATE [KEY=VALUE...]] ; sets STARTED_PID
    local name=$1 port=$2 upstream=$3 template=${4:-$TEMPLATES/switchyard.toml}
    shift $(($# < 4 ? $# : 4))
    local conf="$TMP/$name.toml"
    render "$template" "$conf" "DIR=$TMP" "NAME=$name" "PORT=$port" "UPSTREAM_PORT=$upstream" "$@"
    "$SWITCHYARD" check -c "$conf" >"$TMP/$name.out" 2>&1 ||
        { cat "$TMP/$name.out" >&2; die "switchyard config $name is invalid"; }
    RUST_LOG=warn taskset -c "$PROXY_CPU" "${WRAP[@]}" "$SWITCHYARD" run -c "$conf" 2>"$TMP/$name.log" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

start_longpoll_origin() { # start_longpoll_origin PORT ; sets STARTED_PID
    taskset -c "$PROXY_CPU" python3 "$TEMPLATES/longpoll_origin.py" "$1" "$LP_DELAY" >"$TMP/lp-origin.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

stop_started() { # stop_started PID [SECONDS]: stop one of our processes (see stop_pid) and forget it
    local pid=$1 keep=() p
    stop_pid "$pid" "${2:-5}"
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------- wrk and numbers

run_wrk() { # run_wrk OUTFILE CONNS SECONDS URL [extra wrk args]
    local out=$1 conns=$2 secs=$3 url=$4
    shift 4
    local threads=$WRK_THREADS
    ((threads > conns)) && threads=$conns
    taskset -c "$WRK_CPU" wrk -t "$threads" -c "$conns" -d "${secs}s" --latency "$@" "$url" >"$out" 2>&1 ||
        { cat "$out" >&2; die "wrk failed against $url"; }
}

wrk_rps() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
wrk_requests() { awk '/ requests in / {print $1}' "$1"; }
wrk_p99_ms() { # 99% line of --latency, converted to ms
    awk '$1 == "99%" {
        v = $2; n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000
        printf "%.3f\n", n; exit }' "$1"
}
wrk_errors() { # "" when clean, else a short description of socket errors / non-2xx responses
    awk '/Socket errors:/ {sub(/^ +/, ""); printf "%s; ", $0}
         /Non-2xx or 3xx responses:/ {sub(/^ +/, ""); printf "%s; ", $0}' "$1"
}

median() { # median NUMBER...
    (($#)) || { echo nan; return 0; }
    printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0 || a == "nan" || b == "nan") print "n/a"; else printf "%.2f\n", a / b }'; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "nan" || v == "n/a") print "n/a"; else printf f "\n", v }'; }

origin_accepts() { # connections the origin nginx has accepted so far (stub_status), or "nan"
    python3 - "http://127.0.0.1:$ORIGIN_PORT/status" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(r.read().decode().splitlines()[2].split()[0])
except Exception:
    print("nan")
EOF
}

check_body() { # check_body NAME URL EXPECTED_LEN: one request, verify status and length
    local name=$1 url=$2 want=$3 got
    got=$(python3 - "$url" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(r.status, len(r.read()))
except Exception as e:
    print("error", repr(e).replace("\n", " "))
EOF
)
    if [[ $got != "200 $want" ]]; then
        die "$name: GET $url -> $got (want 200 with $want bytes)"
    fi
}

