#!/usr/bin/env bash
# Installs every prerequisite of the vmesh test suite on a Debian 12 machine (run as root).
# Idempotent: a tool that is already there is not installed again. Installs no running service:
# the tests start their own nginx, Python upstreams and clients on loopback ports.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
# Pinned major versions of the Python peers the tests drive (Playwright drives the web console
# in Debian's Chromium: `playwright install` cannot download its own browsers here, and need not).
# grpcio-health-checking: grpc.health.v1 in the gRPC fixture server (tests/grpc_health.rs).
PIP_PACKAGES=("grpcio>=1.60,<2" "grpcio-health-checking>=1.60,<2" "websockets>=17,<18" "playwright>=1.40,<2"
  # opentelemetry-proto (with protobuf): fixtures/otlp_receiver.py decodes vmesh's OTLP exports.
  "opentelemetry-proto>=1.20,<2")

log() { printf 'install-test-deps: %s\n' "$*"; }
# shellcheck source=scripts/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# --- Debian packages -------------------------------------------------------------------------
# command -> package that provides it
declare -A APT_FOR=(
  [nginx]=nginx-light
  [curl]=curl
  [nghttp]=nghttp2-client
  [h2load]=nghttp2-client
  [promtool]=prometheus
  # The dashboards' test runs the real Prometheus server too (same package).
  [prometheus]=prometheus
  [protoc]=protobuf-compiler
  [etcd]=etcd-server
  [etcdctl]=etcd-client
  [wrk]=wrk
  # The Kubernetes API double is checked with the real kubectl (over TLS: openssl makes the cert).
  [kubectl]=kubectl
  [openssl]=openssl
  # The web console's test runs headless in Debian's Chromium (/usr/bin/chromium).
  [chromium]=chromium
)

missing=()
for cmd in "${!APT_FOR[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing+=("${APT_FOR[$cmd]}")
  fi
done
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  missing+=(python3-pip)
fi

if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
  # A package whose postinst started its service anyway (no policy-rc.d honoured): stop it.
  for svc in nginx prometheus; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
    fi
  done
else
  log "Debian packages present"
fi

# --- Python packages ---------------------------------------------------------------------------
if "$PYTHON" -c 'import grpc, grpc_health.v1.health, websockets, playwright.sync_api, opentelemetry.proto.collector.trace.v1.trace_service_pb2, sys; sys.exit(0 if int(websockets.__version__.split(".")[0]) >= 17 else 1)' >/dev/null 2>&1; then
  log "Python packages present"
else
  log "installing ${PIP_PACKAGES[*]} for $("$PYTHON" -c 'import sys; print(sys.executable)')"
  # Debian's own python3 refuses system-wide pip installs (PEP 668) unless told otherwise.
  pip_flags=()
  if "$PYTHON" -m pip install --help 2>/dev/null | grep -q -- '--break-system-packages'; then
    if [ -e "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]; then
      pip_flags+=(--break-system-packages)
    fi
  fi
  "$PYTHON" -m pip install --quiet "${pip_flags[@]}" "${PIP_PACKAGES[@]}"
fi

# --- Final check: fail loudly rather than let a test discover a missing tool -------------------
for cmd in nginx curl nghttp h2load promtool prometheus chromium; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || { log "$cmd still missing" >&2; exit 1; }
done
"$PYTHON" -c 'import grpc, grpc_health.v1.health, websockets, playwright.sync_api, opentelemetry.proto.collector.trace.v1.trace_service_pb2' || { log "grpcio/grpcio-health-checking/websockets/playwright/opentelemetry-proto still missing" >&2; exit 1; }
log "ok"
