#!/usr/bin/env bash
# Flame graph of vmesh under load, written as an SVG (default docs/flamegraph.svg).
#
# Usage: scripts/flamegraph.sh [--duration 10] [--conns 64] [--accesslog] [--out FILE]
#
# Sets up what tests/bench/run.sh measures (everything on 127.0.0.1, free ports, one mktemp dir,
# every process stopped on exit): one nginx upstream answering `return 200` with a small body,
# and vmesh with worker_threads = 1, one outbound port to it, access log off (--accesslog: to a
# file), keep-alive both sides. vmesh runs alone on CPU 0, wrk and the upstream on CPU 1 (as
# run.sh pins them on a 2-CPU machine). After a 2 s wrk warm-up it records
#     perf record -e cpu-clock -F 499 --call-graph dwarf -p <vmesh>
# for --duration seconds while `wrk -t1 -c<conns>` loads vmesh (cpu-clock: a software event,
# so it works in VMs without hardware counters; DWARF unwinding because the release build has
# no frame pointers: the release profile keeps debug = 1 and the unwind tables), folds the
# stacks with inferno-collapse-perf and draws them with inferno-flamegraph. Frames are coloured
# by the `rust` palette; kernel frames carry `_[k]`.
#
# The binary: VMESH_BIN, else target/release/vmesh (built with `cargo build --release -p
# vmesh-agent` when missing). Needs nginx, wrk, perf (scripts/install-bench-deps.sh installs
# them) and inferno (`cargo install inferno --locked`, run here when missing: it comes from
# crates.io, no other download). perf needs root or kernel.perf_event_paranoid <= 1.
# KEEP_TMP=1 keeps the temp dir (perf.data, the folded stacks, logs).
set -euo pipefail

DURATION=10
CONNS=64
# Samples per second: with 64 KiB of stack copied per sample (the most perf takes; async
# frames are deep and large, and 32 KiB cut half the stacks short), 499 Hz keeps perf.data
# at ~30 MiB per second.
FREQ=499
ACCESSLOG=0
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$REPO_ROOT/docs/flamegraph.svg

die() { printf 'flamegraph: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'flamegraph: %s\n' "$*" >&2; }
usage() { sed -n '4p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --duration) DURATION=${2:?--duration needs a value}; shift 2 ;;
        --conns) CONNS=${2:?--conns needs a value}; shift 2 ;;
        --accesslog) ACCESSLOG=1; shift ;;
        --out) OUT=${2:?--out needs a value}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'flamegraph: unknown argument %q\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $DURATION =~ ^[1-9][0-9]?$ ]] || die "--duration must be 1..99 seconds, got '$DURATION'"
[[ $CONNS =~ ^[1-9][0-9]*$ ]] || die "--conns must be a positive integer, got '$CONNS'"

export PATH="$PATH:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"
for tool in nginx wrk perf curl python3 taskset; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run scripts/install-bench-deps.sh"
done
if ! command -v inferno-collapse-perf >/dev/null 2>&1 || ! command -v inferno-flamegraph >/dev/null 2>&1; then
    say "installing inferno from crates.io: cargo install inferno --locked"
    cargo install inferno --locked --quiet || die "cargo install inferno failed"
fi

VMESH_BIN=${VMESH_BIN:-}
if [[ -z $VMESH_BIN ]]; then
    VMESH_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/vmesh
    if [[ ! -x $VMESH_BIN ]]; then
        say "building: cargo build --release -p vmesh-agent"
        (cd "$REPO_ROOT" && cargo build --release -p vmesh-agent) || die "cargo build failed"
    fi
fi
[[ -x $VMESH_BIN ]] || die "vmesh binary not found or not executable: $VMESH_BIN"

# === processes and cleanup ===

TMP=$(mktemp -d -t vmesh-flamegraph.XXXXXX)
PIDS=()
cleanup() {
    local rc=$? pid i
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || continue
        for ((i = 0; i < 30; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ -n ${KEEP_TMP:-} ]]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_http() { # URL: 2xx within 10 s
    local i
    for ((i = 0; i < 100; i++)); do
        curl -sf -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.1
    done
    die "$1 did not answer within 10 s (logs in $TMP with KEEP_TMP=1)"
}

PROXY_CPU=()
LOAD_CPU=()
if (($(nproc) >= 2)); then
    PROXY_CPU=(taskset -c 0)
    LOAD_CPU=(taskset -c 1)
fi

mapfile -t PORTS < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
for s in socks:
    print(s.getsockname()[1])
EOF
)
UP_PORT=${PORTS[0]}
VMESH_PORT=${PORTS[1]}
ADMIN_PORT=${PORTS[2]}

NGINX_USER=
if [[ ${EUID:-$(id -u)} -eq 0 ]]; then
    NGINX_USER="user root;"
fi
cat >"$TMP/upstream.conf" <<EOF
daemon off; master_process off; worker_processes 1;
$NGINX_USER
pid $TMP/upstream.pid;
error_log $TMP/upstream.error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/body;
    proxy_temp_path $TMP/proxy;
    fastcgi_temp_path $TMP/fastcgi;
    uwsgi_temp_path $TMP/uwsgi;
    scgi_temp_path $TMP/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$UP_PORT backlog=4096;
        location / { default_type text/plain; return 200 "hello from the vmesh bench upstream"; }
    }
}
EOF

ACCESS_LOG=off
if ((ACCESSLOG)); then
    ACCESS_LOG=$TMP/access.log
fi
mkdir -p "$TMP/data"
cat >"$TMP/vmesh.toml" <<EOF
[agent]
node = "flamegraph"
data_dir = "$TMP/data"
admin_listen = "127.0.0.1:$ADMIN_PORT"
worker_threads = 1

[registry]
kind = "none"

[telemetry]
access_log = "$ACCESS_LOG"

[[outbound]]
service = "bench"
listen = "127.0.0.1:$VMESH_PORT"
protocol = "http"
balancer = "round-robin"
timeout = "5s"
endpoints = ["127.0.0.1:$UP_PORT"]
EOF

# vmesh reads VMESH_* env vars as config overrides; never hand it ours (VMESH_BIN).
VMESH_ENV=(env)
while IFS= read -r var; do
    VMESH_ENV+=(-u "$var")
done < <(compgen -e | grep '^VMESH_' || true)

say "starting the nginx upstream on 127.0.0.1:$UP_PORT and vmesh on 127.0.0.1:$VMESH_PORT"
"${LOAD_CPU[@]}" nginx -p "$TMP" -e "$TMP/upstream.error.log" -c "$TMP/upstream.conf" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$UP_PORT/"
"${PROXY_CPU[@]}" "${VMESH_ENV[@]}" "$VMESH_BIN" run --config "$TMP/vmesh.toml" >"$TMP/vmesh.log" 2>&1 &
VMESH_PID=$!
PIDS+=("$VMESH_PID")
wait_http "http://127.0.0.1:$ADMIN_PORT/live"
wait_http "http://127.0.0.1:$VMESH_PORT/"

URL=http://127.0.0.1:$VMESH_PORT/
say "warm-up: wrk -t1 -c$CONNS -d2s"
"${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d2s "$URL" >"$TMP/warmup.txt" 2>&1 || die "wrk warm-up failed"

say "recording: perf record -e cpu-clock -F $FREQ --call-graph dwarf for ${DURATION}s under wrk -t1 -c$CONNS"
"${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d"$((DURATION + 2))s" "$URL" >"$TMP/wrk.txt" 2>&1 &
WRK_PID=$!
PIDS+=("$WRK_PID")
sleep 1 # the load is on before the first sample
perf record -q -e cpu-clock -F "$FREQ" --call-graph dwarf,65528 -p "$VMESH_PID" -o "$TMP/perf.data" \
    -- sleep "$DURATION" >"$TMP/perf-record.log" 2>&1 ||
    { cat "$TMP/perf-record.log" >&2; die "perf record failed (root, or kernel.perf_event_paranoid <= 1, is needed)"; }
wait "$WRK_PID" || die "wrk failed: $(cat "$TMP/wrk.txt")"
RPS=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$TMP/wrk.txt")

say "folding the stacks (perf script can take a minute on a large binary)"
perf script -i "$TMP/perf.data" 2>"$TMP/perf-script.log" >"$TMP/perf.txt" ||
    { tail "$TMP/perf-script.log" >&2; die "perf script failed"; }
SAMPLES=$(awk '/ cpu-clock:/ { n++ } END { print n + 0 }' "$TMP/perf.txt")
((SAMPLES > 0)) || die "no samples recorded"
# The stacks are weighted by the sample period (ns of CPU). The unwinder ends every stack with
# an `[unknown]` frame below main; drop it so the graph starts at the thread.
inferno-collapse-perf --kernel "$TMP/perf.txt" | sed 's/^\([^;]*\);\[unknown\];/\1;/' >"$TMP/folded.txt"
# Stacks the unwinder could not follow down to main (deeper than the 64 KiB copied).
CUT=$(awk '{ t += $NF; if ($0 !~ /;main;|;vmesh::main;|;start_thread/) c += $NF } END { printf "%.1f", (t > 0 ? 100 * c / t : 0) }' "$TMP/folded.txt")

VERSION=$("$VMESH_BIN" --version 2>/dev/null | head -n 1 || true)
# The binary need not be built from HEAD: name both.
BUILT=$(date -u -r "$VMESH_BIN" '+%Y-%m-%d %H:%M UTC')
COMMIT=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
LOG_NOTE="access log off"
((ACCESSLOG)) && LOG_NOTE="access log to a file"
mkdir -p "$(dirname "$OUT")"
inferno-flamegraph --colors rust --width 1600 --minwidth 0.1 \
    --title "vmesh under wrk -t1 -c$CONNS: one worker thread, $LOG_NOTE, $RPS requests/s" \
    --subtitle "${VERSION:-vmesh} built $BUILT (tree at $COMMIT); perf cpu-clock at $FREQ Hz for ${DURATION}s, $SAMPLES samples, DWARF unwinding ($CUT% of the time in stacks cut short); $(date -u +%Y-%m-%d); regenerate with scripts/flamegraph.sh" \
    --countname ns <"$TMP/folded.txt" >"$OUT"
say "wrote ${OUT#"$REPO_ROOT"/} ($SAMPLES samples, $CUT% of the time in stacks cut short; wrk $RPS requests/s)"
