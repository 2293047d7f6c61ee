#!/usr/bin/env bash
# vmesh proxy benchmark: vmesh next to HAProxy and nginx, same upstream, same run.
#
# Usage: tests/bench/run.sh [--duration 10s] [--rounds 3] [--conns 64] [--pin auto|none]
#                           [--no-accesslog] [--no-h2] [--no-bare] [--only-peers]
#                           [--fixed-rate RPS | --no-fixed-rate] [--idle-conns 10000]
#                           [--slow-requests 1000] [--no-memory]
#
# What it does (all traffic on 127.0.0.1, ports picked free at start, everything under one
# mktemp dir, every process stopped by the EXIT trap):
#   1. builds `cargo build --release -p vmesh-agent`, unless VMESH_BIN points at a binary
#      (or --only-peers is given: then vmesh is not run at all), tests/bench/bare-hyper
#      (unless --no-bare or --only-peers) and tests/bench/paced-load (unless --no-fixed-rate);
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
#   5. fixed-rate latency (unless --no-fixed-rate): open-loop load at half of HAProxy's
#      median rps@<conns> from step 4 (or --fixed-rate RPS), <rounds> interleaved rounds of
#      <duration>/<rounds> seconds per row, by tests/bench/paced-load (wrk2's model: request i
#      is due at start + i/rate on <conns> keep-alive connections, and its latency runs from
#      that scheduled time, so queueing behind a stall counts; no coordinated omission):
#      p50/p99/p99.9 per row and added over direct at the same rate;
#   6. h2load -c 16 -m 10 -n 100000 (HTTP/2 prior knowledge) through vmesh's outbound port,
#      and straight to the upstream's h2c listener as the baseline (skipped, with a note, when
#      nginx lacks http_v2), <rounds> interleaved rounds, median per row;
#   7. memory per connection (unless --no-memory), on FRESH instances of vmesh, hyper-bare,
#      HAProxy and nginx (one worker each, limits raised for the count: vmesh
#      proxy.max_connections, header_read_timeout and idle_timeout 300s so idle keep-alive
#      connections stay open; HAProxy maxconn; nginx worker_connections), one instance per
#      phase, measured by tests/bench/idle_conns.py:
#        idle           RSS after start, then with <idle-conns> keep-alive client connections
#                       open and idle (held idle 3 s before the RSS is sampled), each after one
#                       request to the nginx upstream (at most 64 at once, so the upstream pool
#                       holds <= 64 connections) -> KiB per idle connection over the fresh RSS
#        in flight      RSS with <slow-requests> requests held in flight by
#                       tests/fixtures/upstream.py's /gate (each on its own client connection,
#                       so one client and one upstream connection per request) -> KiB per
#                       in-flight request over the fresh RSS; then they are released and
#                       every answer is checked;
#      the open-file limit is raised to its hard limit first (the client holds <idle-conns>
#      sockets, each proxy as many plus its upstream side);
#   8. prints the tables, and writes them as markdown to target/bench/results.md, with: each
#      proxy's CPU use during the <conns>-connection run (~100% = the proxy was the bottleneck)
#      and its CPU time per request (comparable even when the load side was the bottleneck),
#      process/thread counts, access-log lines written vs requests (and drops from /metrics),
#      and the ratios issue 10's targets name, as met/MISSED (informational).
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
FIXED=1
FIXED_RATE=
MEMORY=1
IDLE_CONNS=10000
SLOW_REQUESTS=1000

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }

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
        --fixed-rate) FIXED_RATE=${2:?--fixed-rate needs a value}; shift 2 ;;
        --fixed-rate=*) FIXED_RATE=${1#*=}; shift ;;
        --no-fixed-rate) FIXED=0; shift ;;
        --idle-conns) IDLE_CONNS=${2:?--idle-conns needs a value}; shift 2 ;;
        --idle-conns=*) IDLE_CONNS=${1#*=}; shift ;;
        --slow-requests) SLOW_REQUESTS=${2:?--slow-requests needs a value}; shift 2 ;;
        --slow-requests=*) SLOW_REQUESTS=${1#*=}; shift ;;
        --no-memory) MEMORY=0; shift ;;
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
[[ -z $FIXED_RATE || $FIXED_RATE =~ ^[1-9][0-9]*$ ]] || die "--fixed-rate must be a positive integer (requests/s), got '$FIXED_RATE'"
[[ $IDLE_CONNS =~ ^[1-9][0-9]*$ ]] || die "--idle-conns must be a positive integer, got '$IDLE_CONNS'"
[[ $SLOW_REQUESTS =~ ^[1-9][0-9]*$ ]] || die "--slow-requests must be a positive integer, got '$SLOW_REQUESTS'"
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

# Open files: in the memory phase the client holds --idle-conns sockets, and each proxy as many
# plus its upstream side. Take the hard limit (raising that needs privileges this script does
# not ask for) and lower the counts to fit, with a note, when it is too small.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
MEM_LIMIT_NOTE=
if ((MEMORY)) && [[ $FD_LIMIT =~ ^[0-9]+$ ]]; then
    if ((IDLE_CONNS + 1000 > FD_LIMIT)); then
        MEM_LIMIT_NOTE+="--idle-conns lowered from $IDLE_CONNS to $((FD_LIMIT - 1000)) (open-file hard limit $FD_LIMIT); "
        IDLE_CONNS=$((FD_LIMIT - 1000))
    fi
    if ((2 * SLOW_REQUESTS + 1000 > FD_LIMIT)); then
        MEM_LIMIT_NOTE+="--slow-requests lowered from $SLOW_REQUESTS to $(((FD_LIMIT - 1000) / 2)) (open-file hard limit $FD_LIMIT); "
        SLOW_REQUESTS=$(((FD_LIMIT - 1000) / 2))
    fi
    ((IDLE_CONNS > 0 && SLOW_REQUESTS > 0)) || die "open-file limit $FD_LIMIT is too low for the memory phase (pass --no-memory)"
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

# pick_ports N: N distinct loopback ports free at this moment, one a line.
pick_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
}
mapfile -t PORTS < <(pick_ports 9)
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
PACED_BIN=
if ((FIXED)); then
    say "building: tests/bench/paced-load (cargo build --release, its own workspace)"
    PACED_TARGET=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/paced-load
    CARGO_TARGET_DIR=$PACED_TARGET cargo build --release --quiet \
        --manifest-path "$REPO_ROOT/tests/bench/paced-load/Cargo.toml" || die "building paced-load failed"
    PACED_BIN=$PACED_TARGET/release/paced-load
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

nginx_common() { # $1 = name, $2 = worker_connections (default 4096)
    cat <<EOF
$NGINX_USER
pid $TMP/$1.pid;
error_log $TMP/$1.error.log warn;
events { worker_connections ${2:-4096}; }
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

# kv FILE KEY: the value of KEY in FILE's key=value report line (paced-load, idle_conns.py).
kv() { awk -v k="$2" '{ for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) { print substr($i, length(k) + 2); exit } }' "$1"; }

# Fixed-rate latency: open-loop load at half of HAProxy's maximum, interleaved like the rows
# above. Every row gets the same rate, so the direct row is the floor of the client and the
# upstream at that rate and +pN is what each proxy adds to it.
declare -A FR_P50=() FR_P99=() FR_P999=() FR_ACH=() FR_LAG=()
declare -A FR_P50_R=() FR_P99_R=() FR_P999_R=() FR_ACH_R=() FR_LAG_R=()
declare -A FR_TICKS=() FR_NS=() FR_REQS=()
FR_RATE=
FR_RATE_NOTE=
if ((FIXED)); then
    if [[ -n $FIXED_RATE ]]; then
        FR_RATE=$FIXED_RATE
        FR_RATE_NOTE="--fixed-rate $FIXED_RATE"
    else
        FR_RATE=$((RPS[haproxy] / 2))
        FR_RATE_NOTE="50% of HAProxy's median rps@$CONNS (${RPS[haproxy]}) in this run"
    fi
    for ((round = 1; round <= ROUNDS; round++)); do
        for name in "${NAMES[@]}"; do
            out="$TMP/fixed.$name.r$round.txt"
            say "round $round/$ROUNDS: $name: fixed rate $FR_RATE/s for ${ROUND_S}s, $CONNS connections"
            if [[ $name != direct ]]; then
                t0=$(date +%s%N)
                c0=$(cpu_ticks "${PID_OF[$name]}")
            fi
            run_load "$out" "${LOAD_CPU[@]}" timeout $((ROUND_S + 30)) "$PACED_BIN" \
                "127.0.0.1:${PORT_OF[$name]}" --rate "$FR_RATE" --duration "$ROUND_S" --conns "$CONNS" ||
                { cat "$out" >&2; die "paced-load against $name failed"; }
            if [[ $name != direct ]]; then
                c1=$(cpu_ticks "${PID_OF[$name]}")
                t1=$(date +%s%N)
                FR_TICKS[$name]=$((${FR_TICKS[$name]:-0} + c1 - c0))
                FR_NS[$name]=$((${FR_NS[$name]:-0} + t1 - t0))
                FR_REQS[$name]=$((${FR_REQS[$name]:-0} + $(kv "$out" completed)))
            fi
            FR_P50_R[$name]+="$(kv "$out" p50_us) "
            FR_P99_R[$name]+="$(kv "$out" p99_us) "
            FR_P999_R[$name]+="$(kv "$out" p999_us) "
            FR_ACH_R[$name]+="$(kv "$out" achieved_rps) "
            FR_LAG_R[$name]+="$(kv "$out" lag_p99_us) "
            bad=$(awk '/ scheduled=/ { for (i = 1; i <= NF; i++) { split($i, f, "=")
                    if ((f[1] == "non2xx" || f[1] == "errors" || f[1] == "incomplete") && f[2] > 0) printf "%s %s; ", f[1], f[2] } }' "$out")
            if [[ -n $bad ]]; then
                NOTES[$name]+="fixed rate, round $round: ${bad%; } (first error: $(sed -n 's/.*first_error="\([^"]*\)".*/\1/p' "$out")); "
            fi
        done
    done
    for name in "${NAMES[@]}"; do
        # shellcheck disable=SC2086 # word splitting of the per-round lists is intended
        FR_P50[$name]=$(median ${FR_P50_R[$name]})
        # shellcheck disable=SC2086
        FR_P99[$name]=$(median ${FR_P99_R[$name]})
        # shellcheck disable=SC2086
        FR_P999[$name]=$(median ${FR_P999_R[$name]})
        # shellcheck disable=SC2086
        FR_ACH[$name]=$(median ${FR_ACH_R[$name]})
        # shellcheck disable=SC2086
        FR_LAG[$name]=$(median ${FR_LAG_R[$name]})
        [[ ${FR_P50[$name]} =~ ^[0-9]+$ && ${FR_P99[$name]} =~ ^[0-9]+$ && ${FR_P999[$name]} =~ ^[0-9]+$ ]] ||
            die "could not parse paced-load output for $name (raw output in $TMP with KEEP_TMP=1)"
    done
fi

ACCESSLOG_NOTE=
if ((!ONLY_PEERS && ACCESSLOG)); then
    sent=0
    for f in "$TMP"/vmesh+accesslog.*.txt; do
        sent=$((sent + $(wrk_requests "$f")))
    done
    for f in "$TMP"/fixed.vmesh+accesslog.*.txt; do
        [[ -f $f ]] || continue
        sent=$((sent + $(kv "$f" completed)))
    done
    sent=$((sent + 1)) # the sanity request
    lines=0
    if [[ -f $ACCESS_LOG_FILE ]]; then
        lines=$(wc -l <"$ACCESS_LOG_FILE")
    fi
    dropped=$(curl -sf --max-time 2 "http://127.0.0.1:$VMESHLOG_ADMIN/metrics" |
        awk '$1 ~ /^vmesh_access_log_dropped_total/ { n += $2 } END { printf "%d", n }') || dropped="?"
    ACCESSLOG_NOTE="vmesh+accesslog wrote $lines access-log lines for ~$sent requests completed by wrk and paced-load (wrk does not count requests still in flight at the end); vmesh_access_log_dropped_total = $dropped"
fi

# HTTP/2: h2load through vmesh, and straight to the upstream's h2c listener.
# Interleaved like the HTTP/1.1 rows: <rounds> rounds of vmesh then direct, median per label.
H2_LINES=()
declare -A H2_RPS=() H2_RPS_R=() H2_REQS=() H2_PEAK=()
h2_run() { # $1 = label, $2 = port, $3 = pid to sample ("" for none), $4 = round
    local label=$1 port=$2 pid=$3 out="$TMP/h2.$1.r$4.txt" rps peak
    if [[ -n $pid ]]; then
        sampler_start "$pid" "$TMP/h2.$label.peak"
    fi
    run_load "$out" "${LOAD_CPU[@]}" timeout 120 h2load "${H2_ARGS[@]}" "http://127.0.0.1:$port/" ||
        { cat "$out" >&2; die "h2load against $label failed"; }
    if [[ -n $pid ]]; then
        sampler_stop
        peak=$(<"$TMP/h2.$label.peak")
        ((peak > ${H2_PEAK[$label]:-0})) && H2_PEAK[$label]=$peak
    fi
    rps=$(awk '/^finished in/ { gsub(/,/, "", $4); printf "%.0f", $4 }' "$out")
    [[ -n $rps ]] || { cat "$out" >&2; die "could not parse h2load output for $label"; }
    H2_RPS_R[$label]+="$rps "
    # the last round's counts ("100000 total, ... 0 failed, 0 errored, 0 timeout")
    H2_REQS[$label]=$(awk '/^requests:/ { sub(/^requests: */, ""); print; exit }' "$out")
}
if ((H2)); then
    H2_LABELS=()
    ((ONLY_PEERS)) || H2_LABELS+=(vmesh)
    ((NGINX_HAS_H2)) && H2_LABELS+=(direct)
    for ((round = 1; round <= ROUNDS; round++)); do
        for label in "${H2_LABELS[@]}"; do
            if [[ $label == vmesh ]]; then
                say "round $round/$ROUNDS: vmesh: h2load ${H2_ARGS[*]} (HTTP/2 prior knowledge)"
                h2_run vmesh "$VMESH_PORT" "${PID_OF[vmesh]}" "$round"
            else
                say "round $round/$ROUNDS: direct: h2load ${H2_ARGS[*]} against the upstream's h2c listener"
                h2_run direct "$UP_H2_PORT" "" "$round"
            fi
        done
    done
    for label in "${H2_LABELS[@]}"; do
        # shellcheck disable=SC2086 # word splitting of the per-round list is intended
        H2_RPS[$label]=$(median ${H2_RPS_R[$label]})
        line="h2load ${H2_ARGS[*]} $label: ${H2_RPS[$label]} req/s, median of ${H2_RPS_R[$label]% } (last round: ${H2_REQS[$label]}"
        if [[ -n ${H2_PEAK[$label]:-} ]]; then
            line+=", $label RSS peak $(kib_to_mib "${H2_PEAK[$label]}") MiB"
        fi
        H2_LINES+=("$line)")
    done
    if ((!NGINX_HAS_H2)); then
        H2_LINES+=("h2load direct baseline skipped: this nginx has no http_v2 module (no h2c listener)")
    fi
fi

# === memory per connection: fresh instances, one per proxy and phase ===

# mem_start NAME UPSTREAM_PORT PORT ADMIN_PORT: a fresh instance of proxy NAME (vmesh,
# hyper-bare, haproxy, nginx) on PORT, one worker, limits raised for the connection counts;
# its process is PID_OF[mem]. ADMIN_PORT is vmesh's.
MEM_MAXCONN=$((IDLE_CONNS > SLOW_REQUESTS ? IDLE_CONNS + 1000 : SLOW_REQUESTS + 1000))
mem_start() {
    local name=$1 up=$2 port=$3 admin=$4 conf
    case $name in
        vmesh)
            rm -rf "$TMP/mem-data" && mkdir -p "$TMP/mem-data"
            conf=$TMP/mem-vmesh.toml
            # header_read_timeout also bounds the idle time between keep-alive requests (10 s
            # by default), idle_timeout closes idle connections (60 s): both would close the
            # idle connections before they are all open on a busy machine.
            cat >"$conf" <<EOF
[agent]
node = "bench-mem"
data_dir = "$TMP/mem-data"
admin_listen = "127.0.0.1:$admin"
worker_threads = 1

[registry]
kind = "none"

[telemetry]
access_log = "off"

[proxy]
max_connections = $MEM_MAXCONN
header_read_timeout = "300s"
idle_timeout = "300s"

[[outbound]]
service = "bench"
listen = "127.0.0.1:$port"
protocol = "http"
balancer = "round-robin"
timeout = "120s"
endpoints = ["127.0.0.1:$up"]
EOF
            start mem "${PROXY_CPU[@]}" "${VMESH_ENV[@]}" "$VMESH_BIN" run --config "$conf"
            ;;
        hyper-bare)
            start mem "${PROXY_CPU[@]}" "$BARE_BIN" "127.0.0.1:$port" "127.0.0.1:$up"
            ;;
        haproxy)
            conf=$TMP/mem-haproxy.cfg
            # HAProxy reserves two fds per connection (client and server side) and, with
            # strict-limits (its default), refuses to start when the hard limit is below that;
            # the idle connections share a few server connections, so the limit is enough.
            cat >"$conf" <<EOF
global
    nbthread 1
    maxconn $MEM_MAXCONN
    no strict-limits

defaults
    mode http
    maxconn $MEM_MAXCONN
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 300s
    timeout http-keep-alive 300s

frontend bench
    bind 127.0.0.1:$port
    default_backend upstream

backend upstream
    server up1 127.0.0.1:$up
EOF
            start mem "${PROXY_CPU[@]}" haproxy -db -f "$conf"
            ;;
        nginx)
            conf=$TMP/mem-nginx.conf
            {
                echo "daemon off; master_process on; worker_processes 1;"
                nginx_common mem-nginx "$MEM_MAXCONN"
                echo "http {"
                nginx_http_common mem-nginx
                cat <<EOF
    upstream bench {
        server 127.0.0.1:$up;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
        }
    }
}
EOF
            } >"$conf"
            start mem "${PROXY_CPU[@]}" nginx -p "$TMP" -e "$TMP/mem-nginx.error.log" -c "$conf"
            ;;
    esac
    wait_listen mem "$port"
}
mem_stop() {
    if [[ -n ${PID_OF[mem]:-} ]]; then
        stop_pid "${PID_OF[mem]}"
        wait "${PID_OF[mem]}" 2>/dev/null || true
        unset 'PID_OF[mem]'
    fi
}

MEM_NAMES=()
declare -A MEM_FRESH=() MEM_IDLE=() MEM_IDLE_HELD=() MEM_SLOW_FRESH=() MEM_SLOW=() MEM_SLOW_HELD=()
if ((MEMORY)); then
    if ((!ONLY_PEERS)); then
        MEM_NAMES+=(vmesh)
    fi
    if [[ -n $BARE_BIN ]]; then
        MEM_NAMES+=(hyper-bare)
    fi
    MEM_NAMES+=(haproxy nginx)
    mapfile -t MEM_PORTS < <(pick_ports $((2 * ${#MEM_NAMES[@]} + 2)))
    SLOW_UP_PORT=${MEM_PORTS[0]}
    MEM_ADMIN=${MEM_PORTS[1]}
    say "starting the slow upstream (tests/fixtures/upstream.py) on 127.0.0.1:$SLOW_UP_PORT"
    start slow-upstream "${UPSTREAM_CPU[@]}" python3 "$REPO_ROOT/tests/fixtures/upstream.py" \
        --port "$SLOW_UP_PORT" --name slow
    wait_http slow-upstream "http://127.0.0.1:$SLOW_UP_PORT/healthz"
    i=2
    for name in "${MEM_NAMES[@]}"; do
        for mode in idle slow; do
            port=${MEM_PORTS[i]}
            i=$((i + 1))
            out="$TMP/mem-$name.$mode.txt"
            if [[ $mode == idle ]]; then
                up=$UP_PORT
                args=(idle --conns "$IDLE_CONNS")
                say "$name (fresh): RSS with $IDLE_CONNS idle keep-alive connections"
            else
                up=$SLOW_UP_PORT
                args=(slow --requests "$SLOW_REQUESTS" --upstream "$SLOW_UP_PORT")
                say "$name (fresh): RSS with $SLOW_REQUESTS requests in flight"
            fi
            mem_start "$name" "$up" "$port" "$MEM_ADMIN"
            sleep 1 # start-up settles, as for the idle RSS above
            run_load "$out" "${LOAD_CPU[@]}" timeout 300 python3 "$REPO_ROOT/tests/bench/idle_conns.py" \
                "${args[@]}" --port "$port" --pid "${PID_OF[mem]}" ||
                { cat "$out" >&2; fail_with_log mem "idle_conns.py $mode against $name failed"; }
            mem_stop
            held=$(($(kv "$out" "${args[1]#--}") - $(kv "$out" failed)))
            if [[ $mode == idle ]]; then
                MEM_FRESH[$name]=$(kv "$out" rss_before_kib)
                MEM_IDLE[$name]=$(kv "$out" rss_kib)
                MEM_IDLE_HELD[$name]=$held
                if (($(kv "$out" open) < held)); then
                    NOTES[$name]+="memory: only $(kv "$out" open) of $held idle connections were still open when measured; "
                fi
            else
                MEM_SLOW_FRESH[$name]=$(kv "$out" rss_before_kib)
                MEM_SLOW[$name]=$(kv "$out" rss_kib)
                MEM_SLOW_HELD[$name]=$held
                if (($(kv "$out" in_flight) < held || $(kv "$out" ok) < held)); then
                    NOTES[$name]+="memory: $(kv "$out" in_flight) of $held requests in flight when measured, $(kv "$out" ok) answered 2xx; "
                fi
            fi
            if (($(kv "$out" failed) > 0)); then
                NOTES[$name]+="memory ($mode): $(kv "$out" failed) connections failed (first error: $(sed -n 's/.*first_error="\([^"]*\)".*/\1/p' "$out")); "
            fi
        done
    done
    stop_pid "${PID_OF[slow-upstream]}"
    unset 'PID_OF[slow-upstream]'
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
# shellcheck disable=SC2034 # read through a nameref in text_table/md_table
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

# Fixed-rate rows: the achieved rate, the percentiles and what each proxy adds over direct.
# shellcheck disable=SC2034 # read through a nameref in text_table/md_table
FR_HEADERS=(name "rate/s" "p50 us" "p99 us" "p99.9 us" "+p50 us" "+p99 us" "+p99.9 us")
FR_ROWS=()
if ((FIXED)); then
    for name in "${NAMES[@]}"; do
        if [[ $name == direct ]]; then
            a50=-; a99=-; a999=-
        else
            a50=$((FR_P50[$name] - FR_P50[direct]))
            a99=$((FR_P99[$name] - FR_P99[direct]))
            a999=$((FR_P999[$name] - FR_P999[direct]))
        fi
        FR_ROWS+=("$name|${FR_ACH[$name]}|${FR_P50[$name]}|${FR_P99[$name]}|${FR_P999[$name]}|$a50|$a99|$a999")
    done
fi

# per_kib RSS_KIB BASE_KIB COUNT: KiB per connection (or request) over the base, one decimal.
per_kib() { awk -v r="$1" -v b="$2" -v n="$3" 'BEGIN { if (n > 0) printf "%.1f", (r - b) / n; else printf "n/a" }'; }
# shellcheck disable=SC2034 # read through a nameref in text_table/md_table
MEM_HEADERS=(name "fresh MiB" "$IDLE_CONNS idle MiB" "KiB/idle conn" "$SLOW_REQUESTS in flight MiB" "KiB/in-flight req")
MEM_ROWS=()
declare -A MEM_PER_IDLE=()
for name in "${MEM_NAMES[@]}"; do
    MEM_PER_IDLE[$name]=$(per_kib "${MEM_IDLE[$name]}" "${MEM_FRESH[$name]}" "${MEM_IDLE_HELD[$name]}")
    MEM_ROWS+=("$name|$(kib_to_mib "${MEM_FRESH[$name]}")|$(kib_to_mib "${MEM_IDLE[$name]}")|${MEM_PER_IDLE[$name]}|$(kib_to_mib "${MEM_SLOW[$name]}")|$(per_kib "${MEM_SLOW[$name]}" "${MEM_SLOW_FRESH[$name]}" "${MEM_SLOW_HELD[$name]}")")
done

# text_table FORMAT HEADERS_VAR ROWS_VAR and md_table HEADERS_VAR ROWS_VAR: one table, the rows
# as "|"-separated fields.
text_table() {
    local fmt=$1 row
    local -n hdr=$2 rows=$3
    # shellcheck disable=SC2059 # the format is a constant of the caller
    printf "$fmt" "${hdr[@]}"
    for row in "${rows[@]}"; do
        IFS='|' read -r -a f <<<"$row"
        # shellcheck disable=SC2059
        printf "$fmt" "${f[@]}"
    done
}
md_table() {
    local row i
    local -n hdr=$1 rows=$2
    printf '| %s ' "${hdr[@]}"
    printf '|\n|:--'
    for ((i = 1; i < ${#hdr[@]}; i++)); do
        printf '|--:'
    done
    printf '|\n'
    for row in "${rows[@]}"; do
        IFS='|' read -r -a f <<<"$row"
        printf '| %s ' "${f[@]}"
        printf '|\n'
    done
}
print_text_table() { text_table "%-16s %9s %8s %8s %8s %8s %13s %13s\n" HEADERS ROWS; }
print_md_table() { md_table HEADERS ROWS; }

# The ratios issue 10's targets name, informational only (never an exit code).
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
verdict() { awk -v c="$1" 'BEGIN { print ((c + 0) ? "met" : "MISSED") }'; }
targets() {
    local v=vmesh r a50 n50 a99 h99 ah an
    r=$(ratio "${RPS[$v]}" "${RPS[haproxy]}")
    printf -- '- throughput at %d connections vs HAProxy: %sx (target >= 1.10x): %s\n' "$CONNS" "$r" \
        "$(verdict "$(awk -v r="$r" 'BEGIN { print (r >= 1.10) }')")"
    r=$(ratio "${RPS[$v]}" "${RPS[nginx]}")
    printf -- '- throughput at %d connections vs nginx: %sx (target >= 1.10x): %s\n' "$CONNS" "$r" \
        "$(verdict "$(awk -v r="$r" 'BEGIN { print (r >= 1.10) }')")"
    if ((ACCESSLOG)); then
        r=$(ratio "${RPS[vmesh+accesslog]}" "${RPS[$v]}")
        printf -- '- access log on vs off: %sx of the throughput (target >= 0.95x): %s\n' "$r" \
            "$(verdict "$(awk -v r="$r" 'BEGIN { print (r >= 0.95) }')")"
    else
        printf -- '- access log on vs off: not measured (--no-accesslog)\n'
    fi
    a50=$((P50[$v] - BASE50))
    n50=$((P50[nginx] - BASE50))
    printf -- '- added p50 at one connection: %d us vs nginx %d us (target <= nginx): %s\n' "$a50" "$n50" \
        "$(verdict $((a50 <= n50)))"
    if ((FIXED)); then
        a99=$((FR_P99[$v] - FR_P99[direct]))
        h99=$((FR_P99[haproxy] - FR_P99[direct]))
        printf -- '- added p99 at 50%% load (%s/s open loop): %d us vs HAProxy %d us (target <= HAProxy): %s\n' \
            "$FR_RATE" "$a99" "$h99" "$(verdict $((a99 <= h99)))"
    else
        printf -- '- added p99 at 50%% load: not measured (--no-fixed-rate)\n'
    fi
    if [[ -n ${H2_RPS[$v]:-} && -n ${H2_RPS[direct]:-} ]]; then
        r=$(ratio "${H2_RPS[$v]}" "${H2_RPS[direct]}")
        printf -- '- HTTP/2 (h2load) through vmesh vs direct: %sx (target >= 0.95x): %s\n' "$r" \
            "$(verdict "$(awk -v r="$r" 'BEGIN { print (r >= 0.95) }')")"
    else
        printf -- '- HTTP/2 through vmesh vs direct: not measured (--no-h2, or nginx without http_v2)\n'
    fi
    printf -- '- RSS idle: %s MiB (target <= 20 MiB): %s\n' "$(kib_to_mib "${IDLE_KIB[$v]}")" \
        "$(verdict $((IDLE_KIB[$v] <= 20 * 1024)))"
    printf -- '- RSS peak under the benchmark (%d connections): %s MiB (target <= 64 MiB): %s\n' "$CONNS" \
        "$(kib_to_mib "${PEAK_KIB[$v]}")" "$(verdict $((PEAK_KIB[$v] <= 64 * 1024)))"
    if ((MEMORY)); then
        ah=${MEM_PER_IDLE[$v]}
        an=${MEM_PER_IDLE[nginx]}
        printf -- '- memory per idle connection: %s KiB vs nginx %s KiB, %sx (target <= nginx): %s\n' "$ah" "$an" \
            "$(ratio "$ah" "$an")" "$(verdict "$(awk -v a="$ah" -v n="$an" 'BEGIN { print (a <= n) }')")"
    else
        printf -- '- memory per idle connection: not measured (--no-memory)\n'
    fi
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
    if [[ -n $MEM_LIMIT_NOTE ]]; then
        printf -- '- memory: %s\n' "${MEM_LIMIT_NOTE%; }"
    fi
    if ((ONLY_PEERS)); then
        printf -- '- --only-peers: vmesh not run\n'
    fi
    if [[ -n $BARE_BIN ]]; then
        printf -- '- hyper-bare: tests/bench/bare-hyper, a hyper 1.x proxy with no features (hyper-util client, one current_thread runtime): the floor of the stack vmesh is built on; vmesh minus hyper-bare is what its features cost\n'
    fi
}

# fixed_rate_lines: the proxies' CPU and the client's own numbers behind the fixed-rate table.
fixed_rate_lines() {
    local name line="proxy CPU at the fixed rate (100% = one core; a proxy near 100% queues, and its latency is queueing):"
    for name in "${NAMES[@]}"; do
        if [[ $name != direct ]]; then
            line+=" $name $(awk -v t="${FR_TICKS[$name]}" -v hz="$CLK_TCK" -v ns="${FR_NS[$name]}" -v n="${FR_REQS[$name]}" \
                'BEGIN { printf "%.0f%% (%.1f us/request)", (ns > 0 ? t / hz * 1e11 / ns : 0), (n > 0 ? t / hz * 1e6 / n : 0) }')"
        fi
    done
    printf '%s\n' "$line"
    line="fixed-rate client: p99 of the send lag (scheduled time -> request written: queueing behind busy connections plus the client's own wake-up delay), median over rounds:"
    for name in "${NAMES[@]}"; do
        line+=" $name ${FR_LAG[$name]} us"
    done
    printf '%s\n' "$line"
}

header() {
    cat <<EOF
machine: $NPROC CPUs, $CPU_MODEL, Linux $(uname -r)
versions: vmesh $VMESH_VER; nginx $NGINX_VER; HAProxy $HAPROXY_VER; wrk $WRK_VER; $H2LOAD_VER
command: $CMDLINE
load: wrk -t1, warm-up $WARMUP, then $ROUNDS interleaved rounds of throughput -c$CONNS -d${ROUND_S}s and latency -c1 -d${ROUND_S}s --latency per row; medians over the rounds
cpu placement: $PIN_NOTE
EOF
    if ((FIXED)); then
        echo "fixed rate: tests/bench/paced-load, open loop at $FR_RATE requests/s ($FR_RATE_NOTE) on $CONNS connections, $ROUNDS interleaved rounds of ${ROUND_S}s per row, latency from each request's scheduled send time; medians over the rounds"
    fi
    if ((MEMORY)); then
        echo "memory: tests/bench/idle_conns.py on fresh instances, one worker each: $IDLE_CONNS idle keep-alive connections after one request each; $SLOW_REQUESTS requests held in flight by tests/fixtures/upstream.py /gate; open-file limit $FD_LIMIT"
    fi
}

mkdir -p "$OUT_DIR"
{
    echo
    header
    echo
    print_text_table
    if ((FIXED)); then
        echo
        echo "fixed rate, open loop at $FR_RATE/s ($FR_RATE_NOTE):"
        text_table "%-16s %8s %8s %8s %9s %8s %8s %9s\n" FR_HEADERS FR_ROWS
    fi
    if ((MEMORY)); then
        echo
        echo "memory (fresh instances; KiB per connection or request over the fresh RSS):"
        text_table "%-12s %10s %16s %14s %18s %18s\n" MEM_HEADERS MEM_ROWS
    fi
    echo
    echo "$CPU_LINE"
    echo "$CPU_REQ_LINE"
    echo "$THREADS_LINE"
    if ((FIXED)); then
        fixed_rate_lines
    fi
    printf '%s\n' "${H2_LINES[@]}"
    notes
    if ((!ONLY_PEERS)); then
        echo
        echo "targets (issue 10, informational):"
        targets
    fi
}

{
    echo "# vmesh proxy benchmark"
    echo
    header | sed 's/^/    /'
    echo
    print_md_table
    if ((FIXED)); then
        echo
        echo "Fixed rate, open loop at $FR_RATE/s ($FR_RATE_NOTE):"
        echo
        md_table FR_HEADERS FR_ROWS
    fi
    if ((MEMORY)); then
        echo
        echo "Memory (fresh instances; KiB per connection or request over the fresh RSS):"
        echo
        md_table MEM_HEADERS MEM_ROWS
    fi
    echo
    printf -- '- %s\n' "$CPU_LINE"
    printf -- '- %s\n' "$CPU_REQ_LINE"
    printf -- '- %s\n' "$THREADS_LINE"
    if ((FIXED)); then
        fixed_rate_lines | sed 's/^/- /'
    fi
    for line in "${H2_LINES[@]}"; do
        printf -- '- %s\n' "$line"
    done
    notes
    if ((!ONLY_PEERS)); then
        echo
        echo "Targets (issue 10, informational):"
        echo
        targets
    fi
    echo
    echo "rps@$CONNS: wrk requests/s at $CONNS connections; p50/p99: wrk latency at 1 connection;"
    echo "+p50/+p99: minus the direct path; RSS: VmRSS of the proxy's process tree, idle after"
    echo "start-up, peak sampled every 200 ms during the $CONNS-connection run. Fixed rate: rate/s is"
    echo "the achieved rate, pN the latency from the scheduled send time, +pN minus direct at the"
    echo "same rate. Memory: fresh instances, RSS after start-up, with the idle connections open,"
    echo "and (another fresh instance) with the requests in flight."
} >"$OUT_DIR/results.md"
say "markdown written to ${OUT_DIR#"$REPO_ROOT"/}/results.md"
