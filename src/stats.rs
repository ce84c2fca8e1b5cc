//! `session_kill.stats` and `session_kill.worker`: the shared-memory counters as views.

use crate::args;
use crate::shmem;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

/// Sessions acted on since the server started, by path, reason and outcome.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
fn action_counts() -> TableIterator<
    'static,
    (name!(source, String), name!(reason, String), name!(outcome, String), name!(sessions, i64)),
> {
    crate::args::require_current_catalog();
    shmem::require_preloaded();
    let (rows, _) = shmem::counts();
    TableIterator::new(rows.into_iter().map(|r| (r.source.to_owned(), r.reason, r.outcome, r.count as i64)))
}

/// The background worker's schedule (its PID, its last scan and when it plans the next one;
/// NULL when nothing is due and it sleeps until something changes), the rules in force and
/// the audit entries waiting for `session_kill.log`, and how many were lost since the server
/// started (a full queue, or no audit table to write them to); the sync worker's failures in a
/// row and, while it fails, when it is tried again (1 s after the first failure, doubling up to
/// a minute).
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(pid, Option<i32>),
        name!(last_scan, Option<TimestampWithTimeZone>),
        name!(next_scan, Option<TimestampWithTimeZone>),
        name!(scans, i64),
        name!(rules, i32),
        name!(rules_loaded_at, Option<TimestampWithTimeZone>),
        name!(rules_status, Option<String>),
        name!(audit_queued, i32),
        name!(audit_dropped, i64),
        name!(sync_failures, i32),
        name!(sync_retry_at, Option<TimestampWithTimeZone>),
    ),
> {
    crate::args::require_current_catalog();
    shmem::require_preloaded();
    let (_, w) = shmem::counts();
    let sync = shmem::sync_state();
    let pid = shmem::worker_pid();
    TableIterator::once((
        (pid != 0).then_some(pid),
        args::timestamp(w.last_scan),
        args::timestamp(w.next_scan),
        w.scans as i64,
        shmem::rules_in_force() as i32,
        args::timestamp(sync.rules_loaded_at),
        Some(sync.rules_status.as_str().to_owned()).filter(|s| !s.is_empty()),
        shmem::audit_waiting().0 as i32,
        shmem::audit_dropped() as i64,
        sync.failures as i32,
        args::timestamp(sync.retry_at).filter(|_| sync.failures > 0),
    ))
}

extension_sql!(
    r#"
CREATE VIEW session_kill.stats AS SELECT * FROM session_kill.action_counts();
COMMENT ON VIEW session_kill.stats IS 'Sessions acted on since the server started, by path, reason and outcome';
CREATE VIEW session_kill.worker AS SELECT * FROM session_kill.worker_status();
COMMENT ON VIEW session_kill.worker IS 'The session_kill background worker: last and next scan, rules in force, audit entries waiting, sync failures in a row';
"#,
    name = "stats_views",
    requires = [action_counts, worker_status]
);
