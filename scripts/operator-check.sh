#!/usr/bin/env bash
# The README's two commands, run as a careless operator would: in either order, repeatedly, beside
# running servers. Checks that installing session_kill never crashes a server that has the
# library loaded (a file mapped by a running server must be replaced, never overwritten) and that
# the demo server still answers after the test command's install step and after a second demo.
# Called by scripts/test.sh (its last tier); prints "operator checks: N passed, M failed".
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

# Each install puts a different build in place than the one the server runs (another profile or
# feature set): overwriting a mapped library in place with different code is what crashed servers.

# 1. The test command's install step beside a running server of the installation it installs into.
bindir=$("$PG15_PRIVATE_CONFIG" --bindir)
datadir=$work/operator-pg15
port=54399
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

echo "operator checks: $passed passed, $failed failed"
((failed == 0))
