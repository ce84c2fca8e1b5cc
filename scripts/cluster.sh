# Local PostgreSQL clusters for the demo, the tests and the benchmarks (sourced, not run).
# The server refuses to run as root, so clusters belong to the `postgres` OS user and listen on
# a private port and socket directory.
#
# Our settings live in DATADIR/session_kill.conf, which postgresql.conf includes from its last
# line. postgresql.auto.conf is read after postgresql.conf, so what a user sets with ALTER SYSTEM
# overrides ours and is never touched: a second run keeps it.

as_postgres() {
  if [[ $(id -un) == postgres ]]; then "$@"; else runuser -u postgres -- "$@"; fi
}

CLUSTER_INCLUDE="include_if_exists = 'session_kill.conf'"

# cluster_start BINDIR DATADIR PORT [extra postgresql.conf lines...]
# Creates the cluster if needed, (re)writes our settings and starts it; idempotent.
cluster_start() {
  local bindir=$1 datadir=$2 port=$3 ours
  shift 3
  mkdir -p "$datadir"
  chown postgres: "$datadir" "$(dirname "$datadir")"
  if [[ ! -f $datadir/PG_VERSION ]]; then
    as_postgres "$bindir/initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  as_postgres "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1 && as_postgres "$bindir/pg_ctl" -D "$datadir" -m fast stop >/dev/null
  ours=$(
    echo "# Written by session_kill's scripts/cluster.sh on every start: do not edit. Settings made"
    echo "# with ALTER SYSTEM (postgresql.auto.conf) override these."
    echo "port = $port"
    echo "unix_socket_directories = '$datadir'"
    echo "listen_addresses = '127.0.0.1'"
    echo "shared_preload_libraries = 'session_kill'"
    echo "max_connections = 700"
    echo "log_line_prefix = '%m [%p] %q%u@%d '"
    printf '%s\n' "$@"
  )
  # A cluster started by an earlier version of this script has our settings in
  # postgresql.auto.conf, where they would override session_kill.conf: moved out once.
  if [[ ! -f $datadir/session_kill.conf && -f $datadir/postgresql.auto.conf ]]; then
    cluster_migrate_auto_conf "$datadir" "$ours"
  fi
  printf '%s\n' "$ours" | as_postgres tee "$datadir/session_kill.conf.new" >/dev/null
  as_postgres mv -f "$datadir/session_kill.conf.new" "$datadir/session_kill.conf"
  if ! grep -qxF "$CLUSTER_INCLUDE" "$datadir/postgresql.conf"; then
    printf '\n# session_kill: settings of scripts/cluster.sh\n%s\n' "$CLUSTER_INCLUDE" |
      as_postgres tee -a "$datadir/postgresql.conf" >/dev/null
  fi
  as_postgres "$bindir/pg_ctl" -D "$datadir" -l "$datadir/server.log" -w start >/dev/null
}

# cluster_migrate_auto_conf DATADIR OURS: drops from postgresql.auto.conf the lines that set one
# of our settings (OURS, postgresql.conf lines) to the value we set. Those are the lines an
# earlier version wrote (ALTER SYSTEM keeps them, quoted); a value a user chose with ALTER SYSTEM
# differs from ours and stays, as does everything else.
cluster_migrate_auto_conf() {
  local datadir=$1 ours=$2 auto=$1/postgresql.auto.conf
  awk '
    function setting(line,   m) {
      if (!match(line, /^[ \t]*[A-Za-z_][A-Za-z0-9_.]*[ \t]*=?[ \t]*/)) return 0
      name = substr(line, 1, RLENGTH); value = substr(line, RLENGTH + 1)
      gsub(/[ \t=]/, "", name); name = tolower(name)
      sub(/[ \t]*$/, "", value)
      if (value ~ /^'\''.*'\''$/) { value = substr(value, 2, length(value) - 2); gsub(/'\'''\''/, "'\''", value) }
      return 1
    }
    FNR == NR { if (setting($0)) ours[name] = value; next }
    setting($0) && (name in ours) && ours[name] == value { next }
    { print }
  ' <(printf '%s\n' "$ours") "$auto" >"$auto.session_kill-new"
  chown postgres: "$auto.session_kill-new"
  chmod 600 "$auto.session_kill-new"
  mv -f "$auto.session_kill-new" "$auto"
}

cluster_stop() {
  local bindir=$1 datadir=$2
  as_postgres "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1 || return 0
  as_postgres "$bindir/pg_ctl" -D "$datadir" -m fast stop >/dev/null
}
