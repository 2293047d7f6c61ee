#!/usr/bin/env bash
# A real Nautobot instance for vmesh's `[cmdb] kind = "nautobot"` tests (run as root on Debian 12).
#
#   scripts/nautobot.sh install            apt PostgreSQL + Redis, venv with a pinned Nautobot, DB role/db,
#                                          NAUTOBOT_ROOT with nautobot_config.py
#   scripts/nautobot.sh start              start PostgreSQL + Redis, migrate if needed, superuser + API token,
#                                          web server on 127.0.0.1:$NAUTOBOT_PORT; prints NAUTOBOT_URL / NAUTOBOT_TOKEN
#   scripts/nautobot.sh seed               custom fields, location, cluster and the test VMs (REST API only)
#   scripts/nautobot.sh set-field VM KEY VALUE   PATCH one custom field of a VM (VALUE "null" clears it)
#   scripts/nautobot.sh set-status VM STATUS    PATCH a VM's status (e.g. Decommissioning, Active, Staged)
#   scripts/nautobot.sh get VM [DEPTH]      print the VM list answer for ?name=VM (raw JSON)
#   scripts/nautobot.sh env                print NAUTOBOT_URL=... NAUTOBOT_TOKEN=... lines
#   scripts/nautobot.sh status             exit 0 when the API answers with the token, 1 otherwise
#   scripts/nautobot.sh stop               stop the web server (PostgreSQL and Redis stay up)
#   scripts/nautobot.sh stop-all           stop the web server, Redis and PostgreSQL
#
# Every command is idempotent and bounded in time. Everything lives under /opt/vmesh-test.
# This is a throw-away test instance: the passwords, secret key and token below are fixed on purpose.
set -euo pipefail

NAUTOBOT_VERSION="${NAUTOBOT_VERSION:-3.2.7}"
NAUTOBOT_PORT="${NAUTOBOT_PORT:-8089}"
NAUTOBOT_HOST=127.0.0.1
BASE=/opt/vmesh-test
VENV="$BASE/nautobot"
export NAUTOBOT_ROOT="$BASE/nautobot-root"
CONFIG="$NAUTOBOT_ROOT/nautobot_config.py"
LOG="$BASE/nautobot.log"
PIDFILE="$BASE/nautobot.pid"
REDIS_PIDFILE="$BASE/redis.pid"
REDIS_PORT="${NAUTOBOT_REDIS_PORT:-6379}"
DB_NAME=nautobot
DB_USER=nautobot
DB_PASSWORD=vmesh-test-nautobot
ADMIN_USER="admin"
ADMIN_PASSWORD=vmesh-test-admin
# 40 hex characters, the format of a Nautobot API token key.
NAUTOBOT_TOKEN="${NAUTOBOT_TOKEN:-0123456789abcdef0123456789abcdef01234567}"
NAUTOBOT_URL="http://$NAUTOBOT_HOST:$NAUTOBOT_PORT"
START_TIMEOUT="${NAUTOBOT_START_TIMEOUT:-300}"
MIGRATE_TIMEOUT="${NAUTOBOT_MIGRATE_TIMEOUT:-1200}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FIXTURES="$(cd "$HERE/../tests/fixtures/nautobot" && pwd)"

STEP="(none)"
log() { printf 'nautobot.sh: %s\n' "$*" >&2; }
step() { STEP="$1"; log "$1"; }
die() { printf 'nautobot.sh: FAILED at step "%s": %s\n' "$STEP" "$*" >&2; STEP="(done)"; exit 1; }
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ "$STEP" != "(none)" ] && [ "$STEP" != "(done)" ]; then
    printf 'nautobot.sh: FAILED at step "%s" (exit %s)\n' "$STEP" "$rc" >&2
  fi
}
trap on_exit EXIT

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root"; }

nb() { timeout "${NB_TIMEOUT:-300}" "$VENV/bin/nautobot-server" --config "$CONFIG" "$@"; }

# --- PostgreSQL / Redis -----------------------------------------------------------------------
pg_cluster() {
  # "VERSION CLUSTER" of the first cluster pg_lsclusters lists
  pg_lsclusters -h 2>/dev/null | awk 'NR==1 {print $1, $2}'
}

pg_running() { timeout 10 su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1; }

start_postgres() {
  step "start PostgreSQL"
  if pg_running; then return 0; fi
  local cl
  cl="$(pg_cluster)"
  [ -n "$cl" ] || die "no PostgreSQL cluster (pg_lsclusters lists none); run install"
  # shellcheck disable=SC2086
  timeout 60 pg_ctlcluster $cl start || die "pg_ctlcluster $cl start failed; see /var/log/postgresql/"
  for _ in $(seq 1 60); do pg_running && return 0; sleep 0.5; done
  die "PostgreSQL did not accept connections within 30 s"
}

redis_running() { timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

start_redis() {
  step "start Redis"
  if redis_running; then return 0; fi
  timeout 30 redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
    --pidfile "$REDIS_PIDFILE" --logfile "$BASE/redis.log" --dir "$BASE" --save '' --appendonly no \
    || die "redis-server failed to start; see $BASE/redis.log"
  for _ in $(seq 1 40); do redis_running && return 0; sleep 0.25; done
  die "Redis did not answer PING within 10 s; see $BASE/redis.log"
}

psql_admin() { timeout 30 su postgres -c "psql -v ON_ERROR_STOP=1 -qAt" ; }

# --- install ----------------------------------------------------------------------------------
pick_python() {
  local cand
  for cand in "${PYTHON:-}" python3.11 python3 /usr/bin/python3; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 14) else 1)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  return 1
}

cmd_install() {
  need_root
  mkdir -p "$BASE"

  step "install Debian packages"
  local pkgs=() p
  for p in postgresql redis-server curl; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || pkgs+=("$p")
  done
  if [ "${#pkgs[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' postinst from starting their services: `start` does that.
    local policy=/usr/sbin/policy-rc.d added=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; added=1; fi
    log "  apt-get install ${pkgs[*]} (output in $BASE/apt.log)"
    timeout 300 apt-get update -qq >"$BASE/apt.log" 2>&1 \
      || { [ $added = 1 ] && rm -f "$policy"; tail -5 "$BASE/apt.log" >&2; die "apt-get update failed; see $BASE/apt.log"; }
    timeout 900 apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >>"$BASE/apt.log" 2>&1 \
      || { [ $added = 1 ] && rm -f "$policy"; tail -5 "$BASE/apt.log" >&2; die "apt-get install ${pkgs[*]} failed; see $BASE/apt.log"; }
    [ $added = 1 ] && rm -f "$policy"
  else
    log "  postgresql, redis-server, curl already installed"
  fi

  step "create the Python venv $VENV"
  local py
  if [ ! -x "$VENV/bin/python" ]; then
    py="$(pick_python)" || die "no Python 3.10..3.13 found (set PYTHON=...)"
    if ! "$py" -m venv --help >/dev/null 2>&1; then
      timeout 600 apt-get install -y -qq --no-install-recommends python3-venv >>"$BASE/apt.log" 2>&1 \
        || die "apt-get install python3-venv failed; see $BASE/apt.log"
    fi
    "$py" -m venv "$VENV" || die "$py -m venv $VENV failed"
  else
    log "  venv already there"
  fi

  step "pip install nautobot==$NAUTOBOT_VERSION"
  if [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("nautobot"))' 2>/dev/null)" != "$NAUTOBOT_VERSION" ]; then
    timeout 900 "$VENV/bin/python" -m pip install -q --disable-pip-version-check --prefer-binary \
      "nautobot==$NAUTOBOT_VERSION" || die "pip install nautobot==$NAUTOBOT_VERSION failed"
  else
    log "  nautobot $NAUTOBOT_VERSION already installed"
  fi

  start_postgres
  step "create PostgreSQL role and database $DB_NAME"
  if [ "$(echo "select 1 from pg_roles where rolname='$DB_USER'" | psql_admin)" != 1 ]; then
    echo "create role $DB_USER login password '$DB_PASSWORD'" | psql_admin || die "create role failed"
  fi
  if [ "$(echo "select 1 from pg_database where datname='$DB_NAME'" | psql_admin)" != 1 ]; then
    echo "create database $DB_NAME owner $DB_USER" | psql_admin || die "create database failed"
  fi

  step "write $CONFIG"
  mkdir -p "$NAUTOBOT_ROOT"
  if [ ! -f "$CONFIG" ]; then
    NB_TIMEOUT=120 nb init --disable-installation-metrics "$CONFIG" >/dev/null 2>&1 \
      || NB_TIMEOUT=120 "$VENV/bin/nautobot-server" init --disable-installation-metrics "$CONFIG" >/dev/null \
      || die "nautobot-server init failed"
  fi
  # Our settings go in a block at the end of the generated file (replaced on every install).
  python3 - "$CONFIG" "$FIXTURES/nautobot_config_overrides.py" <<'PY' || die "could not write the config overrides"
import sys
cfg, extra = sys.argv[1], sys.argv[2]
begin, end = "# --- vmesh-test overrides (begin) ---", "# --- vmesh-test overrides (end) ---"
text = open(cfg).read()
if begin in text:
    text = text[: text.index(begin)].rstrip("\n") + "\n" + text[text.index(end) + len(end):].lstrip("\n")
text = text.rstrip("\n") + "\n\n" + begin + "\n" + open(extra).read().rstrip("\n") + "\n" + end + "\n"
open(cfg, "w").write(text)
PY
  log "install done (nautobot $NAUTOBOT_VERSION, venv $VENV, NAUTOBOT_ROOT $NAUTOBOT_ROOT)"
}

# --- start / stop / status -------------------------------------------------------------------
need_installed() {
  { [ -x "$VENV/bin/nautobot-server" ] && [ -f "$CONFIG" ]; } || die "Nautobot is not installed ($VENV, $CONFIG); run: $0 install"
}

# HTTP code of GET $1 with the token ("000" when nothing answers).
http_code() {
  curl -s -o /dev/null -m 10 -w '%{http_code}' -H "Authorization: Token $NAUTOBOT_TOKEN" \
    -H 'Accept: application/json' "$NAUTOBOT_URL$1" 2>/dev/null || true
}

server_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid="$(cat "$PIDFILE" 2>/dev/null)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # make sure the pid is still ours (not a recycled one)
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "runserver" || return 1
  echo "$pid"
}

migrate_if_needed() {
  step "check migrations"
  local oid key
  oid="$(echo "select oid from pg_database where datname='$DB_NAME'" | psql_admin)" || die "cannot query PostgreSQL"
  [ -n "$oid" ] || die "database $DB_NAME does not exist; run: $0 install"
  key="nautobot=$NAUTOBOT_VERSION db_oid=$oid"
  if [ -f "$NAUTOBOT_ROOT/.migrated" ] && [ "$(cat "$NAUTOBOT_ROOT/.migrated")" = "$key" ]; then
    log "  migrations already applied ($key); skipping migrate"
    return 0
  fi
  step "nautobot-server migrate (first run takes minutes)"
  local t0=$SECONDS
  timeout "$MIGRATE_TIMEOUT" nice -n 10 "$VENV/bin/nautobot-server" --config "$CONFIG" migrate --no-input >"$BASE/migrate.log" 2>&1 \
    || { tail -20 "$BASE/migrate.log" >&2; die "migrate failed; see $BASE/migrate.log"; }
  echo "$key" >"$NAUTOBOT_ROOT/.migrated"
  log "  migrate took $((SECONDS - t0)) s"
}

ensure_admin() {
  step "create superuser $ADMIN_USER and the API token"
  NB_ADMIN_USER="$ADMIN_USER" NB_ADMIN_PASSWORD="$ADMIN_PASSWORD" NB_TOKEN="$NAUTOBOT_TOKEN" NB_TIMEOUT=180 \
    nb shell --command "$(cat "$FIXTURES/ensure_admin.py")" >>"$BASE/admin.log" 2>&1 \
    || { tail -20 "$BASE/admin.log" >&2; die "could not create the superuser/token; see $BASE/admin.log"; }
}

print_env() {
  echo "NAUTOBOT_URL=$NAUTOBOT_URL"
  echo "NAUTOBOT_TOKEN=$NAUTOBOT_TOKEN"
}

cmd_start() {
  need_root
  need_installed
  local t0=$SECONDS
  start_postgres
  start_redis
  migrate_if_needed

  step "start the web server on $NAUTOBOT_URL"
  if server_pid >/dev/null; then
    log "  already running (pid $(server_pid))"
  else
    if [ "$(http_code /api/)" != 000 ]; then
      die "something else already answers on $NAUTOBOT_URL (set NAUTOBOT_PORT)"
    fi
    # runserver: one process, threaded, no reloader; --insecure serves the static files with DEBUG off.
    setsid nohup "$VENV/bin/nautobot-server" --config "$CONFIG" runserver --noreload --insecure \
      "$NAUTOBOT_HOST:$NAUTOBOT_PORT" >>"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
  fi

  step "wait for $NAUTOBOT_URL/api/status/ (at most ${START_TIMEOUT} s)"
  local deadline=$((SECONDS + START_TIMEOUT)) code admin_done=0
  while :; do
    code="$(http_code /api/status/)"
    [ "$code" = 200 ] && break
    if [ "$code" = 401 ] || [ "$code" = 403 ]; then
      # the server answers but does not know the token yet
      if [ $admin_done = 0 ]; then ensure_admin; admin_done=1; continue; fi
      die "the API refuses the token (HTTP $code) even after creating it; see $BASE/admin.log"
    fi
    server_pid >/dev/null || { tail -20 "$LOG" >&2; die "the web server exited; see $LOG"; }
    [ $SECONDS -lt $deadline ] || { tail -20 "$LOG" >&2; die "no answer 200 within ${START_TIMEOUT} s (last HTTP $code); see $LOG"; }
    sleep 1
  done
  STEP="(done)"
  log "Nautobot $NAUTOBOT_VERSION answers on $NAUTOBOT_URL (start took $((SECONDS - t0)) s)"
  print_env
}

cmd_status() {
  local code
  code="$(http_code /api/status/)"
  if [ "$code" = 200 ]; then
    echo "nautobot: running at $NAUTOBOT_URL (pid $(server_pid || echo '?'))"
    print_env
    return 0
  fi
  echo "nautobot: not answering at $NAUTOBOT_URL (HTTP $code)"
  return 1
}

cmd_stop() {
  step "stop the web server"
  local pid
  if pid="$(server_pid)"; then
    # runserver was started with setsid: stop its whole process group.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
    log "  stopped pid $pid"
  else
    log "  not running"
  fi
  rm -f "$PIDFILE"
}

cmd_stop_all() {
  cmd_stop
  step "stop Redis"
  if redis_running; then timeout 10 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true; fi
  step "stop PostgreSQL"
  local cl
  cl="$(pg_cluster)"
  # shellcheck disable=SC2086
  if [ -n "$cl" ] && pg_running; then timeout 60 pg_ctlcluster $cl stop || die "pg_ctlcluster $cl stop failed"; fi
  STEP="(done)"
}

# --- REST API helpers (seed.py uses only the Python standard library) ---------------------------
api_py() {
  NAUTOBOT_URL="$NAUTOBOT_URL" NAUTOBOT_TOKEN="$NAUTOBOT_TOKEN" timeout "${API_TIMEOUT:-120}" \
    python3 "$FIXTURES/seed.py" "$@"
}

cmd_seed() {
  step "seed through the REST API"
  [ "$(http_code /api/status/)" = 200 ] || die "Nautobot does not answer at $NAUTOBOT_URL; run: $0 start"
  api_py seed || die "seeding failed"
  STEP="(done)"
}

cmd_set_field() {
  [ $# -eq 3 ] || { echo "usage: $0 set-field VM KEY VALUE" >&2; exit 2; }
  step "set custom field $2 of $1"
  api_py set-field "$1" "$2" "$3" || die "PATCH failed"
  STEP="(done)"
}

cmd_set_status() {
  [ $# -eq 2 ] || { echo "usage: $0 set-status VM STATUS" >&2; exit 2; }
  step "set status of $1 to $2"
  api_py set-status "$1" "$2" || die "PATCH failed"
  STEP="(done)"
}

cmd_get() {
  [ $# -ge 1 ] || { echo "usage: $0 get VM [DEPTH]" >&2; exit 2; }
  step "get VM $1"
  api_py get "$@" || die "GET failed"
  STEP="(done)"
}

cmd_main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    seed) cmd_seed "$@" ;;
    set-field) cmd_set_field "$@" ;;
    set-status) cmd_set_status "$@" ;;
    get) cmd_get "$@" ;;
    env) print_env ;;
    status) cmd_status "$@" ;;
    stop) cmd_stop "$@" ;;
    stop-all) cmd_stop_all "$@" ;;
    *) echo "usage: $0 install|start|seed|set-field VM KEY VALUE|set-status VM STATUS|get VM [DEPTH]|env|status|stop|stop-all" >&2; exit 2 ;;
  esac
}

cmd_main "$@"
