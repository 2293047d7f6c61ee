#!/usr/bin/env bash
# vmesh discovery at scale: ONE caller agent watching N services x 10 endpoints, from real etcd
# and from the Consul double (tests/fixtures/consul_double.py).
#
# Usage: tests/bench/discovery-scale.sh [--etcd-scales 500,2000,3500,5000] [--consul-scales 100,500,5000]
#                                       [--no-etcd] [--no-consul] [--idle 30] [--changes 100]
#                                       [--no-perf]
#
# What it does (all on 127.0.0.1, ports picked free at start, everything under one mktemp dir,
# every process stopped by the EXIT trap):
#   1. builds `cargo build --profile fastrel -p vmesh-agent`, unless VMESH_BIN points at a binary,
#      and copies the binary into the temp dir (a rebuild meanwhile cannot swap it);
#   2. etcd: starts Debian's `etcd` (one member, fresh --data-dir), then for each scale, smallest
#      first, adds the missing services to it (keys /vmesh/services/svc-NNNN/inst-K, 10 per
#      service, through the v3 JSON gateway /v3/kv/txn, 128 puts per txn) and runs one agent:
#        [registry] kind = "etcd"; one [[outbound]] per service, sources = ["etcd"], no listen;
#        [proxy] shared_outbound_listen; [telemetry] access_log = "off"; a fresh data_dir;
#   3. Consul: starts the double, registers the services through /v1/catalog/register (10
#      catalog nodes vm-0..vm-9; each instance with one passing check, as every instance vmesh
#      registers has its TTL check) and runs the agent the same way with kind = "consul" and the
#      default max_watches (128) and watch_wait (30s): up to 128 services one blocking query per
#      service (the 100-service row), beyond that catalog mode (two blocking queries on
#      /v1/health/state/any and /v1/catalog/services, docs/registry.md "From Consul");
#   4. per agent (tests/bench/discovery_scale.py measure):
#        sync        seconds from the agent's start until every service shows its 10 endpoints in
#                    GET /clusters?service=svc-NNNN (a sample polled every 50 ms, then all checked)
#        RSS         VmRSS 5 s after the sync
#        idle CPU    (utime + stime) / wall over --idle s with no change, % of one core; the
#                    registry's CPU and the rest of the machine's in the same window beside it;
#                    perf record -e cpu-clock -g for 10 s when it is >= 1% (--no-perf: never)
#        changes     --changes changes: adds of an 11th endpoint (127.0.0.2) to distinct random
#                    services, then their deletes in a random order; each timed from the return of
#                    the registry write to the moment /clusters?service= shows it (first poll at
#                    once, then every 10 ms; bound 30 s), one change at a time; each of the two
#                    phases starts changes for at most 50 s (the row says how many were done)
#        /metrics    size of one scrape, taken last
#   5. prints the table and writes it as markdown to target/bench/discovery-scale.md.
#
# Timings are informational; the script never fails on a number (an agent that never syncs is a
# row marked FAILED with its last warning). It exits non-zero only when something could not be
# started. A full run takes ~20 min on 2 vCPUs (plus the build). KEEP_TMP=1 keeps the temp dir
# (configs, logs, JSON results) and prints its path.
set -euo pipefail

# === arguments ===

ETCD_SCALES=500,2000,3500,5000
CONSUL_SCALES=100,500,5000
RUN_ETCD=1
RUN_CONSUL=1
IDLE=30
CHANGES=100
PERF=1
DEFAULT_MAX_WATCHES=128 # the agent's registry.max_watches: beyond it, Consul catalog mode

usage() { sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//'; }

CMDLINE=$(printf '%q ' "$0" "$@")
CMDLINE=${CMDLINE% }

while [[ $# -gt 0 ]]; do
    case $1 in
        --etcd-scales) ETCD_SCALES=${2:?--etcd-scales needs a value}; shift 2 ;;
        --etcd-scales=*) ETCD_SCALES=${1#*=}; shift ;;
        --consul-scales) CONSUL_SCALES=${2:?--consul-scales needs a value}; shift 2 ;;
        --consul-scales=*) CONSUL_SCALES=${1#*=}; shift ;;
        --no-etcd) RUN_ETCD=0; shift ;;
        --no-consul) RUN_CONSUL=0; shift ;;
        --idle) IDLE=${2:?--idle needs a value}; shift 2 ;;
        --idle=*) IDLE=${1#*=}; shift ;;
        --changes) CHANGES=${2:?--changes needs a value}; shift 2 ;;
        --changes=*) CHANGES=${1#*=}; shift ;;
        --no-perf) PERF=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'discovery-scale: unknown argument %q\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done

die() { printf 'discovery-scale: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'discovery-scale: %s\n' "$*" >&2; }

# parse_scales ARRAY "500,2000": sets ARRAY to the sorted unique list, each 20..5000 (the port
# scheme holds 5,000 services). Runs in this shell, so that die stops the script.
parse_scales() {
    local -n out=$1
    local s
    [[ $2 =~ ^[0-9]+(,[0-9]+)*$ ]] || die "scales must look like 500,2000, got '$2'"
    out=()
    for s in ${2//,/ }; do
        s=$((10#$s))
        ((s >= 20 && s <= 5000)) || die "a scale must be 20..5000, got $s"
        out+=("$s")
    done
    mapfile -t out < <(printf '%s\n' "${out[@]}" | sort -n -u)
}
parse_scales ETCD_LIST "$ETCD_SCALES"
parse_scales CONSUL_LIST "$CONSUL_SCALES"
[[ $IDLE =~ ^[1-9][0-9]*$ ]] && ((IDLE <= 120)) || die "--idle must be 1..120 seconds, got '$IDLE'"
[[ $CHANGES =~ ^[0-9]+$ ]] && ((CHANGES >= 2 && CHANGES <= 1000)) || die "--changes must be 2..1000, got '$CHANGES'"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HELPER=$REPO_ROOT/tests/bench/discovery_scale.py
DOUBLE=$REPO_ROOT/tests/fixtures/consul_double.py
OUT_DIR=$REPO_ROOT/target/bench
export PATH="$PATH:/usr/sbin:/sbin"

for tool in curl python3 timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
if ((RUN_ETCD)); then
    command -v etcd >/dev/null 2>&1 || die "etcd not found (Debian: apt-get install etcd-server)"
fi
if ((PERF)) && ! command -v perf >/dev/null 2>&1; then
    say "perf not found: no profiles (install linux-perf, or pass --no-perf)"
    PERF=0
fi

# === processes and cleanup ===

TMP=$(mktemp -d -t vmesh-discovery-scale.XXXXXX)
declare -A PID_OF=()

stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? name
    trap - EXIT INT TERM
    for name in "${!PID_OF[@]}"; do
        stop_pid "${PID_OF[$name]}"
    done
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

fail_with_log() {
    local name=$1 msg=$2
    printf 'discovery-scale: error: %s\n--- last lines of %s log ---\n' "$msg" "$name" >&2
    tail -n 30 "$TMP/$name.log" >&2 || true
    exit 1
}

# Percent of the machine's CPU time that was busy over one second (from /proc/stat).
cpu_busy_pct() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x, " "); split(b, y, " "); t = y[1] - x[1]; i = y[2] - x[2]
        printf "%.0f", (t > 0 ? 100 * (t - i) / t : 0) }'
}
busy_neighbours() {
    ps -e -o pid=,comm= | awk '$2 ~ /^(cargo|rustc|cc1|cc1plus|ld|clippy-driver|cargo-clippy)$/ {
        printf "%s%s(%s)", sep, $2, $1; sep = " " }'
}
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# === ports ===

mapfile -t PORTS < <(python3 "$HELPER" ports 5)
[[ ${#PORTS[@]} -eq 5 ]] || die "could not pick free ports"
ETCD_PORT=${PORTS[0]}
ETCD_PEER=${PORTS[1]}
CONSUL_PORT=${PORTS[2]}
ADMIN_PORT=${PORTS[3]}
SHARED_PORT=${PORTS[4]}
ETCD_URL=http://127.0.0.1:$ETCD_PORT
CONSUL_URL=http://127.0.0.1:$CONSUL_PORT

# === build ===

if [[ -z ${VMESH_BIN:-} ]]; then
    say "building: cargo build --profile fastrel -p vmesh-agent"
    (cd "$REPO_ROOT" && cargo build --profile fastrel -p vmesh-agent) || die "cargo build failed"
    VMESH_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/fastrel/vmesh
else
    CMDLINE="VMESH_BIN=$(printf '%q' "$VMESH_BIN") $CMDLINE"
fi
[[ -x $VMESH_BIN ]] || die "vmesh binary not found or not executable: $VMESH_BIN"
cp "$VMESH_BIN" "$TMP/vmesh"
VMESH_VER=$("$TMP/vmesh" --version 2>/dev/null | head -n 1 || true)
GIT_REV=$(cd "$REPO_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "?")
if [[ -n $(cd "$REPO_ROOT" && git status --porcelain --untracked-files=no -- agent Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    GIT_REV+="+changes"
fi

BUSY_BEFORE=$(cpu_busy_pct)
NEIGHBOURS_BEFORE=$(busy_neighbours)
LOAD_BEFORE=$(loadavg)
START_TIME=$(date +%s)
RESULTS=()
CONSUL_NOTES=()
mkdir -p "$OUT_DIR"

# run_agent REGISTRY URL SERVICES REGISTRY_PID TAG [LABEL [CONFIG ARGS...]]: one agent, measured.
run_agent() {
    local registry=$1 url=$2 services=$3 reg_pid=$4 tag=$5 label=${6:-}
    shift 6
    local name=vmesh-$tag dir=$TMP/$tag budget=100 sync_timeout perf_args=()
    mkdir -p "$dir/data"
    python3 "$HELPER" config --registry "$registry" --address "$url" --services "$services" \
        --admin "127.0.0.1:$ADMIN_PORT" --shared "127.0.0.1:$SHARED_PORT" \
        --data-dir "$dir/data" "$@" >"$dir/vmesh.toml"
    "$TMP/vmesh" check-config --config "$dir/vmesh.toml" >"$dir/check.txt" 2>&1 ||
        { cat "$dir/check.txt" >&2; die "the generated config for $tag is invalid"; }
    if [[ $registry == consul ]]; then
        # The double answers one health query at a time: allow 4x its measured pace, + 60 s.
        sync_timeout=$(awk -v ms="$PROBE_MS" -v n="$services" 'BEGIN { printf "%d", 60 + 4 * n * ms / 1000 }')
    else
        sync_timeout=60
    fi
    if ((PERF)); then
        perf_args=(--perf "$OUT_DIR/discovery-scale-perf-$tag.txt" --perf-min-cpu 1.0)
    fi
    local started
    started=$(date +%s.%N)
    "$TMP/vmesh" run --config "$dir/vmesh.toml" >"$TMP/$name.log" 2>&1 &
    PID_OF[$name]=$!
    python3 "$HELPER" measure --registry "$registry" --url "$url" --admin "127.0.0.1:$ADMIN_PORT" \
        --pid "${PID_OF[$name]}" --registry-pid "$reg_pid" --started "$started" \
        --services "$services" --label "$label" --sync-timeout "$sync_timeout" --idle "$IDLE" \
        --changes "$CHANGES" --concurrency 1 --change-budget "$budget" \
        --agent-log "$TMP/$name.log" "${perf_args[@]}" --out "$dir/result.json" ||
        fail_with_log "$name" "measuring $tag failed"
    stop_pid "${PID_OF[$name]}"
    unset "PID_OF[$name]"
    RESULTS+=("$dir/result.json")
}

# === etcd ===

if ((RUN_ETCD)); then
    ETCD_VER=$(etcd --version 2>/dev/null | awk 'NR == 1 { print $3 }')
    say "etcd $ETCD_VER on $ETCD_URL"
    # Debian's etcd reads ETCD_* variables as flags: the caller's shell must not change the run.
    mapfile -t unset_env < <(env | awk -F= '/^ETCD/ { print "-u"; print $1 }')
    env "${unset_env[@]}" etcd --name default --data-dir "$TMP/etcd-data" \
        --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
        --initial-cluster "default=http://127.0.0.1:$ETCD_PEER" --log-level warn \
        >"$TMP/etcd.log" 2>&1 &
    PID_OF[etcd]=$!
    for ((i = 0; i < 100; i++)); do
        kill -0 "${PID_OF[etcd]}" 2>/dev/null || fail_with_log etcd "etcd exited during start-up"
        curl -sf --max-time 1 "$ETCD_URL/health" | grep -q '"health":"true"' && break
        sleep 0.1
    done
    ((i < 100)) || fail_with_log etcd "etcd not healthy within 10 s"
    loaded=0
    for n in "${ETCD_LIST[@]}"; do
        t0=$(date +%s.%N)
        python3 "$HELPER" etcd-load "$ETCD_URL" "$loaded" "$n" >/dev/null || die "loading etcd failed"
        say "etcd: services $loaded..$((n - 1)) loaded ($(((n - loaded) * 10)) keys) in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
        loaded=$n
        run_agent etcd "$ETCD_URL" "$n" "${PID_OF[etcd]}" "etcd-$n" ""
    done
    stop_pid "${PID_OF[etcd]}"
    unset "PID_OF[etcd]"
fi

# === Consul (the double) ===

if ((RUN_CONSUL)); then
    say "Consul double on $CONSUL_URL"
    python3 "$DOUBLE" --port "$CONSUL_PORT" >"$TMP/consul.out" 2>>"$TMP/consul.log" &
    PID_OF[consul]=$!
    for ((i = 0; i < 100; i++)); do
        kill -0 "${PID_OF[consul]}" 2>/dev/null || fail_with_log consul "the Consul double exited during start-up"
        grep -q ready "$TMP/consul.out" 2>/dev/null && break
        sleep 0.1
    done
    ((i < 100)) || fail_with_log consul "the Consul double not ready within 10 s"
    # Its request log (one line per request) would grow by GBs: keep only the start.
    : >"$TMP/consul.log"
    loaded=0
    for n in "${CONSUL_LIST[@]}"; do
        t0=$(date +%s.%N)
        python3 "$HELPER" consul-load "$CONSUL_URL" "$loaded" "$n" >/dev/null || die "registering in the Consul double failed"
        t1=$(date +%s.%N)
        PROBE_MS=$(python3 "$HELPER" consul-probe "$CONSUL_URL" "svc-$(printf %04d $((n - 1)))")
        say "consul: services $loaded..$((n - 1)) registered ($(((n - loaded) * 10)) instances) in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s; one health query takes $PROBE_MS ms"
        CONSUL_NOTES+=("$n services: $(((n - loaded) * 10)) instances registered in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s ($(awk -v a="$t0" -v b="$t1" -v c="$(((n - loaded) * 10))" 'BEGIN { printf "%.0f", c / (b - a) }')/s), one /v1/health/service answer $PROBE_MS ms")
        loaded=$n
        : >"$TMP/consul.log"
        if ((n <= DEFAULT_MAX_WATCHES)); then mode="(one query per service)"; else mode="(catalog mode)"; fi
        run_agent consul "$CONSUL_URL" "$n" "${PID_OF[consul]}" "consul-$n" "$mode"
        : >"$TMP/consul.log"
    done
    stop_pid "${PID_OF[consul]}"
    unset "PID_OF[consul]"
fi

((${#RESULTS[@]})) || die "nothing was measured"

# === report ===

BUSY_AFTER=$(cpu_busy_pct)
NEIGHBOURS_AFTER=$(busy_neighbours)
LOAD_AFTER=$(loadavg)
ELAPSED=$(($(date +%s) - START_TIME))
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM_TOTAL=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
IDLE_NOTE=
if ((BUSY_BEFORE >= 10 || BUSY_AFTER >= 10)) || [[ -n $NEIGHBOURS_BEFORE$NEIGHBOURS_AFTER ]]; then
    IDLE_NOTE="WARNING: the machine was not idle (CPU busy outside the benchmark: $BUSY_BEFORE% before, $BUSY_AFTER% after"
    if [[ -n $NEIGHBOURS_BEFORE$NEIGHBOURS_AFTER ]]; then
        IDLE_NOTE+="; running: ${NEIGHBOURS_BEFORE:-$NEIGHBOURS_AFTER}"
    fi
    IDLE_NOTE+="); see the 'rest of machine' column (other processes' CPU during each idle window, % of one core)"
fi

header() {
    cat <<EOF
machine: $(nproc) CPUs, ${CPU_MODEL:-unknown}, $MEM_TOTAL, Linux $(uname -r)
versions: ${VMESH_VER:-vmesh ?} (git $GIT_REV); etcd ${ETCD_VER:-n/a}; Consul: tests/fixtures/consul_double.py on $(python3 --version 2>&1)
command: $CMDLINE ($ELAPSED s)
load average: $LOAD_BEFORE at start, $LOAD_AFTER at the end
EOF
}
notes() {
    local line
    for line in "${CONSUL_NOTES[@]}"; do
        printf -- '- Consul double, %s\n' "$line"
    done
    if [[ -n $IDLE_NOTE ]]; then
        printf -- '- %s\n' "$IDLE_NOTE"
    fi
}

TEXT_TABLE=$(python3 "$HELPER" table "${RESULTS[@]}")
MD_TABLE=$(python3 "$HELPER" table --md "${RESULTS[@]}")
{
    echo
    header
    echo
    printf '%s\n' "$TEXT_TABLE"
    notes
}
{
    echo "# vmesh discovery at scale"
    echo
    header | sed 's/^/    /'
    echo
    printf '%s\n' "$MD_TABLE"
    notes
    echo
    echo "sync: agent start until every service shows its 10 endpoints in /clusters; RSS: VmRSS 5 s"
    echo "after the sync; idle CPU: agent utime+stime over ${IDLE} s with no change, % of one core;"
    echo "registry CPU: etcd's or the double's in the same window; changes: adds of an 11th endpoint"
    echo "then deletes, from the registry write's return to /clusters showing it (10 ms polls, 30 s"
    echo "bound; > 30000 = a percentile that fell on a change not seen in 30 s); rest of machine:"
    echo "other processes' CPU during the idle window, % of one core."
} >"$OUT_DIR/discovery-scale.md"
say "markdown written to ${OUT_DIR#"$REPO_ROOT"/}/discovery-scale.md"
