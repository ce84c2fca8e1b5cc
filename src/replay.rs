//! Who holds back replay on a hot standby, and since when: the pure part of the `replay_lag`
//! limit (rule state `replay_lag`, setting `session_kill.replay_lag_timeout`).
//!
//! On a hot standby the startup process replays WAL. A record that conflicts with a standby
//! query makes it wait (with `max_standby_streaming_delay = -1`, for ever):
//! - for a lock: it waits in the lock manager for an `AccessExclusiveLock` (wait event
//!   `Lock: relation`); the sessions holding a conflicting lock are responsible;
//! - for snapshots (`RecoveryConflictSnapshot`), a tablespace (`RecoveryConflictTablespace`) or
//!   a buffer pin (`BufferPin`): the sessions it waits for are not published, so the session with
//!   the oldest snapshot (`backend_xmin`) is taken as responsible, the oldest first.
//!
//! Since when replay is held back ("held since"): a *hold* is the startup process waiting in any
//! of these waits at one replay position (`pg_last_wal_replay_lsn()`). It begins when the worker
//! first sees that wait (the worker looks at the startup process every tenth of the shortest
//! replay-lag limit, at most every 100 ms), or at the lock wait's own start when PostgreSQL
//! records one. It lasts while the startup process waits, or has not yet replayed past that
//! position (between two sleeps of a snapshot wait it briefly shows no wait); it ends once
//! replay has moved on with no conflict wait in sight. A session is charged from the start of the
//! hold if it was responsible when the worker first looked at the hold, else from when the worker
//! first saw it responsible: a session that becomes the oldest snapshot only because an older one
//! was ended gets a full limit of its own before it is ended too.

use crate::policy::Micros;
use std::collections::HashMap;

/// What the startup process waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    Lock,
    Snapshot,
    Tablespace,
    BufferPin,
}

/// PostgreSQL's wait event classes (the top byte of `wait_event_info`), the same in every major.
const PG_WAIT_LOCK: u32 = 0x0300_0000;
const PG_WAIT_BUFFERPIN: u32 = 0x0400_0000;
const CLASS_MASK: u32 = 0xFF00_0000;

/// The recovery conflict a wait event stands for; `snapshot` and `tablespace` are the major's
/// `WAIT_EVENT_RECOVERY_CONFLICT_SNAPSHOT` and `..._TABLESPACE`.
pub fn conflict_of(wait_event_info: u32, snapshot: u32, tablespace: u32) -> Option<Conflict> {
    match wait_event_info {
        0 => None,
        w if w == snapshot => Some(Conflict::Snapshot),
        w if w == tablespace => Some(Conflict::Tablespace),
        w if w & CLASS_MASK == PG_WAIT_LOCK => Some(Conflict::Lock),
        w if w & CLASS_MASK == PG_WAIT_BUFFERPIN => Some(Conflict::BufferPin),
        _ => None,
    }
}

/// One look at the startup process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    pub now: Micros,
    pub conflict: Option<Conflict>,
    /// When its lock wait began, if PostgreSQL recorded it (0 otherwise).
    pub wait_start: Micros,
    /// `GetXLogReplayRecPtr`: the end of the last replayed record.
    pub replayed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub conflict: Conflict,
    pub since: Micros,
    pub replayed: u64,
    /// Sessions seen responsible, and since when each is charged; `None` until the first charge.
    charged: Option<HashMap<i32, Micros>>,
}

/// The worker's memory of the current hold.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    hold: Option<Hold>,
}

impl Tracker {
    /// Takes a look into account; returns the hold it shows, if any.
    pub fn observe(&mut self, look: Look) -> Option<&Hold> {
        let same_position = self.hold.as_ref().is_some_and(|h| h.replayed == look.replayed);
        match look.conflict {
            Some(conflict) if same_position => {
                if let Some(h) = self.hold.as_mut() {
                    h.conflict = conflict;
                }
            }
            Some(conflict) => {
                let since = if look.wait_start > 0 { look.wait_start.min(look.now) } else { look.now };
                self.hold = Some(Hold { conflict, since, replayed: look.replayed, charged: None });
            }
            None if same_position => {}
            None => self.hold = None,
        }
        self.hold.as_ref()
    }

    #[cfg(test)]
    pub fn hold(&self) -> Option<&Hold> {
        self.hold.as_ref()
    }

    /// Charges the sessions responsible now (see the module comment) and returns since when
    /// each holds replay back. Sessions no longer responsible are forgotten.
    pub fn charge(&mut self, now: Micros, responsible: &[i32]) -> HashMap<i32, Micros> {
        let Some(hold) = self.hold.as_mut() else { return HashMap::new() };
        let charged = match hold.charged.as_mut() {
            None => hold.charged.insert(responsible.iter().map(|pid| (*pid, hold.since)).collect()),
            Some(charged) => {
                charged.retain(|pid, _| responsible.contains(pid));
                for pid in responsible {
                    charged.entry(*pid).or_insert(now.max(hold.since));
                }
                charged
            }
        };
        charged.clone()
    }

    /// The wall clock stepped by `step`: times kept move with it.
    pub fn shift(&mut self, step: Micros) {
        if let Some(h) = self.hold.as_mut() {
            h.since += step;
            h.charged.iter_mut().flat_map(|c| c.values_mut()).for_each(|t| *t += step);
        }
    }
}

/// The sessions responsible for a hold: for a lock conflict, those holding up the startup
/// process's lock request (`lock_blockers`); otherwise, or if none is found, the client
/// sessions with the oldest snapshot. `snapshots` holds each client session's `backend_xmin`
/// age in transactions (sessions without one are left out).
pub fn responsible(conflict: Conflict, lock_blockers: &[i32], snapshots: &[(i32, u32)]) -> Vec<i32> {
    if conflict == Conflict::Lock && !lock_blockers.is_empty() {
        let mut pids = lock_blockers.to_vec();
        pids.sort_unstable();
        pids.dedup();
        return pids;
    }
    let Some(oldest) = snapshots.iter().map(|(_, age)| *age).max() else { return Vec::new() };
    let mut pids: Vec<i32> =
        snapshots.iter().filter(|(_, age)| *age == oldest).map(|(pid, _)| *pid).collect();
    pids.sort_unstable();
    pids
}

/// The age of `xmin` against the next transaction ID, modulo 2^32 as PostgreSQL compares them.
pub fn xmin_age(next_xid: u32, xmin: u32) -> u32 {
    next_xid.wrapping_sub(xmin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNAP: u32 = 0x0800_0027;
    const TBS: u32 = 0x0800_0028;
    const SEC: Micros = 1_000_000;

    fn look(now: Micros, conflict: Option<Conflict>, replayed: u64) -> Look {
        Look { now, conflict, wait_start: 0, replayed }
    }

    #[test]
    fn wait_events_name_the_conflict() {
        assert_eq!(conflict_of(0, SNAP, TBS), None);
        assert_eq!(conflict_of(SNAP, SNAP, TBS), Some(Conflict::Snapshot));
        assert_eq!(conflict_of(TBS, SNAP, TBS), Some(Conflict::Tablespace));
        assert_eq!(conflict_of(0x0300_0000, SNAP, TBS), Some(Conflict::Lock), "Lock: relation");
        assert_eq!(conflict_of(0x0400_0000, SNAP, TBS), Some(Conflict::BufferPin));
        assert_eq!(conflict_of(0x0800_0001, SNAP, TBS), None, "another IPC wait");
        assert_eq!(conflict_of(0x0500_0000, SNAP, TBS), None, "Activity: waiting for WAL");
    }

    #[test]
    fn a_hold_lasts_across_the_gaps_between_sleeps_and_ends_once_replay_moves_on() {
        let mut t = Tracker::default();
        assert!(t.observe(look(10 * SEC, None, 100)).is_none(), "no conflict");
        let h = t.observe(look(11 * SEC, Some(Conflict::Snapshot), 100)).unwrap();
        assert_eq!((h.since, h.conflict), (11 * SEC, Conflict::Snapshot));
        assert_eq!(t.observe(look(12 * SEC, None, 100)).map(|h| h.since), Some(11 * SEC), "between sleeps");
        assert_eq!(t.observe(look(13 * SEC, Some(Conflict::Snapshot), 100)).map(|h| h.since), Some(11 * SEC));
        assert!(t.observe(look(14 * SEC, None, 180)).is_none(), "replayed past it");
        let next = t.observe(look(15 * SEC, Some(Conflict::Lock), 180)).unwrap();
        assert_eq!(next.since, 15 * SEC, "a new hold at the same position after the old one ended");
        let moved = t.observe(look(16 * SEC, Some(Conflict::Lock), 260)).unwrap();
        assert_eq!(moved.since, 16 * SEC, "a conflict at a later position is a new hold");
    }

    #[test]
    fn a_recorded_lock_wait_start_begins_the_hold() {
        let mut t = Tracker::default();
        let h = t.observe(Look {
            now: 20 * SEC,
            conflict: Some(Conflict::Lock),
            wait_start: 18 * SEC,
            replayed: 5,
        });
        assert_eq!(h.unwrap().since, 18 * SEC);
    }

    #[test]
    fn sessions_responsible_at_the_first_look_are_charged_from_its_start_later_ones_from_then() {
        let mut t = Tracker::default();
        assert!(t.charge(SEC, &[7]).is_empty(), "no hold");
        t.observe(look(10 * SEC, Some(Conflict::Snapshot), 100));
        assert_eq!(t.charge(10 * SEC, &[7]), HashMap::from([(7, 10 * SEC)]));
        assert_eq!(t.charge(11 * SEC, &[7]), HashMap::from([(7, 10 * SEC)]));
        // 7 was ended; 8 is now the oldest snapshot.
        assert_eq!(t.charge(12 * SEC, &[8]), HashMap::from([(8, 12 * SEC)]));
        t.shift(-SEC);
        assert_eq!(t.charge(13 * SEC, &[8]), HashMap::from([(8, 11 * SEC)]), "moved with the clock");
        assert_eq!(t.hold().unwrap().since, 9 * SEC);
    }

    #[test]
    fn lock_conflicts_blame_the_holders_others_the_oldest_snapshot() {
        let snapshots = [(10, 50), (11, 900), (12, 900), (13, 3)];
        assert_eq!(responsible(Conflict::Lock, &[31, 30, 31], &snapshots), vec![30, 31]);
        assert_eq!(responsible(Conflict::Lock, &[], &snapshots), vec![11, 12], "no holder found");
        assert_eq!(responsible(Conflict::Snapshot, &[30], &snapshots), vec![11, 12]);
        assert_eq!(responsible(Conflict::BufferPin, &[], &[(4, 1)]), vec![4]);
        assert!(responsible(Conflict::Tablespace, &[], &[]).is_empty());
    }

    #[test]
    fn xmin_ages_wrap_around_like_transaction_ids() {
        assert_eq!(xmin_age(1000, 990), 10);
        assert_eq!(xmin_age(5, u32::MAX - 4), 10);
    }
}
