//! The `session_kill sync` worker: a short-lived background worker that the main worker starts in
//! `session_kill.database` to read `session_kill.rules` into shared memory and to write the
//! queued audit entries into `session_kill.log` (pruning rows past `session_kill.log_retention`).
//!
//! The main worker itself stays connected to no database, so a rules database that is renamed,
//! dropped or missing its tables never stops enforcement; it only empties the rules. A sync runs
//! when a committed transaction changed the rules table, on SIGHUP, when audit entries have
//! waited up to a second, and at least every minute (which also notices a dropped table).
//! Failures back off up to a minute.

use crate::audit::{self, Entry};
use crate::errors::in_transaction;
use crate::fixed::FixedText;
use crate::policy::Micros;
use crate::rules::{Rule, RuleRow, MAX_COMMENT_LEN};
use crate::{args, backends, gucs, shmem, signal};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::Spi;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

const NAME: &str = "session_kill sync";
const SECOND: Micros = 1_000_000;
/// Rules are read at least this often, even if nothing announced a change.
const REFRESH: Micros = 60 * SECOND;
/// Audit entries are written at most this often (unless the queue fills up): batching keeps the
/// sync's fork, login and insert off the CPU while the worker is ending a burst of sessions.
const AUDIT_INTERVAL: Micros = SECOND;
/// A sync that has not reported back after this long is presumed lost.
const PRESUMED_LOST: Micros = 60 * SECOND;
const MAX_BACKOFF: Micros = 60 * SECOND;

/// Shared state between the main worker, the sync worker and backends that change the rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncState {
    /// The rules should be read again (a committed change, a reload, the worker's start).
    rules_wanted: bool,
    /// When the running sync was started; 0 when none runs.
    running_since: Micros,
    /// Syncs that failed in a row (0 after a success), and when the next one may start; shown
    /// by the `session_kill.worker` view.
    pub failures: u32,
    pub retry_at: Micros,
    /// When the last sync finished successfully.
    last_run: Micros,
    /// What the last sync found, for the `session_kill.worker` view.
    pub rules_status: FixedText<256>,
    pub rules_loaded_at: Micros,
}

/// A transaction that changed `session_kill.rules` committed, or the settings were reloaded.
pub fn request_rules() {
    if shmem::preloaded() {
        shmem::update_sync(|sync| sync.rules_wanted = true);
        signal::wake_worker();
    }
}

/// From the main worker, inside its scan's transaction: starts a sync when one is due. Returns
/// when to look again, or `None` when the sync worker's exit will wake the main worker.
pub fn launch_if_due(now: Micros) -> Option<Micros> {
    let state = shmem::sync_state();
    let Some(database) = gucs::database() else {
        if state.rules_wanted {
            no_rules("session_kill.database is empty: no rules table and no audit table");
            shmem::update_sync(|sync| sync.rules_wanted = false);
        }
        let (dropped, _) = shmem::take_audit();
        shmem::count_dropped_audit(dropped.len() as u64);
        return None;
    };
    if state.running_since != 0 {
        if now - state.running_since < PRESUMED_LOST {
            // Its exit wakes us; this is the fallback if that news never comes.
            return Some(state.running_since + PRESUMED_LOST);
        }
        warning!(
            "session_kill: the sync worker did not report back within {} s; starting another",
            PRESUMED_LOST / SECOND
        );
    }
    if now < state.retry_at {
        return Some(state.retry_at);
    }
    let (queued, oldest) = if backends::in_recovery() { (0, None) } else { shmem::audit_waiting() };
    let audit_at = oldest.map(|at| at + AUDIT_INTERVAL);
    let audit_due = queued >= audit::CAPACITY / 2 || audit_at.is_some_and(|at| at <= now);
    if !(state.rules_wanted || audit_due || now - state.last_run >= REFRESH) {
        return [Some(state.last_run + REFRESH), audit_at].into_iter().flatten().min();
    }
    let Some(oid) = database_oid(&database) else {
        no_rules(&format!("database \"{database}\" does not exist (session_kill.database)"));
        let (dropped, _) = shmem::take_audit();
        shmem::count_dropped_audit(dropped.len() as u64);
        if !dropped.is_empty() {
            log!("session_kill: {} audit entries not written to session_kill.log: database \"{database}\" does not exist; the server log has them", dropped.len());
        }
        shmem::update_sync(|sync| {
            sync.last_run = now;
            sync.rules_wanted = false;
        });
        return Some(now + REFRESH);
    };
    // Marked running before it is started: a quick sync may finish (and clear the mark) before
    // load_dynamic even returns here.
    shmem::update_sync(|sync| {
        sync.running_since = now;
        sync.rules_wanted = false;
    });
    // SAFETY: MyProcPid is set for the life of the process.
    let me = unsafe { pg_sys::MyProcPid };
    let launched = BackgroundWorkerBuilder::new(NAME)
        .set_type(NAME)
        .set_library("session_kill")
        .set_function("session_kill_sync_main")
        .set_argument(oid.into_datum())
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(None)
        .set_notify_pid(me)
        .load_dynamic();
    match launched {
        Ok(_) => None,
        Err(_) => {
            warning!("session_kill: could not start the sync worker; raise max_worker_processes");
            Some(failed(now))
        }
    }
}

/// Records a failed sync; returns when to retry (1 s, doubling up to a minute).
fn failed(now: Micros) -> Micros {
    shmem::update_sync(|sync| {
        sync.failures += 1;
        sync.rules_wanted = true;
        sync.running_since = 0;
        let backoff = (SECOND << sync.failures.min(6).saturating_sub(1)).min(MAX_BACKOFF);
        sync.retry_at = now + backoff;
        sync.rules_status = FixedText::new(&format!(
            "the sync worker failed {} times in a row (see the server log); next attempt in {} s",
            sync.failures,
            backoff / SECOND
        ));
        sync.retry_at
    })
}

fn no_rules(why: &str) {
    let previous = shmem::published_rules();
    shmem::publish_rules(&[]);
    let changed = set_status(why);
    if changed || !previous.is_empty() {
        log!("session_kill: no rules in force: {why}");
    }
}

/// Records what the last load found; true when that differs from before.
fn set_status(status: &str) -> bool {
    let now = backends::now();
    shmem::update_sync(|sync| {
        let changed = sync.rules_status.as_str() != status;
        sync.rules_status = FixedText::new(status);
        sync.rules_loaded_at = now;
        changed
    })
}

/// Looks the database up by name with a plain scan of pg_database: the worker is connected to
/// no database, and then only the shared catalogs' heaps (not their indexes) can be read.
fn database_oid(name: &str) -> Option<pg_sys::Oid> {
    // SAFETY: scans the shared catalog pg_database inside the caller's transaction, without an
    // index; each tuple's fixed part is a FormData_pg_database.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::systable_beginscan(
            rel,
            pg_sys::InvalidOid,
            false,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        );
        let mut found = None;
        loop {
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() {
                break;
            }
            let row = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            if std::ffi::CStr::from_ptr((*row).datname.data.as_ptr()).to_bytes() == name.as_bytes() {
                found = Some((*row).oid);
                break;
            }
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        found
    }
}

/// Set once the sync worker has done its work; read by its exit callback.
static SUCCEEDED: AtomicBool = AtomicBool::new(false);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn session_kill_sync_main(arg: pg_sys::Datum) {
    handle_sigterm_like_a_backend();
    // SAFETY: registers a callback that runs at any exit, FATAL included, while shared memory is
    // still attached.
    unsafe { pg_sys::before_shmem_exit(Some(sync_exited), pg_sys::Datum::from(0)) };
    // SAFETY: the main worker passed an OID as the argument.
    let oid = unsafe { pg_sys::Oid::from_datum(arg, false) }.unwrap_or(pg_sys::InvalidOid);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(oid), None);
    // SAFETY: reports our application_name so the sync is recognisable in pg_stat_activity.
    unsafe { pg_sys::pgstat_report_appname(c"session_kill sync".as_ptr()) };
    load_rules();
    let written = backends::in_recovery() || write_audit();
    SUCCEEDED.store(written, Ordering::Relaxed);
}

unsafe extern "C-unwind" {
    /// The server's SIGTERM handler for backends (tcop/postgres.c), as a plain C function: the
    /// one pg_sys exports is wrapped for calls from Rust, not for use as a signal handler.
    fn die(signal: std::ffi::c_int);
}

/// PostgreSQL's own SIGTERM handler (pgrx's only sets a flag): a sync waiting on a lock or
/// running a statement ends at once when terminated, by `pg_terminate_backend`, `DROP DATABASE
/// ... WITH (FORCE)` or a shutdown.
fn handle_sigterm_like_a_backend() {
    // SAFETY: installs the standard backend handler, then unblocks signals, as a worker's main
    // function does first.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        pg_sys::pqsignal(libc::SIGTERM, Some(die));
        #[cfg(not(any(feature = "pg15", feature = "pg16", feature = "pg17")))]
        pg_sys::pqsignal_be(libc::SIGTERM, Some(die));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

thread_local! {
    /// Audit entries taken from the queue and not yet committed to the table: put back if the
    /// sync dies meanwhile.
    static UNWRITTEN: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

#[pg_guard]
unsafe extern "C-unwind" fn sync_exited(_code: i32, _arg: pg_sys::Datum) {
    let unwritten = UNWRITTEN.take();
    if !unwritten.is_empty() {
        shmem::requeue_audit(&unwritten);
    }
    let now = backends::now();
    if SUCCEEDED.load(Ordering::Relaxed) {
        shmem::update_sync(|sync| {
            sync.running_since = 0;
            sync.failures = 0;
            sync.last_run = now;
        });
    } else {
        failed(now);
    }
    signal::wake_worker();
}

/// The installed extension in the sync's database, read from the catalogs alone: its owner, and
/// its schema-qualified member tables. Nothing else is ever read or written by the sync, so a
/// table, view or trigger that someone else created under the same names is never touched.
const EXTENSION_QUERY: &str = "
    SELECT e.extowner,
           pg_catalog.max(pg_catalog.format('%I.%I', n.nspname, c.relname)) FILTER (WHERE c.relname = 'rules'),
           pg_catalog.max(pg_catalog.format('%I.%I', n.nspname, c.relname)) FILTER (WHERE c.relname = 'log')
      FROM pg_catalog.pg_extension e
      JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
      LEFT JOIN pg_catalog.pg_depend d
        ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
       AND d.refobjid = e.oid AND d.deptype = 'e'
      LEFT JOIN pg_catalog.pg_class c
        ON c.oid = d.objid AND c.relnamespace = e.extnamespace AND c.relkind = 'r'
     WHERE e.extname = 'session_kill'
     GROUP BY e.extowner";

/// What the sync may touch in its database.
struct Installed {
    owner: pg_sys::Oid,
    /// The member tables, schema-qualified and quoted; `None` if the extension lacks one.
    rules: Option<String>,
    log: Option<String>,
}

fn installed() -> Result<Option<Installed>, pgrx::spi::Error> {
    Spi::connect(|client| {
        let rows = client.select(EXTENSION_QUERY, Some(1), &[])?;
        let Some(row) = rows.into_iter().next() else { return Ok(None) };
        let Some(owner) = row.get::<pg_sys::Oid>(1)? else { return Ok(None) };
        Ok(Some(Installed { owner, rules: row.get(2)?, log: row.get(3)? }))
    })
}

/// Why the sync found nothing to work with, or what went wrong.
enum SyncError {
    NotInstalled,
    Failed(String),
}

impl From<pgrx::spi::Error> for SyncError {
    fn from(e: pgrx::spi::Error) -> Self {
        SyncError::Failed(e.to_string())
    }
}

/// Runs `body` in a transaction of its own, as the extension's owner with the restrictions
/// PostgreSQL puts on maintenance commands (so a trigger on a member table runs with no more
/// rights than that owner has), resolving names in pg_catalog only, and unable to hang on a lock
/// or a slow statement. Without the extension in the database, `body` does not run.
fn as_extension_owner<R>(
    body: impl FnOnce(&Installed) -> Result<R, pgrx::spi::Error>,
) -> Result<R, SyncError> {
    let result = in_transaction(|| -> Result<R, SyncError> {
        // set_config in a read-only SELECT, not SET LOCAL: pgrx runs utility statements as
        // writes, which take a transaction ID, and a hot standby refuses to assign one (the rules
        // of a standby come from the primary's table, read here).
        Spi::connect(|client| {
            client
                .select(
                    "SELECT set_config('search_path', 'pg_catalog, pg_temp', true),
                            set_config('lock_timeout', '5s', true), set_config('statement_timeout', '20s', true)",
                    None,
                    &[],
                )
                .map(|_| ())
        })?;
        let installed = installed()?.ok_or(SyncError::NotInstalled)?;
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        // SAFETY: switching the current user inside a transaction, as VACUUM and REFRESH
        // MATERIALIZED VIEW do; restored below, and by the transaction's abort on an error.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            pg_sys::SetUserIdAndSecContext(
                installed.owner,
                context
                    | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                    | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
        }
        let result = body(&installed);
        // SAFETY: restores what was saved above.
        unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
        Ok(result?)
    });
    result.unwrap_or_else(|message| Err(SyncError::Failed(message)))
}

/// Reads the enabled rules and publishes the valid ones. No extension or no rules table means
/// no rules; an unreadable table (altered columns, say) keeps the rules in force and says why.
fn load_rules() {
    let database = gucs::database().unwrap_or_default();
    let read = as_extension_owner(|installed| {
        let Some(table) = &installed.rules else { return Ok(None) };
        let query = format!(
            "SELECT id, database, role, application, client_addr::text, state, timeout, action, grace, priority,
                    left(coalesce(comment, ''), {MAX_COMMENT_LEN})
               FROM {table} WHERE enabled ORDER BY priority DESC, id"
        );
        Spi::connect(|client| {
            client
                .select(&query, None, &[])?
                .map(|row| {
                    // The table may hold any number of rows: SIGTERM must not wait for them all.
                    pgrx::check_for_interrupts!();
                    Ok(RuleRow {
                        id: row.get(1)?.unwrap_or_default(),
                        database: row.get(2)?.unwrap_or_default(),
                        role: row.get(3)?.unwrap_or_default(),
                        application: row.get(4)?.unwrap_or_default(),
                        client_addr: row.get(5)?,
                        state: row.get(6)?.unwrap_or_default(),
                        timeout: row.get::<Interval>(7)?.map_or(0, args::interval_micros),
                        action: row.get(8)?.unwrap_or_default(),
                        grace: row.get::<Interval>(9)?.map_or(0, args::interval_micros),
                        priority: row.get(10)?.unwrap_or_default(),
                        comment: row.get(11)?.unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        })
    });
    match read {
        Ok(Some(rows)) => publish(rows, &database),
        Ok(None) => no_rules(&format!("no table session_kill.rules in database \"{database}\"")),
        Err(SyncError::NotInstalled) => no_rules(&not_installed(&database)),
        Err(SyncError::Failed(why)) => keep_rules(&database, &why),
    }
}

fn not_installed(database: &str) -> String {
    format!("extension session_kill is not installed in database \"{database}\" (session_kill.database): no rules table and no audit table")
}

fn keep_rules(database: &str, why: &str) {
    let status = format!("could not read session_kill.rules in database \"{database}\": {why}; the previous rules stay in force");
    if set_status(&status) {
        warning!("session_kill: {status}");
    }
}

fn publish(rows: Vec<RuleRow>, database: &str) {
    let mut valid = Vec::with_capacity(rows.len());
    for row in rows {
        pgrx::check_for_interrupts!();
        match Rule::from_row(&row) {
            Ok(_) => valid.push(row),
            Err(e) => warning!("session_kill: rule {} ignored: {}", row.id, e.message),
        }
    }
    let previous = shmem::published_rules();
    let kept = shmem::publish_rules(&valid);
    if kept < valid.len() {
        warning!(
            "session_kill: only the {kept} highest-priority rules are in force, {} are enabled",
            valid.len()
        );
    }
    let noun = if kept == 1 { "rule" } else { "rules" };
    let status = format!("{kept} {noun} from session_kill.rules in database \"{database}\"");
    set_status(&status);
    if previous != valid[..kept] {
        log!("session_kill: {status}");
    }
}

/// Follows `INSERT INTO <the member table>`.
const INSERT_LOG: &str = "
    (acted_at, source, rule, reason, actor, pid, database, role,
                                  application, client_addr, state, idle_for, query, action, outcome)
    SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::int[], $7::name[], $8::name[], $9::text[], $10::text[]::inet[],
                         $11::text[], $12::interval[], $13::text[], $14::text[], $15::text[])";

/// Writes the queued entries into `session_kill.log` and deletes rows past the retention. If the
/// write fails, the entries go back to the queue and the sync counts as failed (so it backs off);
/// with no audit table to write to, they are dropped and counted.
fn write_audit() -> bool {
    let (entries, lost) = shmem::take_audit();
    UNWRITTEN.set(entries.clone());
    if lost > 0 {
        warning!("session_kill: {lost} audit entries were dropped because the queue was full; the server log has them");
    }
    let retention = gucs::LOG_RETENTION.get();
    let written = as_extension_owner(|installed| {
        let Some(table) = &installed.log else { return Ok(false) };
        if retention > 0 && !entries.is_empty() {
            Spi::run_with_args(&format!("INSERT INTO {table} {INSERT_LOG}"), &columns(&entries))?;
        }
        let cutoff = args::timestamp(backends::now() - i64::from(retention) * SECOND);
        Spi::run_with_args(&format!("DELETE FROM {table} WHERE acted_at < $1"), &[cutoff.into()])?;
        Ok(true)
    });
    let database = gucs::database().unwrap_or_default();
    let entries = UNWRITTEN.take();
    let nowhere = match written {
        Ok(true) => return true,
        Ok(false) => format!("no table session_kill.log in database \"{database}\""),
        Err(SyncError::NotInstalled) => not_installed(&database),
        Err(SyncError::Failed(error)) => {
            warning!(
                "session_kill: could not write {} entries to session_kill.log in database \"{database}\": {error}",
                entries.len()
            );
            shmem::requeue_audit(&entries);
            return false;
        }
    };
    if !entries.is_empty() {
        shmem::count_dropped_audit(entries.len() as u64);
        log!("session_kill: {} audit entries not written: {nowhere}; the server log has them", entries.len());
    }
    true
}

/// The entries as one array per column of `session_kill.log`.
fn columns(entries: &[Entry]) -> Vec<pgrx::datum::DatumWithOid<'static>> {
    let text = |f: &dyn Fn(&Entry) -> &str| -> Vec<Option<String>> {
        entries.iter().map(|e| Some(f(e)).filter(|s| !s.is_empty()).map(str::to_owned)).collect()
    };
    let required =
        |f: &dyn Fn(&Entry) -> &str| -> Vec<String> { entries.iter().map(|e| f(e).to_owned()).collect() };
    let at: Vec<Option<TimestampWithTimeZone>> = entries.iter().map(|e| args::timestamp(e.at)).collect();
    let idle_for: Vec<Option<Interval>> = entries.iter().map(|e| e.idle_for.map(args::interval)).collect();
    let pids: Vec<i32> = entries.iter().map(|e| e.pid).collect();
    vec![
        at.into(),
        required(&|e| e.source.label()).into(),
        text(&|e| e.rule.as_str()).into(),
        text(&|e| e.reason.as_str()).into(),
        text(&|e| e.actor.as_str()).into(),
        pids.into(),
        text(&|e| e.database.as_str()).into(),
        text(&|e| e.role.as_str()).into(),
        text(&|e| e.application.as_str()).into(),
        text(&|e| e.client.as_str()).into(),
        text(&|e| e.state.as_str()).into(),
        idle_for.into(),
        text(&|e| e.query.as_str()).into(),
        required(&|e| e.action.as_str()).into(),
        required(&|e| e.outcome.as_str()).into(),
    ]
}
