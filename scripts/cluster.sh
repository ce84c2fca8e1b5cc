# Local PostgreSQL clusters for the demo, the tests and the benchmarks (sourced, not run).
# The server refuses to run as root, so clusters belong to the `postgres` OS user and listen on
# a private port and socket directory.

as_postgres() {
  if [[ $(id -un) == postgres ]]; then "$@"; else runuser -u postgres -- "$@"; fi
}

# cluster_start BINDIR DATADIR PORT [extra postgresql.conf lines...]
# Creates the cluster if needed, (re)writes our settings and starts it; idempotent.
cluster_start() {
  local bindir=$1 datadir=$2 port=$3
  shift 3
  mkdir -p "$datadir"
  chown postgres: "$datadir" "$(dirname "$datadir")"
  if [[ ! -f $datadir/PG_VERSION ]]; then
    as_postgres "$bindir/initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  as_postgres "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1 && as_postgres "$bindir/pg_ctl" -D "$datadir" -m fast stop >/dev/null
  {
    echo "port = $port"
    echo "unix_socket_directories = '$datadir'"
    echo "listen_addresses = '127.0.0.1'"
    echo "shared_preload_libraries = 'session_kill'"
    echo "max_connections = 700"
    echo "log_line_prefix = '%m [%p] %q%u@%d '"
    printf '%s\n' "$@"
  } | as_postgres tee "$datadir/postgresql.auto.conf" >/dev/null
  as_postgres "$bindir/pg_ctl" -D "$datadir" -l "$datadir/server.log" -w start >/dev/null
}

cluster_stop() {
  local bindir=$1 datadir=$2
  as_postgres "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1 || return 0
  as_postgres "$bindir/pg_ctl" -D "$datadir" -m fast stop >/dev/null
}
