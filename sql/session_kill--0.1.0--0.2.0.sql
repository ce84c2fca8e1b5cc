-- session_kill 0.1.0 -> 0.2.0 (ALTER EXTENSION session_kill UPDATE)
--
-- 0.2.0 adds blockers(), horizon(), kill_sessions(..., blocking interval), the columns xmin_age
-- and xmin_held_for of sessions(), and the worker view's columns audit_dropped, sync_failures and
-- sync_retry_at. The tables (rules, log) keep their rows; the rules' state column comment names
-- the new states blocking, snapshot and replay_lag. A function whose arguments or result change is dropped
-- and created again; the EXECUTE and SELECT rights granted on it are carried over.
\echo Use "ALTER EXTENSION session_kill UPDATE" to load this file. \quit

-- Rights granted on the objects that are replaced, as GRANT statements run again below.
SELECT set_config(
    'session_kill_upgrade.regrants',
    coalesce(string_agg(format('GRANT %s ON %s %s TO %s', a.privilege_type, replaced.kind, replaced.object, g.name), '; '), ''),
    true)
FROM (
    SELECT 'FUNCTION' AS kind,
           'session_kill.kill_sessions(name, text, interval, name, text, cidr, text[], interval, interval, boolean, boolean, text, interval)' AS object,
           p.proacl AS acl, p.proowner AS owner
      FROM pg_catalog.pg_proc p
     WHERE p.oid = 'session_kill.kill_sessions(name, text, interval, name, text, cidr, text[], interval, interval, boolean, boolean, text)'::pg_catalog.regprocedure
    UNION ALL
    SELECT 'FUNCTION', 'session_kill.sessions(name)', p.proacl, p.proowner
      FROM pg_catalog.pg_proc p
     WHERE p.oid = 'session_kill.sessions(name)'::pg_catalog.regprocedure
    UNION ALL
    SELECT 'TABLE', 'session_kill.worker', c.relacl, c.relowner
      FROM pg_catalog.pg_class c
     WHERE c.oid = 'session_kill.worker'::pg_catalog.regclass
) AS replaced,
LATERAL pg_catalog.aclexplode(replaced.acl) AS a,
LATERAL (SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(a.grantee::pg_catalog.regrole::text) END) AS g(name)
WHERE a.grantee <> replaced.owner;

-- kill_sessions: a new last argument, blocking.
DROP FUNCTION session_kill.kill_sessions(name, text, interval, name, text, cidr, text[], interval, interval, boolean, boolean, text);
CREATE FUNCTION session_kill.kill_sessions(
    "db" name,
    "mode" text DEFAULT 'terminate',
    "min_idle" interval DEFAULT '0',
    "usename" name DEFAULT NULL,
    "application_name" text DEFAULT NULL,
    "client_addr" cidr DEFAULT NULL,
    "states" text[] DEFAULT NULL,
    "grace" interval DEFAULT '5s',
    "wait" interval DEFAULT '10s',
    "include_superusers" bool DEFAULT false,
    "all_databases" bool DEFAULT false,
    "reason" text DEFAULT NULL,
    "blocking" interval DEFAULT NULL
) RETURNS TABLE (
    "pid" INT,
    "datname" name,
    "usename" name,
    "application_name" TEXT,
    "state" TEXT,
    "idle_for" interval,
    "action" TEXT,
    "outcome" TEXT
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kill_sessions_0_2_wrapper';
REVOKE EXECUTE ON FUNCTION session_kill.kill_sessions(name, text, interval, name, text, cidr, text[], interval, interval, boolean, boolean, text, interval) FROM PUBLIC;

-- The worker view: three more columns.
DROP VIEW session_kill.worker;
DROP FUNCTION session_kill.worker_status();
CREATE FUNCTION session_kill.worker_status() RETURNS TABLE (
    "pid" INT,
    "last_scan" timestamp with time zone,
    "next_scan" timestamp with time zone,
    "scans" bigint,
    "rules" INT,
    "rules_loaded_at" timestamp with time zone,
    "rules_status" TEXT,
    "audit_queued" INT,
    "audit_dropped" bigint,
    "sync_failures" INT,
    "sync_retry_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'worker_status_wrapper';
REVOKE EXECUTE ON FUNCTION session_kill.worker_status() FROM PUBLIC;
CREATE VIEW session_kill.worker AS SELECT * FROM session_kill.worker_status();
COMMENT ON VIEW session_kill.worker IS 'The session_kill background worker: last and next scan, rules in force, audit entries waiting, sync failures in a row';

-- blockers(): new, listing only, public like sessions().
CREATE FUNCTION session_kill.blockers(
    "db" name DEFAULT NULL
) RETURNS TABLE (
    "pid" INT,
    "datname" name,
    "usename" name,
    "application_name" TEXT,
    "state" TEXT,
    "lock" TEXT,
    "relation" TEXT,
    "mode" TEXT,
    "granted" bool,
    "blocked_pids" INT[],
    "all_blocked_pids" INT[],
    "longest_wait" interval,
    "protected" TEXT
)
VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'blockers_wrapper';
GRANT EXECUTE ON FUNCTION session_kill.blockers(name) TO PUBLIC;

-- sessions(): two more columns at the end, xmin_age and xmin_held_for.
DROP FUNCTION session_kill.sessions(name);
CREATE FUNCTION session_kill.sessions(
    "db" name DEFAULT NULL
) RETURNS TABLE (
    "pid" INT,
    "datname" name,
    "usename" name,
    "application_name" TEXT,
    "client_addr" inet,
    "backend_type" TEXT,
    "state" TEXT,
    "backend_start" timestamp with time zone,
    "xact_start" timestamp with time zone,
    "query_start" timestamp with time zone,
    "state_change" timestamp with time zone,
    "idle_for" interval,
    "xact_age" interval,
    "query" TEXT,
    "protected" TEXT,
    "xmin_age" INT,
    "xmin_held_for" interval
)
VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'sessions_wrapper';
GRANT EXECUTE ON FUNCTION session_kill.sessions(name) TO PUBLIC;

-- horizon(): new, listing only, public like sessions().
CREATE FUNCTION session_kill.horizon() RETURNS TABLE (
    "kind" TEXT,
    "pid" INT,
    "name" TEXT,
    "datname" name,
    "xmin" xid,
    "xmin_age" INT,
    "held_for" interval,
    "can_end" bool,
    "detail" TEXT
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'horizon_wrapper';
GRANT EXECUTE ON FUNCTION session_kill.horizon() TO PUBLIC;

COMMENT ON COLUMN session_kill.rules.state IS 'idle, idle in transaction, transaction (age of the open transaction), active (running statement), blocking (holding up a lock request), snapshot (holding back the xmin horizon) or replay_lag (holding back replay on a hot standby)';

DO $$
DECLARE
    regrants text := current_setting('session_kill_upgrade.regrants');
BEGIN
    IF regrants <> '' THEN
        EXECUTE regrants;
    END IF;
END
$$;
