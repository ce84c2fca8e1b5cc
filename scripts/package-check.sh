#!/usr/bin/env bash
# The Debian package and META.json, used as someone who does not build from source would:
# scripts/package.sh builds target/debian/session_kill_<version>_<arch>.deb, which is installed with
# `apt-get install -y ./session_kill_*.deb` into Debian's PostgreSQL 15 and preloaded in a clean
# cluster of its own (initdb into a new directory, private port and socket directory); there it must
# CREATE EXTENSION and end an idle session with kill_sessions(). Then `apt-get remove`, a reinstall
# (tested again in a new cluster) and a final remove.
# Debian's PostgreSQL 15 is also where scripts/demo.sh installs its own build, and a demo server may
# be running from it. The files the package replaces are saved first and put back (written under a
# new name and renamed, like install_extension) after each removal, so the machine is left as it
# was: a running demo server keeps answering, and scripts/demo.sh works afterwards.
# Called by scripts/test.sh; prints "package checks: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
source scripts/cluster.sh
passed=0
failed=0
ok=1
check() { # check DESCRIPTION COMMAND...; sets ok to 1 or 0
  if "${@:2}"; then
    echo "ok: $1"
    passed=$((passed + 1))
    ok=1
  else
    echo "FAILED: $1"
    failed=$((failed + 1))
    ok=0
  fi
}
finished=0
finish() {
  finished=1
  echo "package checks: $passed passed, $failed failed"
  ((failed == 0))
}

package=postgresql-15-session-kill
version=$(awk -F'"' '/^\[/ { section = $0 } section == "[package]" && /^version *=/ { print $2; exit }' Cargo.toml)
deb_version=${version//-/\~}
bindir=$("$PG15_CONFIG" --bindir)
libdir=$("$PG15_CONFIG" --pkglibdir)
extdir=$("$PG15_CONFIG" --sharedir)/extension
files=("$libdir/session_kill.so" "$extdir/session_kill.control" "$extdir/session_kill--$version.sql")
work=/var/tmp/session_kill
mkdir -p "$work"
chown postgres: "$work"
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
# quietly COMMAND...: runs COMMAND with its output in $log, shown only when it fails.
quietly() { "$@" >"$log" 2>&1 || { sed 's/^/    /' "$log"; return 1; }; }
apt_get() { apt-get -o DPkg::Lock::Timeout=600 -y "$@"; }
installed() { [[ $(dpkg-query -W -f='${Status} ${Version}' "$package" 2>/dev/null) == "install ok installed $deb_version" ]]; }
intact() { installed && [[ -z $(dpkg --verify "$package" 2>&1) ]]; }
removed() {
  local f
  for f in "${files[@]}"; do [[ ! -e $f ]] || return 1; done
  ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"
}

# 1. META.json: valid JSON with what PGXN Meta Spec 1.0.0 requires, agreeing with Cargo.toml.
meta_check() { # meta_check required|values|version
  python3 - "$1" "$version" <<'PY'
import json, os, re, sys
what, version = sys.argv[1], sys.argv[2]
try:
    meta = json.load(open("META.json"))
except (OSError, ValueError) as e:
    sys.exit(f"    META.json: {e}")
semver = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$")
licenses = {"agpl_3", "apache_1_1", "apache_2_0", "artistic_1", "artistic_2", "bsd", "freebsd",
            "gfdl_1_2", "gfdl_1_3", "gpl_1", "gpl_2", "gpl_3", "lgpl_2_1", "lgpl_3_0", "mit",
            "mozilla_1_0", "mozilla_1_1", "openssl", "perl_5", "postgresql", "qpl_1_0", "ssleay",
            "sun", "zlib", "open_source", "restricted", "unrestricted", "unknown"}
errors = []
if what == "required":
    errors = [f"missing {k!r}" for k in ("name", "version", "abstract", "maintainer", "license", "provides", "meta-spec") if k not in meta]
elif what == "values":
    if not re.fullmatch(r"[^/\\\s\x00-\x1f]{2,}", str(meta.get("name", ""))): errors.append("name is not a term")
    if not semver.match(str(meta.get("version"))): errors.append("version is not SemVer")
    if not str(meta.get("abstract", "")).strip(): errors.append("abstract is empty")
    m = meta.get("maintainer")
    if not (isinstance(m, str) and m) and not (isinstance(m, list) and m and all(isinstance(x, str) and x for x in m)):
        errors.append("maintainer is not a string or a list of strings")
    lic = meta.get("license")
    if not (lic in licenses if isinstance(lic, str) else isinstance(lic, (list, dict)) and lic):
        errors.append(f"license {lic!r} is not one of the spec's names")
    if meta.get("meta-spec", {}).get("version", "") != "1.0.0": errors.append("meta-spec version is not 1.0.0")
    provides = meta.get("provides", {})
    if not provides: errors.append("provides is empty")
    for ext, p in provides.items():
        if not os.path.isfile(str(p.get("file"))): errors.append(f"provides.{ext}.file {p.get('file')!r} does not exist")
        if not semver.match(str(p.get("version"))): errors.append(f"provides.{ext}.version is not SemVer")
        if "docfile" in p and not os.path.isfile(p["docfile"]): errors.append(f"provides.{ext}.docfile does not exist")
    if meta.get("release_status", "stable") not in ("stable", "testing", "unstable"): errors.append("bad release_status")
    tags = meta.get("tags", ["ok"])
    if not (isinstance(tags, list) and tags and all(isinstance(t, str) and 2 <= len(t) <= 255 and "/" not in t for t in tags)):
        errors.append("tags are not a list of 2 to 255 character strings")
    pg = meta.get("prereqs", {}).get("runtime", {}).get("requires", {}).get("PostgreSQL")
    if not semver.match(str(pg)): errors.append("prereqs.runtime.requires.PostgreSQL is not a version")
elif what == "version":
    if meta.get("version") != version: errors.append(f"version {meta.get('version')!r}")
    if meta.get("provides", {}).get("session_kill", {}).get("version") != version:
        errors.append("provides.session_kill.version")
for e in errors:
    print(f"    {e}")
sys.exit(1 if errors else 0)
PY
}
check "META.json is valid JSON and has every key PGXN Meta Spec 1.0.0 requires" meta_check required
check "META.json's values follow the spec (name, SemVer versions, license, provides files, tags, prereqs)" meta_check values
check "META.json's version and provides.session_kill.version are Cargo.toml's ($version)" meta_check version

# A demo server of scripts/demo.sh, if one runs: it must still answer at the end, with the same
# postmaster and worker, through a new login that calls the extension's functions.
demo=$work/demo
demo_state() {
  local pid out
  pid=$(head -1 "$demo/postmaster.pid") &&
    out=$(as_postgres "$bindir/psql" -X -qAt -h "$demo" -p 54321 -U postgres -d postgres \
      -c "SELECT pid FROM session_kill.worker" -c "SELECT count(*) >= 0 FROM session_kill.sessions()") &&
    echo "$pid" $out
}
demo_before=
if as_postgres "$bindir/pg_ctl" -D "$demo" status >/dev/null 2>&1; then
  demo_before=$(demo_state 2>/dev/null) || demo_before=
fi

# Whatever happens, the cluster is stopped and removed, and the package, if this test installed it,
# is removed and the files it replaced are put back.
datadir=
holder=
saved=$(mktemp -d)
# save FILE...: keeps a copy of each existing FILE, to be put back when the package is removed.
save() {
  local f
  for f in "$@"; do
    [[ -f $f && ! -e $saved$f ]] || continue
    mkdir -p "$saved$(dirname "$f")"
    cp -a "$f" "$saved$f"
  done
}
restore() { # puts the saved files back, each written under a new name and renamed over
  local f
  while IFS= read -r -d '' f; do
    f=${f#"$saved"}
    mkdir -p "$(dirname "$f")"
    cp -a "$saved$f" "$f.session_kill-new"
    mv -f "$f.session_kill-new" "$f"
  done < <(find "$saved" -type f -print0)
}
restored() {
  local f
  while IFS= read -r -d '' f; do cmp -s "$f" "${f#"$saved"}" || return 1; done < <(find "$saved" -type f -print0)
}
marker=$work/package-check.installed # exists while this test may have the package installed
exec 4>&1 5>&2 # for cleanup: a signal can arrive while a function's output is redirected
cleanup() {
  local status=$?
  exec >&4 2>&5
  if ((!finished)); then
    echo "FAILED: stopped early (exit status $status): see the output above"
    failed=$((failed + 1))
    finish || true
  fi
  exec 3>&- 2>/dev/null || true
  [[ -z $holder ]] || kill "$holder" 2>/dev/null || true
  if [[ -n $datadir && -f $datadir/PG_VERSION ]]; then
    cluster_stop "$bindir" "$datadir" || true
    rm -rf "$datadir" "$datadir".*
  fi
  if [[ -e $marker ]] && dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
    apt_get remove "$package" >/dev/null 2>&1 || echo "warning: could not remove $package" >&2
  fi
  restore
  rm -rf "$saved" "$log" "$marker"
}
trap cleanup EXIT

# The package must not be installed already: this test installs its own build and removes it.
if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
  if [[ -e $marker ]]; then
    echo "    $package was left installed by an interrupted run of this test: removing it"
    save $(dpkg -L "$package" | grep -E "^($libdir|$extdir)/")
    quietly apt_get remove "$package"
  else
    check "$package is not installed yet (it is: this test installs its own build and removes it; run apt-get remove $package first)" false
    finish || exit 1
  fi
fi

# 2. The package, built twice (idempotent).
build() { bash scripts/package.sh 2>"$log" | tail -1 || { tail -30 "$log" | sed 's/^/    /' >&2; return 1; }; }
deb=$(build) || deb=
check "scripts/package.sh builds ${deb:-the package}" test -f "$deb"
((ok)) || { finish; exit 1; }
md5sums_first=$(dpkg-deb -I "$deb" md5sums)
deb_again=$(build) || deb_again=
check "a second scripts/package.sh run rebuilds the same package ($(basename "$deb"))" \
  test "$deb_again" = "$deb" -a "$(dpkg-deb -I "$deb" md5sums 2>/dev/null)" = "$md5sums_first"
check "the file is named session_kill_<version>_<architecture>.deb" \
  test "$(basename "$deb")" = "session_kill_${deb_version}_$(dpkg --print-architecture).deb"
fields=$(dpkg-deb -f "$deb" Package Version Architecture)
check "control: Package $package, Version $deb_version, Architecture $(dpkg --print-architecture)" \
  test "$fields" = "$(printf 'Package: %s\nVersion: %s\nArchitecture: %s' "$package" "$deb_version" "$(dpkg --print-architecture)")"
check "control: Depends on postgresql-15 ($(dpkg-deb -f "$deb" Depends))" \
  grep -Eq '^postgresql-15(,|$)' <<<"$(dpkg-deb -f "$deb" Depends)"
check "control: Maintainer and Description (summary and long description)" \
  test -n "$(dpkg-deb -f "$deb" Maintainer)" -a "$(dpkg-deb -f "$deb" Description | wc -l)" -ge 3
contents=$(dpkg-deb -c "$deb" | awk '{print substr($6, 2)}')
for f in "${files[@]}"; do
  check "the package holds $f" grep -qx "$f" <<<"$contents"
done

# 3. Save what the package will replace: files of the demo's (or anyone's) own install.
save $(dpkg-deb -c "$deb" | awk '$1 ~ /^-/ {print substr($6, 2)}')

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
q() { as_postgres "$bindir/psql" -X -qAt -v ON_ERROR_STOP=1 -h "$datadir" -p "$port" -U postgres "$@"; }

# mapped_code_kb PID: how much of session_kill.so's code the process has mapped (Rss), in kB.
mapped_code_kb() {
  awk '/ r-xp .*\/session_kill\.so$/ { code = 1; next } /^[0-9a-f]+-[0-9a-f]+ / { code = 0 }
       code && $1 == "Rss:" { print $2; exit }' "/proc/$1/smaps"
}

# smoke LABEL: a clean preloaded cluster, CREATE EXTENSION, an idle session ended by kill_sessions.
smoke() {
  local label=$1 pid row postmaster worker
  datadir=$work/package-check-$$
  port=$(free_port)
  rm -rf "$datadir" "$datadir".*
  check "$label: a new cluster of Debian's PostgreSQL 15 starts with shared_preload_libraries = 'session_kill'" \
    quietly cluster_start "$bindir" "$datadir" "$port"
  ((ok)) || return 0
  check "$label: CREATE EXTENSION session_kill" quietly q -d postgres -c "CREATE EXTENSION session_kill"
  check "$label: the extension's version is $version" \
    test "$(q -d postgres -c "SELECT extversion FROM pg_extension WHERE extname = 'session_kill'")" = "$version"
  postmaster=$(head -1 "$datadir/postmaster.pid")
  check "$label: the server preloaded the package's $libdir/session_kill.so" \
    grep -q " $libdir/session_kill.so\$" "/proc/$postmaster/maps"
  worker=$(q -d postgres -c "SELECT pid FROM session_kill.worker" 2>&1) || worker=
  check "$label: the session_kill worker runs (pid ${worker:-none})" test -n "$worker"
  # Rust's standard library asks for libgcc_s; build.rs links gcc's unwinder in instead, so a
  # PostgreSQL that does not load libgcc_s itself maps one library fewer into every backend.
  check "$label: the package's session_kill.so needs no libgcc_s (the unwinder is linked in)" \
    bash -c "readelf -d '$libdir/session_kill.so' | grep -q NEEDED && ! readelf -d '$libdir/session_kill.so' | grep -q 'NEEDED.*libgcc_s'"
  # Every ERROR that session_kill's Rust code raises unwinds its stack with that unwinder.
  unwound=$(q -d postgres -v ON_ERROR_STOP=0 -c "SELECT * FROM session_kill.kill_sessions('postgres', 'terminte')" \
    -c "SELECT 'the session goes on'" 2>&1) || true
  check "$label: an ERROR from session_kill's Rust code (a typo in the mode) reaches the client, and the session goes on" \
    bash -c "grep -q 'ERROR:  invalid mode \"terminte\"' <<<\"\$1\" && grep -qx 'the session goes on' <<<\"\$1\"" _ "$unwound"
  quietly q -d postgres -c "CREATE ROLE smoke_app LOGIN" -c "CREATE DATABASE smoke"

  # A real client left idle: psql reading from a pipe that this script holds open.
  mkfifo "$datadir.fifo"
  PGAPPNAME=package-smoke "$bindir/psql" -X -h "$datadir" -p "$port" -U smoke_app -d smoke \
    <"$datadir.fifo" >"$datadir.client" 2>&1 &
  holder=$!
  exec 3>"$datadir.fifo"
  echo "SELECT 1;" >&3
  pid=
  for _ in $(seq 100); do
    pid=$(q -d postgres -c "SELECT pid FROM session_kill.sessions('smoke') WHERE application_name = 'package-smoke' AND state = 'idle'")
    [[ -z $pid ]] || break
    sleep 0.1
  done
  check "$label: an idle client session is open in database smoke (pid ${pid:-none})" test -n "$pid"
  # Without src/hot_code.ld a backend mapped about 900 kB of the library's code, one page fault
  # for each 64 kB block it ran code in.
  code_kb=$(mapped_code_kb "$pid")
  check "$label: that backend has mapped ${code_kb:-?} kB of session_kill.so's code, at most 256 kB" \
    test "${code_kb:-999999}" -le 256
  row=$(q -d postgres -c "SELECT * FROM session_kill.kill_sessions('smoke', application_name => 'package-smoke', reason => 'package smoke test')" 2>&1) || true
  echo "    kill_sessions: $row"
  check "$label: kill_sessions() reports it terminated" \
    test "$(cut -d'|' -f1,7,8 <<<"$row")" = "$pid|terminate|terminated"
  check "$label: the session is gone from pg_stat_activity" \
    test "$(q -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE pid = ${pid:-0}")" = 0
  echo "SELECT 2;" >&3 # the client notices only when it next talks to the server
  exec 3>&-
  wait "$holder" || true
  holder=
  sed 's/^/    client: /' "$datadir.client"
  check "$label: the client was told 'terminating connection due to administrator command'" \
    grep -q 'terminating connection due to administrator command' "$datadir.client"
  check "$label: with the DETAIL 'session_kill: ...: package smoke test'" \
    grep -q '^DETAIL:  session_kill: .*package smoke test$' "$datadir.client"
  check "$label: no server process crashed" bash -c "! grep -q 'terminated by signal' '$datadir/server.log'"
  cluster_stop "$bindir" "$datadir"
  rm -rf "$datadir" "$datadir".*
  datadir=
}

# remove_package LABEL: apt-get remove, its files are gone, then the saved files are put back.
remove_package() {
  local label=$1
  check "$label: apt-get remove $package" quietly apt_get remove "$package"
  check "$label: the package is no longer installed and its files are gone" removed
  restore
  check "$label: the files that were there before the package are back" restored
}

# 4. Install with apt, as the README says; look at what dpkg installed; smoke test.
install_deb() { touch "$marker" && (cd "$(dirname "$deb")" && quietly apt_get install ./session_kill_*.deb); }
check "apt-get install -y ./session_kill_*.deb into Debian's postgresql-15" install_deb
check "dpkg: $package $deb_version is installed" installed
listing=$(dpkg -L "$package" 2>/dev/null || true)
for f in "${files[@]}"; do
  check "dpkg -L lists $f" grep -qx "$f" <<<"$listing"
done
check "dpkg --verify: the files on disk are the package's" intact
refuses() { ! install_extension "$PG15_CONFIG" --no-default-features --features pg15 2>"$log" && grep -q "remove that package first" "$log" && intact; }
check "the demo's install step (install_extension) refuses to overwrite the package's files" refuses
smoke "installed"
remove_package "first removal"

# 5. Reinstall (twice: the second is a no-op), smoke test again, remove for good.
check "reinstall: apt-get install -y ./session_kill_*.deb" install_deb
check "reinstall: installing the same package again succeeds" install_deb
check "reinstall: $package $deb_version is installed and dpkg --verify is clean" intact
smoke "reinstalled"
remove_package "final removal"

if [[ -n $demo_before ]]; then
  check "the demo server still answers with the same postmaster and worker" \
    test "$(demo_state 2>&1)" = "$demo_before"
fi
finish
