//! Draining a database: a connection gate in shared memory checked at client authentication,
//! plus `drain_database()`, `undrain_database()` and `drains()`.

use crate::act::{Progress, Subject};
use crate::args;
use crate::backends;
use crate::counters::Source;
use crate::errors::{null_argument, raise, sql_literal};
use crate::gate::{Admission, DbName, Gate, GateError, Verdict};
use crate::gucs;
use crate::kill::{KillRequest, Target};
use crate::policy::{
    escape, BackendKind, DatabaseScope, Filter, Micros, Mode, Outcome, Protections, Session,
};
use crate::rules::MAX_DURATION;
use crate::shmem::{self, require_preloaded};
use crate::signal::{self, Signal};
use crate::sqltypes::Name;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys::libpq::be::Port;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use std::collections::HashSet;
use std::ffi::{c_char, CStr, CString};
use std::time::{Duration, Instant};

static mut PREVIOUS_AUTH_HOOK: pg_sys::libpq::ClientAuthentication_hook_type = None;

/// From `_PG_init` when loaded by `shared_preload_libraries`, after shared memory: the hook.
pub fn install_hook() {
    // SAFETY: _PG_init runs once in the postmaster before any backend; we chain the previous hook.
    unsafe {
        PREVIOUS_AUTH_HOOK = pg_sys::libpq::ClientAuthentication_hook;
        pg_sys::libpq::ClientAuthentication_hook = Some(check_gate);
    }
}

/// Runs after PostgreSQL authenticated a login: refuses it if its database is being drained,
/// otherwise remembers it so a drain that starts now also waits for it.
#[pg_guard]
unsafe extern "C-unwind" fn check_gate(port: *mut Port, status: i32) {
    // SAFETY: PostgreSQL passes a valid Port; the previous hook gets the same arguments.
    unsafe {
        if let Some(previous) = PREVIOUS_AUTH_HOOK {
            previous(port, status);
        }
        // Physical replication belongs to no database; a logical replication connection
        // (replication=database) can run SQL in its database, so it passes the gate like a client.
        let physical_replication = pg_sys::am_walsender && !pg_sys::am_db_walsender;
        let (database_name, user_name) = login_names(port);
        if status != pg_sys::STATUS_OK as i32 || physical_replication || database_name.is_null() {
            return;
        }
        let datname = DbName::new(&CStr::from_ptr(database_name).to_string_lossy());
        let now = backends::now();
        let role = pg_sys::get_role_oid(user_name, true);
        let (pid, started) = backends::own_key();
        let login = Admission {
            pid,
            started,
            datname,
            role: role.to_u32(),
            superuser: role != pg_sys::InvalidOid && pg_sys::superuser_arg(role),
        };
        match shmem::admit(login, now) {
            Verdict::Admit(slot) => {
                // SAFETY: runs at any exit of this backend, while shared memory is still attached.
                pg_sys::before_shmem_exit(Some(forget_admission), pg_sys::Datum::from(slot));
                if gucs::MAKE_WAY_AFTER.get() > 0 {
                    // Set in postgresql.conf: inherited, so no assign hook ran in this backend.
                    crate::make_way::publish(gucs::MAKE_WAY_AFTER.get(), role);
                }
                if gucs::MAX_CONNECTION_USAGE.get() > 0.0 {
                    // One more client: the pressure reaper decides whether that is one too many.
                    signal::wake_worker();
                }
            }
            Verdict::Refuse(gate) => ErrorReport::new(
                PgSqlErrorCode::ERRCODE_CANNOT_CONNECT_NOW,
                format!("database \"{}\" is being drained by session_kill", datname.as_str()),
                "",
            )
            .set_detail(gate_detail(&gate))
            .set_hint(format!(
                "New connections are refused until SELECT session_kill.undrain_database({}) reopens it.",
                sql_literal(datname.as_str())
            ))
            .report(PgLogLevel::FATAL),
        }
    }
}

/// The database and role names a login asked for, from its `Port`.
#[cfg(not(feature = "pg17"))]
pub(crate) unsafe fn login_names(port: *const Port) -> (*const c_char, *const c_char) {
    // SAFETY: port is a valid Port, whose layout pgrx binds correctly on this major.
    unsafe { ((*port).database_name, (*port).user_name) }
}

/// The database and role names a login asked for, from its `Port`. pgrx 0.18 binds 17's `Port`
/// with `canAcceptConnections`, which 17 removed, so its `database_name` is really `user_name` and
/// its `user_name` is `cmdline_options` (usually NULL: a crash at every login). In 17 both
/// names directly follow `remote_port`, whose offset pgrx has right.
#[cfg(feature = "pg17")]
pub(crate) unsafe fn login_names(port: *const Port) -> (*const c_char, *const c_char) {
    // SAFETY: port is a valid Port; the two pointer-sized, pointer-aligned fields after
    // remote_port are database_name and user_name (libpq/libpq-be.h of PostgreSQL 17).
    unsafe {
        let names = std::ptr::addr_of!((*port).remote_port).add(1).cast::<*const c_char>();
        (*names, *names.add(1))
    }
}

/// An admitted backend forgets its admission (in slot `slot` of the ring) as it exits, before
/// its PID can be reused.
#[pg_guard]
unsafe extern "C-unwind" fn forget_admission(_code: i32, slot: pg_sys::Datum) {
    let (pid, started) = backends::own_key();
    shmem::forget_admission(slot.value(), pid, started);
}

fn gate_detail(gate: &Gate) -> String {
    let since = timestamp_text(gate.since);
    match gate.reopen_at {
        0 => format!("It has been closed since {since}."),
        at => format!("It has been closed since {since} and reopens at {}.", timestamp_text(at)),
    }
}

/// Closes `db` to new connections, cancels running queries, waits `grace`, terminates what is
/// left and waits until no session of `db` remains. Raises an ERROR (leaving the database
/// closed) if sessions remain after `timeout`.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn drain_database(
    db: Option<Name>,
    timeout: default!(Option<Interval>, "'30s'"),
    grace: default!(Option<Interval>, "'5s'"),
    include_superusers: default!(Option<bool>, "false"),
    allow_superusers: default!(Option<bool>, "false"),
    reopen_after: default!(Option<Interval>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(datname, Name),
        name!(sessions_at_start, i32),
        name!(cancelled, i32),
        name!(terminated, i32),
        name!(remaining, i32),
        name!(refused_logins, i64),
        name!(elapsed, Interval),
    ),
> {
    crate::args::require_current_catalog();
    require_preloaded();
    let db = db.unwrap_or_else(|| null_argument("db", "Name the database to drain.")).0;
    let timeout = args::duration_arg("timeout", timeout);
    let grace = args::duration_arg("grace", grace);
    let include_superusers = args::superuser_choice(include_superusers);
    let allow_superusers =
        allow_superusers.unwrap_or_else(|| null_argument("allow_superusers", "Pass true or false."));
    let reopen_after = reopen_after.map(|r| args::duration_arg("reopen_after", Some(r)));
    // The reopening time must stay a timestamp: `now + reopen_after` must not overflow.
    if reopen_after.is_some_and(|r| r > MAX_DURATION) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "reopen_after is out of range",
            "Give a reopen_after of at most 100 years, or NULL to keep the database closed until undrain_database().",
        );
    }
    let oid = args::database_oid(&db);
    // SAFETY: MyDatabaseId is set for every connected backend.
    if oid == unsafe { pg_sys::MyDatabaseId }.to_u32() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!("cannot drain the current database \"{db}\""),
            "Connect to another database, such as postgres, and call drain_database from there.",
        );
    }
    require_database_owner(oid, &db);

    let report = Drain::new(&db, oid, timeout, grace, include_superusers).run(allow_superusers, reopen_after);
    TableIterator::once((
        Name(db),
        report.at_start,
        report.cancelled,
        report.terminated,
        report.remaining,
        report.refused as i64,
        args::interval(report.elapsed.as_micros() as Micros),
    ))
}

/// Reopens a drained database. Returns false (with a notice) if it was not closed.
#[pg_extern(volatile, parallel_unsafe)]
fn undrain_database(db: Option<Name>) -> bool {
    crate::args::require_current_catalog();
    require_preloaded();
    let db = db.unwrap_or_else(|| null_argument("db", "Name the database to reopen.")).0;
    let name = DbName::new(&db);
    let now = backends::now();
    let c_name = CString::new(db.as_str()).unwrap_or_default();
    // SAFETY: catalog lookup with missing_ok = true.
    let oid = unsafe { pg_sys::get_database_oid(c_name.as_ptr(), true) };
    // Permission first, as PostgreSQL checks it, so a gate's state is no answer to a non-owner.
    let owner = oid != pg_sys::InvalidOid && is_database_owner(oid);
    if oid != pg_sys::InvalidOid && !owner {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of database {db}"),
            "Only the owner of the database, or a superuser, can reopen it.",
        );
    }
    let Some(gate) = shmem::find_gate(&name, now) else {
        notice!("database \"{db}\" is not being drained");
        return false;
    };
    // The database may have been dropped while closed; then its closer or a superuser reopens it.
    // SAFETY: privilege checks on the current user.
    let allowed = owner || unsafe { pg_sys::superuser() || pg_sys::GetUserId().to_u32() == gate.closed_by };
    if !allowed {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of database {db}"),
            "Only the owner of the database, or a superuser, can reopen it.",
        );
    }
    shmem::open_gate(&name, now);
    log!("session_kill: reopened database \"{}\" to new connections", escape(&db));
    true
}

/// The databases closed to new connections right now.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
fn drains() -> TableIterator<
    'static,
    (
        name!(datname, Name),
        name!(since, Option<TimestampWithTimeZone>),
        name!(closed_by, Option<Name>),
        name!(refused_logins, i64),
        name!(reopen_at, Option<TimestampWithTimeZone>),
        name!(allow_superusers, bool),
    ),
> {
    crate::args::require_current_catalog();
    require_preloaded();
    let gates = shmem::closed_gates(backends::now());
    TableIterator::new(gates.into_iter().map(|g| {
        (
            Name(g.datname.as_str().to_owned()),
            args::timestamp(g.since),
            backends::role_name(pg_sys::Oid::from(g.closed_by)).map(Name),
            g.refused as i64,
            args::timestamp(g.reopen_at),
            g.allow_superusers,
        )
    }))
}

/// What a drain did, for its report row.
struct Report {
    at_start: i32,
    cancelled: i32,
    terminated: i32,
    remaining: i32,
    refused: u64,
    elapsed: Duration,
}

struct Drain {
    db: String,
    oid: u32,
    name: DbName,
    timeout: Duration,
    request: KillRequest,
    started: Instant,
}

/// Polling interval while waiting for late logins and exits.
const SWEEP_INTERVAL: Duration = Duration::from_millis(1);

impl Drain {
    fn new(db: &str, oid: u32, timeout: Micros, grace: Micros, include_superusers: bool) -> Drain {
        let grace = grace.min(timeout);
        Drain {
            db: db.to_owned(),
            oid,
            name: DbName::new(db),
            timeout: args::duration(timeout),
            request: KillRequest {
                source: Source::DrainDatabase,
                mode: Mode::CancelThenTerminate,
                filter: Filter {
                    database: DatabaseScope::One(oid),
                    min_idle: 0,
                    role: None,
                    application: None,
                    client: None,
                    states: None,
                    blocking: None,
                    logical_replication: true,
                },
                grace,
                wait: timeout - grace,
                protections: Protections {
                    logical_replication: true,
                    ..gucs::protections(include_superusers)
                },
                reason: Some(format!("drain of database \"{db}\"")),
            },
            started: Instant::now(),
        }
    }

    fn run(self, allow_superusers: bool, reopen_after: Option<Micros>) -> Report {
        let now = backends::now();
        // SAFETY: GetUserId is valid inside a transaction.
        let closed_by = unsafe { pg_sys::GetUserId() }.to_u32();
        let gate = Gate {
            datname: self.name,
            since: now,
            closed_by,
            refused: 0,
            reopen_at: reopen_after.map_or(0, |r| now + r.max(1)),
            allow_superusers,
        };
        if let Err(GateError::Full) = shmem::close_gate(gate, now) {
            raise(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                "too many databases are being drained",
                "Reopen some with session_kill.undrain_database(); session_kill.drains() lists them.",
            );
        }
        log!("session_kill: closed database \"{}\" to new connections", escape(&self.db));
        let admitted = shmem::admitted_to(&self.name);

        let first = self.request.select();
        let at_start = first.len() as i32;
        let mut handled: HashSet<(i32, Micros)> = HashSet::new();
        let mut totals = (0, 0);
        self.tally(self.request.act(first), &mut handled, &mut totals);

        // Sweep: end sessions that appear late, wait for the rest to go.
        let sweep = KillRequest { mode: Mode::Terminate, wait: 0, ..self.request.clone() };
        // Logins admitted before the gate closed that are not (yet) visible as sessions of the
        // database, at any stage of start-up; each is checked until it shows up as a session (then
        // it is ended like the others) or goes away.
        let mut starting = admitted;
        let mut signalled_starting: HashSet<(i32, Micros)> = HashSet::new();
        let left = loop {
            let left = self.sessions_left();
            starting.retain(|login| self.still_starting(login, &left));
            // Ended while it starts up, as the postmaster ends starting backends at shutdown; a
            // protected login (a superuser's, a protected role's) is left alone like a session.
            for login in &starting {
                let session = starting_session(login, self.oid);
                let subject = Subject { session: &session, database: Some(&self.db), query: None };
                let mut progress = Progress::default();
                if sweep.protections.protection(&session).is_some()
                    || !signalled_starting.insert((login.pid, login.started))
                    || !self.terminate_starting(&sweep, login, &subject, &mut progress)
                {
                    continue;
                }
                sweep.finish(&subject, &progress, Outcome::Signalled);
                totals.1 += 1;
            }
            if (left.is_empty() && starting.is_empty()) || self.started.elapsed() >= self.timeout {
                break left;
            }
            if left.iter().any(|s| !handled.contains(&(s.pid, s.backend_start))) {
                let fresh: Vec<Target> = sweep
                    .select()
                    .into_iter()
                    .filter(|t| !handled.contains(&(t.chosen.pid, t.chosen.backend_start)))
                    .collect();
                self.tally(sweep.act(fresh), &mut handled, &mut totals);
            }
            signal::wait_until(SWEEP_INTERVAL, || false);
        };
        let refused = shmem::find_gate(&self.name, backends::now()).map_or(0, |g| g.refused);
        if !left.is_empty() || !starting.is_empty() {
            self.fail(&left, &starting);
        }
        log!(
            "session_kill: drained database \"{}\" in {:.3} s: {} sessions at start, {} cancelled, {} terminated, {} logins refused",
            escape(&self.db),
            self.started.elapsed().as_secs_f64(),
            at_start,
            totals.0,
            totals.1,
            refused
        );
        Report {
            at_start,
            cancelled: totals.0,
            terminated: totals.1,
            remaining: 0,
            refused,
            elapsed: self.started.elapsed(),
        }
    }

    /// Counts cancels and terminations, and remembers which backends were dealt with.
    fn tally(&self, targets: Vec<Target>, handled: &mut HashSet<(i32, Micros)>, totals: &mut (i32, i32)) {
        for t in targets {
            if t.progress.action.cancelled() {
                totals.0 += 1;
            }
            if t.progress.action.terminated() {
                totals.1 += 1;
            }
            // Protected sessions stay "handled" too: they are reported at the timeout.
            if t.outcome != Some(Outcome::AlreadyGone) {
                handled.insert((t.chosen.pid, t.chosen.backend_start));
            }
        }
    }

    /// Client sessions of the database that still exist.
    fn sessions_left(&self) -> Vec<Session> {
        let now = backends::now();
        backends::sessions().into_values().filter(|s| self.request.filter.matches(s, now)).collect()
    }

    /// A login admitted before the gate closed that is alive (it forgets its admission as it
    /// exits) but not visible as a session of the database: on PG 18 it may already show in
    /// the status array, as `starting` in no database.
    fn still_starting(&self, login: &Admission, visible: &[Session]) -> bool {
        shmem::remembers(login)
            && !visible.iter().any(|s| s.pid == login.pid && s.backend_start == login.started)
    }

    /// Terminates a starting login, holding the gate table so the backend cannot finish exiting
    /// (and free its PID for another process) between the check and the signal.
    fn terminate_starting(
        &self,
        sweep: &KillRequest,
        login: &Admission,
        subject: &Subject,
        progress: &mut Progress,
    ) -> bool {
        shmem::while_admitted(login, || sweep.send(subject, Signal::Terminate, progress).is_ok())
    }

    fn fail(&self, left: &[Session], starting: &[Admission]) -> ! {
        let protections = &self.request.protections;
        let mut lines: Vec<String> = left
            .iter()
            .map(|s| {
                let why = protections.protection(s).map_or("did not exit", |p| p.label());
                format!("{}: {why}", s.describe(Some(&self.db)))
            })
            .collect();
        for login in starting {
            let session = starting_session(login, self.oid);
            let why = protections.protection(&session).map_or("did not exit", |p| p.label());
            lines.push(format!(
                "pid {} (user {}, a login still starting up): {why}",
                login.pid,
                session.role.as_deref().unwrap_or("?")
            ));
        }
        let count = left.len() + starting.len();
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!(
                "database \"{}\" still has {count} session{} after {}",
                self.db,
                if count == 1 { "" } else { "s" },
                humantime(self.timeout)
            ),
            "",
        )
        .set_detail(format!("Remaining: {}.", lines.join("; ")))
        .set_hint(format!(
            "The database stays closed to new connections. End the remaining sessions and drain again, or reopen it with SELECT session_kill.undrain_database({}).",
            sql_literal(&self.db)
        ))
        .report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// A login still starting up, as the protections see it: its role, as authenticated.
fn starting_session(login: &Admission, database_oid: u32) -> Session {
    let role = pg_sys::Oid::from(login.role);
    Session {
        pid: login.pid,
        backend_start: login.started,
        kind: BackendKind::Client,
        database_oid,
        role: backends::role_name(role),
        application: String::new(),
        client: None,
        state: None,
        state_change: 0,
        xact_start: 0,
        query_start: 0,
        is_own: false,
        is_superuser: login.superuser,
        caller_may_signal: signal::may_signal_role(role),
        blocking_since: 0,
        replay_held_since: 0,
        xmin: None,
        xmin_since: 0,
    }
}

fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Draining needs the rights ALTER DATABASE needs: ownership of the database (or superuser).
fn require_database_owner(oid: u32, db: &str) {
    if !is_database_owner(pg_sys::Oid::from(oid)) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of database {db}"),
            "Only the owner of the database, or a superuser, can drain it.",
        );
    }
}

fn is_database_owner(oid: pg_sys::Oid) -> bool {
    // SAFETY: ownership check on the current user, valid inside a transaction.
    unsafe { database_ownercheck(oid, pg_sys::GetUserId()) }
}

#[cfg(feature = "pg15")]
unsafe fn database_ownercheck(oid: pg_sys::Oid, role: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookup; superusers pass, as in PostgreSQL.
    unsafe { pg_sys::pg_database_ownercheck(oid, role) }
}

#[cfg(not(feature = "pg15"))]
unsafe fn database_ownercheck(oid: pg_sys::Oid, role: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookup; superusers pass, as in PostgreSQL.
    unsafe { pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, oid, role) }
}

fn timestamp_text(micros: Micros) -> String {
    args::timestamp(micros).map_or_else(|| "?".to_owned(), |t| t.to_string())
}
