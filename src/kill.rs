//! `session_kill.sessions()` and `session_kill.kill_sessions()`: thin SQL wrappers over the
//! snapshot, the policy and the signal modules.

use crate::act::{Acting, Progress, Subject};
use crate::args::{
    bounded, database_oid, duration, duration_arg, existing_role, interval, superuser_choice, timestamp,
};
use crate::audit;
use crate::backends::{self, Backend};
use crate::counters::Source;
use crate::errors::{null_argument, or_raise, raise};
use crate::policy::{
    query_still_running, Cidr, DatabaseScope, Filter, LikePattern, Micros, Mode, Outcome, Protections,
    Recheck, Session, State,
};
use crate::signal::{self, Signal};
use crate::sqltypes::{self, Name, Text};
use crate::{gucs, shmem};
use pgrx::datum::{Array, Inet, Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::collections::{HashMap, VecDeque};

const MODES_HINT: &str = "Valid modes are: cancel, terminate, cancel_then_terminate, dry_run.";

/// One row per backend (all databases when `db` is NULL), read straight from shared memory.
/// `protected` is NULL when `kill_sessions` could act on the session, otherwise the reason.
/// `xmin_age` is `age(backend_xmin)` in transactions and `xmin_held_for` how long that xmin has
/// held back the horizon (see `xmin_hold.rs`); both NULL without an xmin.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
fn sessions(
    db: default!(Option<Name>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(datname, Option<Name>),
        name!(usename, Option<Name>),
        name!(application_name, Option<String>),
        name!(client_addr, Option<Inet>),
        name!(backend_type, String),
        name!(state, Option<String>),
        name!(backend_start, Option<TimestampWithTimeZone>),
        name!(xact_start, Option<TimestampWithTimeZone>),
        name!(query_start, Option<TimestampWithTimeZone>),
        name!(state_change, Option<TimestampWithTimeZone>),
        name!(idle_for, Option<Interval>),
        name!(xact_age, Option<Interval>),
        name!(query, Option<String>),
        name!(protected, Option<String>),
        name!(xmin_age, Option<i32>),
        name!(xmin_held_for, Option<Interval>),
    ),
> {
    crate::args::require_current_catalog();
    let scope = db.map(|name| database_oid(&name.0));
    let protections = gucs::protections(false);
    let sightings = shmem::sightings();
    let now = backends::now();
    let mut backends: Vec<Backend> = backends::snapshot()
        .into_iter()
        .filter(|b| scope.is_none_or(|oid| b.session.database_oid == oid))
        .map(|mut b| {
            b.session.xmin_since = sightings.held_since(&b.session);
            b
        })
        .collect();
    backends.sort_by_key(|b| b.session.pid);
    TableIterator::new(backends.into_iter().map(move |b| {
        let s = &b.session;
        let shown = b.visible;
        (
            s.pid,
            b.datname.clone().map(Name),
            s.role.clone().map(Name),
            Some(s.application.clone()),
            s.client.filter(|_| shown).map(|a| Inet(a.to_string())),
            b.backend_type.clone(),
            s.state.filter(|_| shown).map(|st| st.label().to_owned()),
            timestamp(s.backend_start).filter(|_| shown),
            timestamp(s.xact_start).filter(|_| shown),
            timestamp(s.query_start).filter(|_| shown),
            timestamp(s.state_change).filter(|_| shown),
            s.idle_for(now).filter(|_| shown).map(interval),
            s.xact_age(now).filter(|_| shown).map(interval),
            if shown { b.query.clone() } else { Some("<insufficient privilege>".to_owned()) },
            protections.protection(s).map(|p| p.label().to_owned()),
            s.xmin.map(|x| x.age as i32),
            s.xmin_held_for(now).filter(|_| shown).map(interval),
        )
    }))
}

/// Cancels or terminates the client sessions of `db` that match every given filter, waits until
/// they are really gone (bounded by `wait`) and returns one row per matching session with what
/// was done and what came of it.
#[pg_extern(name = "kill_sessions", volatile, parallel_unsafe)]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn kill_sessions_0_2(
    db: Option<Name>,
    mode: default!(Option<Text>, "'terminate'"),
    min_idle: default!(Option<Interval>, "'0'"),
    usename: default!(Option<Name>, "NULL"),
    application_name: default!(Option<Text>, "NULL"),
    client_addr: default!(Option<sqltypes::Cidr>, "NULL"),
    states: default!(Option<Array<Text>>, "NULL"),
    grace: default!(Option<Interval>, "'5s'"),
    wait: default!(Option<Interval>, "'10s'"),
    include_superusers: default!(Option<bool>, "false"),
    all_databases: default!(Option<bool>, "false"),
    reason: default!(Option<Text>, "NULL"),
    blocking: default!(Option<Interval>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(datname, Option<Name>),
        name!(usename, Option<Name>),
        name!(application_name, Option<String>),
        name!(state, Option<String>),
        name!(idle_for, Option<Interval>),
        name!(action, String),
        name!(outcome, String),
    ),
> {
    crate::args::require_current_catalog();
    let all_databases =
        all_databases.unwrap_or_else(|| null_argument("all_databases", "Pass true or false."));
    let database = match (db, all_databases) {
        (Some(name), false) => DatabaseScope::One(database_oid(&name.0)),
        (None, true) => DatabaseScope::All,
        (None, false) => null_argument(
            "db",
            "Name the database whose sessions to act on, or pass all_databases => true to act on every database.",
        ),
        (Some(_), true) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "db and all_databases => true cannot be combined",
            "Pass either a database name or all_databases => true.",
        ),
    };
    let mode = mode.unwrap_or_else(|| null_argument("mode", MODES_HINT));
    let mode = Mode::parse(&bounded("mode", mode, MAX_KEYWORD, MODES_HINT));
    let request = KillRequest {
        source: Source::KillSessions,
        mode: or_raise(mode),
        filter: Filter {
            database,
            min_idle: duration_arg("min_idle", min_idle),
            role: usename.map(|name| existing_role(name.0)),
            application: application_name.map(|p| {
                let pattern = bounded("application_name pattern", p, MAX_FILTER_PATTERN, "");
                or_raise(LikePattern::parse(&pattern))
            }),
            client: client_addr.map(|c| or_raise(Cidr::parse(&c.0))),
            states: states.map(state_list),
            blocking: blocking.map(|b| duration_arg("blocking", Some(b))),
            logical_replication: false,
        },
        grace: duration_arg("grace", grace),
        wait: duration_arg("wait", wait),
        protections: gucs::protections(superuser_choice(include_superusers)),
        reason: reason.map(|r| bounded("reason", r, MAX_REASON, "").into_owned()),
    };
    let targets = request.execute();
    TableIterator::new(targets.into_iter().map(|t| {
        let s = &t.chosen;
        let shown = t.backend.visible;
        (
            s.pid,
            t.backend.datname.map(Name),
            s.role.clone().map(Name),
            Some(s.application.clone()),
            t.selected_state.filter(|_| shown).map(|st| st.label().to_owned()),
            t.selected_idle_for.filter(|_| shown).map(interval),
            t.progress.action.label().to_owned(),
            t.outcome.map_or_else(String::new, |o| o.to_string()),
        )
    }))
}

/// The C symbol of `kill_sessions` in the 0.1.0 catalog, whose signature had one argument fewer:
/// called before `ALTER EXTENSION session_kill UPDATE`, it says so instead of misreading its
/// arguments. (The 0.2.0 catalog calls `kill_sessions_0_2_wrapper`.)
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn kill_sessions_wrapper(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    crate::args::require_current_catalog();
    unreachable!("only a 0.1.0 catalog calls this symbol")
}

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_kill_sessions_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1_API: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1_API
}

#[derive(Clone)]
pub(crate) struct KillRequest {
    pub(crate) source: Source,
    pub(crate) mode: Mode,
    pub(crate) filter: Filter,
    pub(crate) grace: Micros,
    pub(crate) wait: Micros,
    pub(crate) protections: Protections,
    pub(crate) reason: Option<String>,
}

/// A matching session and what happened to it so far.
pub(crate) struct Target {
    pub(crate) backend: Backend,
    /// The latest re-checked view of the session.
    pub(crate) chosen: Session,
    selected_state: Option<State>,
    selected_idle_for: Option<Micros>,
    pub(crate) outcome: Option<Outcome>,
    /// What was done to it, and its audit entry once a signal went out.
    pub(crate) progress: Progress,
}

impl Target {
    fn subject(&self) -> Subject<'_> {
        Subject {
            session: &self.chosen,
            database: self.backend.datname.as_deref(),
            query: self.backend.query.as_deref(),
        }
    }
}

impl KillRequest {
    pub(crate) fn execute(&self) -> Vec<Target> {
        self.act(self.select())
    }

    /// The matching sessions, with protected ones (and, in dry run, all) already decided.
    pub(crate) fn select(&self) -> Vec<Target> {
        let now = backends::now();
        let hidden = self.filter.uses_hidden_facts();
        let chains = self.lock_chain_starts();
        let mut targets: Vec<Target> = backends::snapshot()
            .into_iter()
            .map(|mut b| {
                b.session.blocking_since = chains.get(&b.session.pid).copied().unwrap_or(0);
                b
            })
            .filter(|b| self.filter.matches(&b.session, now) && (b.visible || !hidden))
            .map(|backend| Target {
                chosen: backend.session.clone(),
                selected_state: backend.session.state,
                selected_idle_for: backend.session.idle_for(now),
                backend,
                outcome: None,
                progress: Progress::default(),
            })
            .collect();
        targets.sort_by_key(|t| t.chosen.pid);
        for t in &mut targets {
            t.outcome = match self.protections.protection(&t.chosen) {
                Some(p) => Some(Outcome::Protected(p)),
                None if self.mode == Mode::DryRun => Some(Outcome::DryRun),
                None => None,
            };
        }
        targets
    }

    /// Signals every undecided target as the mode says and waits as configured.
    pub(crate) fn act(&self, targets: Vec<Target>) -> Vec<Target> {
        let targets = self.signal_and_wait(targets);
        for t in &targets {
            // Every target has its outcome by now; a signal sent without waiting is `signalled`.
            self.finish(&t.subject(), &t.progress, t.outcome.unwrap_or(Outcome::Signalled));
        }
        targets
    }

    fn acting<'a>(&'a self, told: &'a str) -> Acting<'a> {
        Acting {
            source: self.source,
            counted_as: self.mode.label(),
            rule: None,
            reason: self.reason.as_deref(),
            told,
        }
    }

    fn signal_and_wait(&self, mut targets: Vec<Target>) -> Vec<Target> {
        if self.mode == Mode::DryRun {
            return targets;
        }
        let (cancelled, mut terminated) = self.first_signals(&mut targets);
        match self.mode {
            Mode::Cancel => self.await_cancellations(&mut targets, &cancelled),
            Mode::CancelThenTerminate => {
                terminated.extend(self.escalate(&mut targets, &cancelled));
            }
            Mode::Terminate | Mode::DryRun => {}
        }
        self.await_exits(&mut targets, &terminated);
        targets
    }

    /// Re-checks each actionable session and sends its first signal: cancel for running queries
    /// (in the cancel modes), terminate otherwise. Returns the indexes cancelled and terminated.
    fn first_signals(&self, targets: &mut [Target]) -> (Vec<usize>, Vec<usize>) {
        let (mut cancelled, mut terminated) = (Vec::new(), Vec::new());
        let chains = self.lock_chain_starts();
        for (i, t) in targets.iter_mut().enumerate().filter(|(_, t)| t.outcome.is_none()) {
            let fresh = backends::live_session(t.chosen.pid)
                .map(|s| Session { blocking_since: chains.get(&s.pid).copied().unwrap_or(0), ..s });
            let recheck = self.filter.recheck(&t.chosen, fresh.as_ref(), backends::now());
            let Some(fresh) = fresh.filter(|_| recheck == Recheck::Proceed) else {
                t.outcome = Some(recheck.into());
                continue;
            };
            let running = fresh.state.is_some_and(State::is_running);
            t.chosen = fresh;
            let signal = match self.mode {
                Mode::Cancel if !running => {
                    t.outcome = Some(Outcome::NoQueryToCancel);
                    continue;
                }
                Mode::Cancel | Mode::CancelThenTerminate if running => Signal::Cancel,
                _ => Signal::Terminate,
            };
            if self.signal(t, signal) {
                if signal == Signal::Cancel {
                    cancelled.push(i)
                } else {
                    terminated.push(i)
                }
            }
        }
        (cancelled, terminated)
    }

    /// `cancel` mode: waits until each cancelled query has stopped running.
    fn await_cancellations(&self, targets: &mut [Target], cancelled: &[usize]) {
        if self.wait == 0 {
            return mark(targets, cancelled, Outcome::Signalled);
        }
        let still_running = |t: &Target, live: &HashMap<i32, Session>| {
            query_still_running(&t.chosen, live.get(&t.chosen.pid))
        };
        signal::wait_until(duration(self.wait), || {
            let live = backends::sessions();
            cancelled.iter().all(|&i| !still_running(&targets[i], &live))
        });
        let live = backends::sessions();
        for &i in cancelled {
            let t = &mut targets[i];
            t.outcome = Some(if still_running(t, &live) {
                Outcome::StillRunningAfterWait
            } else if live.get(&t.chosen.pid).is_some_and(|s| s.same_backend(&t.chosen)) {
                Outcome::Cancelled
            } else {
                Outcome::ExitedAfterCancel
            });
        }
    }

    /// `cancel_then_terminate`: gives cancelled sessions `grace` to disconnect on their own, then
    /// terminates the survivors. Returns the indexes terminated.
    fn escalate(&self, targets: &mut [Target], cancelled: &[usize]) -> Vec<usize> {
        if cancelled.is_empty() {
            return Vec::new();
        }
        signal::wait_until(duration(self.grace), || {
            cancelled.iter().all(|&i| !signal::in_process_array(targets[i].chosen.pid))
        });
        let mut terminated = Vec::new();
        for &i in cancelled {
            let t = &mut targets[i];
            if !backends::live_session(t.chosen.pid).is_some_and(|s| s.same_backend(&t.chosen)) {
                t.outcome = Some(Outcome::ExitedAfterCancel);
            } else if self.signal(t, Signal::Terminate) {
                terminated.push(i);
            }
        }
        terminated
    }

    /// Waits until every terminated backend has left the process array (freeing its slot).
    fn await_exits(&self, targets: &mut [Target], terminated: &[usize]) {
        if self.wait == 0 {
            return mark(targets, terminated, Outcome::Signalled);
        }
        // Backends exit roughly in the order they were signalled: checking from the front and
        // stopping at the first one still there keeps ProcArrayLock free for the exiting ones.
        let mut remaining: VecDeque<usize> = terminated.iter().copied().collect();
        signal::wait_until(duration(self.wait), || {
            while remaining.front().is_some_and(|&i| !signal::in_process_array(targets[i].chosen.pid)) {
                remaining.pop_front();
            }
            remaining.is_empty()
        });
        let remaining: Vec<usize> = remaining.into();
        mark(targets, terminated, Outcome::Terminated);
        mark(targets, &remaining, Outcome::StillRunningAfterWait);
    }

    /// Where chains of lock waits begin, when the filter asks (the lock manager is read only then).
    fn lock_chain_starts(&self) -> HashMap<i32, Micros> {
        if self.filter.blocking.is_some() {
            backends::lock_chain_starts()
        } else {
            HashMap::new()
        }
    }

    /// What the client of a session this request signals is told.
    fn told(&self, datname: &str, signal: Signal) -> String {
        let by = audit::actor(self.source);
        let done = match signal {
            Signal::Cancel => "cancelled",
            Signal::Terminate => "terminated",
        };
        match (self.source, &self.reason) {
            (Source::DrainDatabase, _) => format!("database \"{datname}\" is being drained by {by}"),
            (_, Some(reason)) => format!("{done} by {by}: {reason}"),
            (_, None) => format!("{done} by {by}"),
        }
    }

    /// Sends `signal` to the subject through the one acting path, telling its client why.
    pub(crate) fn send(
        &self,
        subject: &Subject,
        signal: Signal,
        progress: &mut Progress,
    ) -> Result<(), Outcome> {
        let told = self.told(subject.database.unwrap_or("?"), signal);
        self.acting(&told).signal(subject, signal, progress)
    }

    /// Records the final outcome for one session (see `Acting::finish`).
    pub(crate) fn finish(&self, subject: &Subject, progress: &Progress, outcome: Outcome) {
        self.acting("").finish(subject, progress, outcome);
    }

    /// Sends one signal; on failure records why. Returns whether it was sent.
    fn signal(&self, t: &mut Target, signal: Signal) -> bool {
        let subject = Subject {
            session: &t.chosen,
            database: t.backend.datname.as_deref(),
            query: t.backend.query.as_deref(),
        };
        match self.send(&subject, signal, &mut t.progress) {
            Ok(()) => true,
            Err(outcome) => {
                t.outcome = Some(outcome);
                false
            }
        }
    }
}

fn mark(targets: &mut [Target], indexes: &[usize], outcome: Outcome) {
    for &i in indexes {
        targets[i].outcome = Some(outcome);
    }
}

/// Caller text is checked for length before it is converted, parsed, matched or copied.
const MAX_FILTER_PATTERN: usize = 256;
const MAX_REASON: usize = 1024;
const MAX_STATES: usize = 64;
/// Modes and states are short words; longer text is not one of them.
const MAX_KEYWORD: usize = 64;

fn state_list(states: Array<Text>) -> Vec<State> {
    let hint = format!("Valid states are: {}.", State::ALL.map(State::label).join(", "));
    if states.is_empty() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "states must not be empty", hint);
    }
    // Counted before any element is read: the array may hold millions.
    if states.len() > MAX_STATES {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "too many states",
            format!("Give at most {MAX_STATES} states. {hint}"),
        );
    }
    states
        .iter()
        .map(|s| {
            pgrx::check_for_interrupts!();
            let s = s.unwrap_or_else(|| null_argument("states element", &hint));
            or_raise(State::parse(&bounded("states element", s, MAX_KEYWORD, &hint)))
        })
        .collect()
}
