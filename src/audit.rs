//! The audit trail: every action by every path (kill_sessions, drain_database, the worker) is
//! counted in shared memory and queued there for the table `session_kill.log`.
//!
//! The queue, not the acting transaction, carries the entry to the table: the `session_kill sync`
//! worker writes it, so an entry survives the caller's rollback (a drain that ends in an ERROR
//! still leaves its terminations on record). A signal is queued the moment it is sent, as
//! `signalled`; the caller settles it with the final outcome after its wait. If the caller never
//! gets there (statement_timeout, a cancel, its own termination), its transaction's abort settles
//! it as it stands, and the sync also writes entries whose caller is gone. On a hot standby
//! nothing is queued; the server log line each action writes is the record there.

use crate::counters::Source;
use crate::fixed::FixedText;
use crate::policy::{Micros, Session, State};
use crate::{backends, gucs, shmem, signal};
use pgrx::prelude::*;
use std::cell::Cell;

/// Entries waiting for the table. When full, a report (dry run or skip) makes room first; only a
/// queue full of signals drops a signal. Either way the loss is counted.
pub const CAPACITY: usize = 1024;

type Name = FixedText<64>;

/// One action, as queued in shared memory.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub at: Micros,
    pub source: Source,
    /// What the counters group it by (see `Act::counted_as`).
    pub counted_as: FixedText<48>,
    pub rule: Name,
    pub reason: FixedText<128>,
    pub actor: Name,
    pub pid: i32,
    pub database: Name,
    pub role: Name,
    pub application: Name,
    pub client: FixedText<48>,
    pub state: FixedText<32>,
    pub idle_for: Option<Micros>,
    pub query: FixedText<256>,
    pub action: FixedText<32>,
    pub outcome: Name,
    /// A signal was sent (as opposed to a dry run or a skipped session).
    pub signalled: bool,
    /// The outcome is final; until then the backend below may still settle it.
    pub settled: bool,
    /// The backend that acted (PID and start time).
    pub owner: (i32, Micros),
    /// Assigned by the queue; how the owner finds its entry again.
    pub seq: u64,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            at: 0,
            source: Source::Worker,
            counted_as: FixedText::default(),
            rule: Name::default(),
            reason: FixedText::default(),
            actor: Name::default(),
            pid: 0,
            database: Name::default(),
            role: Name::default(),
            application: Name::default(),
            client: FixedText::default(),
            state: FixedText::default(),
            idle_for: None,
            query: FixedText::default(),
            action: FixedText::default(),
            outcome: Name::default(),
            signalled: false,
            settled: true,
            owner: (0, 0),
            seq: 0,
        }
    }
}

/// Entries not yet written to the table, oldest first.
#[derive(Clone, Copy)]
pub struct AuditQueue {
    entries: [Entry; CAPACITY],
    len: usize,
    next_seq: u64,
    /// Entries dropped since the last `take` (for the sync's warning).
    lost: u64,
    /// Entries dropped since the server started, for any reason.
    dropped: u64,
}

impl Default for AuditQueue {
    fn default() -> Self {
        AuditQueue { entries: [Entry::default(); CAPACITY], len: 0, next_seq: 1, lost: 0, dropped: 0 }
    }
}

impl AuditQueue {
    /// Queues `entry`; returns its sequence number.
    pub fn push(&mut self, mut entry: Entry) -> u64 {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        self.append(entry);
        entry.seq
    }

    fn append(&mut self, entry: Entry) {
        if self.len == CAPACITY {
            let victim = self.entries.iter().position(|e| !e.signalled).unwrap_or(0);
            let victim = if entry.signalled { victim } else { self.first_report().unwrap_or(victim) };
            self.remove(victim);
            self.lost += 1;
            self.dropped += 1;
        }
        self.entries[self.len] = entry;
        self.len += 1;
    }

    fn first_report(&self) -> Option<usize> {
        self.entries[..self.len].iter().position(|e| !e.signalled)
    }

    fn remove(&mut self, index: usize) {
        self.entries.copy_within(index + 1..self.len, index);
        self.len -= 1;
    }

    pub fn pending(&self) -> usize {
        self.len
    }

    /// When the oldest waiting entry was queued.
    pub fn oldest(&self) -> Option<Micros> {
        (self.len > 0).then(|| self.entries[0].at)
    }

    /// Gives entry `seq` its final action and outcome; false if it is no longer queued.
    pub fn settle(&mut self, seq: u64, action: &str, outcome: &str) -> Option<Entry> {
        let entry = self.entries[..self.len].iter_mut().find(|e| e.seq == seq && !e.settled)?;
        entry.action = FixedText::new(action);
        entry.outcome = FixedText::new(outcome);
        entry.settled = true;
        Some(*entry)
    }

    /// Settles every entry of `owner` as it stands; returns them.
    pub fn settle_all(&mut self, owner: (i32, Micros)) -> Vec<Entry> {
        self.entries[..self.len]
            .iter_mut()
            .filter(|e| e.owner == owner && !e.settled)
            .map(|e| {
                e.settled = true;
                *e
            })
            .collect()
    }

    /// Puts `older` entries (taken earlier, not written) back before the queued ones.
    pub fn requeue(&mut self, older: &[Entry]) {
        let newer: Vec<Entry> = self.entries[..self.len].to_vec();
        self.len = 0;
        for entry in older.iter().chain(&newer) {
            self.append(*entry);
        }
    }

    /// Every settled entry, and every entry whose owner is no longer `alive`, oldest first, and
    /// how many were lost since the last take; removes them from the queue.
    pub fn take(&mut self, alive: impl Fn((i32, Micros)) -> bool) -> (Vec<Entry>, u64) {
        let mut taken = Vec::new();
        let mut kept = 0;
        for i in 0..self.len {
            let e = self.entries[i];
            if e.settled || !alive(e.owner) {
                taken.push(Entry { settled: true, ..e });
            } else {
                self.entries[kept] = e;
                kept += 1;
            }
        }
        self.len = kept;
        (taken, std::mem::take(&mut self.lost))
    }

    /// Counts entries dropped elsewhere (no table to write them to).
    pub fn count_dropped(&mut self, n: u64) {
        self.dropped += n;
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// One action to record.
pub struct Act<'a> {
    pub source: Source,
    /// What the counters group by: the rule for the worker, the mode for the functions.
    pub counted_as: &'a str,
    /// The worker's rule (`rule 3`, `session_kill.idle_timeout`); NULL for the functions.
    pub rule: Option<&'a str>,
    /// The caller's `reason`, or the worker's explanation.
    pub reason: Option<&'a str>,
    pub pid: i32,
    /// The session as it was when acted on; `None` for a login caught while starting up.
    pub session: Option<&'a Session>,
    pub database: Option<&'a str>,
    pub query: Option<&'a str>,
    pub action: &'a str,
    pub outcome: &'a str,
}

/// Records a finished action (a worker's signal, a dry run, a skip): counted and queued at once.
pub fn record(act: &Act, signalled: bool) {
    shmem::count(act.source, act.counted_as, act.outcome);
    if let Some(entry) = entry(act, signalled, true) {
        queue(entry);
    }
}

/// Records a signal just sent whose outcome the caller learns later: queued now, counted when
/// settled. Returns the handle to settle it with.
pub fn record_signal(act: &Act) -> Pending {
    let Some(entry) = entry(act, true, false) else {
        return Pending { seq: None, source: act.source, counted_as: act.counted_as.to_owned() };
    };
    register_abort_callback();
    UNSETTLED.set(true);
    Pending { seq: Some(queue(entry)), source: act.source, counted_as: act.counted_as.to_owned() }
}

/// A queued signal waiting for its outcome.
pub struct Pending {
    seq: Option<u64>,
    source: Source,
    counted_as: String,
}

impl Pending {
    pub fn settle(&self, action: &str, outcome: &str) {
        match self.seq {
            None => shmem::count(self.source, &self.counted_as, outcome),
            // Written or settled by an abort already: it was counted then.
            Some(seq) => {
                if shmem::settle_audit(seq, action, outcome) {
                    shmem::count(self.source, &self.counted_as, outcome);
                }
            }
        }
    }
}

fn queue(entry: Entry) -> u64 {
    let (seq, first) = shmem::queue_audit(entry);
    if first {
        signal::wake_worker();
    }
    seq
}

thread_local! {
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// This backend has queued signals it has not settled yet.
    static UNSETTLED: Cell<bool> = const { Cell::new(false) };
}

fn register_abort_callback() {
    if !CALLBACK_REGISTERED.replace(true) {
        // SAFETY: registers a callback that lives as long as the process.
        unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut()) };
    }
}

/// A caller that errors out or is terminated while waiting still leaves its signals on record,
/// settled as `signalled`, and counted.
#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT) && UNSETTLED.replace(false) {
        for e in shmem::settle_own_audit(backends::own_key()) {
            shmem::count(e.source, e.counted_as.as_str(), e.outcome.as_str());
        }
    }
    if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT) {
        UNSETTLED.set(false);
    }
}

/// The queue entry for `act`, or `None` where nothing is queued (not preloaded, no audit
/// database, a hot standby).
fn entry(act: &Act, signalled: bool, settled: bool) -> Option<Entry> {
    if !shmem::preloaded() || gucs::database().is_none() || backends::in_recovery() {
        return None;
    }
    let now = backends::now();
    let session = act.session;
    Some(Entry {
        at: now,
        source: act.source,
        counted_as: FixedText::new(act.counted_as),
        rule: FixedText::new(act.rule.unwrap_or("")),
        reason: FixedText::new(act.reason.unwrap_or("")),
        actor: FixedText::new(&actor(act.source)),
        pid: act.pid,
        database: FixedText::new(act.database.unwrap_or("")),
        role: FixedText::new(session.and_then(|s| s.role.as_deref()).unwrap_or("")),
        application: FixedText::new(session.map_or("", |s| s.application.as_str())),
        client: FixedText::new(&session.and_then(|s| s.client).map(|a| a.to_string()).unwrap_or_default()),
        state: FixedText::new(session.and_then(|s| s.state).map_or("", State::label)),
        idle_for: session.and_then(|s| s.idle_for(now)),
        query: FixedText::new(act.query.unwrap_or("")),
        action: FixedText::new(act.action),
        outcome: FixedText::new(act.outcome),
        signalled,
        settled,
        owner: backends::own_key(),
        seq: 0,
    })
}

/// Who acted: the current user for the functions, the worker itself otherwise.
pub(crate) fn actor(source: Source) -> String {
    if source == Source::Worker {
        return "session_kill worker".to_owned();
    }
    // SAFETY: a catalog lookup by the current user's OID, inside a transaction; NULL if missing.
    backends::c_string(unsafe { pg_sys::GetUserNameFromId(pg_sys::GetUserId(), true) }).unwrap_or_default()
}

extension_sql!(
    r#"
CREATE TABLE session_kill.log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    acted_at    timestamptz NOT NULL,
    source      text NOT NULL,
    rule        text,
    reason      text,
    actor       text,
    pid         integer NOT NULL,
    database    name,
    role        name,
    application text,
    client_addr inet,
    state       text,
    idle_for    interval,
    query       text,
    action      text NOT NULL,
    outcome     text NOT NULL
);
CREATE INDEX log_acted_at ON session_kill.log (acted_at);
COMMENT ON TABLE session_kill.log IS 'Every session session_kill acted on (written by the session_kill sync worker; rows older than session_kill.log_retention are deleted)';
"#,
    name = "log_table"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: i32, signalled: bool) -> Entry {
        Entry { pid, at: i64::from(pid), signalled, owner: (pid, 1), ..Entry::default() }
    }

    fn pids(entries: &[Entry]) -> Vec<i32> {
        entries.iter().map(|e| e.pid).collect()
    }

    const ALL_ALIVE: fn((i32, Micros)) -> bool = |_| true;

    #[test]
    fn the_queue_keeps_order_and_counts_what_it_drops() {
        let mut q = Box::<AuditQueue>::default();
        assert_eq!(q.oldest(), None);
        q.push(entry(1, true));
        q.push(entry(2, true));
        assert_eq!(q.oldest(), Some(1));
        let (taken, lost) = q.take(ALL_ALIVE);
        assert_eq!((pids(&taken), lost), (vec![1, 2], 0));
        assert_eq!(q.pending(), 0);
        for pid in 0..(CAPACITY as i32 + 3) {
            q.push(entry(pid, true));
        }
        let (taken, lost) = q.take(ALL_ALIVE);
        assert_eq!((taken.len(), lost, q.dropped()), (CAPACITY, 3, 3), "the three oldest went");
        assert_eq!(taken[0].pid, 3);
        assert_eq!(q.take(ALL_ALIVE).1, 0, "lost is reset, dropped is not");
        assert_eq!(q.dropped(), 3);
        q.push(entry(10, true));
        q.requeue(&[entry(8, true), entry(9, true)]);
        assert_eq!(pids(&q.take(ALL_ALIVE).0), vec![8, 9, 10], "failed writes go first");
    }

    #[test]
    fn reports_never_evict_signals() {
        let mut q = Box::<AuditQueue>::default();
        q.push(entry(1, true));
        for pid in 100..(100 + 2 * CAPACITY as i32) {
            q.push(entry(pid, false));
        }
        let (taken, lost) = q.take(ALL_ALIVE);
        assert_eq!(taken[0].pid, 1, "the signal survived a flood of dry runs");
        assert_eq!((taken.len(), lost), (CAPACITY, CAPACITY as u64 + 1));
        for pid in 0..CAPACITY as i32 {
            q.push(entry(pid, pid % 2 == 0));
        }
        q.push(entry(5000, true));
        let (taken, _) = q.take(ALL_ALIVE);
        assert_eq!(taken[0].pid, 0, "a signal makes room by dropping the oldest report");
        assert!(!pids(&taken).contains(&1) && pids(&taken).contains(&5000));
    }

    #[test]
    fn unsettled_signals_wait_for_their_owner_or_its_exit() {
        let mut q = Box::<AuditQueue>::default();
        let pending = Entry { settled: false, action: FixedText::new("cancel"), ..entry(7, true) };
        let seq = q.push(pending);
        q.push(entry(8, true));
        assert_eq!(pids(&q.take(ALL_ALIVE).0), vec![8], "the unsettled entry stays");
        let settled = q.settle(seq, "cancel, terminate", "terminated").unwrap();
        assert_eq!((settled.action.as_str(), settled.outcome.as_str()), ("cancel, terminate", "terminated"));
        assert!(q.settle(seq, "terminate", "terminated").is_none(), "settled once");
        assert_eq!(pids(&q.take(ALL_ALIVE).0), vec![7]);

        let orphan = q.push(Entry { settled: false, ..entry(9, true) });
        let (taken, _) = q.take(|owner| owner != (9, 1));
        assert_eq!(pids(&taken), vec![9], "an entry whose owner is gone is written as it stands");
        assert!(q.settle(orphan, "terminate", "terminated").is_none());

        q.push(Entry { settled: false, ..entry(11, true) });
        q.push(Entry { settled: false, owner: (12, 1), ..entry(11, true) });
        assert_eq!(q.settle_all((11, 1)).len(), 1, "only the owner's own entries");
        assert_eq!(q.take(ALL_ALIVE).0.len(), 1);
    }
}
