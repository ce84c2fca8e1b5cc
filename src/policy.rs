//! Pure decisions about sessions: does a session match a filter, is it protected and why, what
//! happened to it. No pgrx types and no server calls, so everything here is unit-tested with
//! plain `cargo test`.
//!
//! Timestamps are PostgreSQL `TimestampTz` values (microseconds since 2000-01-01); 0 means unset,
//! as in the server's backend status entries.

pub use crate::xmin_hold::Xmin;
use std::fmt;
use std::net::IpAddr;

/// Microseconds, the unit of PostgreSQL timestamps and intervals.
pub type Micros = i64;

/// What kind of process a backend is. Only `Client` sessions are ever signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Client,
    Autovacuum,
    /// A walsender connected to a database (`replication=database`, logical replication): it can
    /// run SQL there, and `DROP DATABASE` waits for it like for a client.
    LogicalReplication,
    Replication,
    BackgroundWorker,
    System,
}

/// A backend's state, as `pg_stat_activity.state` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Active,
    Idle,
    IdleInTransaction,
    IdleInTransactionAborted,
    FastpathFunctionCall,
    Disabled,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Active,
        State::Idle,
        State::IdleInTransaction,
        State::IdleInTransactionAborted,
        State::FastpathFunctionCall,
        State::Disabled,
    ];

    pub fn label(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Idle => "idle",
            State::IdleInTransaction => "idle in transaction",
            State::IdleInTransactionAborted => "idle in transaction (aborted)",
            State::FastpathFunctionCall => "fastpath function call",
            State::Disabled => "disabled",
        }
    }

    /// Waiting for the client: the states `min_idle` measures.
    pub fn is_idle(self) -> bool {
        matches!(self, State::Idle | State::IdleInTransaction | State::IdleInTransactionAborted)
    }

    /// Running a query or function call: the states a cancel applies to.
    pub fn is_running(self) -> bool {
        matches!(self, State::Active | State::FastpathFunctionCall)
    }

    pub fn parse(text: &str) -> Result<State, InputError> {
        parse_label(text, &State::ALL, State::label, "session state", "states")
    }
}

/// What `kill_sessions` does to the sessions it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Cancel,
    Terminate,
    CancelThenTerminate,
    DryRun,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Cancel, Mode::Terminate, Mode::CancelThenTerminate, Mode::DryRun];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Cancel => "cancel",
            Mode::Terminate => "terminate",
            Mode::CancelThenTerminate => "cancel_then_terminate",
            Mode::DryRun => "dry_run",
        }
    }

    pub fn parse(text: &str) -> Result<Mode, InputError> {
        parse_label(text, &Mode::ALL, Mode::label, "mode", "modes")
    }
}

/// Finds the value whose label is `text` (case-insensitive); the error hint lists every label.
pub(crate) fn parse_label<T: Copy>(
    text: &str,
    all: &[T],
    label: fn(T) -> &'static str,
    what: &str,
    plural: &str,
) -> Result<T, InputError> {
    let wanted = text.trim().to_ascii_lowercase();
    all.iter().copied().find(|v| label(*v) == wanted).ok_or_else(|| {
        let valid: Vec<&str> = all.iter().map(|v| label(*v)).collect();
        InputError::invalid(
            format!("invalid {what} \"{text}\""),
            format!("Valid {plural} are: {}.", valid.join(", ")),
        )
    })
}

/// Bad input to a SQL function, reported as ERROR 22023 (invalid_parameter_value) by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub message: String,
    pub hint: String,
}

impl InputError {
    pub fn invalid(message: impl Into<String>, hint: impl Into<String>) -> Self {
        InputError { message: message.into(), hint: hint.into() }
    }
}

/// An interval argument must be a non-negative duration.
pub fn non_negative(name: &str, micros: i128) -> Result<Micros, InputError> {
    if micros < 0 {
        return Err(InputError::invalid(
            format!("{name} must not be negative"),
            format!("Pass a duration of zero or more, such as '5min', for {name}."),
        ));
    }
    Micros::try_from(micros).map_err(|_| {
        InputError::invalid(format!("{name} is out of range"), "Pass a duration shorter than 290,000 years.")
    })
}

/// An IPv4 or IPv6 network, as PostgreSQL's `cidr` type prints it (`10.0.0.0/8`, `::1/128`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, InputError> {
        let malformed = || {
            InputError::invalid(
                format!("invalid network \"{text}\""),
                "Write a network in CIDR notation, such as '10.0.0.0/8' or '::1/128'.",
            )
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr.trim().parse().map_err(|_| malformed())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(malformed)?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }

    /// Same address family and the first `prefix` bits equal, like PostgreSQL's `<<=`.
    pub fn contains(&self, addr: IpAddr) -> bool {
        fn prefix_equal(a: &[u8], b: &[u8], bits: u8) -> bool {
            let whole = usize::from(bits / 8);
            let rest = bits % 8;
            a[..whole] == b[..whole] && (rest == 0 || (a[whole] ^ b[whole]) & (0xffu8 << (8 - rest)) == 0)
        }
        match (self.network, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_equal(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_equal(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

/// A SQL `LIKE` pattern: `%` any run of characters, `_` one character, `\` escapes the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LikePattern {
    tokens: Vec<LikeToken>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LikeToken {
    AnyRun,
    AnyOne,
    Literal(char),
}

impl LikePattern {
    pub fn parse(pattern: &str) -> Result<LikePattern, InputError> {
        let mut tokens = Vec::new();
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '%' => LikeToken::AnyRun,
                '_' => LikeToken::AnyOne,
                '\\' => LikeToken::Literal(chars.next().ok_or_else(|| {
                    InputError::invalid(
                        format!("invalid pattern \"{pattern}\""),
                        "A LIKE pattern must not end with the escape character \\; write \\\\ for a literal backslash.",
                    )
                })?),
                other => LikeToken::Literal(other),
            });
        }
        Ok(LikePattern { tokens })
    }

    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        // Classic wildcard matching with backtracking to the last `%`: linear in practice.
        let (mut t, mut p) = (0, 0);
        let mut resume: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.tokens.get(p) {
                Some(LikeToken::AnyRun) => {
                    resume = Some((p, t));
                    p += 1;
                }
                Some(LikeToken::AnyOne) => {
                    p += 1;
                    t += 1;
                }
                Some(LikeToken::Literal(c)) if *c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match resume {
                    Some((rp, rt)) => {
                        p = rp + 1;
                        t = rt + 1;
                        resume = Some((rp, rt + 1));
                    }
                    None => return false,
                },
            }
        }
        self.tokens[p..].iter().all(|tok| *tok == LikeToken::AnyRun)
    }
}

/// One backend as read from the server, with the facts the policy needs already resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub pid: i32,
    pub backend_start: Micros,
    pub kind: BackendKind,
    pub database_oid: u32,
    pub role: Option<String>,
    pub application: String,
    pub client: Option<IpAddr>,
    pub state: Option<State>,
    pub state_change: Micros,
    pub xact_start: Micros,
    pub query_start: Micros,
    /// The session is the caller's own backend.
    pub is_own: bool,
    /// The session's role is a superuser (or it advertises no role, which PostgreSQL treats alike).
    pub is_superuser: bool,
    /// The caller may signal this backend by PostgreSQL's own rules (see `signal::may_signal`).
    pub caller_may_signal: bool,
    /// When the longest-waiting of the sessions it holds up in the lock manager began to wait, if
    /// it holds any up and waits for no lock itself; 0 otherwise, or when not looked up.
    pub blocking_since: Micros,
    /// On a hot standby, since when the session has held back replay (see `replay.rs`); 0 when
    /// it does not, or when not looked up.
    pub replay_held_since: Micros,
    /// The oldest xmin of the snapshots it holds (`backend_xmin`), with its age.
    pub xmin: Option<Xmin>,
    /// Since when that xmin has held back the horizon (see `xmin_hold.rs`); 0 without one, or
    /// when not looked up.
    pub xmin_since: Micros,
}

impl Session {
    /// How long the session has been waiting for its client; `None` unless idle.
    pub fn idle_for(&self, now: Micros) -> Option<Micros> {
        match self.state {
            Some(s) if s.is_idle() && self.state_change != 0 => Some((now - self.state_change).max(0)),
            _ => None,
        }
    }

    /// Age of the open transaction; `None` outside a transaction.
    pub fn xact_age(&self, now: Micros) -> Option<Micros> {
        (self.xact_start != 0).then(|| (now - self.xact_start).max(0))
    }

    /// How long its xmin has held back the horizon; `None` without an xmin or when unknown.
    pub fn xmin_held_for(&self, now: Micros) -> Option<Micros> {
        (self.xmin.is_some() && self.xmin_since != 0).then(|| (now - self.xmin_since).max(0))
    }

    /// `pid 42 (database shop, user app, application "psql", state idle)`, for log lines and
    /// error details.
    pub fn describe(&self, database: Option<&str>) -> String {
        format!(
            "pid {} ({}user {}, application \"{}\", state {})",
            self.pid,
            database.map(|d| format!("database {}, ", escape(d))).unwrap_or_default(),
            escape(self.role.as_deref().unwrap_or("?")),
            escape(&self.application),
            // No state yet: a login still starting up.
            self.state.map_or("starting", State::label)
        )
    }

    /// The same backend process: PIDs are reused, a PID plus its start time is not.
    pub fn same_backend(&self, other: &Session) -> bool {
        self.pid == other.pid && self.backend_start == other.backend_start
    }
}

/// A duration as a person reads it, to a tenth of a second: `15min 0.4s`, `2h 0min 5.0s`, `0.3s`.
pub fn duration_text(micros: Micros) -> String {
    let tenths = micros.max(0) / 100_000;
    let (hours, minutes, seconds) = (tenths / 36_000, tenths / 600 % 60, tenths % 600);
    let seconds = format!("{}.{}s", seconds / 10, seconds % 10);
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, m) => format!("{m}min {seconds}"),
        (h, m) => format!("{h}h {m}min {seconds}"),
    }
}

/// Text from users (names, reasons) made safe for a log line: control characters are written as
/// escapes (`\n`, `\x1b`), so nobody can start a forged line.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| match c {
            '\n' => "\\n".to_owned(),
            '\r' => "\\r".to_owned(),
            '\t' => "\\t".to_owned(),
            c if c.is_control() => format!("\\x{:02x}", u32::from(c)),
            c => c.to_string(),
        })
        .collect::<String>()
        .into()
}

/// Why a session is not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    OwnSession,
    Autovacuum,
    Replication,
    BackgroundWorker,
    SystemProcess,
    Superuser,
    ProtectedRole,
    ProtectedApplication,
    PermissionDenied,
}

impl Protection {
    pub fn label(self) -> &'static str {
        match self {
            Protection::OwnSession => "own session",
            Protection::Autovacuum => "autovacuum",
            Protection::Replication => "replication",
            Protection::BackgroundWorker => "background worker",
            Protection::SystemProcess => "system process",
            Protection::Superuser => "superuser",
            Protection::ProtectedRole => "protected role",
            Protection::ProtectedApplication => "protected application",
            Protection::PermissionDenied => "permission denied",
        }
    }
}

/// The protections in force for one call: settings plus the caller's explicit choices.
#[derive(Debug, Clone, Default)]
pub struct Protections {
    /// `session_kill.protected_roles`: exact role names.
    pub roles: Vec<String>,
    /// `session_kill.protected_applications`: `LIKE` patterns on `application_name`.
    pub applications: Vec<LikePattern>,
    /// A superuser caller asked to include superuser sessions.
    pub include_superusers: bool,
    /// Logical replication connections count as sessions of their database (a drain).
    pub logical_replication: bool,
}

impl Protections {
    /// Parses the comma-separated settings; an unparsable application pattern protects by
    /// exact name, so a typo never unprotects anything.
    pub fn from_settings(roles: &str, applications: &str, include_superusers: bool) -> Protections {
        let items = |list: &str| -> Vec<String> {
            list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
        };
        Protections {
            roles: items(roles),
            applications: items(applications)
                .iter()
                .map(|p| {
                    LikePattern::parse(p).unwrap_or_else(|_| LikePattern {
                        tokens: p.chars().map(LikeToken::Literal).collect(),
                    })
                })
                .collect(),
            include_superusers,
            logical_replication: false,
        }
    }

    /// The reason `session` must not be signalled, most fundamental first; `None` when it may be.
    pub fn protection(&self, session: &Session) -> Option<Protection> {
        if session.is_own {
            return Some(Protection::OwnSession);
        }
        match session.kind {
            BackendKind::Client => {}
            BackendKind::LogicalReplication if self.logical_replication => {}
            BackendKind::Autovacuum => return Some(Protection::Autovacuum),
            BackendKind::LogicalReplication => return Some(Protection::Replication),
            BackendKind::Replication => return Some(Protection::Replication),
            BackendKind::BackgroundWorker => return Some(Protection::BackgroundWorker),
            BackendKind::System => return Some(Protection::SystemProcess),
        }
        if session.is_superuser && !self.include_superusers {
            return Some(Protection::Superuser);
        }
        if let Some(role) = &session.role {
            if self.roles.iter().any(|r| r == role) {
                return Some(Protection::ProtectedRole);
            }
        }
        if self.applications.iter().any(|p| p.matches(&session.application)) {
            return Some(Protection::ProtectedApplication);
        }
        if !session.caller_may_signal {
            return Some(Protection::PermissionDenied);
        }
        None
    }
}

/// Which databases a call covers: one, or all of them as an explicit choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseScope {
    One(u32),
    All,
}

/// The session filters of `kill_sessions`; every given filter must hold.
#[derive(Debug, Clone)]
pub struct Filter {
    pub database: DatabaseScope,
    pub min_idle: Micros,
    pub role: Option<String>,
    pub application: Option<LikePattern>,
    pub client: Option<Cidr>,
    pub states: Option<Vec<State>>,
    /// Only sessions where a chain of lock waits begins, whose longest victim has waited at
    /// least this long (see `Session::blocking_since`).
    pub blocking: Option<Micros>,
    /// Logical replication connections match too (a drain).
    pub logical_replication: bool,
}

impl Filter {
    /// Client sessions only (and logical replication connections when asked for): other
    /// backends are never "sessions of a database" here.
    pub fn matches(&self, s: &Session, now: Micros) -> bool {
        (s.kind == BackendKind::Client
            || (s.kind == BackendKind::LogicalReplication && self.logical_replication))
            && match self.database {
                DatabaseScope::One(oid) => s.database_oid == oid,
                DatabaseScope::All => s.database_oid != 0,
            }
            && (self.min_idle == 0 || s.idle_for(now).is_some_and(|idle| idle >= self.min_idle))
            && self.role.as_ref().is_none_or(|r| s.role.as_ref() == Some(r))
            && self.application.as_ref().is_none_or(|p| p.matches(&s.application))
            && self.client.as_ref().is_none_or(|c| s.client.is_some_and(|a| c.contains(a)))
            && self.states.as_ref().is_none_or(|st| s.state.is_some_and(|x| st.contains(&x)))
            && self.blocking.is_none_or(|b| s.blocking_since != 0 && now - s.blocking_since >= b)
    }

    /// The filter looks at what `pg_stat_activity` hides from callers without the privileges of
    /// a session's role (its state, idle time, client address): such a filter must not match a
    /// session the caller may not see, or a dry run would reveal those facts.
    pub fn uses_hidden_facts(&self) -> bool {
        self.min_idle > 0 || self.client.is_some() || self.states.is_some()
    }

    /// Just before signalling: is this still the session that was chosen, and does it still match?
    pub fn recheck(&self, chosen: &Session, fresh: Option<&Session>, now: Micros) -> Recheck {
        match fresh {
            Some(f) if f.same_backend(chosen) => {
                if self.matches(f, now) {
                    Recheck::Proceed
                } else if f.state == Some(State::Active) && chosen.state != Some(State::Active) {
                    Recheck::BecameActive
                } else {
                    Recheck::NoLongerMatches
                }
            }
            _ => Recheck::Gone,
        }
    }
}

/// The result of re-checking a chosen session right before signalling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recheck {
    Proceed,
    Gone,
    BecameActive,
    NoLongerMatches,
}

/// What became of one session, as reported in `kill_sessions`' `outcome` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Signalled with SIGTERM and gone from the server.
    Terminated,
    /// Its running query was cancelled; the session stays connected.
    Cancelled,
    /// Cancelled, then it disconnected on its own within `grace`.
    ExitedAfterCancel,
    /// Signalled, but still there (or still running its query) when `wait` ran out.
    StillRunningAfterWait,
    /// Signalled without waiting (`wait => '0'`).
    Signalled,
    /// Gone (or replaced by another backend with the same PID) before it was signalled.
    AlreadyGone,
    BecameActive,
    NoLongerMatches,
    /// `cancel` mode on a session that was not running a query.
    NoQueryToCancel,
    Protected(Protection),
    /// The operating system refused the signal.
    SignalFailed,
    DryRun,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Terminated => f.write_str("terminated"),
            Outcome::Cancelled => f.write_str("cancelled"),
            Outcome::ExitedAfterCancel => f.write_str("exited after cancel"),
            Outcome::StillRunningAfterWait => f.write_str("still running after wait"),
            Outcome::Signalled => f.write_str("signalled"),
            Outcome::AlreadyGone => f.write_str("already gone"),
            Outcome::BecameActive => f.write_str("skipped: became active"),
            Outcome::NoLongerMatches => f.write_str("skipped: no longer matches"),
            Outcome::NoQueryToCancel => f.write_str("skipped: no query to cancel"),
            Outcome::Protected(p) => write!(f, "skipped: {}", p.label()),
            Outcome::SignalFailed => f.write_str("signal failed"),
            Outcome::DryRun => f.write_str("dry run"),
        }
    }
}

impl From<Recheck> for Outcome {
    fn from(r: Recheck) -> Outcome {
        match r {
            Recheck::Proceed => {
                unreachable!("a session that passed its re-check has no outcome yet")
            }
            Recheck::Gone => Outcome::AlreadyGone,
            Recheck::BecameActive => Outcome::BecameActive,
            Recheck::NoLongerMatches => Outcome::NoLongerMatches,
        }
    }
}

/// The pressure reaper's choice when `count` client sessions exceed `threshold`: the longest-idle
/// unprotected sessions, idle in transaction first (they hold locks and snapshots), each group
/// oldest first, as many as it takes to get back to the threshold. Running sessions are never
/// chosen.
pub fn pressure_victims<'a>(
    sessions: &[&'a Session],
    count: usize,
    threshold: usize,
    protections: &Protections,
) -> Vec<&'a Session> {
    let excess = count.saturating_sub(threshold);
    let mut candidates: Vec<&'a Session> = sessions
        .iter()
        .copied()
        .filter(|s| s.state.is_some_and(State::is_idle) && protections.protection(s).is_none())
        .collect();
    candidates.sort_by_key(|s| {
        (
            s.state != Some(State::IdleInTransaction) && s.state != Some(State::IdleInTransactionAborted),
            s.state_change,
        )
    });
    candidates.truncate(excess);
    candidates
}

/// Is the query that was running when a cancel was sent still running?
pub fn query_still_running(cancelled: &Session, fresh: Option<&Session>) -> bool {
    fresh.is_some_and(|f| {
        f.same_backend(cancelled)
            && f.state.is_some_and(State::is_running)
            && f.query_start == cancelled.query_start
    })
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub const SEC: Micros = 1_000_000;
    pub const NOW: Micros = 1_000 * SEC;

    /// A client session of role app in database 16384, `idle_secs` in `state`.
    pub fn client(pid: i32, state: State, idle_secs: i64) -> Session {
        Session {
            pid,
            backend_start: 10 * SEC,
            kind: BackendKind::Client,
            database_oid: 16384,
            role: Some("app".into()),
            application: "psql".into(),
            client: Some("10.1.2.3".parse().unwrap()),
            state: Some(state),
            state_change: NOW - idle_secs * SEC,
            xact_start: 0,
            query_start: NOW - idle_secs * SEC - SEC,
            is_own: false,
            is_superuser: false,
            caller_may_signal: true,
            blocking_since: 0,
            replay_held_since: 0,
            xmin: None,
            xmin_since: 0,
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn durations_read_like_a_person_writes_them() {
        assert_eq!(duration_text(900_400_000), "15min 0.4s");
        assert_eq!(duration_text(7_205_000_000), "2h 0min 5.0s");
        assert_eq!(duration_text(349_999), "0.3s");
        assert_eq!(duration_text(-5), "0.0s");
    }
    use super::*;
    use test_support::*;

    fn filter() -> Filter {
        Filter {
            database: DatabaseScope::One(16384),
            min_idle: 0,
            role: None,
            application: None,
            client: None,
            states: None,
            blocking: None,
            logical_replication: false,
        }
    }

    #[test]
    fn modes_and_states_parse_case_insensitively_and_list_valid_values() {
        assert_eq!(Mode::parse("Cancel_Then_Terminate").unwrap(), Mode::CancelThenTerminate);
        let err = Mode::parse("kill").unwrap_err();
        assert_eq!(err.message, "invalid mode \"kill\"");
        assert_eq!(err.hint, "Valid modes are: cancel, terminate, cancel_then_terminate, dry_run.");
        assert_eq!(State::parse("idle in transaction").unwrap(), State::IdleInTransaction);
        let err = State::parse("sleeping").unwrap_err();
        assert!(err.hint.contains("idle in transaction (aborted)"), "{}", err.hint);
    }

    #[test]
    fn negative_intervals_are_rejected() {
        assert_eq!(non_negative("min_idle", 0).unwrap(), 0);
        assert_eq!(non_negative("wait", 5 * SEC as i128).unwrap(), 5 * SEC);
        assert_eq!(non_negative("grace", -1).unwrap_err().message, "grace must not be negative");
    }

    #[test]
    fn cidr_parses_and_contains_like_postgres() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains("10.200.1.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::ffff:10.0.0.1".parse().unwrap()), "families never mix");
        let odd = Cidr::parse("192.168.0.0/23").unwrap();
        assert!(odd.contains("192.168.1.255".parse().unwrap()));
        assert!(!odd.contains("192.168.2.0".parse().unwrap()));
        assert!(Cidr::parse("::1/128").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains("127.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0/8", "nonsense", "::1/129", "10.0.0.0/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn like_patterns_match_as_in_sql() {
        let p = |s: &str| LikePattern::parse(s).unwrap();
        assert!(p("%").matches(""));
        assert!(p("pg\\_dump%").matches("pg_dump"));
        assert!(!p("pg\\_dump").matches("pgXdump"));
        assert!(p("pg_dump").matches("pgXdump"));
        assert!(p("worker-%-%").matches("worker-1-eu"));
        assert!(!p("worker-%-%").matches("worker-1"));
        assert!(p("%a%b%c").matches("xxaxxbxxbxc"));
        assert!(!p("abc").matches("abcd"));
        assert!(p("ünï_").matches("ünïç"));
        assert!(LikePattern::parse("bad\\").is_err());
    }

    #[test]
    fn min_idle_matches_only_sessions_idle_long_enough() {
        let f = Filter { min_idle: 60 * SEC, ..filter() };
        assert!(f.matches(&client(1, State::Idle, 61), NOW));
        assert!(f.matches(&client(1, State::IdleInTransaction, 60), NOW));
        assert!(!f.matches(&client(1, State::Idle, 59), NOW));
        assert!(!f.matches(&client(1, State::Active, 3600), NOW), "active sessions are not idle");
        assert!(filter().matches(&client(1, State::Active, 0), NOW), "min_idle 0 takes everything");
    }

    #[test]
    fn filters_combine() {
        let s = client(1, State::Idle, 5);
        let with = |f: Filter| f.matches(&s, NOW);
        assert!(with(Filter { role: Some("app".into()), ..filter() }));
        assert!(!with(Filter { role: Some("other".into()), ..filter() }));
        assert!(with(Filter { application: Some(LikePattern::parse("ps%").unwrap()), ..filter() }));
        assert!(with(Filter { client: Some(Cidr::parse("10.1.0.0/16").unwrap()), ..filter() }));
        assert!(!with(Filter { client: Some(Cidr::parse("10.2.0.0/16").unwrap()), ..filter() }));
        assert!(with(Filter { states: Some(vec![State::Active, State::Idle]), ..filter() }));
        assert!(!with(Filter { states: Some(vec![State::IdleInTransaction]), ..filter() }));
        assert!(!with(Filter { database: DatabaseScope::One(1), ..filter() }));
        assert!(with(Filter { database: DatabaseScope::All, ..filter() }));
        let local = Session { client: None, ..s.clone() };
        assert!(!Filter { client: Some(Cidr::parse("0.0.0.0/0").unwrap()), ..filter() }.matches(&local, NOW));
        let worker = Session { kind: BackendKind::BackgroundWorker, ..s.clone() };
        assert!(!filter().matches(&worker, NOW), "only client sessions match");
        let logical = Session { kind: BackendKind::LogicalReplication, ..s };
        assert!(!filter().matches(&logical, NOW), "replication only when asked for");
        assert!(Filter { logical_replication: true, ..filter() }.matches(&logical, NOW));
        let blocking = Session { blocking_since: NOW - 30 * SEC, ..client(9, State::IdleInTransaction, 60) };
        assert!(Filter { blocking: Some(30 * SEC), ..filter() }.matches(&blocking, NOW));
        assert!(!Filter { blocking: Some(31 * SEC), ..filter() }.matches(&blocking, NOW));
        assert!(
            !Filter { blocking: Some(0), ..filter() }.matches(&client(10, State::IdleInTransaction, 60), NOW)
        );
    }

    #[test]
    fn protection_reasons_in_order() {
        let p = Protections::from_settings("backup, monitor", "pg_dump,pgbackrest%", false);
        let s = client(1, State::Idle, 1);
        assert_eq!(p.protection(&s), None);
        assert_eq!(p.protection(&Session { is_own: true, ..s.clone() }), Some(Protection::OwnSession));
        assert_eq!(
            p.protection(&Session { kind: BackendKind::Autovacuum, ..s.clone() }),
            Some(Protection::Autovacuum)
        );
        assert_eq!(
            p.protection(&Session { kind: BackendKind::Replication, ..s.clone() }),
            Some(Protection::Replication)
        );
        let logical = Session { kind: BackendKind::LogicalReplication, ..s.clone() };
        assert_eq!(p.protection(&logical), Some(Protection::Replication));
        let draining = Protections { logical_replication: true, ..p.clone() };
        assert_eq!(draining.protection(&logical), None, "a drain ends logical replication connections");
        assert_eq!(
            draining.protection(&Session { kind: BackendKind::Replication, ..s.clone() }),
            Some(Protection::Replication),
            "never physical replication"
        );
        let su = Session { is_superuser: true, caller_may_signal: false, ..s.clone() };
        assert_eq!(p.protection(&su), Some(Protection::Superuser));
        let p_su = Protections { include_superusers: true, ..p.clone() };
        assert_eq!(p_su.protection(&Session { caller_may_signal: true, ..su.clone() }), None);
        assert_eq!(p_su.protection(&su), Some(Protection::PermissionDenied));
        assert_eq!(
            p.protection(&Session { role: Some("monitor".into()), ..s.clone() }),
            Some(Protection::ProtectedRole)
        );
        assert_eq!(
            p.protection(&Session { application: "pgbackrest-archive".into(), ..s.clone() }),
            Some(Protection::ProtectedApplication)
        );
        assert_eq!(
            p.protection(&Session { caller_may_signal: false, ..s }),
            Some(Protection::PermissionDenied)
        );
    }

    #[test]
    fn malformed_protected_application_still_protects_by_name() {
        let p = Protections::from_settings("", "odd\\", false);
        let s = Session { application: "odd\\".into(), ..client(1, State::Idle, 1) };
        assert_eq!(p.protection(&s), Some(Protection::ProtectedApplication));
    }

    #[test]
    fn recheck_detects_replacement_activity_and_drift() {
        let f = Filter { min_idle: 60 * SEC, ..filter() };
        let chosen = client(7, State::Idle, 120);
        assert_eq!(f.recheck(&chosen, Some(&chosen), NOW), Recheck::Proceed);
        assert_eq!(f.recheck(&chosen, None, NOW), Recheck::Gone);
        let reused_pid = Session { backend_start: 99 * SEC, ..chosen.clone() };
        assert_eq!(f.recheck(&chosen, Some(&reused_pid), NOW), Recheck::Gone);
        let active = Session { state: Some(State::Active), state_change: NOW, ..chosen.clone() };
        assert_eq!(f.recheck(&chosen, Some(&active), NOW), Recheck::BecameActive);
        let briefly_active = Session { state_change: NOW - SEC, ..chosen.clone() };
        assert_eq!(f.recheck(&chosen, Some(&briefly_active), NOW), Recheck::NoLongerMatches);
        assert_eq!(Outcome::from(Recheck::BecameActive).to_string(), "skipped: became active");
    }

    #[test]
    fn idle_for_and_xact_age() {
        let s = Session { xact_start: NOW - 30 * SEC, ..client(1, State::IdleInTransaction, 20) };
        assert_eq!(s.idle_for(NOW), Some(20 * SEC));
        assert_eq!(s.xact_age(NOW), Some(30 * SEC));
        let active = client(1, State::Active, 20);
        assert_eq!(active.idle_for(NOW), None);
        assert_eq!(active.xact_age(NOW), None);
    }

    #[test]
    fn control_characters_are_escaped_for_logs() {
        assert_eq!(escape("shop"), "shop");
        assert_eq!(escape("a\nFATAL: b\r\t\u{1b}"), "a\\nFATAL: b\\r\\t\\x1b");
        let forged = Session { role: Some("x\nLOG: y".into()), ..client(1, State::Idle, 1) };
        assert!(!forged.describe(Some("db\nLOG: z")).contains('\n'));
    }

    #[test]
    fn filters_on_hidden_facts_are_known() {
        assert!(!filter().uses_hidden_facts());
        assert!(Filter { min_idle: 1, ..filter() }.uses_hidden_facts());
        assert!(Filter { states: Some(vec![State::Idle]), ..filter() }.uses_hidden_facts());
        assert!(Filter { client: Some(Cidr::parse("10.0.0.0/8").unwrap()), ..filter() }.uses_hidden_facts());
        assert!(!Filter { role: Some("app".into()), ..filter() }.uses_hidden_facts());
    }

    #[test]
    fn sessions_describe_themselves_for_logs() {
        assert_eq!(
            client(42, State::Idle, 1).describe(Some("shop")),
            "pid 42 (database shop, user app, application \"psql\", state idle)"
        );
        let starting = Session { role: None, state: None, ..client(7, State::Idle, 1) };
        assert_eq!(starting.describe(None), "pid 7 (user ?, application \"psql\", state starting)");
    }

    #[test]
    fn cancelled_query_detection() {
        let running = client(3, State::Active, 0);
        assert!(query_still_running(&running, Some(&running)));
        let next_query = Session { query_start: running.query_start + 1, ..running.clone() };
        assert!(!query_still_running(&running, Some(&next_query)));
        let idle = Session { state: Some(State::Idle), ..running.clone() };
        assert!(!query_still_running(&running, Some(&idle)));
        assert!(!query_still_running(&running, None));
    }

    #[test]
    fn outcome_labels() {
        assert_eq!(Outcome::Protected(Protection::Superuser).to_string(), "skipped: superuser");
        assert_eq!(Outcome::StillRunningAfterWait.to_string(), "still running after wait");
    }

    #[test]
    fn pressure_takes_idle_in_transaction_first_then_the_longest_idle() {
        let p = Protections::from_settings("", "pg_dump", false);
        let sessions = [
            client(1, State::Idle, 100),
            client(2, State::IdleInTransaction, 5),
            client(3, State::Active, 500),
            client(4, State::Idle, 300),
            client(5, State::IdleInTransactionAborted, 50),
            Session { application: "pg_dump".into(), ..client(6, State::Idle, 900) },
            Session { is_superuser: true, ..client(7, State::Idle, 800) },
        ];
        let refs: Vec<&Session> = sessions.iter().collect();
        let pids = |n: usize, threshold: usize| -> Vec<i32> {
            pressure_victims(&refs, n, threshold, &p).iter().map(|s| s.pid).collect()
        };
        assert_eq!(pids(7, 7), Vec::<i32>::new(), "at the threshold nothing happens");
        assert_eq!(pids(7, 4), vec![5, 2, 4], "oldest idle-in-transaction first, then the longest idle");
        assert_eq!(pids(7, 0), vec![5, 2, 4, 1], "never running, protected or superuser sessions");
    }
}
