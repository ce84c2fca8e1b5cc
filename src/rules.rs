//! The worker's rules, as plain Rust: rows of `session_kill.rules` and the limits set in
//! postgresql.conf (which act as rules below every row), and which rule governs a session.
//!
//! Rules compete within their kind (their `state` column). For each kind that applies to a
//! session right now ('idle' to idle sessions, 'idle in transaction' to sessions idle inside a
//! transaction, 'active' to running ones, 'transaction' to any session inside a transaction,
//! 'blocking' to a session that holds up another's lock request and waits for no lock itself,
//! 'snapshot' to a session whose snapshot holds back the xmin horizon), the enabled rule of that
//! kind whose patterns match and whose priority is highest governs (among equal priorities, the
//! one whose deadline comes first). The session then runs into the earliest of those deadlines.
//! A high-priority rule with a long timeout is therefore how an exception is written, and it only
//! lifts limits of its own kind. `session_kill.snapshot_xid_age` is a kind of its own, which no
//! row can set or lift: it counts transactions, not time.

use crate::fixed::FixedText;
use crate::policy::{parse_label, Cidr, InputError, LikePattern, Micros, Session, State};
use std::collections::HashMap;
use std::net::IpAddr;

/// What a rule's timeout measures: the rule's `state` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Idle outside a transaction, since the last statement ended.
    Idle,
    /// Idle inside a transaction (also an aborted one), since the last statement ended.
    IdleInTransaction,
    /// Inside a transaction, running or not, since the transaction began.
    Transaction,
    /// Running a statement, since it began.
    Active,
    /// Holding up another session in the lock manager (and waiting for no lock itself), since
    /// the longest-waiting of those it holds up began to wait.
    Blocking,
    /// Holding back the xmin horizon with a snapshot, since it was taken (see `xmin_hold.rs`).
    Snapshot,
    /// Holding back the xmin horizon by more than a number of transactions
    /// (`session_kill.snapshot_xid_age`); not a rule state.
    SnapshotXidAge,
    /// On a hot standby, holding back the replay of WAL: the startup process waits in a recovery
    /// conflict with the session (see `replay.rs`), since the worker first saw it wait there (or
    /// first saw this session responsible, if that came later in the same wait).
    ReplayLag,
}

impl Measure {
    /// What `session_kill.rules.state` may say.
    const STATES: [Measure; 7] = [
        Measure::Idle,
        Measure::IdleInTransaction,
        Measure::Transaction,
        Measure::Active,
        Measure::Blocking,
        Measure::Snapshot,
        Measure::ReplayLag,
    ];
    /// Every kind of limit: the states, and the xid-age limit that only the setting sets.
    fn all() -> impl Iterator<Item = Measure> {
        Measure::STATES.into_iter().chain([Measure::SnapshotXidAge])
    }

    pub fn label(self) -> &'static str {
        match self {
            Measure::Idle => "idle",
            Measure::IdleInTransaction => "idle in transaction",
            Measure::Transaction => "transaction",
            Measure::Active => "active",
            Measure::Blocking => "blocking",
            Measure::Snapshot => "snapshot",
            Measure::SnapshotXidAge => "snapshot xid age",
            Measure::ReplayLag => "replay_lag",
        }
    }

    /// What the session `s` was doing for the measured time `how_long`, as its client is told.
    pub fn told(self, how_long: &str, s: &Session) -> String {
        let age = s.xmin.map_or(0, |x| x.age);
        match self {
            Measure::Idle => format!("idle for {how_long}"),
            Measure::IdleInTransaction => format!("idle in transaction for {how_long}"),
            Measure::Transaction => format!("in a transaction for {how_long}"),
            Measure::Active => format!("running a statement for {how_long}"),
            Measure::Blocking => format!("holding up another session's lock request for {how_long}"),
            Measure::Snapshot | Measure::SnapshotXidAge => {
                format!("holding back the xmin horizon for {how_long} (xmin age {age})")
            }
            Measure::ReplayLag => format!("holding back replay on this standby for {how_long}"),
        }
    }

    pub fn parse(text: &str) -> Result<Measure, InputError> {
        parse_label(text, &Measure::STATES, Measure::label, "rule state", "rule states")
    }

    /// Since when `s` has been in the measured condition; `None` when it is not in it.
    pub fn since(self, s: &Session) -> Option<Micros> {
        let since = match (self, s.state?) {
            (Measure::Idle, State::Idle) => s.state_change,
            (Measure::IdleInTransaction, State::IdleInTransaction | State::IdleInTransactionAborted) => {
                s.state_change
            }
            (Measure::Transaction, _) => s.xact_start,
            (Measure::Active, state) if state.is_running() => s.query_start,
            (Measure::Blocking, _) => s.blocking_since,
            (Measure::Snapshot | Measure::SnapshotXidAge, _) if s.xmin.is_some() => s.xmin_since,
            (Measure::ReplayLag, _) => s.replay_held_since,
            _ => return None,
        };
        (since != 0).then_some(since)
    }
}

/// What the worker does to a session past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Terminate,
    /// Cancel the running statement; terminate if the session is still past a deadline after
    /// `grace`. A session that runs nothing has nothing to cancel and is terminated at once.
    CancelThenTerminate,
}

impl Action {
    const ALL: [Action; 2] = [Action::Terminate, Action::CancelThenTerminate];

    pub fn label(self) -> &'static str {
        match self {
            Action::Terminate => "terminate",
            Action::CancelThenTerminate => "cancel_then_terminate",
        }
    }

    pub fn parse(text: &str) -> Result<Action, InputError> {
        parse_label(text, &Action::ALL, Action::label, "rule action", "rule actions")
    }
}

/// Where a rule comes from: a row of `session_kill.rules`, or a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Row(i64),
    Setting(&'static str),
}

impl Origin {
    /// `rule 3` or `session_kill.idle_timeout`: the name counters, logs and the audit use.
    pub fn label(self) -> String {
        match self {
            Origin::Row(id) => format!("rule {id}"),
            Origin::Setting(name) => name.to_owned(),
        }
    }
}

/// One row of `session_kill.rules` as stored: the columns the worker needs, still as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRow {
    pub id: i64,
    pub database: String,
    pub role: String,
    pub application: String,
    pub client_addr: Option<String>,
    pub state: String,
    pub timeout: Micros,
    pub action: String,
    pub grace: Micros,
    pub priority: i32,
    /// The rule's comment, cut to `MAX_COMMENT_LEN` bytes: clients ended by it are told.
    pub comment: String,
}

/// Comments are kept in shared memory in fixed slots of this many bytes.
pub const MAX_COMMENT_LEN: usize = 63;

/// Longer timeouts and graces are refused: deadlines stay far from overflowing. 100 years as
/// PostgreSQL compares intervals (`'100 years' = '36000 days'`).
pub const MAX_DURATION: Micros = 100 * 12 * 30 * 24 * 3600 * 1_000_000;

/// Patterns are kept in shared memory, in fixed slots of this many bytes.
pub const MAX_PATTERN_LEN: usize = 63;

#[derive(Debug, Clone)]
pub struct Rule {
    pub origin: Origin,
    database: LikePattern,
    role: LikePattern,
    application: LikePattern,
    client: Option<Cidr>,
    pub measure: Measure,
    pub timeout: Micros,
    pub action: Action,
    pub grace: Micros,
    /// Settings rank below every row, whatever its priority.
    priority: i64,
    pub comment: String,
    /// `SnapshotXidAge` only: applies once the xmin is older than this many transactions.
    pub xid_age: i64,
}

impl Rule {
    /// Checks a row the way the table's trigger does before accepting it.
    pub fn from_row(row: &RuleRow) -> Result<Rule, InputError> {
        let pattern = |column: &str, text: &str| {
            if text.len() > MAX_PATTERN_LEN {
                return Err(InputError::invalid(
                    format!("{column} pattern is too long"),
                    format!("Patterns are at most {MAX_PATTERN_LEN} bytes, like PostgreSQL names."),
                ));
            }
            LikePattern::parse(text)
        };
        if row.timeout <= 0 {
            return Err(InputError::invalid(
                "timeout must be positive",
                "Give the rule a timeout such as '10min'; to switch a rule off, set enabled to false.",
            ));
        }
        if row.grace < 0 {
            return Err(InputError::invalid(
                "grace must not be negative",
                "Give a grace such as '5s', or '0'.",
            ));
        }
        for (column, value) in [("timeout", row.timeout), ("grace", row.grace)] {
            if value > MAX_DURATION {
                return Err(InputError::invalid(
                    format!("{column} is out of range"),
                    format!("Give a {column} of at most 100 years; to exempt sessions, write a rule with a long timeout."),
                ));
            }
        }
        Ok(Rule {
            origin: Origin::Row(row.id),
            database: pattern("database", &row.database)?,
            role: pattern("role", &row.role)?,
            application: pattern("application", &row.application)?,
            client: row.client_addr.as_deref().map(Cidr::parse).transpose()?,
            measure: Measure::parse(&row.state)?,
            timeout: row.timeout,
            action: Action::parse(&row.action)?,
            grace: row.grace,
            priority: i64::from(row.priority),
            comment: row.comment.clone(),
            xid_age: 0,
        })
    }

    /// The rule a setting stands for: every session, terminate, below every row.
    /// Settings terminate, except `session_kill.replay_lag_timeout`, which cancels first (see
    /// `Limits::replay_lag`).
    fn setting(name: &'static str, measure: Measure, timeout: Micros) -> Rule {
        let (action, grace) = match measure {
            Measure::ReplayLag => (Action::CancelThenTerminate, REPLAY_LAG_SETTING_GRACE),
            _ => (Action::Terminate, 0),
        };
        let any = LikePattern::parse("%").expect("% is a valid pattern");
        Rule {
            origin: Origin::Setting(name),
            database: any.clone(),
            role: any.clone(),
            application: any,
            client: None,
            measure,
            timeout,
            action,
            grace,
            priority: i64::MIN,
            comment: String::new(),
            xid_age: 0,
        }
    }

    /// How often the worker must look at sessions for this rule: its timeout, except for the
    /// transaction-counting `snapshot_xid_age`, which nothing wakes the worker for.
    fn poll_interval(&self) -> Micros {
        match self.measure {
            Measure::SnapshotXidAge => XID_AGE_POLL,
            _ => self.timeout,
        }
    }

    /// For `snapshot_xid_age`, the session's xmin is old enough; every other rule, always.
    fn reached_xid_age(&self, s: &Session) -> bool {
        self.measure != Measure::SnapshotXidAge || s.xmin.is_some_and(|x| x.age > self.xid_age)
    }

    /// The patterns match `s` (connected to database `datname`); a network needs a TCP client.
    /// What only the session's identity decides, so a scan may remember it (`MatchCache`).
    fn matches(&self, s: &Session, datname: &str) -> bool {
        self.database.matches(datname)
            && self.role.matches(s.role.as_deref().unwrap_or(""))
            && self.application.matches(&s.application)
            && self.client.as_ref().is_none_or(|net| s.client.is_some_and(|addr| net.contains(addr)))
    }
}

/// While `session_kill.snapshot_xid_age` is set, the worker looks at every session at least this
/// often: transaction IDs are assigned without waking it.
pub const XID_AGE_POLL: Micros = 1_000_000;

/// The limits set in postgresql.conf (`session_kill.idle_timeout` and friends); 0 turns one off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub idle: Micros,
    pub idle_in_transaction: Micros,
    pub transaction: Micros,
    pub blocking: Micros,
    pub snapshot: Micros,
    /// In transactions, not time.
    pub snapshot_xid_age: i64,
    /// `session_kill.replay_lag_timeout`: unlike the other settings it cancels the statement
    /// first (as PostgreSQL's own `max_standby_streaming_delay` does) and terminates the session
    /// only if it still holds replay back `REPLAY_LAG_SETTING_GRACE` later.
    pub replay_lag: Micros,
}

/// The grace of `session_kill.replay_lag_timeout`: the rules table's default grace.
pub const REPLAY_LAG_SETTING_GRACE: Micros = 5_000_000;

/// Which rule governs a session, and when the session runs into it.
#[derive(Debug, Clone, Copy)]
pub struct Verdict<'a> {
    pub rule: &'a Rule,
    pub deadline: Micros,
}

/// Which rules match each identity (database, role, application, client address) seen in one
/// scan: the sessions of a pool share one, so a scan under many rules matches their patterns
/// once per identity, not once per session. Valid for one rule set and one scan.
#[derive(Default)]
pub struct MatchCache {
    matching: HashMap<Identity, Vec<usize>>,
}

/// What the rules' patterns look at: database OID, role, application, client address.
type Identity = (u32, Option<String>, String, Option<IpAddr>);

/// Every enabled rule, highest priority first.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(mut rows: Vec<Rule>, settings: Limits) -> RuleSet {
        rows.extend(
            [
                ("session_kill.idle_timeout", Measure::Idle, settings.idle),
                (
                    "session_kill.idle_in_transaction_timeout",
                    Measure::IdleInTransaction,
                    settings.idle_in_transaction,
                ),
                ("session_kill.transaction_timeout", Measure::Transaction, settings.transaction),
                ("session_kill.blocker_timeout", Measure::Blocking, settings.blocking),
                ("session_kill.snapshot_timeout", Measure::Snapshot, settings.snapshot),
                ("session_kill.replay_lag_timeout", Measure::ReplayLag, settings.replay_lag),
            ]
            .into_iter()
            .filter(|(_, _, timeout)| *timeout > 0)
            .map(|(name, measure, timeout)| Rule::setting(name, measure, timeout)),
        );
        if settings.snapshot_xid_age > 0 {
            // Due as soon as the xmin is too old: a deadline of the hold's start.
            rows.push(Rule {
                xid_age: settings.snapshot_xid_age,
                ..Rule::setting("session_kill.snapshot_xid_age", Measure::SnapshotXidAge, 0)
            });
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.priority));
        RuleSet { rules: rows }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Some enabled rule (or setting) measures this.
    pub fn measures(&self, measure: Measure) -> bool {
        self.rules.iter().any(|r| r.measure == measure)
    }

    /// Some enabled rule (or setting) limits how long or how far snapshots hold the horizon.
    pub fn measures_snapshots(&self) -> bool {
        self.measures(Measure::Snapshot) || self.measures(Measure::SnapshotXidAge)
    }

    /// The rule that governs `s` now (see the module comment), with its deadline.
    pub fn verdict(&self, s: &Session, datname: &str) -> Option<Verdict<'_>> {
        self.verdict_among(s, &self.matching(s, datname))
    }

    /// `verdict`, matching the rules' patterns only once per identity in `cache`.
    pub fn cached_verdict(&self, s: &Session, datname: &str, cache: &mut MatchCache) -> Option<Verdict<'_>> {
        let identity = (s.database_oid, s.role.clone(), s.application.clone(), s.client);
        let matching = cache.matching.entry(identity).or_insert_with(|| self.matching(s, datname));
        self.verdict_among(s, matching)
    }

    /// The rules whose patterns and network match `s`, by index, highest priority first.
    fn matching(&self, s: &Session, datname: &str) -> Vec<usize> {
        (0..self.rules.len()).filter(|i| self.rules[*i].matches(s, datname)).collect()
    }

    fn verdict_among(&self, s: &Session, matching: &[usize]) -> Option<Verdict<'_>> {
        Measure::all().filter_map(|kind| self.governing(kind, s, matching)).min_by_key(|v| v.deadline)
    }

    /// Among the matching rules of one kind, the one with the highest priority (rules are sorted
    /// that way), the earliest deadline among equals.
    fn governing(&self, kind: Measure, s: &Session, matching: &[usize]) -> Option<Verdict<'_>> {
        let since = kind.since(s)?;
        let mut candidates = matching
            .iter()
            .map(|i| &self.rules[*i])
            .filter(|rule| rule.measure == kind && rule.reached_xid_age(s))
            .map(|rule| Verdict { rule, deadline: since.saturating_add(rule.timeout) });
        let first = candidates.next()?;
        Some(candidates.take_while(|v| v.rule.priority == first.rule.priority).fold(first, |best, v| {
            if v.deadline < best.deadline {
                v
            } else {
                best
            }
        }))
    }

    /// When to scan next: at the earliest known deadline, and no later than the shortest timeout
    /// from now (a session that enters a state after this scan cannot expire sooner; a snapshot
    /// taken after it is charged from after it, see `xmin_hold.rs`), or `XID_AGE_POLL` while
    /// `snapshot_xid_age` is set. Blocking and replay-lag limits are left to `lock_watch` and
    /// `replay_watch`. `None` when there is
    /// no rule: sleep until something changes.
    pub fn next_scan(&self, now: Micros, earliest_deadline: Option<Micros>) -> Option<Micros> {
        let shortest = self
            .rules
            .iter()
            .filter(|r| !matches!(r.measure, Measure::Blocking | Measure::ReplayLag))
            .map(Rule::poll_interval)
            .min();
        [earliest_deadline, shortest.map(|t| now.saturating_add(t))].into_iter().flatten().min()
    }

    /// How often to look for lock waits while some limit measures blocking: a wait that begins
    /// just after a look cannot outlast the shortest such limit before the next one.
    pub fn lock_watch(&self) -> Option<Micros> {
        self.rules.iter().filter(|r| r.measure == Measure::Blocking).map(|r| r.timeout).min()
    }

    /// How often to look at the startup process while some limit measures replay lag (and the
    /// server is a standby): a tenth of the shortest such limit, between 5 ms and 100 ms. A
    /// replay-lag limit counts from the look that first sees replay held back, so this bounds
    /// how much of a conflict the worker can miss.
    pub fn replay_watch(&self) -> Option<Micros> {
        self.rules
            .iter()
            .filter(|r| r.measure == Measure::ReplayLag)
            .map(|r| (r.timeout / 10).clamp(REPLAY_WATCH_MIN, REPLAY_WATCH_MAX))
            .min()
    }
}

/// Bounds of `RuleSet::replay_watch`.
const REPLAY_WATCH_MIN: Micros = 5_000;
const REPLAY_WATCH_MAX: Micros = 100_000;
/// How many rules shared memory holds; the loader keeps the highest-priority ones.
pub const MAX_RULES: usize = 256;

type Pattern = FixedText<{ MAX_PATTERN_LEN + 1 }>;

/// A row in shared memory: every pattern fits, as `Rule::from_row` caps their length.
#[derive(Debug, Clone, Copy, Default)]
struct StoredRow {
    id: i64,
    database: Pattern,
    role: Pattern,
    application: Pattern,
    client_addr: Option<FixedText<48>>,
    state: FixedText<32>,
    timeout: Micros,
    action: FixedText<32>,
    grace: Micros,
    priority: i32,
    comment: FixedText<64>,
}

/// The enabled rows of `session_kill.rules`, as the loader last read them.
#[derive(Debug, Clone, Copy)]
pub struct PublishedRules {
    /// Bumped at every publication, so readers re-parse only what changed.
    generation: u64,
    count: usize,
    rows: [StoredRow; MAX_RULES],
}

impl Default for PublishedRules {
    fn default() -> Self {
        PublishedRules { generation: 0, count: 0, rows: [StoredRow::default(); MAX_RULES] }
    }
}

impl PublishedRules {
    /// Replaces the rules; returns how many were kept (at most `MAX_RULES`).
    pub fn publish(&mut self, rows: &[RuleRow]) -> usize {
        self.generation += 1;
        self.count = rows.len().min(MAX_RULES);
        for (slot, row) in self.rows.iter_mut().zip(rows) {
            *slot = StoredRow {
                id: row.id,
                database: Pattern::new(&row.database),
                role: Pattern::new(&row.role),
                application: Pattern::new(&row.application),
                client_addr: row.client_addr.as_deref().map(FixedText::new),
                state: FixedText::new(&row.state),
                timeout: row.timeout,
                action: FixedText::new(&row.action),
                grace: row.grace,
                priority: row.priority,
                comment: FixedText::new(&row.comment),
            };
        }
        self.count
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn rows(&self) -> Vec<RuleRow> {
        self.rows[..self.count]
            .iter()
            .map(|r| RuleRow {
                id: r.id,
                database: r.database.as_str().to_owned(),
                role: r.role.as_str().to_owned(),
                application: r.application.as_str().to_owned(),
                client_addr: r.client_addr.map(|c| c.as_str().to_owned()),
                state: r.state.as_str().to_owned(),
                timeout: r.timeout,
                action: r.action.as_str().to_owned(),
                grace: r.grace,
                priority: r.priority,
                comment: r.comment.as_str().to_owned(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::{client, NOW, SEC};

    fn row(id: i64, state: &str, timeout_secs: i64) -> RuleRow {
        RuleRow {
            id,
            database: "%".into(),
            role: "%".into(),
            application: "%".into(),
            client_addr: None,
            state: state.into(),
            timeout: timeout_secs * SEC,
            action: "terminate".into(),
            grace: 5 * SEC,
            priority: 0,
            comment: String::new(),
        }
    }

    fn rules(rows: Vec<RuleRow>, settings: Limits) -> RuleSet {
        RuleSet::new(rows.iter().map(|r| Rule::from_row(r).unwrap()).collect(), settings)
    }

    fn governing(set: &RuleSet, s: &Session) -> Option<(String, Micros)> {
        set.verdict(s, "shop").map(|v| (v.rule.origin.label(), v.deadline))
    }

    #[test]
    fn settings_alone_follow_the_state_and_the_earliest_limit_wins() {
        let limits = Limits { idle: 60 * SEC, idle_in_transaction: 10 * SEC, ..Limits::default() };
        let set = RuleSet::new(vec![], limits);
        let idle = client(1, State::Idle, 5);
        assert_eq!(governing(&set, &idle), Some(("session_kill.idle_timeout".into(), NOW + 55 * SEC)));
        let in_tx = client(2, State::IdleInTransaction, 5);
        let iit = "session_kill.idle_in_transaction_timeout".to_owned();
        assert_eq!(governing(&set, &in_tx), Some((iit.clone(), NOW + 5 * SEC)));
        let aborted = client(3, State::IdleInTransactionAborted, 20);
        assert_eq!(governing(&set, &aborted), Some((iit, NOW - 10 * SEC)));
        assert_eq!(governing(&set, &client(4, State::Active, 0)), None, "running sessions are not idle");
        let with_tx = RuleSet::new(vec![], Limits { transaction: 30 * SEC, ..limits });
        let tx = "session_kill.transaction_timeout".to_owned();
        let old_tx = Session { xact_start: NOW - 29 * SEC, ..client(5, State::IdleInTransaction, 1) };
        assert_eq!(governing(&with_tx, &old_tx), Some((tx.clone(), NOW + SEC)));
        let active_tx = Session { xact_start: NOW - 40 * SEC, ..client(6, State::Active, 0) };
        assert_eq!(governing(&with_tx, &active_tx), Some((tx, NOW - 10 * SEC)));
        assert!(RuleSet::new(vec![], Limits::default()).is_empty(), "all off");
    }

    #[test]
    fn a_blocking_limit_counts_from_the_longest_wait_it_causes_and_spares_the_rest() {
        let set = RuleSet::new(vec![], Limits { blocking: 30 * SEC, ..Limits::default() });
        assert!(set.measures(Measure::Blocking) && !set.measures(Measure::Idle));
        let blocker = Session { blocking_since: NOW - 20 * SEC, ..client(1, State::IdleInTransaction, 300) };
        assert_eq!(governing(&set, &blocker), Some(("session_kill.blocker_timeout".into(), NOW + 10 * SEC)));
        assert_eq!(governing(&set, &client(2, State::IdleInTransaction, 300)), None, "blocks nobody");
        let rule = rules(vec![row(7, "blocking", 5)], Limits::default());
        assert_eq!(governing(&rule, &blocker), Some(("rule 7".into(), NOW - 15 * SEC)));
    }

    #[test]
    fn rows_outrank_settings_and_the_highest_priority_wins() {
        let limits = Limits { idle: 60 * SEC, ..Limits::default() };
        let mut exempt_reports =
            RuleRow { application: "report%".into(), priority: 10, ..row(7, "idle", 3600) };
        let mut strict = row(8, "idle", 30);
        let set = rules(vec![exempt_reports.clone(), strict.clone()], limits);
        let psql = client(1, State::Idle, 5);
        assert_eq!(
            governing(&set, &psql),
            Some(("rule 8".into(), NOW + 25 * SEC)),
            "a row beats the setting"
        );
        let report = Session { application: "reporting".into(), ..client(2, State::Idle, 5) };
        assert_eq!(
            governing(&set, &report),
            Some(("rule 7".into(), NOW + 3595 * SEC)),
            "exception by priority"
        );
        exempt_reports.priority = 0;
        strict.priority = 0;
        let tied = rules(vec![exempt_reports, strict], limits);
        assert_eq!(
            governing(&tied, &report),
            Some(("rule 8".into(), NOW + 25 * SEC)),
            "a tie goes to the earliest deadline"
        );
    }

    #[test]
    fn rules_compete_within_their_kind_and_the_earliest_deadline_governs() {
        let limits = Limits { transaction: 60 * SEC, idle_in_transaction: 30 * SEC, ..Limits::default() };
        let set = rules(
            vec![
                RuleRow { priority: 5, ..row(1, "active", 3600) },
                RuleRow { priority: 5, ..row(2, "idle in transaction", 3600) },
            ],
            limits,
        );
        let running = Session { xact_start: NOW - 50 * SEC, ..client(1, State::Active, 0) };
        assert_eq!(
            governing(&set, &running),
            Some(("session_kill.transaction_timeout".into(), NOW + 10 * SEC)),
            "an 'active' rule does not lift the transaction limit"
        );
        let waiting = Session { xact_start: NOW - 50 * SEC, ..client(2, State::IdleInTransaction, 40) };
        assert_eq!(
            governing(&set, &waiting),
            Some(("session_kill.transaction_timeout".into(), NOW + 10 * SEC)),
            "rule 2 lifts the idle-in-transaction setting only"
        );
    }

    #[test]
    fn a_scan_matches_patterns_once_per_identity_and_decides_as_without_the_cache() {
        let set = rules(
            vec![
                RuleRow { role: "app".into(), ..row(1, "idle", 10) },
                RuleRow { application: "ps%".into(), ..row(2, "idle", 20) },
                row(3, "active", 5),
            ],
            Limits { idle: 60 * SEC, ..Limits::default() },
        );
        let sessions: Vec<Session> = (0..12)
            .map(|i| Session {
                role: Some(["app", "dba"][i % 2].into()),
                application: ["psql", "pgbench", "psql"][i % 3].into(),
                ..client(i as i32, if i % 4 == 0 { State::Active } else { State::Idle }, i as i64)
            })
            .collect();
        let mut cache = MatchCache::default();
        for s in &sessions {
            let plain = set.verdict(s, "shop").map(|v| (v.rule.origin.label(), v.deadline));
            let cached =
                set.cached_verdict(s, "shop", &mut cache).map(|v| (v.rule.origin.label(), v.deadline));
            assert_eq!(cached, plain, "session {}", s.pid);
        }
        assert_eq!(cache.matching.len(), 4, "two roles × two applications");
    }

    #[test]
    fn rules_match_on_database_role_application_network_and_state() {
        let set = rules(
            vec![RuleRow {
                database: "sh_p".into(),
                role: "app".into(),
                application: "ps%".into(),
                client_addr: Some("10.0.0.0/8".into()),
                ..row(1, "idle in transaction", 10)
            }],
            Limits::default(),
        );
        let s = client(1, State::IdleInTransaction, 5);
        assert!(governing(&set, &s).is_some());
        assert!(set.verdict(&s, "other").is_none(), "database");
        assert!(governing(&set, &Session { role: Some("dba".into()), ..s.clone() }).is_none(), "role");
        assert!(
            governing(&set, &Session { application: "pgbench".into(), ..s.clone() }).is_none(),
            "application"
        );
        let elsewhere = Session { client: Some("192.168.1.1".parse().unwrap()), ..s.clone() };
        assert!(governing(&set, &elsewhere).is_none(), "network");
        assert!(
            governing(&set, &Session { client: None, ..s.clone() }).is_none(),
            "a Unix socket is in no network"
        );
        assert!(governing(&set, &client(1, State::Idle, 5)).is_none(), "state");
    }

    #[test]
    fn active_rules_measure_the_running_statement() {
        let set = rules(
            vec![RuleRow { action: "cancel_then_terminate".into(), ..row(4, "active", 60) }],
            Limits::default(),
        );
        let running = Session { query_start: NOW - 70 * SEC, ..client(1, State::Active, 0) };
        let v = set.verdict(&running, "shop").unwrap();
        assert_eq!((v.deadline, v.rule.action), (NOW - 10 * SEC, Action::CancelThenTerminate));
        assert!(governing(&set, &client(2, State::Idle, 500)).is_none());
    }

    #[test]
    fn bad_rows_are_refused_with_a_reason() {
        let refused = |r: RuleRow| Rule::from_row(&r).unwrap_err().message;
        assert_eq!(refused(row(1, "sleeping", 10)), "invalid rule state \"sleeping\"");
        assert_eq!(
            refused(RuleRow { action: "kill".into(), ..row(1, "idle", 10) }),
            "invalid rule action \"kill\""
        );
        assert_eq!(refused(row(1, "idle", 0)), "timeout must be positive");
        assert_eq!(refused(RuleRow { grace: -1, ..row(1, "idle", 10) }), "grace must not be negative");
        assert_eq!(refused(row(1, "idle", 101 * 366 * 24 * 3600)), "timeout is out of range");
        assert_eq!(refused(RuleRow { grace: i64::MAX, ..row(1, "idle", 10) }), "grace is out of range");
        assert_eq!(
            refused(RuleRow { role: "x".repeat(64), ..row(1, "idle", 10) }),
            "role pattern is too long"
        );
        assert_eq!(
            refused(RuleRow { application: "a\\".into(), ..row(1, "idle", 10) }),
            "invalid pattern \"a\\\""
        );
        assert_eq!(
            refused(RuleRow { client_addr: Some("10.0.0.0/33".into()), ..row(1, "idle", 10) }),
            "invalid network \"10.0.0.0/33\""
        );
        assert!(Rule::from_row(&RuleRow { state: "Idle In Transaction".into(), ..row(1, "", 10) }).is_ok());
    }

    #[test]
    fn next_scan_is_the_earliest_deadline_or_the_shortest_timeout() {
        let set = rules(
            vec![row(1, "active", 7)],
            Limits { idle: 60 * SEC, idle_in_transaction: 10 * SEC, ..Limits::default() },
        );
        assert_eq!(set.next_scan(NOW, Some(NOW + 3 * SEC)), Some(NOW + 3 * SEC));
        assert_eq!(set.next_scan(NOW, Some(NOW + 30 * SEC)), Some(NOW + 7 * SEC));
        assert_eq!(set.next_scan(NOW, None), Some(NOW + 7 * SEC));
        assert_eq!(RuleSet::new(vec![], Limits::default()).next_scan(NOW, None), None);
    }

    fn holding(pid: i32, state: State, held_secs: i64, age: i64) -> Session {
        Session {
            xact_start: NOW - 3600 * SEC,
            xmin: Some(crate::policy::Xmin { xid: 100, age }),
            xmin_since: NOW - held_secs * SEC,
            ..client(pid, state, 0)
        }
    }

    #[test]
    fn snapshot_limits_measure_the_hold_and_spare_sessions_without_a_snapshot() {
        let set = RuleSet::new(vec![], Limits { snapshot: 60 * SEC, ..Limits::default() });
        assert!(set.measures_snapshots() && set.measures(Measure::Snapshot));
        let idle_rr = holding(1, State::IdleInTransaction, 50, 10);
        assert_eq!(governing(&set, &idle_rr), Some(("session_kill.snapshot_timeout".into(), NOW + 10 * SEC)));
        let running = holding(2, State::Active, 70, 10);
        assert_eq!(governing(&set, &running), Some(("session_kill.snapshot_timeout".into(), NOW - 10 * SEC)));
        let no_snapshot = Session { xmin: None, ..holding(3, State::IdleInTransaction, 70, 10) };
        assert_eq!(governing(&set, &no_snapshot), None, "idle in transaction without a snapshot");
        let rule = rules(
            vec![RuleRow { action: "cancel_then_terminate".into(), ..row(9, "Snapshot", 30) }],
            Limits::default(),
        );
        let v = rule.verdict(&running, "shop").unwrap();
        assert_eq!(
            (v.rule.origin, v.deadline, v.rule.action),
            (Origin::Row(9), NOW - 40 * SEC, Action::CancelThenTerminate)
        );
    }

    #[test]
    fn snapshot_xid_age_is_due_once_the_xmin_is_too_old_and_no_row_lifts_it() {
        let limits = Limits { snapshot_xid_age: 1000, ..Limits::default() };
        let exempt = RuleRow { priority: 100, ..row(5, "snapshot", 86_400) };
        let set = rules(vec![exempt], limits);
        let young = holding(1, State::IdleInTransaction, 500, 1000);
        assert_eq!(governing(&set, &young), Some(("rule 5".into(), NOW + 85_900 * SEC)));
        let old = holding(2, State::IdleInTransaction, 5, 1001);
        let v = set.verdict(&old, "shop").unwrap();
        assert_eq!(
            (v.rule.origin.label(), v.deadline, v.rule.action),
            ("session_kill.snapshot_xid_age".into(), NOW - 5 * SEC, Action::Terminate)
        );
        assert_eq!(v.rule.xid_age, 1000);
        assert_eq!(
            set.next_scan(NOW, None),
            Some(NOW + XID_AGE_POLL),
            "transaction IDs wake nobody: polled every second"
        );
        assert!(RuleSet::new(vec![], limits).measures_snapshots());
    }

    #[test]
    fn snapshot_is_a_rule_state_but_snapshot_xid_age_is_not() {
        assert_eq!(Measure::parse("snapshot").unwrap(), Measure::Snapshot);
        let err = Measure::parse("snapshot xid age").unwrap_err();
        assert_eq!(
            err.hint,
            "Valid rule states are: idle, idle in transaction, transaction, active, blocking, snapshot, replay_lag."
        );
        let s = holding(1, State::Active, 2, 1234);
        assert_eq!(
            Measure::Snapshot.told("2.0s", &s),
            "holding back the xmin horizon for 2.0s (xmin age 1234)"
        );
    }

    #[test]
    fn blocking_limits_set_the_lock_watch_not_the_scans() {
        let set = rules(
            vec![row(1, "blocking", 2), row(2, "idle", 30)],
            Limits { blocking: SEC, ..Limits::default() },
        );
        assert_eq!(set.lock_watch(), Some(SEC));
        assert_eq!(set.next_scan(NOW, None), Some(NOW + 30 * SEC));
        let only_blocking = rules(vec![row(1, "blocking", 5)], Limits::default());
        assert_eq!(only_blocking.next_scan(NOW, None), None);
        assert_eq!(only_blocking.next_scan(NOW, Some(NOW + SEC)), Some(NOW + SEC));
        assert_eq!(rules(vec![row(1, "idle", 5)], Limits::default()).lock_watch(), None);
    }

    #[test]
    fn replay_lag_counts_from_the_hold_and_its_setting_cancels_first() {
        let set = RuleSet::new(vec![], Limits { replay_lag: 30 * SEC, idle: 60 * SEC, ..Limits::default() });
        let holder = Session { replay_held_since: NOW - 20 * SEC, ..client(1, State::Active, 0) };
        let v = set.verdict(&holder, "shop").unwrap();
        assert_eq!(v.rule.origin.label(), "session_kill.replay_lag_timeout");
        assert_eq!(
            (v.deadline, v.rule.action, v.rule.grace),
            (NOW + 10 * SEC, Action::CancelThenTerminate, 5 * SEC)
        );
        assert_eq!(governing(&set, &client(2, State::Active, 0)), None, "holds nothing back");
        assert_eq!(set.next_scan(NOW, None), Some(NOW + 60 * SEC), "replay lag is left to the watch");
        assert_eq!(set.replay_watch(), Some(100_000), "at most 100 ms");
        let exempt = RuleRow { role: "app".into(), priority: 10, ..row(3, "replay_lag", 3600) };
        let rows = rules(vec![exempt, row(4, "replay_lag", 2)], Limits::default());
        assert_eq!(
            governing(&rows, &holder),
            Some(("rule 3".into(), NOW + 3580 * SEC)),
            "exempted by priority"
        );
        assert_eq!(rows.replay_watch(), Some(100_000));
        let short = rules(vec![RuleRow { timeout: 20_000, ..row(5, "replay_lag", 1) }], Limits::default());
        assert_eq!(short.replay_watch(), Some(5_000), "at least 5 ms");
        assert_eq!(
            Measure::ReplayLag.told("2.0 s", &holder),
            "holding back replay on this standby for 2.0 s"
        );
        assert_eq!(rules(vec![row(1, "idle", 5)], Limits::default()).replay_watch(), None);
    }

    #[test]
    fn published_rows_come_back_as_they_went_in() {
        let rows = vec![
            RuleRow { client_addr: Some("10.0.0.0/8".into()), role: "r".repeat(63), ..row(1, "idle", 10) },
            row(2, "active", 60),
        ];
        let mut published = Box::<PublishedRules>::default();
        assert_eq!(published.publish(&rows), 2);
        assert_eq!(published.rows(), rows);
        let many: Vec<RuleRow> = (0..300).map(|i| row(i, "idle", 10)).collect();
        assert_eq!(published.publish(&many), MAX_RULES);
        assert_eq!(published.publish(&[]), 0);
        assert!(published.rows().is_empty());
    }
}
