#!/usr/bin/env bash
# Install what tests/bench/run.sh needs: nginx (upstream and peer proxy), HAProxy (peer proxy),
# wrk (HTTP/1.1 load), h2load (HTTP/2 load, from nghttp2-client), procps, curl and python3; and
# perf (linux-perf) for scripts/flamegraph.sh. The fixed-rate client (tests/bench/paced-load)
# and the hyper floor (tests/bench/bare-hyper) are built by run.sh with cargo; inferno (the flame
# graph renderer) is installed by scripts/flamegraph.sh with `cargo install inferno`.
#
# Idempotent: packages whose command is already on PATH are skipped, and apt is only called
# when something is missing. Debian/Ubuntu only. Runs apt through sudo when not root.
set -euo pipefail

log() { printf 'install-bench-deps: %s\n' "$*" >&2; }

SUDO=()
if [[ ${EUID:-$(id -u)} -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        log "not root and sudo is missing: run as root"
        exit 1
    fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found: this script supports Debian/Ubuntu only"
    exit 1
fi

# True when apt knows an installable candidate for the package.
has_candidate() {
    local cand
    cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    [[ -n $cand && $cand != "(none)" ]]
}

# command -> package. nginx is handled below (nginx-light preferred, nginx as fallback).
declare -A WANT=(
    [haproxy]=haproxy
    [wrk]=wrk
    [h2load]=nghttp2-client
    [ps]=procps
    [pgrep]=procps
    [curl]=curl
    [python3]=python3
    [taskset]=util-linux
    [timeout]=coreutils
)

missing=()
for cmd in "${!WANT[@]}"; do
    # nginx and haproxy live in /usr/sbin, which is not on every user's PATH.
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$cmd ]]; then
        missing+=("${WANT[$cmd]}")
    fi
done
need_nginx=0
if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]]; then
    need_nginx=1
fi
# perf is `linux-perf` on Debian; Ubuntu ships it per kernel (linux-tools-<release>), handled below.
need_perf=0
if ! command -v perf >/dev/null 2>&1; then
    need_perf=1
fi

if [[ ${#missing[@]} -eq 0 && $need_nginx -eq 0 && $need_perf -eq 0 ]]; then
    log "all benchmark dependencies present"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
"${SUDO[@]}" apt-get update -qq

if [[ $need_nginx -eq 1 ]]; then
    if has_candidate nginx-light; then
        missing+=(nginx-light)
    else
        missing+=(nginx)
    fi
fi

if [[ $need_perf -eq 1 ]]; then
    if has_candidate linux-perf; then
        missing+=(linux-perf)
    elif has_candidate "linux-tools-$(uname -r)"; then
        missing+=("linux-tools-$(uname -r)")
    else
        log "perf: no linux-perf package here; scripts/flamegraph.sh will not run (the benchmark does not need it)"
    fi
fi

if [[ ${#missing[@]} -eq 0 ]]; then
    log "done"
    exit 0
fi

# De-duplicate (ps and pgrep both map to procps).
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
log "installing: ${pkgs[*]}"
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}"

# The Debian nginx/haproxy packages may start system services on install; the benchmark does not
# use them (it runs its own processes on free loopback ports), so they are left as they are.
log "done"
