//! The audit trail: every action by every path (kill_sessions, drain_database, the worker) is
//! counted in shared memory and queued there for the table `session_kill.log`.
//!
//! The queue, not the acting transaction, carries the entry to the table: the `session_kill sync`
//! worker writes it, so an entry survives the caller's rollback (a drain that ends in an ERROR
//! still leaves its terminations on record). On a hot standby nothing is queued; the server log
//! line each action writes is the record there.

use crate::backends::Backend;
use crate::counters::Source;
use crate::fixed::FixedText;
use crate::policy::{Micros, Session, State};
use crate::{backends, gucs, shmem, signal};
use pgrx::prelude::*;

/// Entries waiting for the table; when full, the oldest is dropped (and counted as lost).
pub const CAPACITY: usize = 1024;

type Name = FixedText<64>;

/// One action, as queued in shared memory.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub at: Micros,
    pub source: Source,
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
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            at: 0,
            source: Source::Worker,
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
        }
    }
}

/// A ring of entries not yet written to the table.
#[derive(Clone, Copy)]
pub struct AuditQueue {
    entries: [Entry; CAPACITY],
    start: usize,
    len: usize,
    /// Entries dropped because the queue was full, since the last `take`.
    lost: u64,
}

impl Default for AuditQueue {
    fn default() -> Self {
        AuditQueue { entries: [Entry::default(); CAPACITY], start: 0, len: 0, lost: 0 }
    }
}

impl AuditQueue {
    pub fn push(&mut self, entry: Entry) {
        if self.len == CAPACITY {
            self.start = (self.start + 1) % CAPACITY;
            self.len -= 1;
            self.lost += 1;
        }
        self.entries[(self.start + self.len) % CAPACITY] = entry;
        self.len += 1;
    }

    pub fn pending(&self) -> usize {
        self.len
    }

    /// When the oldest waiting entry was queued.
    pub fn oldest(&self) -> Option<Micros> {
        (self.len > 0).then(|| self.entries[self.start].at)
    }

    /// Puts `older` entries (taken earlier, not written) back before the queued ones; if they do
    /// not all fit, the oldest are dropped and counted as lost.
    pub fn requeue(&mut self, older: &[Entry]) {
        let (newer, lost) = self.take();
        self.lost = lost;
        for entry in older.iter().chain(&newer) {
            self.push(*entry);
        }
    }

    /// Every queued entry, oldest first, and how many were lost; empties the queue.
    pub fn take(&mut self) -> (Vec<Entry>, u64) {
        let entries = (0..self.len).map(|i| self.entries[(self.start + i) % CAPACITY]).collect();
        let lost = self.lost;
        (self.start, self.len, self.lost) = (0, 0, 0);
        (entries, lost)
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

impl<'a> Act<'a> {
    /// An action on a session described by `backend`.
    pub fn on(
        source: Source,
        backend: &'a Backend,
        session: &'a Session,
        action: &'a str,
        outcome: &'a str,
    ) -> Self {
        Act {
            source,
            counted_as: action,
            rule: None,
            reason: None,
            pid: session.pid,
            session: Some(session),
            database: backend.datname.as_deref(),
            query: backend.query.as_deref(),
            action,
            outcome,
        }
    }
}

/// Counts the action and, on a primary with an audit database configured, queues it for
/// `session_kill.log`. The caller writes the server log line.
pub fn record(act: &Act) {
    shmem::count(act.source, act.counted_as, act.outcome);
    if !shmem::preloaded() || gucs::database().is_none() || backends::in_recovery() {
        return;
    }
    let now = backends::now();
    let session = act.session;
    let entry = Entry {
        at: now,
        source: act.source,
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
    };
    if shmem::queue_audit(entry) {
        signal::wake_worker();
    }
}

/// Who acted: the current user for the functions, the worker itself otherwise.
fn actor(source: Source) -> String {
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

    fn entry(pid: i32) -> Entry {
        Entry { pid, at: i64::from(pid), ..Entry::default() }
    }

    #[test]
    fn the_queue_keeps_order_and_counts_what_it_drops() {
        let mut q = Box::<AuditQueue>::default();
        assert_eq!(q.oldest(), None);
        q.push(entry(1));
        q.push(entry(2));
        assert_eq!(q.oldest(), Some(1));
        let (taken, lost) = q.take();
        assert_eq!((taken.iter().map(|e| e.pid).collect::<Vec<_>>(), lost), (vec![1, 2], 0));
        assert_eq!(q.pending(), 0);
        for pid in 0..(CAPACITY as i32 + 3) {
            q.push(entry(pid));
        }
        let (taken, lost) = q.take();
        assert_eq!((taken.len(), lost), (CAPACITY, 3), "the three oldest went");
        assert_eq!(taken[0].pid, 3);
        assert_eq!(q.oldest(), None);
        assert_eq!(q.take().1, 0, "lost is reset");
        q.push(entry(10));
        q.requeue(&[entry(8), entry(9)]);
        assert_eq!(
            q.take().0.iter().map(|e| e.pid).collect::<Vec<_>>(),
            vec![8, 9, 10],
            "failed writes go first"
        );
    }
}
