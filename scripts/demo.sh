#!/usr/bin/env bash
# One command from a fresh machine to session_kill working: installs the dependencies, builds and
# installs the extension into PostgreSQL 15, starts a local cluster with
# shared_preload_libraries = 'session_kill' (as the postgres OS user, private port and socket
# directory), creates the extension, opens a few real sessions and ends some of them.
# Re-running is safe: everything already in place is skipped or restarted.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
source scripts/cluster.sh
bash scripts/install-deps.sh

bindir=$("$PG15_CONFIG" --bindir)
datadir=/var/tmp/session_kill/demo
port=54321
echo "==> building and installing session_kill into PostgreSQL 15"
# Safe beside a running server (the files are replaced by rename); the restart below loads it.
install_extension "$PG15_CONFIG" --no-default-features --features pg15
echo "==> starting PostgreSQL 15 in $datadir (port $port)"
cluster_start "$bindir" "$datadir" "$port"

export PGHOST=$datadir PGPORT=$port PGUSER=postgres
psql_() { "$bindir/psql" -X -v ON_ERROR_STOP=1 "$@"; }
psql_ -q -d postgres <<'SQL'
SET client_min_messages = warning;
DROP DATABASE IF EXISTS shop WITH (FORCE);
CREATE DATABASE shop;
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'shop_app') THEN CREATE ROLE shop_app LOGIN; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'reporting') THEN CREATE ROLE reporting LOGIN; END IF;
END $$;
DROP EXTENSION IF EXISTS session_kill;
CREATE EXTENSION session_kill;
\c shop
CREATE TABLE orders (id int PRIMARY KEY, status text);
INSERT INTO orders VALUES (1, 'new');
GRANT SELECT, UPDATE ON orders TO shop_app;
SQL

# Real client sessions held open by psql processes fed from a pipe.
holders=()
hold() { # hold USER APPNAME SQL...
  local user=$1 app=$2
  shift 2
  (printf '%s\n' "$@"; sleep 120) | PGAPPNAME=$app "$bindir/psql" -X -q -d shop -U "$user" >/dev/null 2>&1 &
  holders+=($!)
}
for _ in 1 2 3; do hold shop_app web "SELECT 1;"; done
for _ in 1 2; do hold shop_app web "START TRANSACTION;" "UPDATE orders SET status = 'paid' WHERE id = 1;"; done
hold reporting dashboard "SELECT 1;"
hold shop_app batch "SELECT pg_sleep(120);"
trap 'kill "${holders[@]}" 2>/dev/null || true' EXIT
sleep 2

show() { echo; echo "postgres=# $1"; psql_ -d postgres -c "$1"; }
show "SELECT pid, usename, application_name, state, idle_for, xact_age, protected, query FROM session_kill.sessions('shop');"
show "SELECT * FROM session_kill.kill_sessions('shop', 'dry_run', min_idle => '1s');"
show "SELECT * FROM session_kill.kill_sessions('shop', states => '{idle in transaction}', reason => 'demo: stuck transactions');"
show "SELECT * FROM session_kill.kill_sessions('shop', 'cancel', application_name => 'batch');"
show "SELECT * FROM session_kill.kill_sessions('shop', min_idle => '1s', usename => 'reporting');"
show "SELECT pid, usename, application_name, state, idle_for FROM session_kill.sessions('shop');"
show "SELECT * FROM session_kill.drain_database('shop', timeout => '10s', grace => '2s');"
echo; echo "\$ psql -d shop -U shop_app"
"$bindir/psql" -X -d shop -U shop_app -c "SELECT 1" 2>&1 || true
show "SELECT * FROM session_kill.drains();"
show "SELECT session_kill.undrain_database('shop');"
hold shop_app web "SELECT 1;"
sleep 1
show "INSERT INTO session_kill.rules (role, state, timeout, comment) VALUES ('shop_app', 'idle', '2s', 'demo: pool connections') RETURNING id, role, state, timeout;"
sleep 2.5
show "SELECT acted_at, source, rule, actor, pid, database, role, state, action, outcome FROM session_kill.log ORDER BY id;"
show "SELECT * FROM session_kill.stats;"
show "SELECT pid, next_scan, rules, rules_status, audit_queued FROM session_kill.worker;"

cat <<MSG

session_kill is installed and the server is running. Explore with:
  sudo -u postgres $bindir/psql -h $datadir -p $port -d postgres
  (or as root: PGHOST=$datadir PGPORT=$port $bindir/psql -U postgres)
Server log: $datadir/server.log
Stop it:    runuser -u postgres -- $bindir/pg_ctl -D $datadir stop
MSG
