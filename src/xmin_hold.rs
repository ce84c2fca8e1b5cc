//! Since when a backend's snapshot has held back the xmin horizon: pure code, plain `#[test]`s.
//!
//! A backend's xmin (`backend_xmin` in `pg_stat_activity`, `PGPROC.xmin` in shared memory) is
//! the oldest xmin of the snapshots it holds. Nothing in shared memory says when that snapshot
//! was taken, nor the session's isolation level, so "held since" is bounded from what can be
//! seen, with the worker's earlier sightings of the same transaction:
//!
//! 1. A client backend holds a snapshot only inside a transaction: snapshots are released when
//!    it ends (a `WITH HOLD` cursor is materialised at commit and keeps none). So no xmin is
//!    older than its transaction's start (`xact_start`).
//! 2. If every sighting of this transaction (same PID, backend start and `xact_start`) showed
//!    the same xmin, it is held since the transaction start: exact for REPEATABLE READ and
//!    SERIALIZABLE (the transaction snapshot, taken by the first statement) and for a single
//!    statement outside `BEGIN`; early by the pause when a client waits between `BEGIN` and its
//!    first statement.
//! 3. If a sighting of this transaction showed no xmin or another one, the current snapshot was
//!    taken after the last such sighting; it is held since that sighting or since the start of
//!    the statement that was running (or had last run) at the first sighting of this xmin,
//!    whichever is later. For READ COMMITTED, whose every statement takes a new snapshot, that
//!    is the statement start; a cursor opened after the last sighting by an earlier statement
//!    is charged from the later statement (late, never early).
//! 4. A transaction that began before the worker started watching (its start, a reload that set
//!    a snapshot limit, a rule inserted) and already had this xmin then is charged from when the
//!    watch began or, if it is idle, from the end of its last statement (which took the snapshot
//!    or ran after it) if that is earlier: late, never early.
//!
//! An xmin that stays the same across two statements (READ COMMITTED while no transaction ID is
//! assigned anywhere, so both snapshots get the same xmin) counts as one hold: such an xmin
//! holds back nothing newer than itself. Without sightings (no snapshot limit in force, or the
//! library not preloaded) rule 2 applies.

use crate::policy::{Micros, Session, State};
use std::collections::HashMap;

/// A backend's xmin as read with the next transaction ID: the raw 32-bit ID, and its age in
/// transactions, like `age(backend_xmin)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Xmin {
    pub xid: u32,
    pub age: i64,
}

impl Xmin {
    /// `None` for an invalid (0) xid. `next` is the next transaction ID to be assigned; ages
    /// wrap like PostgreSQL's 32-bit comparisons.
    pub fn read(xid: u32, next: u32) -> Option<Xmin> {
        (xid != 0).then(|| Xmin { xid, age: i64::from(next.wrapping_sub(xid) as i32) })
    }
}

/// What the worker saw of one backend in a transaction at one scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sighting {
    pub pid: i32,
    pub backend_start: Micros,
    pub xact_start: Micros,
    /// 0: no xmin.
    pub xmin: u32,
    /// Since when that xmin was held (0 without one).
    pub since: Micros,
    /// When it was seen.
    pub at: Micros,
}

/// The worker's sightings at its last scan, and since when it has been watching.
#[derive(Debug, Clone, Default)]
pub struct Sightings {
    /// 0: not watching; every xmin then counts from its transaction's start.
    pub watching_since: Micros,
    by_backend: HashMap<(i32, Micros), Sighting>,
}

impl Sightings {
    pub fn new(watching_since: Micros, sightings: impl IntoIterator<Item = Sighting>) -> Sightings {
        Sightings {
            watching_since,
            by_backend: sightings.into_iter().map(|s| ((s.pid, s.backend_start), s)).collect(),
        }
    }

    /// Since when `s`'s current xmin has held back the horizon (see the module comment); 0 when
    /// it has no xmin or is in no transaction.
    pub fn held_since(&self, s: &Session) -> Micros {
        let Some(xmin) = s.xmin else { return 0 };
        if s.xact_start == 0 {
            return 0;
        }
        let earlier = self.by_backend.get(&(s.pid, s.backend_start)).filter(|p| p.xact_start == s.xact_start);
        match earlier {
            None if s.xact_start >= self.watching_since => s.xact_start,
            None if s.state.is_some_and(State::is_idle) && s.state_change != 0 => {
                self.watching_since.min(s.state_change)
            }
            None => self.watching_since,
            Some(p) if p.xmin == xmin.xid => p.since,
            Some(p) => p.at.max(s.query_start),
        }
    }

    /// The worker starts watching at `now`, unless it watches already.
    pub fn watch(&mut self, now: Micros) {
        if self.watching_since == 0 {
            self.watching_since = now;
        }
    }

    /// A scan at `now` saw `sessions` (each with `xmin_since` from `held_since`): they replace
    /// the sightings. Backends outside a transaction are forgotten.
    pub fn record<'a>(&mut self, sessions: impl IntoIterator<Item = &'a Session>, now: Micros) {
        self.watch(now);
        self.by_backend = sessions
            .into_iter()
            .filter(|s| s.xact_start != 0)
            .map(|s| {
                let sighting = Sighting {
                    pid: s.pid,
                    backend_start: s.backend_start,
                    xact_start: s.xact_start,
                    xmin: s.xmin.map_or(0, |x| x.xid),
                    since: s.xmin_since,
                    at: now,
                };
                ((s.pid, s.backend_start), sighting)
            })
            .collect();
    }

    /// Stops watching: the next watch starts afresh.
    pub fn stop(&mut self) {
        *self = Sightings::default();
    }

    pub fn iter(&self) -> impl Iterator<Item = &Sighting> {
        self.by_backend.values()
    }
}

/// How many sightings shared memory holds for `sessions()` and `horizon()`; backends beyond
/// that are shown by rule 2 (the transaction start).
pub const MAX_PUBLISHED: usize = 4096;

/// The worker's last sightings, in shared memory.
#[derive(Debug, Clone, Copy)]
pub struct PublishedSightings {
    watching_since: Micros,
    count: usize,
    rows: [Sighting; MAX_PUBLISHED],
}

impl Default for PublishedSightings {
    fn default() -> Self {
        PublishedSightings { watching_since: 0, count: 0, rows: [Sighting::default(); MAX_PUBLISHED] }
    }
}

impl PublishedSightings {
    /// Replaces the published sightings with `sightings`' (at most `MAX_PUBLISHED`).
    pub fn publish(&mut self, sightings: &Sightings) {
        self.watching_since = sightings.watching_since;
        self.count = 0;
        for (slot, s) in self.rows.iter_mut().zip(sightings.iter()) {
            *slot = *s;
            self.count += 1;
        }
    }

    pub fn read(&self) -> Sightings {
        Sightings::new(self.watching_since, self.rows[..self.count].iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::{client, NOW, SEC};
    use crate::policy::State;

    /// A session in a transaction begun `xact_secs` ago, in `state`, whose last statement began
    /// `query_secs` ago, with xmin `xid` (0: none).
    fn in_tx(state: State, xact_secs: i64, query_secs: i64, xid: u32) -> Session {
        Session {
            xact_start: NOW - xact_secs * SEC,
            query_start: NOW - query_secs * SEC,
            xmin: Xmin::read(xid, 1000),
            ..client(1, state, 0)
        }
    }

    /// The worker's scan at `at`: `held_since` for each session, then `record`.
    fn scan(sightings: &mut Sightings, at: Micros, sessions: &mut [&mut Session]) {
        for s in sessions.iter_mut() {
            s.xmin_since = sightings.held_since(s);
        }
        sightings.record(sessions.iter().map(|s| &**s), at);
    }

    #[test]
    fn ages_wrap_like_postgres() {
        assert_eq!(Xmin::read(990, 1000), Some(Xmin { xid: 990, age: 10 }));
        assert_eq!(Xmin::read(0, 1000), None);
        assert_eq!(Xmin::read(u32::MAX - 4, 5).unwrap().age, 10, "across the wraparound");
    }

    #[test]
    fn repeatable_read_idle_in_transaction_holds_since_the_transaction_start() {
        let mut sightings = Sightings::new(NOW - 3600 * SEC, []);
        let mut rr = in_tx(State::IdleInTransaction, 30, 29, 900);
        scan(&mut sightings, NOW - 20 * SEC, &mut [&mut rr]);
        assert_eq!(rr.xmin_since, NOW - 30 * SEC);
        scan(&mut sightings, NOW, &mut [&mut rr]);
        assert_eq!(rr.xmin_since, NOW - 30 * SEC, "the same xmin at every sighting");
    }

    #[test]
    fn a_statement_snapshot_after_a_sighting_without_one_holds_since_its_statement() {
        // READ COMMITTED: idle in the transaction without a snapshot, then a long statement.
        let mut sightings = Sightings::new(NOW - 3600 * SEC, []);
        let mut rc = in_tx(State::IdleInTransaction, 60, 59, 0);
        scan(&mut sightings, NOW - 20 * SEC, &mut [&mut rc]);
        assert_eq!(rc.xmin_since, 0, "no snapshot: nothing held");
        let mut running = in_tx(State::Active, 60, 10, 950);
        scan(&mut sightings, NOW, &mut [&mut running]);
        assert_eq!(running.xmin_since, NOW - 10 * SEC, "since the statement began");
        // A statement that began before the sighting without an xmin took its snapshot after it.
        let mut sightings = Sightings::new(NOW - 3600 * SEC, []);
        let mut early = in_tx(State::Active, 60, 30, 0);
        scan(&mut sightings, NOW - 20 * SEC, &mut [&mut early]);
        let mut later = in_tx(State::Active, 60, 30, 950);
        scan(&mut sightings, NOW, &mut [&mut later]);
        assert_eq!(later.xmin_since, NOW - 20 * SEC);
    }

    #[test]
    fn a_moving_xmin_is_charged_from_each_new_statement_not_the_transaction() {
        let mut sightings = Sightings::new(NOW - 3600 * SEC, []);
        let mut first = in_tx(State::Active, 100, 1, 800);
        scan(&mut sightings, NOW - 50 * SEC, &mut [&mut first]);
        assert_eq!(first.xmin_since, NOW - 100 * SEC, "first sighting: the transaction start");
        let mut second = in_tx(State::Active, 100, 2, 850);
        scan(&mut sightings, NOW, &mut [&mut second]);
        assert_eq!(second.xmin_since, NOW - 2 * SEC, "a new xmin: since its statement");
        let mut same = in_tx(State::Active, 100, 1, 850);
        scan(&mut sightings, NOW + 10 * SEC, &mut [&mut same]);
        assert_eq!(same.xmin_since, NOW - 2 * SEC, "the same xmin keeps its start");
    }

    #[test]
    fn a_cursor_idle_in_transaction_holds_since_the_statement_that_opened_it() {
        // BEGIN; SELECT 1 (seen without a snapshot); DECLARE c CURSOR ...; FETCH; then idle.
        let mut sightings = Sightings::new(NOW - 3600 * SEC, []);
        let mut before = in_tx(State::IdleInTransaction, 60, 59, 0);
        scan(&mut sightings, NOW - 40 * SEC, &mut [&mut before]);
        let mut cursor = in_tx(State::IdleInTransaction, 60, 30, 900);
        scan(&mut sightings, NOW, &mut [&mut cursor]);
        assert_eq!(cursor.xmin_since, NOW - 30 * SEC);
    }

    #[test]
    fn a_new_transaction_starts_afresh_and_one_older_than_the_watch_counts_from_the_watch() {
        let mut sightings = Sightings::new(NOW - 3600 * SEC, []);
        let mut old = in_tx(State::IdleInTransaction, 60, 60, 0);
        scan(&mut sightings, NOW - 10 * SEC, &mut [&mut old]);
        let mut next_tx = in_tx(State::IdleInTransaction, 5, 5, 990);
        scan(&mut sightings, NOW, &mut [&mut next_tx]);
        assert_eq!(next_tx.xmin_since, NOW - 5 * SEC, "another xact_start: another transaction");

        let unwatched = Sightings::default();
        let long = in_tx(State::IdleInTransaction, 600, 600, 500);
        assert_eq!(unwatched.held_since(&long), NOW - 600 * SEC, "no watch: the transaction start");

        // Begun before the watch: a running statement counts from the watch's start, an idle
        // transaction from the end of its last statement if that came first.
        let mut watch = Sightings::default();
        watch.watch(NOW - 60 * SEC);
        assert_eq!(watch.watching_since, NOW - 60 * SEC);
        let idle_long = Session { state_change: NOW - 300 * SEC, ..long.clone() };
        assert_eq!(watch.held_since(&idle_long), NOW - 300 * SEC);
        let idle_recent = Session { state_change: NOW - 30 * SEC, ..long.clone() };
        assert_eq!(watch.held_since(&idle_recent), NOW - 60 * SEC);
        let running = in_tx(State::Active, 600, 600, 500);
        assert_eq!(watch.held_since(&running), NOW - 60 * SEC);
        let mut kept = running.clone();
        scan(&mut watch, NOW - 50 * SEC, &mut [&mut kept]);
        scan(&mut watch, NOW, &mut [&mut kept]);
        assert_eq!(kept.xmin_since, NOW - 60 * SEC, "and keeps that start while the xmin stays");
        let younger = in_tx(State::Active, 10, 10, 990);
        assert_eq!(watch.held_since(&younger), NOW - 10 * SEC, "begun after: its own start");
        watch.stop();
        assert_eq!(watch.watching_since, 0);
    }

    #[test]
    fn no_xmin_or_no_transaction_holds_nothing() {
        let sightings = Sightings::new(NOW - 60 * SEC, []);
        assert_eq!(sightings.held_since(&in_tx(State::IdleInTransaction, 30, 30, 0)), 0);
        let outside = Session { xact_start: 0, ..in_tx(State::Idle, 30, 30, 900) };
        assert_eq!(sightings.held_since(&outside), 0);
    }

    #[test]
    fn published_sightings_give_the_same_answers() {
        let mut sightings = Sightings::new(NOW - 3600 * SEC, []);
        let mut a = in_tx(State::IdleInTransaction, 60, 59, 0);
        scan(&mut sightings, NOW - 20 * SEC, &mut [&mut a]);
        let mut published = Box::<PublishedSightings>::default();
        published.publish(&sightings);
        let read = published.read();
        let now_running = in_tx(State::Active, 60, 10, 950);
        assert_eq!(read.held_since(&now_running), sightings.held_since(&now_running));
        assert_eq!(read.watching_since, NOW - 3600 * SEC);
        assert_eq!(read.held_since(&now_running), NOW - 10 * SEC);
    }
}
