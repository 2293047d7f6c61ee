#!/usr/bin/env bash
# Builds the vmesh packages from this workspace:
#   target/packages/vmesh_<version>_<debarch>.deb        (cargo-deb)
#   target/packages/vmesh-<version>-1.<arch>.rpm         (cargo-generate-rpm)
# from one `cargo build --release -p vmesh-agent`. <version> is the crate version (workspace
# Cargo.toml). The package metadata is in agent/Cargo.toml ([package.metadata.deb],
# [package.metadata.generate-rpm]); the files are packaging/, systemd/ and docs/.
#
# Prerequisites: bash scripts/install-packaging-deps.sh (as root, once).
# Environment: CARGO_TARGET_DIR is honoured for the build; packages always go to
# <workspace>/target/packages. VMESH_PACKAGING_NO_BUILD=1 packages the existing release binary.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

log() { printf 'packaging/build.sh: %s\n' "$*"; }
die() { printf 'packaging/build.sh: error: %s\n' "$*" >&2; exit 1; }

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
for tool in cargo cargo-deb cargo-generate-rpm dpkg-deb dpkg-shlibdeps strip; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool is not installed: run \`bash scripts/install-packaging-deps.sh\` as root"
done

# --- version -------------------------------------------------------------------------------------
# `cargo pkgid` prints e.g. path+file:///work/main/agent#vmesh-agent@0.1.0
pkgid="$(cargo pkgid -p vmesh-agent)"
version="${pkgid##*[@#]}"
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+([.+~a-zA-Z0-9-]*)?$ ]] || die "cannot read the version from '$pkgid'"
rpm_release=1
# The one-line description of both packages (Debian synopsis, RPM Summary).
DEB_SYNOPSIS="service-mesh agent for virtual machines (sidecar proxy, registration)"
deb_arch="$(dpkg --print-architecture)"
rpm_arch="$(uname -m)"

# The Debian changelog's top entry must name this version (lintian and `apt changelog` read it).
changelog_version="$(sed -n '1s/^vmesh (\([^)]*\)).*/\1/p' packaging/changelog)"
[ "$changelog_version" = "$version" ] ||
  die "packaging/changelog starts with version '$changelog_version', the crate is $version: add an entry"

out="$root/target/packages"
stage="$out/.stage"
deb="$out/vmesh_${version}_${deb_arch}.deb"
rpm="$out/vmesh-${version}-${rpm_release}.${rpm_arch}.rpm"
mkdir -p "$out"
rm -rf "$stage"
mkdir -p "$stage"

# --- build -----------------------------------------------------------------------------------------
target_dir="${CARGO_TARGET_DIR:-$root/target}"
binary="$target_dir/release/vmesh"
if [ "${VMESH_PACKAGING_NO_BUILD:-0}" = 1 ]; then
  [ -x "$binary" ] || die "VMESH_PACKAGING_NO_BUILD=1 but $binary is missing"
  log "packaging the existing $binary"
else
  log "cargo build --release -p vmesh-agent"
  cargo build --release -p vmesh-agent
fi
"$binary" --version >/dev/null || die "$binary does not run"
# The packaged default config must be valid for the packaged binary.
"$binary" check-config --config packaging/vmesh.toml >/dev/null ||
  die "packaging/vmesh.toml is not valid for $binary"

# A stripped copy for the .rpm (cargo-deb strips its own copy with --strip). The release
# profile keeps debug line tables, which packages do not ship.
cp "$binary" "$stage/vmesh"
strip --strip-all "$stage/vmesh"

# --- .deb --------------------------------------------------------------------------------------------
log "cargo deb -> $deb"
rm -f "$deb"
cargo deb -p vmesh-agent --no-build --strip --output "$stage/cargo-deb.deb"

# Finish the control data with dpkg-deb, which cargo-deb's metadata cannot express:
# - the synopsis: cargo-deb takes the crate's `description`, which starts with the package name
#   (lintian error description-starts-with-package-name);
# - the changelog name: a native version (no Debian revision) has changelog.gz, not
#   changelog.Debian.gz (lintian wrong-name-for-changelog-of-native-package);
# - md5sums, for `dpkg --verify` / debsums.
tree="$stage/deb"
dpkg-deb -R "$stage/cargo-deb.deb" "$tree"
sed -i "s/^Description: .*/Description: $DEB_SYNOPSIS/" "$tree/DEBIAN/control"
mv "$tree/usr/share/doc/vmesh/changelog.Debian.gz" "$tree/usr/share/doc/vmesh/changelog.gz"
(cd "$tree" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
  >"$tree/DEBIAN/md5sums"
chmod 0644 "$tree/DEBIAN/md5sums"
# Every path gets cargo-deb's timestamp (reproducible: the same inputs give the same .deb).
stamp="$(stat -c %Y "$tree/usr/bin/vmesh")"
find "$tree" -path "$tree/DEBIAN" -prune -o -exec touch -h -d "@$stamp" {} +
export SOURCE_DATE_EPOCH="$stamp"
dpkg-deb --root-owner-group -Zxz --build "$tree" "$deb" >/dev/null

# --- .rpm --------------------------------------------------------------------------------------------
log "cargo generate-rpm -> $rpm"
rm -f "$rpm"
cargo generate-rpm -p agent --output "$rpm"

rm -rf "$stage"
for f in "$deb" "$rpm"; do
  [ -s "$f" ] || die "$f was not written"
  log "wrote $f ($(du -h "$f" | cut -f1))"
done
