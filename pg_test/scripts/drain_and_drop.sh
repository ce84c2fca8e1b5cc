#!/usr/bin/env bash
# Maintenance recipe: close the database, end its sessions, drop it, reopen the name.
# The drain raises an ERROR if sessions remain, and ON_ERROR_STOP + set -e stop the script
# before dropdb. Usage: drain_and_drop.sh DB [TIMEOUT]   (PGHOST/PGPORT/PGUSER from the environment)
set -euo pipefail
db=$1
timeout=${2:-30s}
psql -X -v ON_ERROR_STOP=1 -v db="$db" -v timeout="$timeout" -d postgres <<'SQL'
SELECT sessions_at_start, cancelled, terminated, remaining, refused_logins
FROM session_kill.drain_database(:'db', timeout => :'timeout', grace => '1s');
SQL
dropdb "$db"
psql -X -v ON_ERROR_STOP=1 -v db="$db" -d postgres <<'SQL'
SELECT session_kill.undrain_database(:'db');
SQL
echo "dropped $db"
