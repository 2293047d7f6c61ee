#!/usr/bin/env bash
# Installs what the Ansible role and playbooks (ansible/) and their test
# (tests/tests/ansible_rollout.rs) need: ansible-core (ansible-playbook, ansible-galaxy) and
# ansible-lint, pinned, with `python3 -m pip install` into the Python that runs the tests
# ($PYTHON, default python3). Idempotent: nothing is installed when the pinned versions are there.
# Needs only PyPI; starts nothing. Run as root on a Debian machine whose python3 is Debian's own
# (PEP 668 "externally managed": --break-system-packages is added then), or as any user for a
# pyenv/virtualenv Python.
#
#   bash scripts/install-ansible-deps.sh
#   ANSIBLE_CORE_VERSION=2.18.12 bash scripts/install-ansible-deps.sh   # another pin
#
# Checked on Python 3.11 (Debian 12): ansible-core 2.19 supports a controller on Python
# 3.11-3.13; ansible-core 2.20 needs Python >= 3.12, so do not raise the pin past 2.19 here.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
ANSIBLE_CORE_VERSION="${ANSIBLE_CORE_VERSION:-2.19.14}"
ANSIBLE_LINT_VERSION="${ANSIBLE_LINT_VERSION:-26.10.1}"

log() { printf 'install-ansible-deps: %s\n' "$*"; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  log "$PYTHON not found: install python3 (apt-get install python3 python3-pip)" >&2
  exit 1
fi

# The installed version of a distribution, or nothing.
installed() {
  "$PYTHON" - "$1" <<'EOF' 2>/dev/null || true
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
EOF
}

have_core="$(installed ansible-core)"
have_lint="$(installed ansible-lint)"
if [ "$have_core" = "$ANSIBLE_CORE_VERSION" ] && [ "$have_lint" = "$ANSIBLE_LINT_VERSION" ]; then
  log "ansible-core $have_core and ansible-lint $have_lint present"
else
  if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
      log "pip is missing for $PYTHON; run this script as root (it installs python3-pip)" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends python3-pip
  fi
  # Debian's own python3 refuses system-wide pip installs (PEP 668) unless told otherwise.
  pip_flags=(--quiet --disable-pip-version-check)
  stdlib="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
  if [ -e "$stdlib/EXTERNALLY-MANAGED" ]; then
    pip_flags+=(--break-system-packages)
  fi
  log "installing ansible-core==$ANSIBLE_CORE_VERSION ansible-lint==$ANSIBLE_LINT_VERSION" \
    "(was: ${have_core:-none} / ${have_lint:-none}) for $("$PYTHON" -c 'import sys; print(sys.executable)')"
  "$PYTHON" -m pip install "${pip_flags[@]}" \
    "ansible-core==$ANSIBLE_CORE_VERSION" "ansible-lint==$ANSIBLE_LINT_VERSION"
fi

# --- Final check: the commands the tests run, on PATH, from this Python ------------------------
bindir="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
for cmd in ansible-playbook ansible-lint; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    log "$cmd is not on PATH (it was installed into $bindir): add that directory to PATH" >&2
    exit 1
  fi
done
log "ok: $(ansible-playbook --version | head -n1), ansible-lint $(installed ansible-lint)"
