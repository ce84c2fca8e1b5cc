//! Everything session_kill keeps in shared memory (only when preloaded): the drain gates, the
//! action counters, the published rules, the audit queue, the sync worker's state, the reasons
//! left for clients and the worker's PID, plus the check that SQL functions needing them make.
//!
//! Locking. Each structure has an LWLock of its own, taken shared to read and exclusive to
//! change, and held only inside the functions of this module, never across a call out of it:
//! nobody else can take them, so nobody can hold one for long or take two in the wrong order.
//! The one exception is `while_admitted`, which holds the gate table shared while it signals a
//! login still starting up, so the login cannot finish exiting (its exit callback takes the
//! gate table exclusive) and free its PID between the check and the signal. The signal path
//! takes the reasons, audit and counters locks inside it, so locks nest only as gates first,
//! then one of those; never the other way round. The worker's PID is an atomic, read without a
//! lock by every backend that wakes the worker.

use crate::audit::{AuditQueue, Entry};
use crate::counters::{Counters, Source, WorkerStatus};
use crate::errors::raise;
use crate::gate::{Admission, DbName, Gate, GateError, GateTable, Verdict};
use crate::make_way::{MakeWayTable, Recorded, Request};
use crate::policy::Micros;
use crate::reasons::{ReasonTable, ReasonText};
use crate::rules::{PublishedRules, RuleRow};
use crate::signal::Signal;
use crate::sync::SyncState;
use crate::xmin_hold::{PublishedSightings, Sightings};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock, PgSqlErrorCode};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

// SAFETY: both tables are plain Copy data without pointers.
unsafe impl PGRXSharedMemory for GateTable {}
// SAFETY: as above.
unsafe impl PGRXSharedMemory for Counters {}
// SAFETY: as above.
unsafe impl PGRXSharedMemory for PublishedRules {}
// SAFETY: as above.
unsafe impl PGRXSharedMemory for AuditQueue {}
// SAFETY: as above.
unsafe impl PGRXSharedMemory for SyncState {}
// SAFETY: as above.
unsafe impl PGRXSharedMemory for ReasonTable {}
// SAFETY: as above.
unsafe impl PGRXSharedMemory for MakeWayTable {}
// SAFETY: as above.
unsafe impl PGRXSharedMemory for PublishedSightings {}

// SAFETY: the names are unique to this extension.
static GATES: PgLwLock<GateTable> = unsafe { PgLwLock::new(c"session_kill_gates") };
// SAFETY: as above.
static COUNTERS: PgLwLock<Counters> = unsafe { PgLwLock::new(c"session_kill_counters") };
// SAFETY: as above.
static RULES: PgLwLock<PublishedRules> = unsafe { PgLwLock::new(c"session_kill_rules") };
// SAFETY: as above.
static AUDIT: PgLwLock<AuditQueue> = unsafe { PgLwLock::new(c"session_kill_audit") };
// SAFETY: as above.
static SYNC: PgLwLock<SyncState> = unsafe { PgLwLock::new(c"session_kill_sync") };
// SAFETY: as above.
static REASONS: PgLwLock<ReasonTable> = unsafe { PgLwLock::new(c"session_kill_reasons") };
// SAFETY: as above.
static MAKE_WAY: PgLwLock<MakeWayTable> = unsafe { PgLwLock::new(c"session_kill_make_way") };
// SAFETY: as above.
static SIGHTINGS: PgLwLock<PublishedSightings> = unsafe { PgLwLock::new(c"session_kill_sightings") };
// SAFETY: as above.
static WORKER_PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"session_kill_worker_pid") };
// SAFETY: as above.
static WAKE_REQUESTS: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"session_kill_wake_requests") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// From `_PG_init` while `shared_preload_libraries` is being processed.
pub fn init() {
    pg_shmem_init!(GATES = GateTable::default());
    pg_shmem_init!(COUNTERS = Counters::default());
    pg_shmem_init!(RULES = PublishedRules::default());
    pg_shmem_init!(AUDIT = AuditQueue::default());
    pg_shmem_init!(SYNC = SyncState::default());
    pg_shmem_init!(REASONS = ReasonTable::default());
    pg_shmem_init!(MAKE_WAY = MakeWayTable::default());
    pg_shmem_init!(SIGHTINGS = PublishedSightings::default());
    pg_shmem_init!(WORKER_PID);
    pg_shmem_init!(WAKE_REQUESTS);
    // SAFETY: _PG_init runs once in the postmaster; registered last, this hook runs first and
    // calls the others (the structures' initialisation) before it does its own part.
    unsafe {
        PREVIOUS_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(after_shmem_startup);
    }
    PRELOADED.store(true, Ordering::Relaxed);
}

static mut PREVIOUS_SHMEM_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

#[pg_guard]
unsafe extern "C-unwind" fn after_shmem_startup() {
    // SAFETY: the previous hook is pgrx's initialisation of the structures above (and whatever
    // another library registered before it).
    unsafe {
        if let Some(previous) = PREVIOUS_SHMEM_STARTUP_HOOK {
            previous();
        }
    }
    // SAFETY: in the postmaster, signals are blocked while shared memory is set up at start;
    // before PostgreSQL 16 a crash restart sets it up in a signal handler, with the other
    // signals blocked. Either way no signal frame lives below this frame during the call.
    if unsafe { !pg_sys::IsUnderPostmaster } {
        release_stack_below_here();
    }
}

/// Gives back the stack pages below the current frame. pgrx builds each structure's first value
/// on the stack and copies it into shared memory (the audit queue alone is 1 MB), which left the
/// postmaster 3 MB of stack it never uses again. Every fork copied their page table entries and
/// every exit freed them: 10 % more CPU per login (benchmarks/results.md, "The cost on every
/// login"). Nothing lives below the stack pointer, and a page given back is a zero page again
/// if the stack ever grows that deep.
fn release_stack_below_here() {
    const MARGIN: usize = 64 * 1024;
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return };
    let Some(lowest) = maps
        .lines()
        .find(|line| line.ends_with("[stack]"))
        .and_then(|line| usize::from_str_radix(line.split('-').next()?, 16).ok())
    else {
        return;
    };
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let here = &raw const maps as usize;
    let below = here.saturating_sub(MARGIN) & !(page - 1);
    if below > lowest {
        // SAFETY: [lowest, below) is stack below this frame and a margin, which no live frame
        // uses (see the caller); MADV_DONTNEED keeps the mapping and drops its pages.
        unsafe { libc::madvise(lowest as *mut libc::c_void, below - lowest, libc::MADV_DONTNEED) };
    }
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

pub fn require_preloaded() {
    if !preloaded() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "session_kill must be loaded via shared_preload_libraries",
            "Add session_kill to shared_preload_libraries in postgresql.conf and restart the server.",
        );
    }
}

/// Counts one action; a no-op when not preloaded (kill_sessions works without shared memory).
pub fn count(source: Source, reason: &str, outcome: &str) {
    if preloaded() {
        COUNTERS.exclusive().add(source, reason, outcome);
    }
}

/// Leaves the reason for a signal about to be sent (see `reasons.rs`); a no-op when not preloaded.
pub fn attach_reason(pid: i32, started: Micros, signal: Signal, text: &str) {
    if preloaded() {
        REASONS.exclusive().attach(pid, started, signal, text, crate::backends::now());
    }
}

pub fn withdraw_reason(pid: i32, started: Micros) {
    if preloaded() {
        REASONS.exclusive().withdraw(pid, started);
    }
}

/// The reason left for this backend's interrupt, taken so it is told once.
pub fn take_reason(pid: i32, started: Micros, signal: Signal, now: Micros) -> Option<ReasonText> {
    if !preloaded() {
        return None;
    }
    REASONS.exclusive().take(pid, started, signal, now)
}

/// The worker announces itself at start, so backends can wake it before its first scan.
pub fn worker_started(pid: i32) {
    WORKER_PID.get().store(pid, Ordering::Release);
}

/// The worker reports each scan.
pub fn worker_scanned(at: Micros, next: Option<Micros>) {
    let mut counters = COUNTERS.exclusive();
    let scans = counters.worker.scans + 1;
    counters.worker = WorkerStatus { last_scan: at, next_scan: next.unwrap_or(0), scans };
}

/// The worker reports when it wakes next after a look that found nothing to scan for.
pub fn worker_planned(next: Option<Micros>) {
    COUNTERS.exclusive().worker.next_scan = next.unwrap_or(0);
}

/// Counted by every backend that wakes the worker, so the worker can tell a wake-up that asks
/// for a scan from one that its own timer set.
pub fn count_wake_request() {
    WAKE_REQUESTS.get().fetch_add(1, Ordering::AcqRel);
}

pub fn wake_requests() -> u64 {
    WAKE_REQUESTS.get().load(Ordering::Acquire)
}

pub fn counts() -> (Vec<crate::counters::Count>, WorkerStatus) {
    let counters = COUNTERS.share();
    (counters.rows(), counters.worker)
}

/// 0 until the worker has started.
pub fn worker_pid() -> i32 {
    if preloaded() {
        WORKER_PID.get().load(Ordering::Acquire)
    } else {
        0
    }
}

/// Decides on a login that passed authentication (see `GateTable::admit`).
pub fn admit(login: Admission, now: Micros) -> Verdict {
    GATES.exclusive().admit(login, now)
}

/// The backend `(pid, started)`, admitted into `slot`, is exiting: it is no longer a login the
/// drain must wait for.
pub fn forget_admission(slot: usize, pid: i32, started: Micros) {
    GATES.exclusive().exited(slot, pid, started);
}

pub fn close_gate(gate: Gate, now: Micros) -> Result<Gate, GateError> {
    GATES.exclusive().close(gate, now)
}

pub fn open_gate(name: &DbName, now: Micros) -> Option<Gate> {
    GATES.exclusive().open(name, now)
}

pub fn find_gate(name: &DbName, now: Micros) -> Option<Gate> {
    GATES.share().find(name, now)
}

pub fn closed_gates(now: Micros) -> Vec<Gate> {
    GATES.share().list(now)
}

/// Live logins admitted to `name` (see `GateTable::admitted_to`).
pub fn admitted_to(name: &DbName) -> Vec<Admission> {
    GATES.share().admitted_to(name)
}

/// Is this login still remembered, and so still alive?
pub fn remembers(login: &Admission) -> bool {
    GATES.share().remembers(login)
}

/// Logins admitted since the server started.
pub fn admissions() -> u64 {
    GATES.share().admissions()
}

/// Runs `act` only if `login` is still remembered, holding the gate table meanwhile so the
/// login cannot finish exiting and free its PID for another process (see the module comment).
pub fn while_admitted(login: &Admission, act: impl FnOnce() -> bool) -> bool {
    let gates = GATES.share();
    gates.remembers(login) && act()
}

/// Records a session's `make_way_after` (see `make_way.rs`); false when the table is full.
pub fn set_make_way(request: Request) -> Recorded {
    MAKE_WAY.exclusive().set(request)
}

pub fn forget_make_way(pid: i32, started: Micros) {
    MAKE_WAY.exclusive().remove(pid, started);
}

/// Every session's `make_way_after` request, for the worker, and how often it must look for
/// lock waits until its next call (see `MakeWayTable::watch`).
pub fn watch_make_way_requests() -> (Vec<Request>, Option<Micros>) {
    if preloaded() {
        MAKE_WAY.exclusive().watch()
    } else {
        (Vec::new(), None)
    }
}

/// A copy of the sync worker's state.
pub fn sync_state() -> SyncState {
    *SYNC.share()
}

/// Changes the sync worker's state under its lock.
pub fn update_sync<R>(change: impl FnOnce(&mut SyncState) -> R) -> R {
    change(&mut SYNC.exclusive())
}

/// Queues an audit entry; returns its sequence number, and true when the queue was empty (the
/// worker should be woken).
pub fn queue_audit(entry: Entry) -> (u64, bool) {
    let mut queue = AUDIT.exclusive();
    let seq = queue.push(entry);
    (seq, queue.pending() == 1)
}

/// Gives a queued signal its final outcome; false if it was settled or written already.
pub fn settle_audit(seq: u64, action: &str, outcome: &str) -> bool {
    AUDIT.exclusive().settle(seq, action, outcome).is_some()
}

/// Settles every queued signal of this backend as it stands; returns them.
pub fn settle_own_audit(owner: (i32, Micros)) -> Vec<Entry> {
    AUDIT.exclusive().settle_all(owner)
}

/// Audit entries lost since the server started (queue overflow, or nowhere to write them).
pub fn audit_dropped() -> u64 {
    AUDIT.share().dropped()
}

/// Counts entries that were taken but had nowhere to go.
pub fn count_dropped_audit(n: u64) {
    AUDIT.exclusive().count_dropped(n);
}

/// How many audit entries wait, and since when.
pub fn audit_waiting() -> (usize, Option<Micros>) {
    let queue = AUDIT.share();
    (queue.pending(), queue.oldest())
}

/// Every settled entry (and those whose backend has exited) and how many were lost since the
/// last take; removes them from the queue.
pub fn take_audit() -> (Vec<Entry>, u64) {
    // A PID stands for its backend here: after PID reuse an entry waits for the new one's exit.
    AUDIT.exclusive().take(|(pid, _)| crate::signal::in_process_array(pid))
}

/// Puts entries that could not be written back at the head of the queue.
pub fn requeue_audit(entries: &[Entry]) {
    AUDIT.exclusive().requeue(entries);
}

/// Replaces the published rules; returns how many were kept.
pub fn publish_rules(rows: &[RuleRow]) -> usize {
    RULES.exclusive().publish(rows)
}

pub fn rules_in_force() -> usize {
    RULES.share().len()
}

pub fn published_rules() -> Vec<RuleRow> {
    RULES.share().rows()
}

/// The published rules and their generation, unless the caller already has `known`'s.
pub fn published_rules_since(known: Option<u64>) -> Option<(u64, Vec<RuleRow>)> {
    let rules = RULES.share();
    (known != Some(rules.generation())).then(|| (rules.generation(), rules.rows()))
}

/// The worker's sightings of xmins at its last scan (see `xmin_hold.rs`).
pub fn publish_sightings(sightings: &Sightings) {
    SIGHTINGS.exclusive().publish(sightings);
}

/// The worker's last published sightings; none (so every xmin counts from its transaction's
/// start) when not preloaded.
pub fn sightings() -> Sightings {
    if preloaded() {
        SIGHTINGS.share().read()
    } else {
        Sightings::default()
    }
}
