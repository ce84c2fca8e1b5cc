//! Action counters kept in shared memory: how many sessions each path (kill_sessions,
//! drain_database, the worker) acted on, why, and with what outcome, plus the worker's schedule.
//! Plain Rust with fixed-size arrays; `stats.rs` puts it behind an LWLock.

use crate::policy::Micros;

/// Distinct (source, reason, outcome) combinations kept; more are folded into the last row.
pub const MAX_ROWS: usize = 128;
const TEXT_LEN: usize = 48;

/// Which path acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    KillSessions,
    DrainDatabase,
    Worker,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::KillSessions => "kill_sessions",
            Source::DrainDatabase => "drain_database",
            Source::Worker => "worker",
        }
    }
}

type Text = crate::fixed::FixedText<TEXT_LEN>;

#[derive(Clone, Copy)]
struct Row {
    source: Source,
    reason: Text,
    outcome: Text,
    count: u64,
}

/// One line of the counters view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    pub source: &'static str,
    pub reason: String,
    pub outcome: String,
    pub count: u64,
}

/// The worker's schedule as last reported by it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStatus {
    pub last_scan: Micros,
    /// 0 when nothing is due (every limit off).
    pub next_scan: Micros,
    pub scans: u64,
}

#[derive(Clone, Copy)]
pub struct Counters {
    rows: [Option<Row>; MAX_ROWS],
    pub worker: WorkerStatus,
}

impl Default for Counters {
    fn default() -> Self {
        Counters { rows: [None; MAX_ROWS], worker: WorkerStatus::default() }
    }
}

impl Counters {
    pub fn add(&mut self, source: Source, reason: &str, outcome: &str) {
        let (reason, outcome) = (Text::new(reason), Text::new(outcome));
        let same = |r: &Row| r.source == source && r.reason == reason && r.outcome == outcome;
        if let Some(row) = self.rows.iter_mut().flatten().find(|r| same(r)) {
            row.count += 1;
        } else if let Some(slot) = self.rows.iter_mut().find(|r| r.is_none()) {
            *slot = Some(Row { source, reason, outcome, count: 1 });
        } else if let Some(last) = self.rows.last_mut().and_then(Option::as_mut) {
            *last = Row {
                source,
                reason: Text::new("(other)"),
                outcome: Text::new("(other)"),
                count: last.count + 1,
            };
        }
    }

    pub fn rows(&self) -> Vec<Count> {
        let mut rows: Vec<Count> = self
            .rows
            .iter()
            .flatten()
            .map(|r| Count {
                source: r.source.label(),
                reason: r.reason.as_str().to_owned(),
                outcome: r.outcome.as_str().to_owned(),
                count: r.count,
            })
            .collect();
        rows.sort_by(|a, b| (a.source, &a.reason, &a.outcome).cmp(&(b.source, &b.reason, &b.outcome)));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_source_reason_and_outcome() {
        let mut c = Counters::default();
        c.add(Source::KillSessions, "terminate", "terminated");
        c.add(Source::KillSessions, "terminate", "terminated");
        c.add(Source::KillSessions, "terminate", "skipped: superuser");
        c.add(Source::Worker, "session_kill.idle_timeout", "terminated");
        let rows = c.rows();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0],
            Count {
                source: "kill_sessions",
                reason: "terminate".into(),
                outcome: "skipped: superuser".into(),
                count: 1
            }
        );
        assert_eq!(rows[1].count, 2);
        assert_eq!(rows[2].source, "worker");
    }

    #[test]
    fn the_table_is_bounded_and_folds_the_rest() {
        let mut c = Counters::default();
        for i in 0..MAX_ROWS + 5 {
            c.add(Source::DrainDatabase, &format!("reason {i}"), "terminated");
        }
        let rows = c.rows();
        assert_eq!(rows.len(), MAX_ROWS);
        assert_eq!(rows.iter().map(|r| r.count).sum::<u64>(), (MAX_ROWS + 5) as u64, "nothing is lost");
        assert!(rows.iter().any(|r| r.reason == "(other)"));
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        let mut c = Counters::default();
        c.add(Source::Worker, &"é".repeat(40), "terminated");
        assert_eq!(c.rows()[0].reason, "é".repeat(23));
    }
}
