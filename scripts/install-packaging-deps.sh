#!/usr/bin/env bash
# Installs what packaging/build.sh, the packaging tests (tests/tests/packaging_*.rs) and the
# fleet test (tests/tests/fleet_rollout.rs, with scripts/install-ansible-deps.sh) need on a
# Debian 12 machine (run as root): rpm (rpm -qp / rpm --root, and the .rpm's scriptlets in a
# container), lintian, dpkg-dev, systemd's systemd-analyze, systemd-nspawn (the tests boot
# containers over this machine's root to run the packages under systemd), nsenter (util-linux:
# Ansible and the tests reach into those containers), adduser, curl, python3 and python3-apt
# (inside the containers: the app, and Ansible's apt module), binutils (strip, readelf), and
# the cargo subcommands cargo-deb and cargo-generate-rpm (pinned).
# Idempotent: whatever is already there is not installed again. Starts no service.
set -euo pipefail

# Pinned versions of the cargo subcommands (their metadata keys are what agent/Cargo.toml uses).
CARGO_DEB_VERSION="${CARGO_DEB_VERSION:-3.8.0}"
CARGO_GENERATE_RPM_VERSION="${CARGO_GENERATE_RPM_VERSION:-0.21.1}"

log() { printf 'install-packaging-deps: %s\n' "$*"; }
# shellcheck source=scripts/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# --- Debian packages -------------------------------------------------------------------------
# command -> package that provides it
declare -A APT_FOR=(
  [rpm]=rpm
  [rpmbuild]=rpm
  [lintian]=lintian
  [dpkg-deb]=dpkg
  [dpkg-shlibdeps]=dpkg-dev
  [dpkg-architecture]=dpkg-dev
  [systemd-analyze]=systemd
  [adduser]=adduser
  [useradd]=passwd
  [cc]=gcc
  [strip]=binutils
  [readelf]=binutils
  [systemd-nspawn]=systemd-container
  [curl]=curl
  [nsenter]=util-linux
)

missing=()
for cmd in "${!APT_FOR[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
    missing+=("${APT_FOR[$cmd]}")
  fi
done

# The container's demo app runs /usr/bin/python3 (not a pyenv or venv shim).
[ -x /usr/bin/python3 ] || missing+=(python3-minimal)
# Ansible's apt module, run by the container's /usr/bin/python3 in the fleet test.
/usr/bin/python3 -c 'import apt' >/dev/null 2>&1 || missing+=(python3-apt)

if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
else
  log "Debian packages present"
fi

# --- cargo subcommands -------------------------------------------------------------------------
# `cargo install` only when the subcommand is missing or not the pinned version.
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$cargo_bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
  log "cargo is not on PATH: install a Rust toolchain (rustup) first" >&2
  exit 1
fi

installed_version() {
  # `cargo install --list` prints "name vX.Y.Z:" for every installed crate.
  cargo install --list 2>/dev/null | awk -v n="$1" '$1 == n { v = $2; sub(/^v/, "", v); sub(/:$/, "", v); print v }'
}

ensure_crate() {
  local crate="$1" version="$2" have
  have="$(installed_version "$crate")"
  if [ "$have" = "$version" ] && command -v "$crate" >/dev/null 2>&1; then
    log "$crate $version present"
    return
  fi
  log "installing $crate $version (was: ${have:-none})"
  cargo install --locked --version "=$version" "$crate"
}

ensure_crate cargo-deb "$CARGO_DEB_VERSION"
ensure_crate cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"

# --- Final check: fail loudly rather than let the test discover a missing tool ------------------
for cmd in rpm lintian dpkg-deb dpkg-shlibdeps systemd-analyze systemd-nspawn nsenter adduser strip readelf curl cargo-deb cargo-generate-rpm; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || { log "$cmd still missing" >&2; exit 1; }
done
log "ok (systemd-analyze: $(systemd-analyze --version | head -n1))"
