#!/usr/bin/env bash
# Builds a Debian package of session_kill for Debian's own PostgreSQL 15 (package `postgresql-15`):
#   target/debian/session_kill_<version>_<architecture>.deb, package postgresql-15-session-kill,
# holding /usr/lib/postgresql/15/lib/session_kill.so and the control and SQL files in
# /usr/share/postgresql/15/extension. Install it with `apt install ./session_kill_*.deb`.
# The build is `cargo pgrx package` (release) against /usr/lib/postgresql/15/bin/pg_config.
# The version comes from Cargo.toml, the maintainer and the descriptions from META.json.
# Re-running rebuilds the package from scratch. Prints the .deb's path on its last line.
# Usage: scripts/package.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

die() { echo "error: $*" >&2; exit 1; }

bash scripts/install-deps.sh >&2
if ! dpkg-query -W -f='${Status}' dpkg-dev 2>/dev/null | grep -q "install ok installed"; then
  echo "==> apt-get install dpkg-dev (dpkg-shlibdeps)" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends dpkg-dev; } >/dev/null ||
    die "could not install dpkg-dev"
fi

package=postgresql-15-session-kill
version=$(awk -F'"' '/^\[/ { section = $0 } section == "[package]" && /^version *=/ { print $2; exit }' Cargo.toml)
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || die "no version found in Cargo.toml's [package] section"
deb_version=${version//-/\~} # a SemVer pre-release (0.2.0-rc.1) sorts before its release in Debian as 0.2.0~rc.1
arch=$(dpkg --print-architecture)
read_meta() { # read_meta KEY: a string field of META.json
  python3 -c 'import json, sys; v = json.load(open("META.json"))[sys.argv[1]]; print(v if isinstance(v, str) else ", ".join(v))' "$1" ||
    die "META.json has no usable \"$1\""
}
maintainer=$(read_meta maintainer)
summary=$(read_meta abstract)
description=$(read_meta description)
[[ $maintainer == *"<"*"@"*">" ]] || die "META.json's maintainer must read \"Name <email>\", not \"$maintainer\""
((${#summary} <= 80)) || die "META.json's abstract is the package's one-line summary: at most 80 characters"

out=target/debian
root=$out/root
deb=$out/session_kill_${deb_version}_${arch}.deb
rm -rf "$root"
mkdir -p "$root/DEBIAN"

echo "==> cargo pgrx package (release) against $PG15_CONFIG" >&2
log=$out/build.log
if ! cargo pgrx package --pg-config "$PG15_CONFIG" --out-dir "$root" \
    --no-default-features --features pg15 >"$log" 2>&1; then
  cat "$log" >&2
  die "cargo pgrx package failed (log: $log)"
fi
libdir=$("$PG15_CONFIG" --pkglibdir)
extdir=$("$PG15_CONFIG" --sharedir)/extension
for file in "$libdir/session_kill.so" "$extdir/session_kill.control" "$extdir/session_kill--$version.sql"; do
  [[ -s $root$file ]] || die "cargo pgrx package did not produce $file (log: $log)"
done
grep -q "^default_version = '$version'\$" "$root$extdir/session_kill.control" ||
  die "$extdir/session_kill.control does not say default_version = '$version'"
unexpected=$(cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path ".$libdir/*" ! -path ".$extdir/*")
[[ -z $unexpected ]] || die "cargo pgrx package wrote files outside PostgreSQL's directories: $unexpected"

docdir=$root/usr/share/doc/$package
mkdir -p "$docdir"
cp README.md "$docdir/README.md"
find "$root" -type d -exec chmod 0755 {} +
find "$root" -type f -exec chmod 0644 {} + # Debian installs shared libraries without the x bit

# The libraries the .so links to (libc6), with the versions its symbols need.
shlibs_dir=$(mktemp -d)
trap 'rm -rf "$shlibs_dir"' EXIT
mkdir "$shlibs_dir/debian"
printf 'Source: session-kill\n\nPackage: %s\nArchitecture: any\n' "$package" >"$shlibs_dir/debian/control"
so=$PWD/$root$libdir/session_kill.so
shlibs=$(cd "$shlibs_dir" && dpkg-shlibdeps -O "$so" 2>/dev/null) || die "dpkg-shlibdeps failed on $so"
shlibs=${shlibs#shlibs:Depends=}
[[ -n $shlibs ]] || die "dpkg-shlibdeps found no library dependencies for $so"

{
  echo "Package: $package"
  echo "Version: $deb_version"
  echo "Architecture: $arch"
  echo "Maintainer: $maintainer"
  echo "Installed-Size: $(du -sk "$root/usr" | cut -f1)"
  echo "Depends: postgresql-15, $shlibs"
  echo "Section: database"
  echo "Priority: optional"
  echo "Description: $summary"
  # Long description: lines start with a space; an empty line is " .".
  fold -s -w 78 <<<"$description" | sed -e 's/ *$//' -e 's/^/ /'
  echo " ."
  echo " Needs shared_preload_libraries = 'session_kill' in postgresql.conf and a"
  echo " restart, then CREATE EXTENSION session_kill."
} >"$root/DEBIAN/control"
(cd "$root" && find usr -type f -print0 | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"

rm -f "$out"/session_kill_*.deb "$out"/*.deb.new # packages of earlier versions
dpkg-deb --root-owner-group --build "$root" "$deb.new" >&2 || die "dpkg-deb --build failed"
mv -f "$deb.new" "$deb"
echo "==> built $deb" >&2
echo "$deb"
