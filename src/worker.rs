//! The background worker: enforces `session_kill.idle_timeout`,
//! `session_kill.idle_in_transaction_timeout` and `session_kill.transaction_timeout` on every
//! client session. Instead of polling it sleeps on its latch until the earliest deadline (or
//! until the shortest limit has passed, since nothing that becomes idle later can expire sooner).
//! With `session_kill.max_connection_usage` set it also ends the longest-idle sessions when
//! client sessions crowd `max_connections`; it needs no client slot to do so.

use crate::backends;
use crate::counters::Source;
use crate::gucs;
use crate::kill;
use crate::policy::{pressure_victims, BackendKind, Limits, Micros, Outcome, Protections, Session, State};
use crate::shmem;
use crate::signal::{self, Signal, SignalError};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

const NAME: &str = "session_kill worker";

/// From `_PG_init` when preloaded. It runs on primaries and hot standbys alike and needs no
/// database: everything it reads is in shared memory and shared catalogs.
pub fn register() {
    BackgroundWorkerBuilder::new(NAME)
        .set_type(NAME)
        .set_library("session_kill")
        .set_function("session_kill_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn session_kill_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    // SAFETY: reports our application_name so the worker is recognisable in pg_stat_activity.
    unsafe { pg_sys::pgstat_report_appname(c"session_kill worker".as_ptr()) };
    log!("session_kill worker started");
    let mut worker = Worker::default();
    let mut backoff = FIRST_BACKOFF;
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: what every worker does on SIGHUP, outside a transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let next = match scan_or_error(&mut worker) {
            Ok(next) => {
                backoff = FIRST_BACKOFF;
                next
            }
            Err(message) => {
                warning!("session_kill worker: scan failed, retrying in {} s: {message}", backoff.as_secs());
                let retry = backends::now() + backoff.as_micros() as Micros;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                Some(retry)
            }
        };
        // SAFETY: MyProcPid is set for the life of the process.
        shmem::worker_scanned(unsafe { pg_sys::MyProcPid }, backends::now(), next);
        if !BackgroundWorker::wait_latch(next.map(until)) {
            break;
        }
    }
    log!("session_kill worker stopped");
    // Exit code 1, not 0: a worker that exits with 0 is unregistered for good, and a terminated
    // worker must come back (after the restart time) unless the server is shutting down.
    // SAFETY: proc_exit runs the exit callbacks and never returns.
    unsafe { pg_sys::proc_exit(1) };
}

/// Retry delays after a failed scan: doubled each time, reset by a good scan.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One scan in its own transaction; an ERROR inside it is caught, its transaction aborted, and
/// reported, so a fault is retried with backoff instead of restarting the worker.
fn scan_or_error(worker: &mut Worker) -> Result<Option<Micros>, String> {
    PgTryBuilder::new(AssertUnwindSafe(|| {
        Ok(BackgroundWorker::transaction(AssertUnwindSafe(|| worker.scan())))
    }))
    .catch_others(|caught| {
        // SAFETY: the failed scan left its transaction open; abort it before going on.
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err(match caught {
            CaughtError::PostgresError(e) | CaughtError::ErrorReport(e) => e.message().to_owned(),
            CaughtError::RustPanic { ereport, .. } => ereport.message().to_owned(),
        })
    })
    .execute()
}

/// From now until `at`, rounded up to whole milliseconds (the latch's resolution) so the worker
/// never wakes just before a deadline.
fn until(at: Micros) -> Duration {
    let micros = (at - backends::now()).max(0) as u64;
    Duration::from_millis(micros.div_ceil(1000))
}

/// While the pressure reaper is on, how often the worker counts sessions even if no deadline is due.
const PRESSURE_CHECK: Micros = 100_000;

#[derive(Default)]
struct Worker {
    /// Backends already signalled (or reported, in dry run), by PID and start time.
    handled: HashSet<(i32, Micros)>,
}

impl Worker {
    /// Ends every session past a deadline, relieves connection pressure, and returns when to
    /// scan next.
    fn scan(&mut self) -> Option<Micros> {
        let limits = gucs::limits();
        let usage = gucs::MAX_CONNECTION_USAGE.get();
        let sessions = backends::sessions();
        self.handled.retain(|(pid, start)| sessions.get(pid).is_some_and(|s| s.backend_start == *start));
        if limits == Limits::default() && usage <= 0.0 {
            return None;
        }
        let protections = kill::configured_protections(false);
        let now = backends::now();
        let mut earliest: Option<Micros> = None;
        for s in sessions.values().filter(|s| s.kind == BackendKind::Client) {
            if protections.protection(s).is_some() || self.handled.contains(&(s.pid, s.backend_start)) {
                continue;
            }
            match limits.deadline(s) {
                Some((deadline, _)) if deadline > now => {
                    earliest = Some(earliest.map_or(deadline, |e| e.min(deadline)));
                }
                Some(_) => self.enforce_limit(s, &limits),
                None => {}
            }
        }
        let next = limits.next_scan(now, earliest);
        if usage <= 0.0 {
            return next;
        }
        let staying: Vec<&Session> = sessions
            .values()
            .filter(|s| s.kind == BackendKind::Client && !self.handled.contains(&(s.pid, s.backend_start)))
            .collect();
        self.relieve_pressure(&staying, usage, &protections);
        Some(next.map_or(now + PRESSURE_CHECK, |n| n.min(now + PRESSURE_CHECK)))
    }

    /// Re-reads the session from its live entry and terminates it if it is the same backend and
    /// still past a deadline (a session that just ran a statement is not ended for idleness).
    fn enforce_limit(&mut self, chosen: &Session, limits: &Limits) {
        let now = backends::now();
        let Some(fresh) = backends::live_session(chosen.pid).filter(|f| f.same_backend(chosen)) else {
            return;
        };
        if let Some((deadline, kind)) = limits.deadline(&fresh).filter(|(d, _)| *d <= now) {
            let why = format!("{} exceeded by {:.1} ms", kind.setting(), (now - deadline) as f64 / 1000.0);
            self.terminate(&fresh, kind.setting(), &why);
        }
    }

    /// Above `usage` × max_connections client sessions, ends the longest-idle ones.
    fn relieve_pressure(&mut self, clients: &[&Session], usage: f64, protections: &Protections) {
        // SAFETY: MaxConnections is set at server start.
        let max_connections = unsafe { pg_sys::MaxConnections } as usize;
        let threshold = (usage * max_connections as f64).floor() as usize;
        for victim in pressure_victims(clients, clients.len(), threshold, protections) {
            let fresh = backends::live_session(victim.pid).filter(|f| f.same_backend(victim));
            if let Some(fresh) = fresh.filter(|f| f.state.is_some_and(State::is_idle)) {
                let why = format!(
                    "connection pressure, {} client sessions above session_kill.max_connection_usage ({threshold} of max_connections {max_connections})",
                    clients.len()
                );
                self.terminate(&fresh, "session_kill.max_connection_usage", &why);
            }
        }
    }

    /// Terminates `s` (or, in dry run, says it would), logs why and counts it under `reason`.
    fn terminate(&mut self, s: &Session, reason: &str, why: &str) {
        self.handled.insert((s.pid, s.backend_start));
        let who = format!("{}: {why}", s.describe());
        let outcome = if gucs::DRY_RUN.get() {
            log!("session_kill: dry run, would terminate {who}");
            Outcome::DryRun
        } else {
            match signal::send(s.pid, Signal::Terminate) {
                Ok(()) => {
                    log!("session_kill: terminated {who}");
                    Outcome::Terminated
                }
                Err(SignalError::Gone) => Outcome::AlreadyGone,
                Err(e) => {
                    warning!("session_kill: could not terminate {who}: {e:?}");
                    Outcome::SignalFailed
                }
            }
        };
        shmem::count(Source::Worker, reason, &outcome.to_string());
    }
}
