//! The background worker: enforces the rules of `session_kill.rules` and the limits
//! `session_kill.idle_timeout`, `session_kill.idle_in_transaction_timeout`,
//! `session_kill.transaction_timeout`, `session_kill.blocker_timeout` and the snapshot limits
//! `session_kill.snapshot_timeout` and `session_kill.snapshot_xid_age` (see `rules.rs` for which
//! governs, `xmin_hold.rs` for how long a snapshot has been held) on every client session, and on
//! a hot standby the replay-lag limits (`replay.rs`: it looks at the startup process).
//! Instead of polling it sleeps on its latch until the earliest deadline (or until the shortest
//! timeout has passed, since nothing that enters a state later can expire sooner). With
//! `session_kill.max_connection_usage` set it also ends the longest-idle sessions when client
//! sessions crowd `max_connections`; it needs no client slot to do so. It starts the
//! `session_kill sync` worker (`sync.rs`) that loads the rules and writes the audit table.

use crate::act::{Acting, Progress, Subject};
use crate::args;
use crate::backends::{self, Backend};
use crate::clock::StepSafeClock;
use crate::counters::Source;
use crate::lock_graph;
use crate::policy::{
    duration_text, escape, pressure_victims, BackendKind, Micros, Outcome, Protections, Session, State,
};
use crate::replay::{self, Conflict};
use crate::rules::{Action, MatchCache, Measure, Origin, Rule, RuleSet, Verdict};
use crate::shmem;
use crate::signal::{self, Signal};
use crate::standby;
use crate::sync;
use crate::xmin_hold::Sightings;
use crate::{errors, gucs};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

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
    // SAFETY: MyProcPid is set for the life of the process.
    shmem::worker_started(unsafe { pg_sys::MyProcPid });
    sync::request_rules();
    let mut worker = Worker::default();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let sighup = BackgroundWorker::sighup_received();
        if sighup {
            // SAFETY: what every worker does on SIGHUP, outside a transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            // session_kill.database may name another database now.
            sync::request_rules();
        }
        let next = if !sighup
            && worker.only_watching_locks()
            && !backends::any_lock_wait()
            && !worker.replay_held_back()
        {
            let next = worker.next_look();
            shmem::worker_planned(next);
            next
        } else {
            let next = match scan_or_error(&mut worker) {
                Ok(next) => {
                    backoff = FIRST_BACKOFF;
                    next
                }
                Err(message) => {
                    warning!(
                        "session_kill worker: scan failed, retrying in {} s: {message}",
                        backoff.as_secs()
                    );
                    let retry = worker.now() + backoff.as_micros() as Micros;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    worker.full_scan_at = Some(retry);
                    Some(retry)
                }
            };
            shmem::worker_scanned(backends::now(), next);
            next
        };
        if !BackgroundWorker::wait_latch(next.map(|at| worker.until(at))) {
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
    errors::in_transaction(|| worker.scan())
}

/// With the pressure reaper on, every admitted login wakes the worker. A login becomes visible
/// in the backend status array a little after it is admitted, so while the logins not yet known
/// to be counted could push the sessions over the threshold, the worker counts again every
/// `LOGIN_RECHECK`, until `LOGIN_SETTLE` has passed without a new login.
const LOGIN_RECHECK: Micros = 20_000;

/// After ending an idle-in-transaction blocker, how long running blockers wait to be looked at
/// again: by then its locks are released and they may no longer hold anyone up.
const BLOCKER_SETTLE: Micros = 50_000;
const LOGIN_SETTLE: Micros = 1_000_000;

/// The pressure reaper's view of logins.
#[derive(Default)]
struct Logins {
    /// Admitted logins so far, and when that count last changed.
    admitted: u64,
    changed_at: Micros,
    /// The count when every admitted login was last known to be visible.
    counted: u64,
}

type BackendKey = (i32, Micros);

struct Worker {
    /// Moves session stamps across steps of the wall clock (see `clock.rs`).
    clock: StepSafeClock,
    /// The monotonic clock's origin.
    started: Instant,
    /// Wall time at the last reading, and the monotonic time it was taken at.
    wall_at: (Micros, Instant),
    /// Backends already terminated (or reported, in dry run).
    handled: HashSet<BackendKey>,
    /// Backends whose statement a `cancel_then_terminate` rule cancelled, and when their grace ends.
    cancelled: HashMap<BackendKey, Micros>,
    logins: Logins,
    /// Database names by OID for rules' database patterns, looked up once per scan.
    databases: HashMap<u32, String>,
    /// The published rules as last parsed, with their generation.
    parsed_rules: Option<(u64, Vec<Rule>)>,
    /// Sessions waiting for a lock at the last scan, and when sessions that were seen waiting
    /// were first seen holding others up without waiting themselves.
    waiting_at_last_scan: HashSet<i32>,
    free_since: HashMap<i32, Micros>,
    /// When the last scan wants the next one, whatever the lock waits; the shortest blocking
    /// limit, how often to look for lock waits in between; and the wake requests counted when
    /// the last scan began (a new one asks for a scan).
    full_scan_at: Option<Micros>,
    lock_watch: Option<Micros>,
    wake_requests_seen: u64,
    /// Each backend's xmin at the last scan, while a snapshot limit is in force.
    sightings: Sightings,
    /// On a hot standby with a replay-lag limit: how often to look at the startup process, the
    /// startup process's PID, the hold on replay it shows (see `replay.rs`), and since when each
    /// session responsible for that hold was charged at the last scan, with the hold's start.
    replay_watch: Option<Micros>,
    startup_pid: Option<i32>,
    replay: replay::Tracker,
    replay_charged: (Micros, HashMap<i32, Micros>),
}

impl Default for Worker {
    fn default() -> Self {
        let started = Instant::now();
        Worker {
            clock: StepSafeClock::default(),
            started,
            wall_at: (backends::now(), started),
            handled: HashSet::new(),
            cancelled: HashMap::new(),
            logins: Logins::default(),
            databases: HashMap::new(),
            parsed_rules: None,
            waiting_at_last_scan: HashSet::new(),
            free_since: HashMap::new(),
            full_scan_at: None,
            lock_watch: None,
            wake_requests_seen: 0,
            sightings: Sightings::default(),
            replay_watch: None,
            startup_pid: None,
            replay: replay::Tracker::default(),
            replay_charged: (0, HashMap::new()),
        }
    }
}

fn key(s: &Session) -> BackendKey {
    (s.pid, s.backend_start)
}

fn earliest(a: Option<Micros>, b: Option<Micros>) -> Option<Micros> {
    [a, b].into_iter().flatten().min()
}

impl Worker {
    /// Reads the wall clock and the monotonic clock together; every time the worker keeps from
    /// earlier scans moves with the wall clock's step since the last reading.
    fn read_clocks(&mut self) -> Micros {
        let now = backends::now();
        let instant = Instant::now();
        let step = self.clock.read(now, instant.duration_since(self.started).as_micros() as Micros);
        if step != 0 {
            self.cancelled.values_mut().for_each(|grace_end| *grace_end += step);
            self.logins.changed_at += step;
            self.replay.shift(step);
        }
        self.wall_at = (now, instant);
        now
    }

    /// The wall time now, in the timeline of the last reading: a step since then does not count.
    fn now(&self) -> Micros {
        let (wall, at) = self.wall_at;
        wall + at.elapsed().as_micros() as Micros
    }

    /// From now until `at`, rounded up to whole milliseconds (the latch's resolution) so the
    /// worker never wakes just before a deadline.
    fn until(&self, at: Micros) -> Duration {
        let micros = (at - self.now()).max(0) as u64;
        Duration::from_millis(micros.div_ceil(1000))
    }

    /// Where chains of lock waits begin, and since when each such session counts as blocking:
    /// the start of the longest wait it causes, but never before the worker saw it stop waiting
    /// itself, so the middle of a chain whose head has just gone is not charged with the whole
    /// chain's wait. `scan` keeps track of who waits; a re-check only reads. The lock manager is
    /// read only while some rule or setting limits blocking.
    fn blocking_since(&mut self, rules: &RuleSet, scan: bool) -> HashMap<i32, Micros> {
        if !rules.measures(Measure::Blocking) {
            self.waiting_at_last_scan.clear();
            self.free_since.clear();
            return HashMap::new();
        }
        let locks = backends::locks();
        let starts = lock_graph::chain_starts(&locks);
        if scan {
            let now = backends::now();
            for pid in starts.keys().filter(|pid| self.waiting_at_last_scan.contains(pid)) {
                self.free_since.entry(*pid).or_insert(now);
            }
            self.waiting_at_last_scan = lock_graph::waiting(&locks);
            self.free_since.retain(|pid, _| starts.contains_key(pid));
        }
        starts
            .into_iter()
            .map(|(pid, since)| (pid, self.free_since.get(&pid).map_or(since, |free| since.max(*free))))
            .collect()
    }

    /// Looks at the startup process (on a hot standby, while a replay-lag limit is set) and
    /// returns the hold on replay it shows, if any. Cheap: one PGPROC and the replay position.
    fn look_at_replay(&mut self, now: Micros) -> Option<replay::Hold> {
        if self.replay_watch.is_none() || !backends::in_recovery() {
            self.replay = replay::Tracker::default();
            return None;
        }
        let pid = match self.startup_pid {
            Some(pid) => pid,
            None => {
                self.startup_pid = backends::startup_pid();
                self.startup_pid?
            }
        };
        let Some(look) = standby::look_at_startup(pid, now) else {
            self.startup_pid = None;
            return None;
        };
        self.replay.observe(look).cloned()
    }

    /// For the look between scans: replay is held back now (or the startup process is not known
    /// yet), so a full scan is due.
    fn replay_held_back(&mut self) -> bool {
        if self.replay_watch.is_none() {
            return false;
        }
        if self.startup_pid.is_none() {
            return backends::in_recovery();
        }
        let now = self.now();
        self.look_at_replay(now).is_some()
    }

    /// Since when each session holds back replay (see `replay.rs`): the holders of the lock the
    /// startup process waits for, or the client sessions with the oldest snapshot.
    fn replay_held_since(&mut self, sessions: &HashMap<i32, Session>, now: Micros) -> HashMap<i32, Micros> {
        let Some(hold) = self.look_at_replay(now) else {
            self.replay_charged = (0, HashMap::new());
            return HashMap::new();
        };
        let blockers: Vec<i32> = match (hold.conflict, self.startup_pid) {
            (Conflict::Lock, Some(startup)) => lock_graph::blockers(&backends::locks())
                .into_iter()
                .filter(|b| b.blocked.contains(&startup))
                .map(|b| b.pid)
                .collect(),
            _ => Vec::new(),
        };
        let next_xid = standby::next_xid();
        let snapshots: Vec<(i32, u32)> = if blockers.is_empty() {
            sessions
                .values()
                .filter(|s| s.kind == BackendKind::Client)
                .filter_map(|s| standby::xmin(s.pid).map(|xmin| (s.pid, replay::xmin_age(next_xid, xmin))))
                .collect()
        } else {
            Vec::new()
        };
        let responsible = replay::responsible(hold.conflict, &blockers, &snapshots);
        let charged = self.replay.charge(now, &responsible);
        self.replay_charged = (hold.since, charged.clone());
        charged
    }

    /// The re-check before acting: since when `pid` holds back replay, if the hold the last scan
    /// charged it with still goes on.
    fn replay_recheck(&mut self, pid: i32) -> Micros {
        let Some(since) = self.replay_charged.1.get(&pid).copied() else { return 0 };
        let now = self.now();
        match self.look_at_replay(now) {
            Some(hold) if hold.since == self.replay_charged.0 => since,
            _ => 0,
        }
    }

    /// Whether this wake-up comes only from the timer that looks for lock waits: nobody asked
    /// for a scan since the last one, and no scan is due yet for anything else. A blocking limit
    /// then needs a full scan only once some process waits for a lock; until then a scan every
    /// limit would copy every session's status for nothing.
    fn only_watching_locks(&self) -> bool {
        self.lock_watch.is_some()
            && shmem::wake_requests() == self.wake_requests_seen
            && self.full_scan_at.is_none_or(|at| self.now() < at)
    }

    /// After a look that found no lock wait: the next look, or the full scan if that is sooner.
    fn next_look(&self) -> Option<Micros> {
        earliest(self.full_scan_at, self.lock_watch.map(|every| self.now().saturating_add(every)))
    }

    /// A full scan (see `scan_sessions`), and when to wake next: for the next full scan or the
    /// next look for lock waits, whichever is sooner.
    fn scan(&mut self) -> Option<Micros> {
        self.wake_requests_seen = shmem::wake_requests();
        self.full_scan_at = self.scan_sessions();
        self.next_look()
    }

    /// Ends every session past its deadline, relieves connection pressure, starts a sync of the
    /// rules and the audit trail when one is due, and returns when to scan next.
    fn scan_sessions(&mut self) -> Option<Micros> {
        let rules = self.rules();
        self.replay_watch = rules.replay_watch().filter(|_| backends::in_recovery());
        self.lock_watch = earliest(rules.lock_watch(), self.replay_watch);
        let read = backends::sessions();
        let blocking = self.blocking_since(&rules, true);
        let now = self.read_clocks();
        let read = self.watch_snapshots(&rules, read, now);
        let replay = self.replay_held_since(&read, now);
        let sessions: HashMap<i32, Session> = read
            .into_iter()
            .map(|(pid, s)| {
                let s = Session { blocking_since: blocking.get(&pid).copied().unwrap_or(0), ..s };
                let s = self.clock.corrected(&s);
                (pid, Session { replay_held_since: replay.get(&pid).copied().unwrap_or(0), ..s })
            })
            .collect();
        self.databases.clear();
        let sync_at = sync::launch_if_due(now);
        let usage = gucs::MAX_CONNECTION_USAGE.get();
        let alive = |k: &BackendKey| sessions.get(&k.0).is_some_and(|s| s.backend_start == k.1);
        self.handled.retain(alive);
        self.cancelled.retain(|k, _| alive(k));
        let protections = gucs::protections(false);
        let sync_at = earliest(sync_at, self.make_way(now, &sessions, &protections));
        if rules.is_empty() && usage <= 0.0 {
            return sync_at;
        }
        let mut next: Option<Micros> = None;
        // Idle-in-transaction sessions first: ending such a blocker may free the running ones it
        // holds up, which are then looked at again once its locks are gone.
        let mut clients: Vec<&Session> =
            sessions.values().filter(|s| s.kind == BackendKind::Client).collect();
        clients.sort_by_key(|s| !s.state.is_some_and(|st| st != State::Idle && st.is_idle()));
        let mut ended_idle_blocker = false;
        let mut matches = MatchCache::default();
        for s in clients {
            if protections.protection(s).is_some() || self.handled.contains(&key(s)) {
                continue;
            }
            let verdict = rules.cached_verdict(s, self.database_name(s.database_oid), &mut matches);
            let blocking = verdict.is_some_and(|v| v.rule.measure == Measure::Blocking);
            let wake = match verdict {
                Some(v) if v.deadline > now => {
                    self.cancelled.remove(&key(s));
                    Some(v.deadline)
                }
                Some(_) if blocking && ended_idle_blocker && s.state.is_some_and(State::is_running) => {
                    Some(now + BLOCKER_SETTLE)
                }
                Some(_) => {
                    let wake = self.enforce(s, &rules);
                    ended_idle_blocker |=
                        blocking && self.handled.contains(&key(s)) && !s.state.is_some_and(State::is_running);
                    wake
                }
                None => {
                    self.cancelled.remove(&key(s));
                    None
                }
            };
            next = earliest(next, wake);
        }
        let next = earliest(rules.next_scan(now, next), sync_at);
        if usage <= 0.0 {
            return next;
        }
        let staying: Vec<&Session> = sessions
            .values()
            .filter(|s| s.kind == BackendKind::Client && !self.handled.contains(&key(s)))
            .collect();
        // SAFETY: MaxConnections is set at server start.
        let max_connections = unsafe { pg_sys::MaxConnections } as usize;
        let threshold = (usage * max_connections as f64).floor() as usize;
        self.relieve_pressure(&staying, threshold, max_connections, &protections);
        let admitted = shmem::admissions();
        let logins = &mut self.logins;
        if admitted != logins.admitted {
            (logins.admitted, logins.changed_at) = (admitted, now);
        }
        let unseen = (admitted - logins.counted) as usize;
        let settling = now - logins.changed_at < LOGIN_SETTLE && staying.len() + unseen > threshold;
        if !settling {
            logins.counted = admitted;
        }
        earliest(next, settling.then_some(now + LOGIN_RECHECK))
    }

    /// While some limit measures snapshots, gives each session since when its xmin has held
    /// back the horizon, by what earlier scans saw (see `xmin_hold.rs`), and records and
    /// publishes what this scan saw. Otherwise stops watching: a later watch starts afresh.
    fn watch_snapshots(
        &mut self,
        rules: &RuleSet,
        mut read: HashMap<i32, Session>,
        now: Micros,
    ) -> HashMap<i32, Session> {
        if !rules.measures_snapshots() {
            if !self.sightings.is_empty() {
                self.sightings = Sightings::default();
                shmem::publish_sightings(&self.sightings);
            }
            return read;
        }
        for s in read.values_mut() {
            s.xmin_since = self.sightings.held_since(s);
        }
        self.sightings.record(read.values(), now);
        shmem::publish_sightings(&self.sightings);
        read
    }

    /// The published rows of `session_kill.rules` (parsed again only when republished) and the
    /// settings, as one rule set.
    fn rules(&mut self) -> RuleSet {
        if let Some((generation, rows)) =
            shmem::published_rules_since(self.parsed_rules.as_ref().map(|p| p.0))
        {
            self.parsed_rules =
                Some((generation, rows.iter().filter_map(|row| Rule::from_row(row).ok()).collect()));
        }
        let rows = self.parsed_rules.as_ref().map(|p| p.1.clone()).unwrap_or_default();
        RuleSet::new(rows, gucs::limits())
    }

    fn database_name(&mut self, oid: u32) -> &str {
        self.databases
            .entry(oid)
            .or_insert_with(|| backends::database_name(pg_sys::Oid::from(oid)).unwrap_or_default())
    }

    /// Re-reads the session from its live entry and acts if it is the same backend and still
    /// past a deadline (a session that just ran a statement is not ended for idleness). Returns
    /// when to look at it again (the end of a cancel's grace).
    fn enforce(&mut self, chosen: &Session, rules: &RuleSet) -> Option<Micros> {
        let now = self.now();
        let mut fresh = backends::live_backend(chosen.pid).filter(|f| f.session.same_backend(chosen))?;
        fresh.session.blocking_since =
            self.blocking_since(rules, false).get(&chosen.pid).copied().unwrap_or(0);
        if rules.measures_snapshots() {
            fresh.session.xmin_since = self.sightings.held_since(&fresh.session);
        }
        fresh.session = self.clock.corrected(&fresh.session);
        fresh.session.replay_held_since = self.replay_recheck(chosen.pid);
        let datname = fresh.datname.clone().unwrap_or_default();
        let verdict = rules.verdict(&fresh.session, &datname).filter(|v| v.deadline <= now)?;
        let rule = verdict.rule.origin.label();
        let (why, told) = explain(&verdict, &fresh.session, now);
        match self.cancelled.get(&key(chosen)) {
            Some(grace_end) if now < *grace_end => return Some(*grace_end),
            Some(_) => {}
            None if verdict.rule.action == Action::CancelThenTerminate
                && fresh.session.state.is_some_and(State::is_running) =>
            {
                let grace_end = now + verdict.rule.grace;
                self.cancelled.insert(key(chosen), grace_end);
                self.signal(&fresh, Signal::Cancel, &rule, &why, &told);
                return Some(grace_end);
            }
            None => {}
        }
        self.signal(&fresh, Signal::Terminate, &rule, &why, &told);
        None
    }

    /// Ends the sessions that hold up a session that set `session_kill.make_way_after` once it
    /// has waited that long, with that session's rights (see `make_way.rs`). Returns when to
    /// look again.
    fn make_way(
        &mut self,
        now: Micros,
        sessions: &HashMap<i32, Session>,
        protections: &Protections,
    ) -> Option<Micros> {
        // Until the next read of the requests, as promised to the backends that made them: a
        // look for lock waits finds a request's wait before it is due (at the floor, soon after).
        let (requests, look_every) = shmem::watch_make_way_requests();
        let look_every = look_every?; // no request
        self.lock_watch = earliest(self.lock_watch, Some(look_every));
        let locks = backends::locks();
        let found = lock_graph::blockers(&locks);
        let mut next = None;
        for request in requests {
            let Some(waiter) = sessions.get(&request.pid).filter(|s| s.backend_start == request.started)
            else {
                continue;
            };
            let waiting_since =
                locks.iter().filter(|e| e.pid == request.pid).find_map(|e| e.waiting).map(|(_, since)| since);
            let Some(waiting_since) = waiting_since else { continue };
            let due = waiting_since + request.after;
            if due > now {
                next = earliest(next, Some(due));
                continue;
            }
            let caller = pg_sys::Oid::from(request.role);
            for blocker in found.iter().filter(|b| b.blocked.contains(&request.pid)) {
                let Some(s) = sessions.get(&blocker.pid) else { continue };
                if s.kind != BackendKind::Client
                    || protections.protection(s).is_some()
                    || self.handled.contains(&key(s))
                    || !s.role.as_deref().is_some_and(|role| signal::may_signal_role_as(caller, role))
                {
                    continue;
                }
                let Some(fresh) = backends::live_backend(s.pid).filter(|f| f.session.same_backend(s)) else {
                    continue;
                };
                let waited = duration_text(now - waiting_since);
                let why = format!(
                    "holds up pid {}, which has waited {waited} for a lock and set session_kill.make_way_after",
                    waiter.pid
                );
                let told = format!(
                    "holding a lock that pid {} (user {}) has waited {waited} for, and it asked to make way after {}",
                    waiter.pid,
                    escape(waiter.role.as_deref().unwrap_or("?")),
                    duration_text(request.after)
                );
                self.signal(&fresh, Signal::Terminate, "session_kill.make_way_after", &why, &told);
            }
        }
        next
    }

    /// Above `threshold` client sessions, ends the longest-idle ones.
    fn relieve_pressure(
        &mut self,
        clients: &[&Session],
        threshold: usize,
        max_connections: usize,
        protections: &Protections,
    ) {
        for victim in pressure_victims(clients, clients.len(), threshold, protections) {
            let fresh = backends::live_backend(victim.pid).filter(|f| f.session.same_backend(victim));
            if let Some(fresh) = fresh.filter(|f| f.session.state.is_some_and(State::is_idle)) {
                let why = format!(
                    "connection pressure, {} client sessions above session_kill.max_connection_usage ({threshold} of max_connections {max_connections})",
                    clients.len()
                );
                let told = format!(
                    "idle for {} while client sessions crowd max_connections ({} above session_kill.max_connection_usage, {threshold} of {max_connections})",
                    duration_text(self.now() - fresh.session.state_change),
                    clients.len()
                );
                self.signal(&fresh, Signal::Terminate, "session_kill.max_connection_usage", &why, &told);
            }
        }
    }

    /// Terminates or cancels `b` (or, in dry run, says it would) through the one acting path,
    /// telling its client `told`, and records it under `rule`.
    fn signal(&mut self, b: &Backend, signal: Signal, rule: &str, why: &str, told: &str) {
        let s = &b.session;
        if signal == Signal::Terminate || gucs::DRY_RUN.get() {
            self.handled.insert(key(s));
        }
        let acting =
            Acting { source: Source::Worker, counted_as: rule, rule: Some(rule), reason: Some(why), told };
        let subject = Subject { session: s, database: b.datname.as_deref(), query: b.query.as_deref() };
        let mut progress = Progress::default();
        let outcome = if gucs::DRY_RUN.get() {
            acting.would_signal(&subject, signal);
            Outcome::DryRun
        } else {
            match acting.signal(&subject, signal, &mut progress) {
                Ok(()) if signal == Signal::Terminate => Outcome::Terminated,
                Ok(()) => Outcome::Cancelled,
                Err(outcome) => outcome,
            }
        };
        acting.finish(&subject, &progress, outcome);
    }
}

/// Why the worker ends a session past `verdict`'s deadline: for the log line and the audit row,
/// and as its client is told (after `session_kill: `).
fn explain(verdict: &Verdict, s: &Session, now: Micros) -> (String, String) {
    let rule = verdict.rule.origin.label();
    let measure = verdict.rule.measure;
    let xid_age = verdict.rule.xid_age;
    let age = s.xmin.map_or(0, |x| x.age);
    let limit = match verdict.rule.origin {
        Origin::Row(_) => {
            format!("{rule} ({} longer than {})", measure.label(), args::interval(verdict.rule.timeout))
        }
        Origin::Setting(_) => rule.clone(),
    };
    let why = if measure == Measure::SnapshotXidAge {
        format!("{limit} exceeded: xmin age {age} is over {xid_age}")
    } else {
        format!("{limit} exceeded by {:.1} ms", (now - verdict.deadline) as f64 / 1000.0)
    };
    let over = match verdict.rule.origin {
        Origin::Row(_) if !verdict.rule.comment.is_empty() => {
            format!("{rule} ({})", escape(&verdict.rule.comment))
        }
        Origin::Row(_) => rule.clone(),
        Origin::Setting(_) if measure == Measure::SnapshotXidAge => format!("{rule} ({xid_age})"),
        Origin::Setting(_) => format!("{rule} ({})", duration_text(verdict.rule.timeout)),
    };
    let measured = now - (verdict.deadline - verdict.rule.timeout);
    (why, format!("{}, over {over}", measure.told(&duration_text(measured), s)))
}
