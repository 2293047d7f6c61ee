#!/usr/bin/env bash
# vmesh proxy benchmark: vmesh next to HAProxy and nginx, same upstream, same run.
#
# Usage: tests/bench/run.sh [--duration 10s] [--rounds 3] [--conns 64] [--pin auto|none]
#                           [--no-accesslog] [--no-h2] [--no-bare] [--only-peers]
#
# What it does (all traffic on 127.0.0.1, ports picked free at start, everything under one
# mktemp dir, every process stopped by the EXIT trap):
#   1. builds `cargo build --release -p vmesh-agent`, unless VMESH_BIN points at a binary
#      (or --only-peers is given: then vmesh is not run at all), and tests/bench/bare-hyper
#      (unless --no-bare or --only-peers);
#   2. starts ONE nginx upstream (single process, one worker, `return 200` with a fixed small
#      body, access log off, huge keepalive_requests), plus an h2c (prior-knowledge) listener on
#      a second port when this nginx has the http_v2 module, used as the HTTP/2 baseline;
#   3. starts the proxies, each with ONE worker thread and keep-alive to the upstream:
#        vmesh           worker_threads = 1, access_log = "off"
#        vmesh+accesslog the same, access log written to a file in the temp dir (--no-accesslog
#                        skips it)
#        hyper-bare      tests/bench/bare-hyper: a hyper 1.x proxy with no features on one
#                        current_thread runtime, the floor of what vmesh is built on
#        haproxy         nbthread 1, mode http, http-reuse always, option http-keep-alive,
#                        no logging
#        nginx           master + 1 worker, upstream keepalive 64, proxy_http_version 1.1,
#                        Connection "", access log off
#   4. for each of direct (wrk straight to the upstream), the vmeshes, hyper-bare, haproxy,
#      nginx a warm-up (wrk -t1 -c<conns> -d2s, discarded), then <rounds> interleaved rounds:
#      each round gives every row in turn <duration>/<rounds> seconds (at least 2) of
#        throughput     wrk -t1 -c<conns>                              -> requests/s
#        latency        wrk -t1 -c1 --latency                          -> p50, p99 (us)
#      and a row's numbers are the medians over its rounds (a VM whose speed drifts over
#      minutes then shifts every row alike); then
#        added latency  proxy p50/p99 minus direct p50/p99
#        RSS            VmRSS of the proxy's process tree (master + workers), idle = after start
#                       before any request, peak = max of samples every 200 ms during the
#                       <conns>-connection runs;
#   5. h2load -c 16 -m 10 -n 100000 (HTTP/2 prior knowledge) through vmesh's outbound port,
#      and straight to the upstream's h2c listener as the baseline (skipped, with a note, when
#      nginx lacks http_v2);
#   6. prints the table, and writes it as markdown to target/bench/results.md, with: each
#      proxy's CPU use during the <conns>-connection run (~100% = the proxy was the bottleneck)
#      and its CPU time per request (comparable even when the load side was the bottleneck),
#      process/thread counts, access-log lines written vs requests (and drops from /metrics),
#      and the issue-2 targets as met/MISSED (informational).
#
# CPU placement (--pin, default auto): every proxy runs under `taskset -c 0`, alone on that
# core, so each proxy gets exactly the same single core and never fights the client or the
# upstream for it. The load generator (wrk, h2load) runs under `taskset -c 1`; the upstream
# nginx under `taskset -c 2` with 3+ CPUs, else it shares CPU 1 with the load generator. So on
# a 2-CPU machine the "direct" row is also the ceiling of the load side: a proxy row close to it
# is load-bound, and the script says so. Nothing is pinned inside the proxies (no
# worker_cpu_affinity, no cpu-map). With 1 CPU, or --pin none, nothing is pinned (on a
# 2-CPU VM unpinned runs varied far more from run to run, as the scheduler moves processes).
# The script measures how busy the machine is (other than the benchmark) before and after the
# run and warns when it was not idle: a compile in the background makes the numbers worthless.
#
# Timings here are informational; this script never fails on a number. It exits non-zero only
# when something could not be started or measured (missing tool, proxy not answering).
# Prerequisites: scripts/install-bench-deps.sh. KEEP_TMP=1 keeps the temp dir (configs, logs,
# raw wrk/h2load output) and prints its path.
set -euo pipefail

# === arguments ===

DURATION=10s
ROUNDS=3
CONNS=64
PIN=auto
ACCESSLOG=1
H2=1
ONLY_PEERS=0
BARE=1
WARMUP=2s
H2_ARGS=(-c 16 -m 10 -n 100000)

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }

CMDLINE=$(printf '%q ' "$0" "$@")
CMDLINE=${CMDLINE% }
if [[ -n ${VMESH_BIN:-} ]]; then
    CMDLINE="VMESH_BIN=$(printf '%q' "$VMESH_BIN") $CMDLINE"
fi

while [[ $# -gt 0 ]]; do
    case $1 in
        --duration) DURATION=${2:?--duration needs a value}; shift 2 ;;
        --rounds) ROUNDS=${2:?--rounds needs a value}; shift 2 ;;
        --rounds=*) ROUNDS=${1#*=}; shift ;;
        --duration=*) DURATION=${1#*=}; shift ;;
        --conns) CONNS=${2:?--conns needs a value}; shift 2 ;;
        --conns=*) CONNS=${1#*=}; shift ;;
        --pin) PIN=${2:?--pin needs a value}; shift 2 ;;
        --pin=*) PIN=${1#*=}; shift ;;
        --no-accesslog) ACCESSLOG=0; shift ;;
        --no-h2) H2=0; shift ;;
        --only-peers) ONLY_PEERS=1; shift ;;
        --no-bare) BARE=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'bench: unknown argument %q\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done

die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'bench: %s\n' "$*" >&2; }

# Seconds in a wrk duration ("10", "10s", "2m").
duration_secs() {
    case $1 in
        *m) echo $((${1%m} * 60)) ;;
        *s) echo "${1%s}" ;;
        *) echo "$1" ;;
    esac
}

[[ $DURATION =~ ^[1-9][0-9]*[sm]?$ ]] || die "--duration must look like 10s or 1m, got '$DURATION'"
[[ $CONNS =~ ^[1-9][0-9]*$ ]] || die "--conns must be a positive integer, got '$CONNS'"
[[ $PIN == auto || $PIN == none ]] || die "--pin must be auto or none, got '$PIN'"
DUR_S=$(duration_secs "$DURATION")
((DUR_S <= 60)) || die "--duration is capped at 60s so the whole run stays bounded"
[[ $ROUNDS =~ ^[1-9]$|^10$ ]] || die "--rounds must be 1..10, got '$ROUNDS'"
# Each round runs every row for an equal share of --duration (at least 2 s).
ROUND_S=$((DUR_S / ROUNDS))
((ROUND_S >= 2)) || ROUND_S=2

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT_DIR=$REPO_ROOT/target/bench
export PATH="$PATH:/usr/sbin:/sbin"

for tool in nginx haproxy wrk curl python3 ps timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run scripts/install-bench-deps.sh"
done
if ((H2)) && ! command -v h2load >/dev/null 2>&1; then
    die "h2load not found: run scripts/install-bench-deps.sh (or pass --no-h2)"
fi

# === processes and cleanup ===

TMP=$(mktemp -d -t vmesh-bench.XXXXXX)
declare -A PID_OF=()
SAMPLER_PID=
LOAD_PID=

stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? name
    trap - EXIT INT TERM
    if [[ -n $SAMPLER_PID ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
    fi
    if [[ -n $LOAD_PID ]]; then
        stop_pid "$LOAD_PID"
    fi
    for name in "${!PID_OF[@]}"; do
        stop_pid "${PID_OF[$name]}"
    done
    wait 2>/dev/null || true
    if [[ -n ${KEEP_TMP:-} ]]; then
        say "logs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Show the tail of a process's log and stop.
fail_with_log() {
    local name=$1 msg=$2
    printf 'bench: error: %s\n--- last lines of %s log ---\n' "$msg" "$name" >&2
    tail -n 30 "$TMP/$name.log" >&2 || true
    exit 1
}

# start NAME CMD... : run CMD in the background, output to $TMP/NAME.log.
start() {
    local name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    PID_OF[$name]=$!
}

# wait_http NAME URL: poll URL until it answers 2xx (10 s bound), or fail with NAME's log.
wait_http() {
    local name=$1 url=$2 i
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "${PID_OF[$name]}" 2>/dev/null; then
            fail_with_log "$name" "$name exited during start-up"
        fi
        if curl -sf -o /dev/null --max-time 1 "$url"; then
            return 0
        fi
        sleep 0.1
    done
    fail_with_log "$name" "$name did not answer $url within 10 s"
}

# rss_kib PID: VmRSS in KiB summed over PID and all its descendants.
rss_kib() {
    ps -e -o pid=,ppid=,rss= | awk -v root="$1" '
        { ppid[$1] = $2; rss[$1] = $3 }
        END {
            total = 0
            for (p in rss) {
                q = p
                for (hops = 0; q != "" && q != 0 && hops < 64; hops++) {
                    if (q == root) { total += rss[p]; break }
                    q = ppid[q]
                }
            }
            print total
        }'
}

# cpu_ticks PID: utime + stime (clock ticks) summed over PID and its descendants.
cpu_ticks() {
    local p total=0 rest
    local -a f
    for p in $(ps -e -o pid=,ppid= | awk -v root="$1" '
        { ppid[$1] = $2 }
        END {
            for (p in ppid) {
                q = p
                for (hops = 0; q != "" && q != 0 && hops < 64; hops++) {
                    if (q == root) { print p; break }
                    q = ppid[q]
                }
            }
        }'); do
        rest=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        rest=${rest##*) } # skip "pid (comm) ", comm may hold spaces
        read -r -a f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
CLK_TCK=$(getconf CLK_TCK)

# proc_threads PID: "processes/threads" of PID's process tree, e.g. "2/2" for nginx master+worker.
proc_threads() {
    ps -e -o pid=,ppid=,nlwp= | awk -v root="$1" '
        { ppid[$1] = $2; nlwp[$1] = $3 }
        END {
            np = 0; nt = 0
            for (p in ppid) {
                q = p
                for (hops = 0; q != "" && q != 0 && hops < 64; hops++) {
                    if (q == root) { np++; nt += nlwp[p]; break }
                    q = ppid[q]
                }
            }
            printf "%d/%d", np, nt
        }'
}

# Peak-RSS sampler: every 200 ms until stopped, keeps the max in a file.
sampler_start() {
    local pid=$1 out=$2
    echo 0 >"$out"
    (
        max=0
        while true; do
            cur=$(rss_kib "$pid")
            if ((cur > max)); then
                max=$cur
                echo "$max" >"$out"
            fi
            sleep 0.2
        done
    ) &
    SAMPLER_PID=$!
}
sampler_stop() {
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
}

kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# Percent of the machine's CPU time that was busy over one second (from /proc/stat). Called
# while the benchmark's own processes are idle, so it measures everything else.
cpu_busy_pct() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x, " "); split(b, y, " "); t = y[1] - x[1]; i = y[2] - x[2]
        printf "%.0f", (t > 0 ? 100 * (t - i) / t : 0) }'
}
# Compilers and the like that would spoil the numbers, as "name(pid) ...".
busy_neighbours() {
    ps -e -o pid=,comm= | awk '$2 ~ /^(cargo|rustc|cc1|cc1plus|ld|clippy-driver|cargo-clippy)$/ {
        printf "%s%s(%s)", sep, $2, $1; sep = " " }'
}

# === CPU placement ===

NPROC=$(nproc)
PROXY_CPU=()
LOAD_CPU=()
UPSTREAM_CPU=()
PIN_NOTE="none (--pin none)"
if [[ $PIN == auto ]]; then
    if ((NPROC >= 3)) && command -v taskset >/dev/null 2>&1; then
        PROXY_CPU=(taskset -c 0)
        LOAD_CPU=(taskset -c 1)
        UPSTREAM_CPU=(taskset -c 2)
        PIN_NOTE="taskset: proxy on CPU 0 alone, wrk/h2load on CPU 1, upstream nginx on CPU 2"
    elif ((NPROC >= 2)) && command -v taskset >/dev/null 2>&1; then
        PROXY_CPU=(taskset -c 0)
        LOAD_CPU=(taskset -c 1)
        UPSTREAM_CPU=(taskset -c 1)
        PIN_NOTE="taskset: proxy on CPU 0 alone, wrk/h2load and upstream nginx on CPU 1"
    else
        PIN_NOTE="none (1 CPU or no taskset)"
    fi
fi

# === ports ===

mapfile -t PORTS < <(python3 - 9 <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
)
[[ ${#PORTS[@]} -eq 9 ]] || die "could not pick free ports"
UP_PORT=${PORTS[0]}
UP_H2_PORT=${PORTS[1]}
VMESH_PORT=${PORTS[2]}
VMESH_ADMIN=${PORTS[3]}
VMESHLOG_PORT=${PORTS[4]}
VMESHLOG_ADMIN=${PORTS[5]}
HAPROXY_PORT=${PORTS[6]}
NGINX_PORT=${PORTS[7]}
BARE_PORT=${PORTS[8]}

BODY="hello from the vmesh bench upstream"

# === build ===

if ((!ONLY_PEERS)); then
    if [[ -z ${VMESH_BIN:-} ]]; then
        say "building: cargo build --release -p vmesh-agent"
        (cd "$REPO_ROOT" && cargo build --release -p vmesh-agent) || die "cargo build failed"
        VMESH_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/vmesh
    fi
    [[ -x $VMESH_BIN ]] || die "vmesh binary not found or not executable: $VMESH_BIN"
fi
BARE_BIN=
if ((!ONLY_PEERS && BARE)); then
    say "building: tests/bench/bare-hyper (cargo build --release, its own workspace)"
    BARE_TARGET=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/bare-hyper
    CARGO_TARGET_DIR=$BARE_TARGET cargo build --release --quiet \
        --manifest-path "$REPO_ROOT/tests/bench/bare-hyper/Cargo.toml" || die "building bare-hyper failed"
    BARE_BIN=$BARE_TARGET/release/bare-hyper
fi

# === upstream nginx ===

# nginx writes temp files and a pid file; keep them all in $TMP. As root, run the workers as
# root too, or they could not reach the 0700 temp dir.
NGINX_USER=
if [[ ${EUID:-$(id -u)} -eq 0 ]]; then
    NGINX_USER="user root;"
fi
NGINX_HAS_H2=0
if nginx -V 2>&1 | grep -q -- '--with-http_v2_module'; then
    NGINX_HAS_H2=1
fi

nginx_common() { # $1 = name
    cat <<EOF
$NGINX_USER
pid $TMP/$1.pid;
error_log $TMP/$1.error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_http_common() { # $1 = name
    cat <<EOF
    access_log off;
    client_body_temp_path $TMP/$1.body;
    proxy_temp_path $TMP/$1.proxy;
    fastcgi_temp_path $TMP/$1.fastcgi;
    uwsgi_temp_path $TMP/$1.uwsgi;
    scgi_temp_path $TMP/$1.scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
EOF
}

{
    echo "daemon off; master_process off; worker_processes 1;"
    nginx_common upstream
    echo "http {"
    nginx_http_common upstream
    cat <<EOF
    server {
        listen 127.0.0.1:$UP_PORT backlog=4096;
        location / { default_type text/plain; return 200 "$BODY"; }
    }
EOF
    if ((NGINX_HAS_H2)); then
        cat <<EOF
    server {
        listen 127.0.0.1:$UP_H2_PORT http2 backlog=4096;
        http2_max_requests 100000000;
        location / { default_type text/plain; return 200 "$BODY"; }
    }
EOF
    fi
    echo "}"
} >"$TMP/upstream.conf"

# === proxies: configs ===

vmesh_conf() { # $1 = listen port, $2 = admin port, $3 = data dir, $4 = access_log value
    cat <<EOF
[agent]
node = "bench"
data_dir = "$3"
admin_listen = "127.0.0.1:$2"
worker_threads = 1

[registry]
kind = "none"

[telemetry]
access_log = "$4"

[[outbound]]
service = "bench"
listen = "127.0.0.1:$1"
protocol = "http"
balancer = "round-robin"
timeout = "5s"
endpoints = ["127.0.0.1:$UP_PORT"]
EOF
}
ACCESS_LOG_FILE=$TMP/vmesh-access.log
if ((!ONLY_PEERS)); then
    mkdir -p "$TMP/vmesh-data" "$TMP/vmeshlog-data"
    vmesh_conf "$VMESH_PORT" "$VMESH_ADMIN" "$TMP/vmesh-data" off >"$TMP/vmesh.toml"
    vmesh_conf "$VMESHLOG_PORT" "$VMESHLOG_ADMIN" "$TMP/vmeshlog-data" "$ACCESS_LOG_FILE" \
        >"$TMP/vmeshlog.toml"
fi

cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend bench
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend upstream

backend upstream
    server up1 127.0.0.1:$UP_PORT
EOF

{
    echo "daemon off; master_process on; worker_processes 1;"
    nginx_common nginxproxy
    echo "http {"
    nginx_http_common nginxproxy
    cat <<EOF
    upstream bench {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
} >"$TMP/nginxproxy.conf"

# === start everything ===

# vmesh reads VMESH_* env vars as config overrides; never hand it ours (VMESH_BIN etc.).
VMESH_ENV=(env)
while IFS= read -r var; do
    VMESH_ENV+=(-u "$var")
done < <(compgen -e | grep '^VMESH_' || true)

BUSY_BEFORE=$(cpu_busy_pct)
NEIGHBOURS_BEFORE=$(busy_neighbours)
say "starting upstream nginx on 127.0.0.1:$UP_PORT"
start upstream "${UPSTREAM_CPU[@]}" nginx -p "$TMP" -e "$TMP/upstream.error.log" -c "$TMP/upstream.conf"
wait_http upstream "http://127.0.0.1:$UP_PORT/"

# name -> port, in the order the rows are measured
NAMES=(direct)
declare -A PORT_OF=([direct]=$UP_PORT)
if ((!ONLY_PEERS)); then
    say "starting vmesh on 127.0.0.1:$VMESH_PORT (admin $VMESH_ADMIN)"
    start vmesh "${PROXY_CPU[@]}" "${VMESH_ENV[@]}" "$VMESH_BIN" run --config "$TMP/vmesh.toml"
    wait_http vmesh "http://127.0.0.1:$VMESH_ADMIN/live"
    NAMES+=(vmesh)
    PORT_OF[vmesh]=$VMESH_PORT
    if ((ACCESSLOG)); then
        say "starting vmesh+accesslog on 127.0.0.1:$VMESHLOG_PORT (admin $VMESHLOG_ADMIN)"
        start vmesh+accesslog "${PROXY_CPU[@]}" "${VMESH_ENV[@]}" "$VMESH_BIN" run \
            --config "$TMP/vmeshlog.toml"
        wait_http vmesh+accesslog "http://127.0.0.1:$VMESHLOG_ADMIN/live"
        NAMES+=(vmesh+accesslog)
        PORT_OF[vmesh+accesslog]=$VMESHLOG_PORT
    fi
fi
if [[ -n $BARE_BIN ]]; then
    say "starting hyper-bare on 127.0.0.1:$BARE_PORT"
    start hyper-bare "${PROXY_CPU[@]}" "$BARE_BIN" "127.0.0.1:$BARE_PORT" "127.0.0.1:$UP_PORT"
    NAMES+=(hyper-bare)
    PORT_OF[hyper-bare]=$BARE_PORT
fi
say "starting haproxy on 127.0.0.1:$HAPROXY_PORT"
start haproxy "${PROXY_CPU[@]}" haproxy -db -f "$TMP/haproxy.cfg"
say "starting nginx proxy on 127.0.0.1:$NGINX_PORT"
start nginx "${PROXY_CPU[@]}" nginx -p "$TMP" -e "$TMP/nginxproxy.error.log" \
    -c "$TMP/nginxproxy.conf"
NAMES+=(haproxy nginx)
PORT_OF[haproxy]=$HAPROXY_PORT
PORT_OF[nginx]=$NGINX_PORT
# Readiness of the listeners without sending a request through them: a request would allocate
# and spoil the idle RSS reading.
wait_listen() {
    local name=$1 port=$2 i
    for ((i = 0; i < 100; i++)); do
        kill -0 "${PID_OF[$name]}" 2>/dev/null || fail_with_log "$name" "$name exited during start-up"
        if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$2" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    fail_with_log "$name" "$name did not listen on port $port within 10 s"
}
wait_listen haproxy "$HAPROXY_PORT"
if [[ -n $BARE_BIN ]]; then
    wait_listen hyper-bare "$BARE_PORT"
fi
wait_listen nginx "$NGINX_PORT"
if ((!ONLY_PEERS)); then
    wait_listen vmesh "$VMESH_PORT"
    if ((ACCESSLOG)); then
        wait_listen vmesh+accesslog "$VMESHLOG_PORT"
    fi
fi

# Idle RSS: after start-up, before the first proxied request.
sleep 1
declare -A IDLE_KIB=() PEAK_KIB=()
for name in "${NAMES[@]}"; do
    [[ $name == direct ]] && continue
    IDLE_KIB[$name]=$(rss_kib "${PID_OF[$name]}")
done

# Every path must return the upstream's body before it is measured.
for name in "${NAMES[@]}"; do
    got=$(curl -sS --max-time 2 "http://127.0.0.1:${PORT_OF[$name]}/" 2>&1) || true
    if [[ $got != "$BODY" ]]; then
        log_name=$name
        if [[ $name == direct ]]; then
            log_name=upstream
        fi
        fail_with_log "$log_name" "$name on port ${PORT_OF[$name]} returned '$got', expected the upstream body"
    fi
done

# === measure ===

# run_load OUT CMD...: run a load generator with output to OUT. In the background plus `wait`,
# so that a signal to this script runs the cleanup trap at once instead of after the run.
run_load() {
    local out=$1 rc=0
    shift
    "$@" >"$out" 2>&1 &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=
    return "$rc"
}

# wrk_run OUT ARGS...: wrk on the load CPU, bounded by timeout.
wrk_run() {
    local out=$1
    shift
    run_load "$out" "${LOAD_CPU[@]}" timeout $((DUR_S + 30)) wrk "$@" ||
        { cat "$out" >&2; die "wrk $* failed"; }
}

# Microseconds from a wrk duration such as 45.00us, 1.20ms, 2.00s.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") f = 1; else if (u == "ms") f = 1000; else if (u == "s") f = 1000000;
        else if (u == "m") f = 60000000; else { print "NaN"; exit }
        printf "%.0f", n * f }'
}
wrk_rps() { awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$1"; }
wrk_pct() { to_us "$(awk -v p="$2" '$1 == p { print $2; exit }' "$1")"; }
# Non-2xx responses and socket errors, as one short string ("" when none).
wrk_errors() {
    awk '/Non-2xx or 3xx responses:/ { printf "non-2xx %s; ", $NF }
         /Socket errors:/ { sub(/^ *Socket errors: */, ""); printf "socket errors: %s; ", $0 }' "$1"
}
wrk_requests() { awk '/ requests in / { print $1; exit }' "$1"; }

# median of the numbers given as arguments (the lower middle one for an even count)
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Interleaved rounds: each round gives every row one short run in turn, and a row's number is
# its median over the rounds. A machine whose speed drifts over minutes (a shared VM) then
# shifts every row alike instead of favouring the rows measured in its fast minutes.
declare -A RPS=() P50=() P99=() NOTES=() CPU_PCT=() CPU_TICKS=() THREADS=() REQS=()
declare -A RPS_R=() P50_R=() P99_R=() NS=()
for name in "${NAMES[@]}"; do
    say "$name: warm-up $WARMUP, ${CONNS} connections"
    wrk_run "$TMP/$name.warm.txt" -t1 -c"$CONNS" -d"$WARMUP" "http://127.0.0.1:${PORT_OF[$name]}/"
    CPU_TICKS[$name]=0
    REQS[$name]=0
    NS[$name]=0
    PEAK_KIB[$name]=0
done
for ((round = 1; round <= ROUNDS; round++)); do
    for name in "${NAMES[@]}"; do
        url="http://127.0.0.1:${PORT_OF[$name]}/"
        out="$TMP/$name.c$CONNS.r$round.txt"
        say "round $round/$ROUNDS: $name: throughput ${ROUND_S}s, ${CONNS} connections"
        if [[ $name != direct ]]; then
            sampler_start "${PID_OF[$name]}" "$TMP/$name.peak"
            t0=$(date +%s%N)
            c0=$(cpu_ticks "${PID_OF[$name]}")
        fi
        wrk_run "$out" -t1 -c"$CONNS" -d"${ROUND_S}s" "$url"
        if [[ $name != direct ]]; then
            c1=$(cpu_ticks "${PID_OF[$name]}")
            t1=$(date +%s%N)
            sampler_stop
            peak=$(<"$TMP/$name.peak")
            ((peak > PEAK_KIB[$name])) && PEAK_KIB[$name]=$peak
            CPU_TICKS[$name]=$((CPU_TICKS[$name] + c1 - c0))
            NS[$name]=$((NS[$name] + t1 - t0))
            THREADS[$name]=$(proc_threads "${PID_OF[$name]}")
        fi
        REQS[$name]=$((REQS[$name] + $(wrk_requests "$out")))
        RPS_R[$name]+="$(wrk_rps "$out") "
        errs=$(wrk_errors "$out")
        say "round $round/$ROUNDS: $name: latency ${ROUND_S}s, 1 connection"
        out1="$TMP/$name.c1.r$round.txt"
        wrk_run "$out1" -t1 -c1 -d"${ROUND_S}s" --latency "$url"
        P50_R[$name]+="$(wrk_pct "$out1" 50%) "
        P99_R[$name]+="$(wrk_pct "$out1" 99%) "
        errs+=$(wrk_errors "$out1")
        if [[ -n $errs ]]; then
            NOTES[$name]+="round $round: ${errs%; }; "
        fi
    done
done
for name in "${NAMES[@]}"; do
    # shellcheck disable=SC2086 # word splitting of the per-round lists is intended
    RPS[$name]=$(median ${RPS_R[$name]})
    # shellcheck disable=SC2086
    P50[$name]=$(median ${P50_R[$name]})
    # shellcheck disable=SC2086
    P99[$name]=$(median ${P99_R[$name]})
    if [[ $name != direct ]]; then
        CPU_PCT[$name]=$((CPU_TICKS[$name] * 100 * 1000000000 / CLK_TCK / NS[$name]))
    fi
    [[ -n ${RPS[$name]} && ${P50[$name]} != NaN && ${P99[$name]} != NaN ]] ||
        die "could not parse wrk output for $name (raw output in $TMP with KEEP_TMP=1)"
done

ACCESSLOG_NOTE=
if ((!ONLY_PEERS && ACCESSLOG)); then
    sent=0
    for f in "$TMP"/vmesh+accesslog.*.txt; do
        sent=$((sent + $(wrk_requests "$f")))
    done
    sent=$((sent + 1)) # the sanity request
    lines=0
    if [[ -f $ACCESS_LOG_FILE ]]; then
        lines=$(wc -l <"$ACCESS_LOG_FILE")
    fi
    dropped=$(curl -sf --max-time 2 "http://127.0.0.1:$VMESHLOG_ADMIN/metrics" |
        awk '$1 ~ /^vmesh_access_log_dropped_total/ { n += $2 } END { printf "%d", n }') || dropped="?"
    ACCESSLOG_NOTE="vmesh+accesslog wrote $lines access-log lines for ~$sent requests completed by wrk (wrk does not count requests still in flight at the end); vmesh_access_log_dropped_total = $dropped"
fi

# HTTP/2: h2load through vmesh, and straight to the upstream's h2c listener.
H2_LINES=()
h2_run() { # $1 = label, $2 = port, $3 = pid to sample ("" for none)
    local label=$1 port=$2 pid=$3 out="$TMP/h2.$1.txt" rps reqs peak=""
    if [[ -n $pid ]]; then
        sampler_start "$pid" "$TMP/h2.$label.peak"
    fi
    run_load "$out" "${LOAD_CPU[@]}" timeout 120 h2load "${H2_ARGS[@]}" "http://127.0.0.1:$port/" ||
        { cat "$out" >&2; die "h2load against $label failed"; }
    if [[ -n $pid ]]; then
        sampler_stop
        peak=", $label RSS peak $(kib_to_mib "$(<"$TMP/h2.$label.peak")") MiB"
    fi
    rps=$(awk '/^finished in/ { gsub(/,/, "", $4); printf "%.0f", $4 }' "$out")
    reqs=$(awk '/^requests:/ { sub(/^requests: */, ""); print; exit }' "$out")
    [[ -n $rps ]] || { cat "$out" >&2; die "could not parse h2load output for $label"; }
    H2_LINES+=("h2load ${H2_ARGS[*]} $label: $rps req/s ($reqs$peak)")
}
if ((H2)); then
    if ((!ONLY_PEERS)); then
        say "vmesh: h2load ${H2_ARGS[*]} (HTTP/2 prior knowledge)"
        h2_run vmesh "$VMESH_PORT" "${PID_OF[vmesh]}"
    fi
    if ((NGINX_HAS_H2)); then
        say "direct: h2load ${H2_ARGS[*]} against the upstream's h2c listener"
        h2_run direct "$UP_H2_PORT" ""
    else
        H2_LINES+=("h2load direct baseline skipped: this nginx has no http_v2 module (no h2c listener)")
    fi
fi

BUSY_AFTER=$(cpu_busy_pct)
NEIGHBOURS_AFTER=$(busy_neighbours)
IDLE_NOTE=
if ((BUSY_BEFORE >= 10 || BUSY_AFTER >= 10)) || [[ -n $NEIGHBOURS_BEFORE$NEIGHBOURS_AFTER ]]; then
    IDLE_NOTE="WARNING: the machine was not idle (CPU busy outside the benchmark: $BUSY_BEFORE% before, $BUSY_AFTER% after"
    if [[ -n $NEIGHBOURS_BEFORE$NEIGHBOURS_AFTER ]]; then
        IDLE_NOTE+="; running: ${NEIGHBOURS_BEFORE:-$NEIGHBOURS_AFTER}"
    fi
    IDLE_NOTE+="): these numbers are not comparable to a quiet run"
fi

# === report ===

CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[[ -n $CPU_MODEL ]] || CPU_MODEL=unknown
NGINX_VER=$(nginx -v 2>&1 | sed 's/^nginx version: //')
HAPROXY_VER=$(haproxy -v 2>&1 | awk 'NR == 1 { print $3 }')
WRK_VER=$(wrk -v 2>&1 | awk 'NR == 1 { print $2 }' || true)
H2LOAD_VER=$( (h2load --version 2>/dev/null || echo "h2load n/a") | head -n 1)
VMESH_VER=n/a
if ((!ONLY_PEERS)); then
    VMESH_VER=$("$VMESH_BIN" --version 2>/dev/null | head -n 1 || true)
    [[ -n $VMESH_VER ]] || VMESH_VER="$VMESH_BIN"
fi

RPS_DIRECT=${RPS[direct]}
BASE50=${P50[direct]}
BASE99=${P99[direct]}
HEADERS=(name "rps@$CONNS" "p50 us" "p99 us" "+p50 us" "+p99 us" "RSS idle MiB" "RSS peak MiB")
ROWS=()
for name in "${NAMES[@]}"; do
    if [[ $name == direct ]]; then
        add50=-; add99=-; idle=-; peak=-
    else
        p50=${P50[$name]}
        p99=${P99[$name]}
        add50=$((p50 - BASE50))
        add99=$((p99 - BASE99))
        idle=$(kib_to_mib "${IDLE_KIB[$name]}")
        peak=$(kib_to_mib "${PEAK_KIB[$name]}")
    fi
    ROWS+=("$name|${RPS[$name]}|${P50[$name]}|${P99[$name]}|$add50|$add99|$idle|$peak")
done

# Rows whose throughput is within 10% of the direct path's may be limited by the load side.
LOADBOUND=()
for name in "${NAMES[@]}"; do
    r=${RPS[$name]}
    if [[ $name != direct ]] && ((r * 10 >= RPS_DIRECT * 9)); then
        LOADBOUND+=("$name")
    fi
done
LOADBOUND_NOTE=
if ((${#LOADBOUND[@]})); then
    LOADBOUND_NOTE="rps@$CONNS of ${LOADBOUND[*]} is within 10% of direct: probably bound by the load side, not the proxy (see the proxy CPU line)"
fi
THREADS_LINE="proxy processes/threads:"
CPU_REQ_LINE="proxy CPU time per request in that run (lower is better, independent of the bottleneck):"
CPU_LINE="proxy CPU during the $CONNS-connection run (100% = one core):"
for name in "${NAMES[@]}"; do
    if [[ $name != direct ]]; then
        reqs=${REQS[$name]}
        CPU_LINE+=" $name ${CPU_PCT[$name]}%"
        CPU_REQ_LINE+=" $name $(awk -v t="${CPU_TICKS[$name]}" -v hz="$CLK_TCK" -v n="$reqs" \
            'BEGIN { printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0) }') us"
        THREADS_LINE+=" $name ${THREADS[$name]}"
    fi
done

print_text_table() {
    local fmt="%-16s %9s %8s %8s %8s %8s %13s %13s\n" row
    # shellcheck disable=SC2059 # the format is a constant above
    printf "$fmt" "${HEADERS[@]}"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r -a f <<<"$row"
        # shellcheck disable=SC2059
        printf "$fmt" "${f[@]}"
    done
}
print_md_table() {
    local row
    printf '| %s ' "${HEADERS[@]}"
    printf '|\n|:--|--:|--:|--:|--:|--:|--:|--:|\n'
    for row in "${ROWS[@]}"; do
        IFS='|' read -r -a f <<<"$row"
        printf '| %s ' "${f[@]}"
        printf '|\n'
    done
}

# Targets from issue 2, informational only (never an exit code).
targets() {
    local v=vmesh p50 p99 n50
    p50=${P50[$v]}
    p99=${P99[$v]}
    n50=${P50[nginx]}
    awk -v r="${RPS[$v]}" -v h="${RPS[haproxy]}" -v n="${RPS[nginx]}" \
        -v a50="$((p50 - BASE50))" -v a99="$((p99 - BASE99))" -v n50="$((n50 - BASE50))" \
        -v idle="${IDLE_KIB[$v]}" -v peak="${PEAK_KIB[$v]}" '
        function verdict(ok) { return ok ? "met" : "MISSED" }
        BEGIN {
            printf "- throughput vs HAProxy: %.2fx (target >= 1.00x): %s\n", r / h, verdict(r >= h)
            printf "- throughput vs nginx: %.2fx (target >= 1.00x): %s\n", r / n, verdict(r >= n)
            printf "- added p50: %d us vs nginx %d us (target <= nginx): %s\n", a50, n50, verdict(a50 <= n50)
            printf "- added p99: %d us (target <= 150 us): %s\n", a99, verdict(a99 <= 150)
            printf "- RSS idle: %.1f MiB (target <= 20 MiB): %s\n", idle / 1024, verdict(idle <= 20 * 1024)
            printf "- RSS peak: %.1f MiB (target <= 64 MiB): %s\n", peak / 1024, verdict(peak <= 64 * 1024)
        }'
}

notes() {
    local name
    for name in "${NAMES[@]}"; do
        if [[ -n ${NOTES[$name]:-} ]]; then
            printf -- '- WARNING %s: %s\n' "$name" "${NOTES[$name]}"
        fi
    done
    if [[ -n $IDLE_NOTE ]]; then
        printf -- '- %s\n' "$IDLE_NOTE"
    fi
    if [[ -n $LOADBOUND_NOTE ]]; then
        printf -- '- %s\n' "$LOADBOUND_NOTE"
    fi
    if [[ -n $ACCESSLOG_NOTE ]]; then
        printf -- '- %s\n' "$ACCESSLOG_NOTE"
    fi
    if ((ONLY_PEERS)); then
        printf -- '- --only-peers: vmesh not run\n'
    fi
    if [[ -n $BARE_BIN ]]; then
        printf -- '- hyper-bare: tests/bench/bare-hyper, a hyper 1.x proxy with no features (hyper-util client, one current_thread runtime): the floor of the stack vmesh is built on; vmesh minus hyper-bare is what its features cost\n'
    fi
}

header() {
    cat <<EOF
machine: $NPROC CPUs, $CPU_MODEL, Linux $(uname -r)
versions: vmesh $VMESH_VER; nginx $NGINX_VER; HAProxy $HAPROXY_VER; wrk $WRK_VER; $H2LOAD_VER
command: $CMDLINE
load: wrk -t1, warm-up $WARMUP, then $ROUNDS interleaved rounds of throughput -c$CONNS -d${ROUND_S}s and latency -c1 -d${ROUND_S}s --latency per row; medians over the rounds
cpu placement: $PIN_NOTE
EOF
}

mkdir -p "$OUT_DIR"
{
    echo
    header
    echo
    print_text_table
    echo
    echo "$CPU_LINE"
    echo "$CPU_REQ_LINE"
    echo "$THREADS_LINE"
    printf '%s\n' "${H2_LINES[@]}"
    notes
    if ((!ONLY_PEERS)); then
        echo
        echo "targets (issue 2, informational):"
        targets
    fi
}

{
    echo "# vmesh proxy benchmark"
    echo
    header | sed 's/^/    /'
    echo
    print_md_table
    echo
    printf -- '- %s\n' "$CPU_LINE"
    printf -- '- %s\n' "$CPU_REQ_LINE"
    printf -- '- %s\n' "$THREADS_LINE"
    for line in "${H2_LINES[@]}"; do
        printf -- '- %s\n' "$line"
    done
    notes
    if ((!ONLY_PEERS)); then
        echo
        echo "Targets (issue 2, informational):"
        echo
        targets
    fi
    echo
    echo "rps@$CONNS: wrk requests/s at $CONNS connections; p50/p99: wrk latency at 1 connection;"
    echo "+p50/+p99: minus the direct path; RSS: VmRSS of the proxy's process tree, idle after"
    echo "start-up, peak sampled every 200 ms during the $CONNS-connection run."
} >"$OUT_DIR/results.md"
say "markdown written to ${OUT_DIR#"$REPO_ROOT"/}/results.md"
