//! Who blocks whom in the lock manager, from one copy of its state (see `backends::locks`).
//!
//! A session waiting for a lock is blocked by every other session that holds a conflicting mode
//! of that lock (a hard block), and by every session queued ahead of it for a conflicting mode
//! (a soft block: PostgreSQL grants in queue order, so an `ALTER TABLE` waiting behind a long
//! transaction holds up every `SELECT` that arrives after it). The lock manager's copy does not
//! keep the queue order; the order in which the waits started stands for it. Blocking is
//! followed transitively, so the long transaction is seen to block the `SELECT`s too.
//!
//! Pure code: the caller reads the lock manager and maps the members of a parallel query's lock
//! group to their leader.

use crate::policy::Micros;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A lock: the fields of PostgreSQL's LOCKTAG.
pub type LockTag = ([u32; 3], u16, u8, u8);

/// Lock modes are 1 (AccessShareLock) to 8 (AccessExclusiveLock); bit `m` of a mask is mode `m`.
pub const MAX_MODE: u8 = 8;

/// PostgreSQL's lock conflict table (lock.c), the same for regular and advisory locks.
const CONFLICTS: [u16; MAX_MODE as usize + 1] = {
    const fn modes(list: &[u8]) -> u16 {
        let mut mask = 0;
        let mut i = 0;
        while i < list.len() {
            mask |= 1 << list[i];
            i += 1;
        }
        mask
    }
    [
        0,
        modes(&[8]),
        modes(&[7, 8]),
        modes(&[5, 6, 7, 8]),
        modes(&[4, 5, 6, 7, 8]),
        modes(&[3, 4, 6, 7, 8]),
        modes(&[3, 4, 5, 6, 7, 8]),
        modes(&[2, 3, 4, 5, 6, 7, 8]),
        modes(&[1, 2, 3, 4, 5, 6, 7, 8]),
    ]
};

fn conflicts(mode: u8, with_mask: u16) -> bool {
    CONFLICTS.get(mode as usize).is_some_and(|c| c & with_mask != 0)
}

/// One process's interest in one lock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LockEntry {
    /// The session: the process itself, or its lock group's leader.
    pub pid: i32,
    pub tag: LockTag,
    /// Modes granted, as a mask.
    pub held: u16,
    /// The mode it waits for, and since when.
    pub waiting: Option<(u8, Micros)>,
}

/// A session that holds up at least one other.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocker {
    pub pid: i32,
    /// The lock on which it holds up the longest-waiting of the sessions it blocks directly,
    /// the mode it holds or waits for there, and whether it holds it (or only queues ahead).
    pub tag: LockTag,
    pub mode: u8,
    pub holds: bool,
    /// Sessions it blocks directly, and directly or through others, in PID order.
    pub blocked: Vec<i32>,
    pub all_blocked: Vec<i32>,
    /// When the longest-waiting session of `all_blocked` began to wait.
    pub waiting_since: Micros,
    /// It waits for a lock itself: it is not where the chain of waits begins.
    pub waits: bool,
}

/// An edge of the wait graph: `blocker` holds up `waiter` on `tag`.
struct Edge {
    blocker: i32,
    waiter: i32,
    tag: LockTag,
    mode: u8,
    holds: bool,
    waiter_since: Micros,
}

/// Every session that blocks another, in PID order.
pub fn blockers(entries: &[LockEntry]) -> Vec<Blocker> {
    let mut by_tag: HashMap<LockTag, Vec<&LockEntry>> = HashMap::new();
    for e in entries {
        by_tag.entry(e.tag).or_default().push(e);
    }
    let mut edges = Vec::new();
    for on_lock in by_tag.values() {
        for waiter in on_lock {
            let Some((wanted, since)) = waiter.waiting else { continue };
            for other in on_lock.iter().filter(|o| o.pid != waiter.pid) {
                let edge = |mode, holds| Edge {
                    blocker: other.pid,
                    waiter: waiter.pid,
                    tag: waiter.tag,
                    mode,
                    holds,
                    waiter_since: since,
                };
                if conflicts(wanted, other.held) {
                    let strongest = (1..=MAX_MODE).rev().find(|m| other.held & (1 << m) != 0).unwrap_or(0);
                    edges.push(edge(strongest, true));
                } else if let Some((queued, queued_since)) = other.waiting {
                    if queued_since < since && conflicts(wanted, 1 << queued) {
                        edges.push(edge(queued, false));
                    }
                }
            }
        }
    }
    let mut direct: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
    let mut since_of: HashMap<i32, Micros> = HashMap::new();
    let mut worst_edge: HashMap<i32, &Edge> = HashMap::new();
    for edge in &edges {
        direct.entry(edge.blocker).or_default().insert(edge.waiter);
        since_of.insert(edge.waiter, edge.waiter_since);
        let worst = worst_edge.entry(edge.blocker).or_insert(edge);
        if (edge.waiter_since, edge.waiter) < (worst.waiter_since, worst.waiter) {
            *worst = edge;
        }
    }
    direct
        .iter()
        .map(|(&pid, blocked)| {
            let mut all: BTreeSet<i32> = BTreeSet::new();
            let mut todo: Vec<i32> = blocked.iter().copied().collect();
            while let Some(next) = todo.pop() {
                if next != pid && all.insert(next) {
                    todo.extend(direct.get(&next).into_iter().flatten());
                }
            }
            let edge = worst_edge[&pid];
            Blocker {
                waits: since_of.contains_key(&pid),
                pid,
                tag: edge.tag,
                mode: edge.mode,
                holds: edge.holds,
                blocked: blocked.iter().copied().filter(|w| *w != pid).collect(),
                waiting_since: all.iter().filter_map(|w| since_of.get(w)).copied().min().unwrap_or(0),
                all_blocked: all.into_iter().collect(),
            }
        })
        .filter(|b| !b.blocked.is_empty())
        .collect()
}

/// For each session where a chain of lock waits begins (it holds up others and waits for no lock
/// itself), when the longest wait it causes began.
pub fn chain_starts(entries: &[LockEntry]) -> HashMap<i32, Micros> {
    blockers(entries).into_iter().filter(|b| !b.waits).map(|b| (b.pid, b.waiting_since)).collect()
}

/// The sessions waiting for a lock.
pub fn waiting(entries: &[LockEntry]) -> HashSet<i32> {
    entries.iter().filter(|e| e.waiting.is_some()).map(|e| e.pid).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: LockTag = ([5, 16384, 0], 0, 0, 1);
    const OTHER_TABLE: LockTag = ([5, 16390, 0], 0, 0, 1);
    const ACCESS_SHARE: u8 = 1;
    const ROW_EXCLUSIVE: u8 = 3;
    const ACCESS_EXCLUSIVE: u8 = 8;

    fn holds(pid: i32, tag: LockTag, mode: u8) -> LockEntry {
        LockEntry { pid, tag, held: 1 << mode, waiting: None }
    }

    fn waits(pid: i32, tag: LockTag, mode: u8, since: Micros) -> LockEntry {
        LockEntry { pid, tag, held: 0, waiting: Some((mode, since)) }
    }

    fn summary(found: &[Blocker]) -> Vec<(i32, Vec<i32>, Vec<i32>, Micros, bool)> {
        found
            .iter()
            .map(|b| (b.pid, b.blocked.clone(), b.all_blocked.clone(), b.waiting_since, b.holds))
            .collect()
    }

    #[test]
    fn a_holder_blocks_a_conflicting_waiter_only() {
        let found = blockers(&[
            holds(10, TABLE, ACCESS_SHARE),
            holds(11, TABLE, ROW_EXCLUSIVE),
            waits(20, TABLE, ACCESS_EXCLUSIVE, 100),
            waits(21, OTHER_TABLE, ACCESS_EXCLUSIVE, 90),
        ]);
        assert_eq!(
            summary(&found),
            vec![(10, vec![20], vec![20], 100, true), (11, vec![20], vec![20], 100, true)]
        );
        assert_eq!((found[1].tag, found[1].mode), (TABLE, ROW_EXCLUSIVE));
    }

    #[test]
    fn compatible_modes_block_nobody() {
        let found = blockers(&[
            holds(10, TABLE, ACCESS_SHARE),
            waits(20, TABLE, ROW_EXCLUSIVE, 100),
            holds(20, TABLE, 1),
        ]);
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn a_queued_lock_request_blocks_later_ones_and_the_holder_blocks_them_all() {
        // A long transaction reads the table, ALTER TABLE queues for it, SELECTs queue behind.
        let found = blockers(&[
            holds(10, TABLE, ACCESS_SHARE),
            waits(20, TABLE, ACCESS_EXCLUSIVE, 100),
            waits(30, TABLE, ACCESS_SHARE, 200),
            waits(31, TABLE, ACCESS_SHARE, 300),
        ]);
        assert_eq!(
            summary(&found),
            vec![(10, vec![20], vec![20, 30, 31], 100, true), (20, vec![30, 31], vec![30, 31], 200, false)]
        );
        assert_eq!(found[1].mode, ACCESS_EXCLUSIVE);
    }

    #[test]
    fn blocking_is_followed_across_locks() {
        // 10 holds A; 20 waits for A while holding B; 30 waits for B.
        let found = blockers(&[
            holds(10, TABLE, ACCESS_EXCLUSIVE),
            waits(20, TABLE, ACCESS_SHARE, 100),
            holds(20, OTHER_TABLE, ACCESS_EXCLUSIVE),
            waits(30, OTHER_TABLE, ACCESS_SHARE, 50),
        ]);
        assert_eq!(
            summary(&found),
            vec![(10, vec![20], vec![20, 30], 50, true), (20, vec![30], vec![30], 50, true)]
        );
        assert_eq!(
            found.iter().map(|b| b.waits).collect::<Vec<_>>(),
            vec![false, true],
            "10 is where it begins"
        );
    }

    #[test]
    fn a_deadlock_cycle_ends_and_never_lists_a_session_as_blocking_itself() {
        let found = blockers(&[
            holds(10, TABLE, ACCESS_EXCLUSIVE),
            waits(10, OTHER_TABLE, ACCESS_EXCLUSIVE, 100),
            holds(20, OTHER_TABLE, ACCESS_EXCLUSIVE),
            waits(20, TABLE, ACCESS_EXCLUSIVE, 110),
        ]);
        assert_eq!(
            summary(&found),
            vec![(10, vec![20], vec![20], 110, true), (20, vec![10], vec![10], 100, true)]
        );
    }

    #[test]
    fn members_of_one_lock_group_never_block_each_other() {
        // The caller gives parallel workers their leader's PID.
        let found = blockers(&[holds(10, TABLE, ACCESS_EXCLUSIVE), waits(10, TABLE, ACCESS_SHARE, 100)]);
        assert!(found.is_empty());
    }
}
