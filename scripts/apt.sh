# shellcheck shell=bash
# Sourced by the install-*-deps.sh scripts (they define `log` first).
#
# apt_install PKG...: installs the Debian packages named (duplicates dropped) as root, with a
# temporary /usr/sbin/policy-rc.d that keeps their maintainer scripts from starting services;
# exits 1 naming the packages when not run as root.
apt_install() {
  local pkgs policy=/usr/sbin/policy-rc.d added=0 rc=0
  mapfile -t pkgs < <(printf '%s\n' "$@" | sort -u)
  if [ "$(id -u)" -ne 0 ]; then
    log "missing packages ${pkgs[*]}; run this script as root" >&2
    exit 1
  fi
  log "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    added=1
  fi
  { apt-get update && apt-get install -y --no-install-recommends "${pkgs[@]}"; } || rc=$?
  if [ "$added" = 1 ]; then
    rm -f "$policy"
  fi
  return "$rc"
}
