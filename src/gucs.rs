//! Every `session_kill.*` setting, in one place. All are `PGC_SIGHUP`: set in postgresql.conf
//! or with `ALTER SYSTEM` plus a reload, never by a client with `SET`, so a session cannot
//! exempt itself.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// `session_kill.protected_roles`: comma-separated role names whose sessions are never
/// cancelled or terminated by session_kill (e.g. monitoring or replication-management roles).
pub static PROTECTED_ROLES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));

/// `session_kill.protected_applications`: comma-separated `LIKE` patterns on
/// `application_name` that are never touched. Empty by default: the client picks its own
/// application_name, so any client can claim a protected name. Protect backup tools by their
/// role (`protected_roles`) instead.
pub static PROTECTED_APPLICATIONS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));

/// `session_kill.idle_timeout`: the background worker terminates client sessions idle (outside a
/// transaction) for longer than this. 0 turns it off. Unlike `idle_session_timeout`, a client
/// cannot switch it off.
pub static IDLE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `session_kill.idle_in_transaction_timeout`: likewise for sessions idle inside a transaction
/// (also an aborted one), which hold locks and snapshots.
pub static IDLE_IN_TRANSACTION_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `session_kill.transaction_timeout`: terminates sessions whose transaction is older than this,
/// running or not (also on PostgreSQL releases without a built-in transaction_timeout).
pub static TRANSACTION_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `session_kill.blocker_timeout`: terminates a session that holds up others in the lock manager
/// (and waits for no lock itself) once the longest-waiting of them has waited this long; a
/// running statement is cancelled first if the rule says so. 0 turns it off.
pub static BLOCKER_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `session_kill.snapshot_timeout`: ends a session whose snapshot (`backend_xmin`) has held back
/// the xmin horizon, and so vacuum everywhere, for longer than this: a running statement is
/// terminated (a `snapshot` rule may cancel it first), a session idle in a transaction is
/// terminated. How long a snapshot has been held is defined in `xmin_hold.rs`. 0 turns it off.
pub static SNAPSHOT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `session_kill.snapshot_xid_age`: likewise once `age(backend_xmin)` exceeds this many
/// transactions. While set, the worker looks at every session at least once a second
/// (`rules::XID_AGE_POLL`). 0 turns it off.
pub static SNAPSHOT_XID_AGE: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `session_kill.replay_lag_timeout`: on a hot standby, cancels the statements of client sessions
/// that have held back the replay of WAL for longer than this (the startup process waits in a
/// recovery conflict with them, see `replay.rs`), and terminates a session still in the way 5 s
/// later (one with nothing running at once). 0 turns it off; `replay_lag` rules do it per
/// database, role, application or network.
pub static REPLAY_LAG_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `session_kill.make_way_after`: settable by any user. Once this session has waited this long
/// for a lock, the worker ends the sessions that hold up its request (a session queued ahead of
/// it too), if its own role could `pg_terminate_backend` them; superusers and protected sessions
/// are excepted. 0 turns it off. The worker looks for the wait at most every 100 ms
/// (`make_way::LOOK_FLOOR`). See `make_way.rs`.
pub static MAKE_WAY_AFTER: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `session_kill.max_connection_usage`: when client sessions exceed this share of
/// `max_connections`, the worker ends the longest-idle unprotected sessions (idle in transaction
/// first) until back at it. 0 turns the pressure reaper off.
pub static MAX_CONNECTION_USAGE: GucSetting<f64> = GucSetting::<f64>::new(0.0);

/// `session_kill.dry_run`: the worker logs what it would do and signals nothing.
pub static DRY_RUN: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `session_kill.database`: the database whose `session_kill.rules` table the worker enforces
/// and whose `session_kill.log` table receives the audit trail (install the extension there).
/// Empty: no rules table and no audit table; the settings, counters and server log still work.
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));

/// `session_kill.log_retention`: rows of `session_kill.log` older than this are deleted each
/// time entries are written (and at least hourly). 0 keeps no rows: the server log only.
pub static LOG_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);

pub fn register() {
    for (name, short, setting) in [
        (
            c"session_kill.idle_timeout",
            c"Terminates client sessions idle for longer than this (0 turns it off).",
            &IDLE_TIMEOUT,
        ),
        (
            c"session_kill.idle_in_transaction_timeout",
            c"Terminates client sessions idle in a transaction for longer than this (0 turns it off).",
            &IDLE_IN_TRANSACTION_TIMEOUT,
        ),
        (
            c"session_kill.transaction_timeout",
            c"Terminates client sessions whose transaction is older than this (0 turns it off).",
            &TRANSACTION_TIMEOUT,
        ),
        (
            c"session_kill.blocker_timeout",
            c"Terminates client sessions that have held up another session's lock request for longer than this (0 turns it off).",
            &BLOCKER_TIMEOUT,
        ),
        (
            c"session_kill.snapshot_timeout",
            c"Ends client sessions whose snapshot has held back the xmin horizon for longer than this (0 turns it off).",
            &SNAPSHOT_TIMEOUT,
        ),
        (
            c"session_kill.replay_lag_timeout",
            c"On a hot standby, cancels queries that have held back replay for longer than this (0 turns it off).",
            &REPLAY_LAG_TIMEOUT,
        ),
    ] {
        GucRegistry::define_int_guc(
            name,
            short,
            c"Enforced by the session_kill background worker; clients cannot change it.",
            setting,
            0,
            i32::MAX,
            GucContext::Sighup,
            GucFlags::UNIT_MS,
        );
    }
    // SAFETY: the assign hook is a #[pg_guard] function that only publishes the new value.
    unsafe {
        GucRegistry::define_int_guc_with_hooks(
            c"session_kill.make_way_after",
            c"Once this session has waited this long for a lock, end the sessions that hold it up (0 turns it off).",
            c"Only sessions this session's role could end with pg_terminate_backend; never superusers or protected sessions.",
            &MAKE_WAY_AFTER,
            0,
            i32::MAX,
            GucContext::Userset,
            GucFlags::UNIT_MS,
            None,
            Some(crate::make_way::assign),
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"session_kill.snapshot_xid_age",
        c"Ends client sessions whose snapshot is older than this many transactions (0 turns it off).",
        c"Enforced by the session_kill background worker, which then looks at every session once a second; clients cannot change it.",
        &SNAPSHOT_XID_AGE,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"session_kill.max_connection_usage",
        c"Share of max_connections above which the session_kill worker ends the longest-idle sessions (0 turns it off).",
        c"Idle-in-transaction sessions go first, then idle ones, oldest first; running and protected sessions never.",
        &MAX_CONNECTION_USAGE,
        0.0,
        1.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"session_kill.database",
        c"Database holding the session_kill.rules and session_kill.log tables.",
        c"Empty turns both tables off.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"session_kill.log_retention",
        c"Rows of session_kill.log older than this are deleted (0 keeps none).",
        c"",
        &LOG_RETENTION,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"session_kill.dry_run",
        c"The session_kill worker only logs what it would do.",
        c"",
        &DRY_RUN,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"session_kill.protected_roles",
        c"Roles whose sessions session_kill never cancels or terminates.",
        c"Comma-separated role names.",
        &PROTECTED_ROLES,
        GucContext::Sighup,
        list_input(),
    );
    GucRegistry::define_string_guc(
        c"session_kill.protected_applications",
        c"application_name patterns whose sessions session_kill never cancels or terminates.",
        c"Comma-separated LIKE patterns. Clients choose their own application_name: protect backup tools by role instead.",
        &PROTECTED_APPLICATIONS,
        GucContext::Sighup,
        list_input(),
    );
}

/// The current value of a list setting, as the text the policy module parses.
pub fn list(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|v| v.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `GUC_LIST_INPUT`, which pgrx's `GucFlags` has no name for (`from_bits_truncate` would drop it,
/// and `ALTER SYSTEM SET session_kill.protected_roles = a, b` would be refused).
fn list_input() -> GucFlags {
    GucFlags::from_bits_retain(pgrx::pg_sys::GUC_LIST_INPUT as i32)
}

/// `session_kill.database`, unless empty.
pub fn database() -> Option<String> {
    Some(list(&DATABASE)).filter(|name| !name.is_empty())
}

/// The limits set here, in microseconds: the rules below every row of `session_kill.rules`.
pub fn limits() -> crate::rules::Limits {
    let micros = |setting: &GucSetting<i32>| i64::from(setting.get()) * 1000;
    crate::rules::Limits {
        idle: micros(&IDLE_TIMEOUT),
        idle_in_transaction: micros(&IDLE_IN_TRANSACTION_TIMEOUT),
        transaction: micros(&TRANSACTION_TIMEOUT),
        blocking: micros(&BLOCKER_TIMEOUT),
        snapshot: micros(&SNAPSHOT_TIMEOUT),
        snapshot_xid_age: i64::from(SNAPSHOT_XID_AGE.get()),
        replay_lag: micros(&REPLAY_LAG_TIMEOUT),
    }
}

/// The protections the settings ask for, plus superusers unless `include_superusers`.
pub fn protections(include_superusers: bool) -> crate::policy::Protections {
    crate::policy::Protections::from_settings(
        &list(&PROTECTED_ROLES),
        &list(&PROTECTED_APPLICATIONS),
        include_superusers,
    )
}
