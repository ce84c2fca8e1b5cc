#!/usr/bin/env bash
# The README's two commands, run as a careless operator would: in either order, repeatedly, beside
# running servers. Checks that installing session_kill never crashes a server that has the
# library loaded (a file mapped by a running server must be replaced, never overwritten) and that
# the demo server still answers after the test command's install step and after a second demo.
# Also that a re-run of the demo keeps a user's ALTER SYSTEM settings, and that a cluster started
# by an earlier version (our settings in postgresql.auto.conf) keeps working once cluster_start
# has moved them to session_kill.conf.
# Called by scripts/test.sh (tier 4); prints "operator checks: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
source scripts/cluster.sh
passed=0
failed=0
check() { # check DESCRIPTION COMMAND...
  if "${@:2}"; then
    echo "ok: $1"
    passed=$((passed + 1))
  else
    echo "FAILED: $1"
    failed=$((failed + 1))
  fi
}

# server_state BINDIR DATADIR PORT: the postmaster's PID and the session_kill worker's PID, read
# through a new login (so a crashed or restarting server shows up as a difference or an error).
server_state() {
  local bindir=$1 datadir=$2 port=$3
  echo "$(head -1 "$datadir/postmaster.pid")" \
    "$(as_postgres "$bindir/psql" -X -qAt -h "$datadir" -p "$port" -U postgres -d postgres \
      -c "SELECT pid FROM session_kill.worker" -c "SELECT count(*) >= 0 FROM session_kill.sessions()")"
}

# survives NAME BINDIR DATADIR PORT COMMAND...: runs COMMAND beside the running server, then checks
# that the same postmaster and worker still answer and that nothing crashed.
survives() {
  local name=$1 bindir=$2 datadir=$3 port=$4 before after
  shift 4
  before=$(server_state "$bindir" "$datadir" "$port")
  # A session that has used the library stays open across the install.
  (echo "SELECT count(*) FROM session_kill.sessions();"; sleep 4; echo "SELECT count(*) FROM session_kill.sessions();") |
    as_postgres "$bindir/psql" -X -qAt -h "$datadir" -p "$port" -U postgres -d postgres >/tmp/session_kill-held.$$ 2>&1 &
  local holder=$!
  sleep 1
  "$@" >/dev/null
  sleep 1 # give a corrupted mapping time to be executed by the worker and the held session
  wait "$holder" || true
  after=$(server_state "$bindir" "$datadir" "$port" 2>&1 || true)
  check "$name: the server still answers with the same postmaster and worker" [ "$before" = "$after" ]
  check "$name: the session open during the install still works" [ "$(grep -c '^[0-9]' /tmp/session_kill-held.$$)" = 2 ]
  check "$name: no process crashed" bash -c "! grep -q 'terminated by signal' '$datadir/server.log'"
  rm -f /tmp/session_kill-held.$$
}

work=/var/tmp/session_kill
mkdir -p "$work"
chown postgres: "$work"
# Clusters of this script other than the demo's go under SESSION_KILL_TEST_ROOT, on free ports.
own=${SESSION_KILL_TEST_ROOT:-$work}
mkdir -p "$own"
chown postgres: "$own"
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Each install puts a different build in place than the one the server runs (another profile or
# feature set): overwriting a mapped library in place with different code is what crashed servers.

# 1. The test command's install step beside a running server of the installation it installs into.
bindir=$("$PG15_PRIVATE_CONFIG" --bindir)
datadir=$own/operator-pg15
port=$(free_port)
rm -rf "$datadir"
cluster_start "$bindir" "$datadir" "$port" "session_kill.idle_timeout = '1h'"
as_postgres "$bindir/psql" -X -q -h "$datadir" -p "$port" -U postgres -d postgres -c "CREATE EXTENSION session_kill"
survives "an install beside a running server of the tests' installation" "$bindir" "$datadir" "$port" \
  install_extension "$PG15_PRIVATE_CONFIG" --debug --no-default-features --features "pg15 pg_test"
cluster_stop "$bindir" "$datadir"
rm -rf "$datadir"
install_extension "$PG15_PRIVATE_CONFIG" --debug --no-default-features --features pg15

# 2. The README's first command, then the second command's install step, then the first again.
bash scripts/demo.sh >/dev/null
demo_bindir=$("$PG15_CONFIG" --bindir)
demo=$work/demo
survives "the test command's install beside the demo server" "$demo_bindir" "$demo" 54321 \
  install_extension "$PG15_PRIVATE_CONFIG" --debug --no-default-features --features pg15
survives "another build installed beside the demo server" "$demo_bindir" "$demo" 54321 \
  install_extension "$PG15_CONFIG" --debug --no-default-features --features pg15
bash scripts/demo.sh >/dev/null
check "a second demo run leaves the demo server answering" \
  as_postgres "$demo_bindir/psql" -X -qAt -h "$demo" -p 54321 -U postgres -d postgres -c "SELECT count(*) FROM session_kill.sessions('shop')"


# 3. A user's ALTER SYSTEM setting survives a second run of the demo (which restarts its cluster
#    with cluster_start); the demo server's earlier value of that setting is put back afterwards.
demo_psql() { as_postgres "$demo_bindir/psql" -X -qAt -h "$demo" -p 54321 -U postgres -d postgres "$@"; }
auto_conf_value() { # the value of setting $1 in the demo's postgresql.auto.conf, if any
  demo_psql -c "SELECT setting FROM pg_file_settings WHERE name = '$1' AND sourcefile LIKE '%/postgresql.auto.conf' ORDER BY seqno DESC LIMIT 1"
}
previous=$(auto_conf_value session_kill.idle_timeout)
demo_psql -c "ALTER SYSTEM SET session_kill.idle_timeout = '7min'" -c "SELECT pg_reload_conf()" >/dev/null
bash scripts/demo.sh >/dev/null
check "ALTER SYSTEM SET session_kill.idle_timeout = '7min' survives a second demo run" \
  [ "$(demo_psql -c 'SHOW session_kill.idle_timeout')" = 7min ]
check "the demo's postgresql.auto.conf holds that setting once and none of the demo's own" \
  [ "$(grep -Ec "^(session_kill.idle_timeout|port|shared_preload_libraries) " "$demo/postgresql.auto.conf")" = 1 ]
check "the demo's postgresql.conf includes session_kill.conf once" \
  [ "$(grep -cxF "$CLUSTER_INCLUDE" "$demo/postgresql.conf")" = 1 ]
if [[ -n $previous ]]; then
  demo_psql -c "ALTER SYSTEM SET session_kill.idle_timeout = '$previous'" -c "SELECT pg_reload_conf()" >/dev/null
else
  demo_psql -c "ALTER SYSTEM RESET session_kill.idle_timeout" -c "SELECT pg_reload_conf()" >/dev/null
fi

# 4. A cluster started by the earlier cluster_start, which wrote our settings into
#    postgresql.auto.conf, after a user's ALTER SYSTEM: cluster_start moves our lines out once
#    and keeps the user's (max_connections differs from ours, so it is the user's), twice over.
old=$own/operator-old-pg15
old_port=$(free_port)
rm -rf "$old"
mkdir -p "$old"
chown postgres: "$old"
as_postgres "$bindir/initdb" -D "$old" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
{
  echo "port = $old_port"
  echo "unix_socket_directories = '$old'"
  echo "listen_addresses = '127.0.0.1'"
  echo "shared_preload_libraries = 'session_kill'"
  echo "max_connections = 700"
  echo "log_line_prefix = '%m [%p] %q%u@%d '"
} | as_postgres tee "$old/postgresql.auto.conf" >/dev/null
as_postgres "$bindir/pg_ctl" -D "$old" -l "$old/server.log" -w start >/dev/null
old_psql() { as_postgres "$bindir/psql" -X -qAt -h "$old" -p "$old_port" -U postgres -d postgres "$@"; }
old_psql -c "ALTER SYSTEM SET session_kill.idle_timeout = '7min'" -c "ALTER SYSTEM SET max_connections = 300"
for run in first second; do
  cluster_start "$bindir" "$old" "$old_port"
  check "a cluster of the earlier version, $run start: the user's ALTER SYSTEM settings are in force" \
    [ "$(old_psql -c 'SHOW session_kill.idle_timeout' -c 'SHOW max_connections' | paste -sd' ')" = "7min 300" ]
  check "a cluster of the earlier version, $run start: our settings are in force" \
    [ "$(old_psql -c 'SHOW port' -c 'SHOW shared_preload_libraries' -c 'SELECT count(*) FROM pg_stat_activity WHERE backend_type = $$session_kill worker$$' | paste -sd' ')" = "$old_port session_kill 1" ]
  check "a cluster of the earlier version, $run start: postgresql.auto.conf holds only the user's two settings" \
    [ "$(grep -Ev '^(#|$)' "$old/postgresql.auto.conf" | sort | paste -sd' ')" = "max_connections = '300' session_kill.idle_timeout = '7min'" ]
  check "a cluster of the earlier version, $run start: postgresql.conf includes session_kill.conf once" \
    [ "$(grep -cxF "$CLUSTER_INCLUDE" "$old/postgresql.conf")" = 1 ]
done
cluster_stop "$bindir" "$old"
((failed)) || rm -rf "$old"

echo "operator checks: $passed passed, $failed failed"
((failed == 0))
