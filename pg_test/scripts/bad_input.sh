#!/usr/bin/env bash
# The same kind of script with a typo in the mode: psql must stop before anything is signalled
# and before the following statement runs, and the script must exit non-zero.
# Usage: bad_input.sh DB
set -euo pipefail
db=$1
psql -X -v ON_ERROR_STOP=1 -v db="$db" -d postgres <<'SQL'
SELECT * FROM session_kill.kill_sessions(:'db', 'terminte');
SELECT 'not reached';
SQL
dropdb "$db"
