//! Since when a backend's snapshot has held back the xmin horizon: pure code, plain `#[test]`s.
//!
//! A backend's xmin (`backend_xmin` in `pg_stat_activity`, `PGPROC.xmin` in shared memory) is
//! the oldest xmin of the snapshots it holds. Nothing in shared memory says when that snapshot
//! was taken, nor the session's isolation level, so "held since" is bounded from what can be
//! seen: the start of the statement running (or last run), `query_start`, and the worker's
//! earlier sightings of the same transaction (same PID, backend start and `xact_start`).
//!
//! A client backend takes a snapshot only while it runs a statement, and releases every one
//! when its transaction ends (a `WITH HOLD` cursor is materialised at commit and keeps none).
//! So an xmin seen now was taken by the statement running now or last run, or by an earlier
//! statement of the same transaction (a REPEATABLE READ or SERIALIZABLE transaction keeps the
//! snapshot of its first statement; an open cursor keeps the snapshot of the statement that
//! opened it). Taking the current statement's start is therefore never early; the worker's
//! memory makes it exact in the usual cases:
//!
//! 1. When the worker first sees this xmin, it is held since the start of the statement
//!    running or last run (`query_start`), but not before the worker's last sighting of this
//!    transaction without it (no xmin, or another one): the snapshot was taken after that.
//! 2. While the worker keeps seeing the same xmin, that start is kept, through later statements.
//! 3. Except: an xmin whose age was 0 at the last sighting (no transaction ID assigned since it,
//!    so it held nothing back) counts as new once the session runs another statement, since
//!    READ COMMITTED then takes a new snapshot with the same xmin.
//!
//! So a READ COMMITTED statement is charged from its start, and each statement of a long READ
//! COMMITTED transaction from its own start; a REPEATABLE READ transaction from its first
//! statement (which takes the snapshot) when the worker sees it during that statement or before
//! the next one; a cursor from the statement that declared it, when seen before the next
//! statement. Otherwise (an xmin first seen during a later statement) the charge starts late,
//! by at most the time between two scans, which is at most the shortest limit while a snapshot
//! limit is in force. Without sightings (no snapshot limit in force, or the library not
//! preloaded) rule 1 alone applies: the current statement's start.

use crate::policy::{Micros, Session};
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
    pub query_start: Micros,
    /// 0: no xmin.
    pub xmin: u32,
    pub xmin_age: i64,
    /// Since when that xmin was held (0 without one).
    pub since: Micros,
    /// When it was seen.
    pub at: Micros,
}

/// The worker's sightings at its last scan.
#[derive(Debug, Clone, Default)]
pub struct Sightings {
    by_backend: HashMap<(i32, Micros), Sighting>,
}

impl Sightings {
    pub fn new(sightings: impl IntoIterator<Item = Sighting>) -> Sightings {
        Sightings { by_backend: sightings.into_iter().map(|s| ((s.pid, s.backend_start), s)).collect() }
    }

    /// Since when `s`'s current xmin has held back the horizon (see the module comment); 0 when
    /// it has no xmin or is in no transaction.
    pub fn held_since(&self, s: &Session) -> Micros {
        let Some(xmin) = s.xmin else { return 0 };
        if s.xact_start == 0 {
            return 0;
        }
        let statement = s.query_start.max(s.xact_start);
        let earlier = self.by_backend.get(&(s.pid, s.backend_start)).filter(|p| p.xact_start == s.xact_start);
        match earlier {
            None => statement,
            Some(p) if p.xmin == xmin.xid && !(p.xmin_age == 0 && p.query_start != s.query_start) => p.since,
            Some(p) => p.at.max(statement),
        }
    }

    /// A scan at `now` saw `sessions` (each with `xmin_since` from `held_since`): they replace
    /// the sightings. Backends outside a transaction are forgotten.
    pub fn record<'a>(&mut self, sessions: impl IntoIterator<Item = &'a Session>, now: Micros) {
        self.by_backend = sessions
            .into_iter()
            .filter(|s| s.xact_start != 0)
            .map(|s| {
                let sighting = Sighting {
                    pid: s.pid,
                    backend_start: s.backend_start,
                    xact_start: s.xact_start,
                    query_start: s.query_start,
                    xmin: s.xmin.map_or(0, |x| x.xid),
                    xmin_age: s.xmin.map_or(0, |x| x.age),
                    since: s.xmin_since,
                    at: now,
                };
                ((s.pid, s.backend_start), sighting)
            })
            .collect();
    }

    pub fn is_empty(&self) -> bool {
        self.by_backend.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Sighting> {
        self.by_backend.values()
    }
}

/// How many sightings shared memory holds for `sessions()` and `horizon()`; backends beyond
/// that are shown by rule 1 alone (the current statement's start).
pub const MAX_PUBLISHED: usize = 4096;

/// The worker's last sightings, in shared memory.
#[derive(Debug, Clone, Copy)]
pub struct PublishedSightings {
    count: usize,
    rows: [Sighting; MAX_PUBLISHED],
}

impl Default for PublishedSightings {
    fn default() -> Self {
        PublishedSightings { count: 0, rows: [Sighting::default(); MAX_PUBLISHED] }
    }
}

impl PublishedSightings {
    /// Replaces the published sightings with `sightings`' (at most `MAX_PUBLISHED`).
    pub fn publish(&mut self, sightings: &Sightings) {
        self.count = 0;
        for (slot, s) in self.rows.iter_mut().zip(sightings.iter()) {
            *slot = *s;
            self.count += 1;
        }
    }

    pub fn read(&self) -> Sightings {
        Sightings::new(self.rows[..self.count].iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::{client, NOW, SEC};
    use crate::policy::State;

    /// A session in a transaction begun `xact_secs` ago, in `state`, whose last statement began
    /// `query_secs` ago, with xmin `xid` (0: none) as of next transaction ID 1000.
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
    fn repeatable_read_holds_since_its_first_statement_through_later_ones() {
        let mut sightings = Sightings::default();
        // BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT ... in one message: same start.
        let mut rr = in_tx(State::IdleInTransaction, 30, 30, 900);
        scan(&mut sightings, NOW - 20 * SEC, &mut [&mut rr]);
        assert_eq!(rr.xmin_since, NOW - 30 * SEC);
        let mut later = in_tx(State::Active, 30, 5, 900);
        scan(&mut sightings, NOW, &mut [&mut later]);
        assert_eq!(later.xmin_since, NOW - 30 * SEC, "the same xmin keeps its start");
        // Seen first during a later statement: from that statement (late, never early).
        assert_eq!(Sightings::default().held_since(&later), NOW - 5 * SEC);
    }

    #[test]
    fn a_statement_snapshot_holds_since_its_statement_not_its_transaction() {
        let unseen = in_tx(State::Active, 60, 10, 950);
        assert_eq!(Sightings::default().held_since(&unseen), NOW - 10 * SEC);
        // Seen without a snapshot after the statement began: taken after that sighting.
        let mut sightings = Sightings::default();
        let mut early = in_tx(State::Active, 60, 30, 0);
        scan(&mut sightings, NOW - 20 * SEC, &mut [&mut early]);
        assert_eq!(early.xmin_since, 0, "no snapshot: nothing held");
        let mut later = in_tx(State::Active, 60, 30, 950);
        scan(&mut sightings, NOW, &mut [&mut later]);
        assert_eq!(later.xmin_since, NOW - 20 * SEC);
    }

    #[test]
    fn a_moving_xmin_is_charged_from_each_new_statement_not_the_transaction() {
        let mut sightings = Sightings::default();
        let mut first = in_tx(State::Active, 100, 51, 800);
        scan(&mut sightings, NOW - 50 * SEC, &mut [&mut first]);
        assert_eq!(first.xmin_since, NOW - 51 * SEC);
        let mut second = in_tx(State::Active, 100, 2, 850);
        scan(&mut sightings, NOW, &mut [&mut second]);
        assert_eq!(second.xmin_since, NOW - 2 * SEC, "a new xmin: since its statement");
        let mut same = in_tx(State::Active, 100, 2, 850);
        scan(&mut sightings, NOW + 10 * SEC, &mut [&mut same]);
        assert_eq!(same.xmin_since, NOW - 2 * SEC, "the same xmin keeps its start");
    }

    #[test]
    fn an_xmin_that_held_nothing_back_is_new_at_the_next_statement() {
        // READ COMMITTED while no transaction ID is assigned: every statement's snapshot has
        // the same xmin, the next transaction ID (age 0).
        let mut sightings = Sightings::default();
        let mut first = in_tx(State::Active, 100, 1, 1000);
        scan(&mut sightings, NOW - 50 * SEC, &mut [&mut first]);
        assert_eq!(first.xmin_since, NOW - SEC);
        let mut next = Session { xmin: Xmin::read(1000, 1003), ..in_tx(State::Active, 100, 2, 1000) };
        scan(&mut sightings, NOW, &mut [&mut next]);
        assert_eq!(next.xmin_since, NOW - 2 * SEC, "another statement: not the same hold");
        let mut same = Session { xmin: Xmin::read(1000, 1005), ..next.clone() };
        scan(&mut sightings, NOW + SEC, &mut [&mut same]);
        assert_eq!(same.xmin_since, NOW - 2 * SEC, "it holds transactions back now: kept");
    }

    #[test]
    fn a_cursor_idle_in_transaction_holds_since_the_statement_that_opened_it() {
        // BEGIN; SELECT 1 (seen without a snapshot); DECLARE c CURSOR ... (seen); FETCH; idle.
        let mut sightings = Sightings::default();
        let mut before = in_tx(State::IdleInTransaction, 60, 59, 0);
        scan(&mut sightings, NOW - 40 * SEC, &mut [&mut before]);
        let mut declared = in_tx(State::IdleInTransaction, 60, 30, 900);
        scan(&mut sightings, NOW - 20 * SEC, &mut [&mut declared]);
        assert_eq!(declared.xmin_since, NOW - 30 * SEC);
        let mut fetched = in_tx(State::IdleInTransaction, 60, 10, 900);
        scan(&mut sightings, NOW, &mut [&mut fetched]);
        assert_eq!(fetched.xmin_since, NOW - 30 * SEC);
    }

    #[test]
    fn a_new_transaction_starts_afresh() {
        let mut sightings = Sightings::default();
        let mut old = in_tx(State::IdleInTransaction, 60, 60, 500);
        scan(&mut sightings, NOW - 10 * SEC, &mut [&mut old]);
        let mut next_tx = in_tx(State::IdleInTransaction, 5, 5, 500);
        scan(&mut sightings, NOW, &mut [&mut next_tx]);
        assert_eq!(next_tx.xmin_since, NOW - 5 * SEC, "another xact_start: another transaction");
    }

    #[test]
    fn no_xmin_or_no_transaction_holds_nothing() {
        let sightings = Sightings::default();
        assert_eq!(sightings.held_since(&in_tx(State::IdleInTransaction, 30, 30, 0)), 0);
        let outside = Session { xact_start: 0, ..in_tx(State::Idle, 30, 30, 900) };
        assert_eq!(sightings.held_since(&outside), 0);
    }

    #[test]
    fn published_sightings_give_the_same_answers() {
        let mut sightings = Sightings::default();
        let mut a = in_tx(State::IdleInTransaction, 60, 59, 0);
        scan(&mut sightings, NOW - 20 * SEC, &mut [&mut a]);
        let mut published = Box::<PublishedSightings>::default();
        published.publish(&sightings);
        let now_running = in_tx(State::Active, 60, 30, 950);
        assert_eq!(published.read().held_since(&now_running), NOW - 20 * SEC);
        assert_eq!(sightings.held_since(&now_running), NOW - 20 * SEC);
        published.publish(&Sightings::default());
        assert_eq!(published.read().held_since(&now_running), NOW - 30 * SEC);
    }
}
