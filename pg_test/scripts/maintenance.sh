#!/usr/bin/env bash
# A nightly maintenance script as a DBA would write it: end idle sessions of a database, then
# drop it. psql stops at the first error (ON_ERROR_STOP) and the script with it (set -e).
# Usage: maintenance.sh DB   (PGHOST/PGPORT/PGUSER from the environment)
set -euo pipefail
db=$1
psql -X -v ON_ERROR_STOP=1 -v db="$db" -d postgres <<'SQL'
\echo ending the sessions of :db
SELECT action, outcome, count(*)
FROM session_kill.kill_sessions(:'db', 'terminate', min_idle => '0', reason => 'nightly rebuild')
GROUP BY action, outcome
ORDER BY action, outcome;
SQL
dropdb "$db"
echo "dropped $db"
