//! The worker's clock: deadlines that a step of the wall clock cannot bring forward.
//!
//! PostgreSQL stamps a session's state change, transaction start and query start with the wall
//! clock, which an administrator or a time daemon can step. A stamp therefore belongs to the wall
//! timeline in force when it was written. The worker reads the wall clock and a monotonic clock
//! together at every scan; their difference (the offset) changes only when the wall clock is
//! stepped or slewed. Each stamp keeps the offset of the timeline it was written in, and is moved
//! into the current wall timeline by the change of offset since then, so after a forward step of
//! an hour an idle session is still measured by the time it really waited.
//!
//! A stamp first seen at a scan was written since the previous scan, in the previous timeline or
//! the current one. A timeline is possible when the stamp, read in it, is not later than now.
//! Of the possible ones the stamp takes the one that makes it youngest, so a guess can only make
//! a deadline late, never early. That guess is needed only when a step happened since the
//! previous scan and is shorter than the time between the scans.
//!
//! Pure code: the worker passes the clock readings in.

use crate::policy::{Micros, Session};
use std::collections::HashMap;

/// A stamp of one session: (pid, backend start, stamp).
type StampKey = (i32, Micros, Micros);

/// One reading of both clocks.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Reading {
    monotonic: Micros,
    /// Wall clock minus monotonic clock.
    offset: Micros,
}

#[derive(Default)]
pub struct StepSafeClock {
    previous: Option<Reading>,
    current: Option<Reading>,
    /// The offset of each stamp seen at the previous scan and at this one.
    previous_stamps: HashMap<StampKey, Micros>,
    stamps: HashMap<StampKey, Micros>,
}

impl StepSafeClock {
    /// A new scan: reads both clocks (wall first; both in microseconds) and returns by how much
    /// the wall clock moved against the monotonic one since the previous scan. Times the caller
    /// keeps from earlier scans must be moved by that much to stay in the current wall timeline.
    pub fn read(&mut self, wall: Micros, monotonic: Micros) -> Micros {
        let reading = Reading { monotonic, offset: wall - monotonic };
        self.previous = self.current.replace(reading);
        self.previous_stamps = std::mem::take(&mut self.stamps);
        self.previous.map_or(0, |p| reading.offset - p.offset)
    }

    /// `s` with its stamps moved into the current wall timeline (see the module comment).
    pub fn corrected(&mut self, s: &Session) -> Session {
        let mut fixed = s.clone();
        for stamp in [
            &mut fixed.state_change,
            &mut fixed.xact_start,
            &mut fixed.query_start,
            &mut fixed.blocking_since,
            &mut fixed.xmin_since,
        ] {
            *stamp = self.correct(s.pid, s.backend_start, *stamp);
        }
        fixed
    }

    fn correct(&mut self, pid: i32, backend_start: Micros, stamp: Micros) -> Micros {
        let Some(current) = self.current else { return stamp };
        if stamp == 0 {
            return stamp;
        }
        let key = (pid, backend_start, stamp);
        let offset = match self.stamps.get(&key).or_else(|| self.previous_stamps.get(&key)) {
            Some(offset) => *offset,
            None => {
                let candidates = [self.previous, Some(current)];
                candidates
                    .into_iter()
                    .flatten()
                    .map(|r| r.offset)
                    .filter(|offset| stamp - offset <= current.monotonic)
                    .min()
                    .unwrap_or(current.offset)
            }
        };
        self.stamps.insert(key, offset);
        stamp + (current.offset - offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BackendKind, State};

    const SEC: Micros = 1_000_000;
    const HOUR: Micros = 3600 * SEC;
    /// Wall time at the first reading; the monotonic clock starts at 0.
    const T0: Micros = 800_000_000 * SEC;

    fn idle_since(pid: i32, state_change: Micros) -> Session {
        Session {
            pid,
            backend_start: T0 - HOUR,
            kind: BackendKind::Client,
            database_oid: 5,
            role: Some("app".into()),
            application: String::new(),
            client: None,
            state: Some(State::Idle),
            state_change,
            xact_start: 0,
            query_start: state_change - SEC,
            is_own: false,
            is_superuser: false,
            caller_may_signal: true,
            blocking_since: 0,
            replay_held_since: 0,
            xmin: None,
            xmin_since: 0,
        }
    }

    #[test]
    fn without_a_step_stamps_are_unchanged() {
        let mut clock = StepSafeClock::default();
        let s = idle_since(1, T0 - 10 * SEC);
        assert_eq!(clock.read(T0, 0), 0);
        assert_eq!(clock.corrected(&s), s);
        assert_eq!(clock.read(T0 + 30 * SEC, 30 * SEC), 0);
        assert_eq!(clock.corrected(&s), s);
        let later = idle_since(2, T0 + 20 * SEC);
        assert_eq!(clock.corrected(&later), later);
    }

    #[test]
    fn a_forward_step_does_not_age_sessions_idle_since_before_it() {
        let mut clock = StepSafeClock::default();
        let before = idle_since(1, T0 - 10 * SEC);
        clock.read(T0, 0);
        clock.corrected(&before);
        // 5 s later the wall clock jumps an hour ahead.
        assert_eq!(clock.read(T0 + HOUR + 5 * SEC, 5 * SEC), HOUR);
        let now_wall = T0 + HOUR + 5 * SEC;
        let fixed = clock.corrected(&before);
        assert_eq!(fixed.idle_for(now_wall), Some(15 * SEC), "idle 15 s, not an hour");
        assert_eq!(fixed.query_start, T0 - 11 * SEC + HOUR);
        // A session idle since just after the step is in the new timeline already.
        let after = idle_since(2, T0 + HOUR + 4 * SEC);
        assert_eq!(clock.corrected(&after).idle_for(now_wall), Some(SEC));
        // The corrections hold at later scans.
        clock.read(now_wall + 10 * SEC, 15 * SEC);
        assert_eq!(clock.corrected(&before).idle_for(now_wall + 10 * SEC), Some(25 * SEC));
        assert_eq!(clock.corrected(&after).idle_for(now_wall + 10 * SEC), Some(11 * SEC));
    }

    #[test]
    fn a_stamp_first_seen_after_a_step_is_placed_in_the_older_possible_timeline() {
        let mut clock = StepSafeClock::default();
        clock.read(T0, 0);
        // Between the scans (60 s apart) the wall clock jumped 10 s ahead. A session that became
        // idle between them, unseen until now, may be from either side of the jump.
        clock.read(T0 + 70 * SEC, 60 * SEC);
        let ambiguous = idle_since(1, T0 + 40 * SEC);
        let fixed = clock.corrected(&ambiguous);
        assert_eq!(fixed.idle_for(T0 + 70 * SEC), Some(20 * SEC), "the younger reading: late, never early");
        // Stamped later than the old timeline's now: it can only be from the new one.
        let new_only = idle_since(2, T0 + 65 * SEC);
        assert_eq!(clock.corrected(&new_only).idle_for(T0 + 70 * SEC), Some(5 * SEC));
    }

    #[test]
    fn a_backward_step_does_not_make_sessions_look_younger_than_they_are() {
        let mut clock = StepSafeClock::default();
        let before = idle_since(1, T0 - 10 * SEC);
        clock.read(T0, 0);
        clock.corrected(&before);
        assert_eq!(clock.read(T0 - HOUR + 5 * SEC, 5 * SEC), -HOUR);
        let now_wall = T0 - HOUR + 5 * SEC;
        assert_eq!(clock.corrected(&before).idle_for(now_wall), Some(15 * SEC));
        let after = idle_since(2, now_wall - 2 * SEC);
        assert_eq!(clock.corrected(&after).idle_for(now_wall), Some(2 * SEC));
    }

    #[test]
    fn stamps_unseen_for_a_scan_are_forgotten() {
        let mut clock = StepSafeClock::default();
        let s = idle_since(1, T0 - 10 * SEC);
        clock.read(T0, 0);
        clock.corrected(&s);
        clock.read(T0 + SEC, SEC);
        clock.read(T0 + 2 * SEC, 2 * SEC);
        assert!(clock.previous_stamps.is_empty() && clock.stamps.is_empty());
    }
}
