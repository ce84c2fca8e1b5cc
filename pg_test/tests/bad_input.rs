//! The bad-input matrix: every SQL function, argument, rules column and setting, given NULL,
//! empty, over-long, extreme, infinite (PG 17+) and non-UTF-8 values (in a SQL_ASCII database).
//! Each bad value is an ERROR with a SQLSTATE, a PostgreSQL-style message (not capitalised, no
//! trailing period), and a detail and hint written as sentences; an extreme but valid value is
//! accepted (in dry run, or in a transaction that is rolled back). The backend survives every
//! case, and nothing is ever signalled: idle and idle-in-transaction sessions in both databases
//! stay connected, the server log has no `session_kill: sent` line, `session_kill.log` has no
//! signalled row and `session_kill.stats` counts no action.

use postgres::Client;
use session_kill_pg_test::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;
use std::time::Duration;

/// Who runs a case, and where.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// The superuser `postgres`, in database `postgres` (where session_kill.rules is enforced).
    Admin,
    /// `plain`: EXECUTE on the functions, no other privilege; in database `postgres`.
    Plain,
    /// The superuser `postgres`, in the SQL_ASCII database.
    AdminAscii,
}

enum Expect {
    /// ERROR with this SQLSTATE and message. The message ends with `…` when only its start is
    /// checked (PostgreSQL's own wording of the rest differs between majors). The hint must
    /// contain `hint` (empty: PostgreSQL's own error, whose hint, if any, must be a sentence).
    Error { code: &'static str, message: String, hint: &'static str },
    /// Accepted: an extreme but valid value.
    Accepted,
}

struct Case {
    group: &'static str,
    caller: Caller,
    sql: String,
    expect: Expect,
}

/// The cases of one group, all run by the same caller.
struct Group {
    name: &'static str,
    caller: Caller,
    cases: Vec<Case>,
}

impl Group {
    fn new(name: &'static str, caller: Caller) -> Group {
        Group { name, caller, cases: Vec::new() }
    }

    fn error(
        &mut self,
        sql: impl Into<String>,
        code: &'static str,
        message: impl Into<String>,
        hint: &'static str,
    ) {
        let expect = Expect::Error { code, message: message.into(), hint };
        self.cases.push(Case { group: self.name, caller: self.caller, sql: sql.into(), expect });
    }

    fn accepted(&mut self, sql: impl Into<String>) {
        self.cases.push(Case {
            group: self.name,
            caller: self.caller,
            sql: sql.into(),
            expect: Expect::Accepted,
        });
    }
}

const DB: &str = "t_bad_input";
const ASCII_DB: &str = "t_bad_ascii";
/// A role whose name is not UTF-8: `r` and the byte 0xff.
const HIGH_BYTE_ROLE: &[u8] = b"r\xff";

const NULL_VALUE: &str = "22004";
const INVALID_VALUE: &str = "22023";
const BAD_SYNTAX: &str = "22P02";
const NOT_UTF8: &str = "22021";
const NO_DATABASE: &str = "3D000";
const NO_ROLE: &str = "42704";
const DENIED: &str = "42501";
const CANT_CHANGE_NOW: &str = "55P02";
const NOT_NULL_VIOLATION: &str = "23502";

const DURATION_HINT: &str = "Pass a duration of zero or more";
const OUT_OF_RANGE_HINT: &str = "Pass a duration shorter than 290,000 years.";
const STATES_HINT: &str = "Valid states are: active, idle, idle in transaction,";
const RULE_COLUMN_HINT: &str = "Rules' text columns hold at most 63 bytes, like PostgreSQL names.";
const NOT_UTF8_HINT: &str = "Give names, patterns and reasons in UTF-8";

fn kill_sql(args: &str) -> String {
    format!("SELECT * FROM session_kill.kill_sessions({args})")
}

/// `kill_sessions` of the test database in dry run, with `args` added.
fn dry_run(args: &str) -> String {
    kill_sql(&format!("'{DB}', 'dry_run', {args}"))
}

fn kill_sessions_cases(infinite_intervals: bool) -> Group {
    let mut g = Group::new("kill_sessions", Caller::Admin);
    let db = |args: &str| kill_sql(&format!("'{DB}', {args}"));
    // db and all_databases
    g.error(kill_sql("NULL"), NULL_VALUE, "db must not be null", "all_databases => true");
    g.error(kill_sql("'no_such_db'"), NO_DATABASE, "database \"no_such_db\" does not exist", "pg_database");
    g.error(kill_sql("''"), NO_DATABASE, "database \"\" does not exist", "pg_database");
    // A name is cut to 63 bytes, as PostgreSQL cuts every name.
    g.error(
        kill_sql("repeat('d', 100000)"),
        NO_DATABASE,
        format!("database \"{}\" does not exist", "d".repeat(63)),
        "pg_database",
    );
    g.error(
        db("all_databases => true"),
        INVALID_VALUE,
        "db and all_databases => true cannot be combined",
        "either",
    );
    g.error(db("all_databases => NULL"), NULL_VALUE, "all_databases must not be null", "true or false");
    // mode
    g.error(
        db("'nuke'"),
        INVALID_VALUE,
        "invalid mode \"nuke\"",
        "Valid modes are: cancel, terminate, cancel_then_terminate, dry_run.",
    );
    g.error(db("NULL"), NULL_VALUE, "mode must not be null", "Valid modes are");
    g.error(db("''"), INVALID_VALUE, "invalid mode \"\"", "Valid modes are");
    g.error(db("repeat('m', 100000)"), INVALID_VALUE, "mode is too long", "Valid modes are");
    // min_idle
    g.error(db("min_idle => '-5 min'"), INVALID_VALUE, "min_idle must not be negative", DURATION_HINT);
    g.error(
        db("min_idle => '-1 microsecond'"),
        INVALID_VALUE,
        "min_idle must not be negative",
        DURATION_HINT,
    );
    g.error(db("min_idle => NULL"), NULL_VALUE, "min_idle must not be null", "'0'");
    g.error(
        db("min_idle => '178000000 years'"),
        INVALID_VALUE,
        "min_idle is out of range",
        OUT_OF_RANGE_HINT,
    );
    g.error(
        db("min_idle => '1 month -31 days'"),
        INVALID_VALUE,
        "min_idle must not be negative",
        DURATION_HINT,
    );
    g.accepted(dry_run("min_idle => '1 microsecond'"));
    g.accepted(dry_run("min_idle => '106751991 days'"));
    // usename
    g.error(db("usename => 'nobody_here'"), NO_ROLE, "role \"nobody_here\" does not exist", "pg_roles");
    g.error(db("usename => ''"), NO_ROLE, "role \"\" does not exist", "pg_roles");
    g.error(
        db("usename => repeat('u', 100000)"),
        NO_ROLE,
        format!("role \"{}\" does not exist", "u".repeat(63)),
        "pg_roles",
    );
    // application_name: a LIKE pattern of at most 256 bytes
    g.error(
        db("application_name => 'oops\\'"),
        INVALID_VALUE,
        "invalid pattern \"oops\\\"",
        "escape character",
    );
    let long_pattern = "a".repeat(100_000);
    g.error(
        db(&format!("application_name => '{long_pattern}'")),
        INVALID_VALUE,
        "application_name pattern is too long",
        "Give at most 256 bytes.",
    );
    g.error(
        db("application_name => repeat('%', 257)"),
        INVALID_VALUE,
        "application_name pattern is too long",
        "Give at most 256 bytes.",
    );
    g.accepted(dry_run("application_name => repeat('%_', 128)"));
    g.accepted(dry_run("application_name => ''"));
    // client_addr: PostgreSQL's own cidr input
    g.error(
        db("client_addr => '10.0.0.300/8'"),
        BAD_SYNTAX,
        "invalid input syntax for type cidr: \"10.0.0.300/8\"",
        "",
    );
    g.error(db("client_addr => '10.0.0.1/8'"), BAD_SYNTAX, "invalid cidr value: \"10.0.0.1/8\"", "");
    g.error(db("client_addr => ''"), BAD_SYNTAX, "invalid input syntax for type cidr: \"\"", "");
    g.accepted(dry_run("client_addr => '::/0'"));
    // states: at most 64 elements, each a state's name
    g.error(
        db("states => '{idle,sleeping}'"),
        INVALID_VALUE,
        "invalid session state \"sleeping\"",
        STATES_HINT,
    );
    g.error(db("states => '{}'"), INVALID_VALUE, "states must not be empty", STATES_HINT);
    g.error(db("states => '{idle,NULL}'"), NULL_VALUE, "states element must not be null", STATES_HINT);
    g.error(db("states => '{\"\"}'"), INVALID_VALUE, "invalid session state \"\"", STATES_HINT);
    g.error(
        db("states => array_fill('idle'::text, ARRAY[65])"),
        INVALID_VALUE,
        "too many states",
        "Give at most 64 states.",
    );
    g.error(
        db("states => array_fill('idle'::text, ARRAY[1000000])"),
        INVALID_VALUE,
        "too many states",
        "Give at most 64 states.",
    );
    g.error(
        db("states => ARRAY['idle', repeat('s', 100000)]"),
        INVALID_VALUE,
        "states element is too long",
        STATES_HINT,
    );
    g.accepted(dry_run("states => array_fill('idle in transaction'::text, ARRAY[64])"));
    g.accepted(dry_run("states => '{{idle},{active}}'"));
    // grace and wait
    g.error(
        db("'cancel_then_terminate', grace => '-1s'"),
        INVALID_VALUE,
        "grace must not be negative",
        DURATION_HINT,
    );
    g.error(db("grace => NULL"), NULL_VALUE, "grace must not be null", "'5s'");
    g.error(db("blocking => '-1s'"), INVALID_VALUE, "blocking must not be negative", DURATION_HINT);
    g.error(db("grace => '178000000 years'"), INVALID_VALUE, "grace is out of range", OUT_OF_RANGE_HINT);
    g.error(db("wait => NULL"), NULL_VALUE, "wait must not be null", "'5s'");
    g.error(db("wait => '-1 microsecond'"), INVALID_VALUE, "wait must not be negative", DURATION_HINT);
    g.error(db("wait => '-178000000 years'"), INVALID_VALUE, "wait must not be negative", DURATION_HINT);
    g.accepted(dry_run("grace => '290000 years', wait => '1 microsecond'"));
    // include_superusers
    g.error(
        db("include_superusers => NULL"),
        NULL_VALUE,
        "include_superusers must not be null",
        "true or false",
    );
    // reason: at most 1024 bytes
    g.error(
        db("reason => repeat('r', 10000)"),
        INVALID_VALUE,
        "reason is too long",
        "Give at most 1024 bytes.",
    );
    g.error(
        db("reason => repeat('é', 513)"),
        INVALID_VALUE,
        "reason is too long",
        "Give at most 1024 bytes.",
    );
    g.accepted(dry_run("reason => repeat('r', 1024)"));
    g.accepted(dry_run("reason => E'two\\nlines'"));
    if infinite_intervals {
        g.error(db("min_idle => 'infinity'"), INVALID_VALUE, "min_idle is out of range", OUT_OF_RANGE_HINT);
        g.error(db("min_idle => '-infinity'"), INVALID_VALUE, "min_idle must not be negative", DURATION_HINT);
        g.error(db("grace => 'infinity'"), INVALID_VALUE, "grace is out of range", OUT_OF_RANGE_HINT);
        g.error(db("wait => 'infinity'"), INVALID_VALUE, "wait is out of range", OUT_OF_RANGE_HINT);
        g.error(db("wait => '-infinity'"), INVALID_VALUE, "wait must not be negative", DURATION_HINT);
    }
    g
}

/// What only a superuser may ask for, asked by `plain`.
fn unprivileged_cases() -> Group {
    let mut g = Group::new("unprivileged", Caller::Plain);
    g.error(
        kill_sql(&format!("'{DB}', 'dry_run', include_superusers => true")),
        DENIED,
        "permission denied to include superuser sessions",
        "Only superusers",
    );
    g.error(
        format!("SELECT * FROM session_kill.drain_database('{DB}', include_superusers => true)"),
        DENIED,
        "permission denied to include superuser sessions",
        "Only superusers",
    );
    g.error(
        format!("SELECT * FROM session_kill.drain_database('{DB}')"),
        DENIED,
        format!("must be owner of database {DB}"),
        "Only the owner of the database",
    );
    // Settings: session_kill's are set in postgresql.conf only.
    g.error(
        "ALTER SYSTEM SET session_kill.idle_timeout = '1min'",
        DENIED,
        "permission denied to set parameter \"session_kill.idle_timeout\"",
        "",
    );
    g.error(
        "SET session_kill.dry_run = on",
        CANT_CHANGE_NOW,
        "parameter \"session_kill.dry_run\" cannot be changed now",
        "",
    );
    g.error(
        "SELECT set_config('session_kill.idle_in_transaction_timeout', '0', true)",
        CANT_CHANGE_NOW,
        "parameter \"session_kill.idle_in_transaction_timeout\" cannot be changed now",
        "",
    );
    g
}

fn sessions_cases() -> Group {
    let mut g = Group::new("sessions", Caller::Admin);
    let sessions = |arg: &str| format!("SELECT count(*) FROM session_kill.sessions({arg})");
    g.error(sessions("'no_such_db'"), NO_DATABASE, "database \"no_such_db\" does not exist", "pg_database");
    g.error(sessions("''"), NO_DATABASE, "database \"\" does not exist", "pg_database");
    g.error(
        sessions("repeat('d', 100000)"),
        NO_DATABASE,
        format!("database \"{}\" does not exist", "d".repeat(63)),
        "pg_database",
    );
    g.accepted(sessions("NULL"));
    g
}

/// Every bad argument is refused before the gate closes or anything is signalled.
fn drain_cases(infinite_intervals: bool) -> Group {
    let mut g = Group::new("drain_database", Caller::Admin);
    let drain = |args: &str| format!("SELECT * FROM session_kill.drain_database({args})");
    let db = |args: &str| drain(&format!("'{DB}', {args}"));
    g.error(drain("NULL"), NULL_VALUE, "db must not be null", "Name the database to drain.");
    g.error(drain("'no_such_db'"), NO_DATABASE, "database \"no_such_db\" does not exist", "pg_database");
    g.error(drain("''"), NO_DATABASE, "database \"\" does not exist", "pg_database");
    g.error(
        drain("'postgres'"),
        "55006",
        "cannot drain the current database \"postgres\"",
        "Connect to another database",
    );
    g.error(db("timeout => NULL"), NULL_VALUE, "timeout must not be null", "'5s'");
    g.error(db("timeout => '-1s'"), INVALID_VALUE, "timeout must not be negative", DURATION_HINT);
    g.error(db("timeout => '178000000 years'"), INVALID_VALUE, "timeout is out of range", OUT_OF_RANGE_HINT);
    g.error(db("grace => NULL"), NULL_VALUE, "grace must not be null", "'5s'");
    g.error(db("grace => '-1 microsecond'"), INVALID_VALUE, "grace must not be negative", DURATION_HINT);
    g.error(
        db("include_superusers => NULL"),
        NULL_VALUE,
        "include_superusers must not be null",
        "true or false",
    );
    g.error(db("allow_superusers => NULL"), NULL_VALUE, "allow_superusers must not be null", "true or false");
    g.error(db("reopen_after => '-1s'"), INVALID_VALUE, "reopen_after must not be negative", DURATION_HINT);
    g.error(
        db("reopen_after => '101 years'"),
        INVALID_VALUE,
        "reopen_after is out of range",
        "Give a reopen_after of at most 100 years",
    );
    // Past the last timestamp: `now + reopen_after` would overflow.
    g.error(
        db("reopen_after => '106751991 days'"),
        INVALID_VALUE,
        "reopen_after is out of range",
        "Give a reopen_after of at most 100 years",
    );
    g.error(
        db("reopen_after => '178000000 years'"),
        INVALID_VALUE,
        "reopen_after is out of range",
        OUT_OF_RANGE_HINT,
    );
    if infinite_intervals {
        g.error(db("timeout => 'infinity'"), INVALID_VALUE, "timeout is out of range", OUT_OF_RANGE_HINT);
        g.error(db("grace => '-infinity'"), INVALID_VALUE, "grace must not be negative", DURATION_HINT);
        g.error(
            db("reopen_after => 'infinity'"),
            INVALID_VALUE,
            "reopen_after is out of range",
            OUT_OF_RANGE_HINT,
        );
    }
    g
}

fn undrain_cases() -> Group {
    let mut g = Group::new("undrain_database", Caller::Admin);
    g.error(
        "SELECT session_kill.undrain_database(NULL)",
        NULL_VALUE,
        "db must not be null",
        "Name the database to reopen.",
    );
    // Not drained: false, with a notice.
    g.accepted("SELECT session_kill.undrain_database('')");
    g.accepted("SELECT session_kill.undrain_database(repeat('d', 100000))");
    g.accepted(format!("SELECT session_kill.undrain_database('{DB}')"));
    g
}

/// Rows of session_kill.rules (in `postgres`, the database the worker reads), checked by the
/// table's trigger and constraints. A valid row is inserted disabled and rolled back.
fn rules_cases(infinite_intervals: bool) -> Group {
    let mut g = Group::new("rules", Caller::Admin);
    let insert = |columns: &str, values: &str| {
        format!(
            "BEGIN; INSERT INTO session_kill.rules (enabled, {columns}) VALUES (false, {values}); ROLLBACK"
        )
    };
    // state and timeout, given
    let row = |columns: &str, values: &str| {
        insert(&format!("state, timeout, {columns}"), &format!("'idle', '1h', {values}"))
    };
    let not_null = |column: &str| {
        format!("null value in column \"{column}\" of relation \"rules\" violates not-null constraint")
    };
    const RULE_STATES: &str =
        "Valid rule states are: idle, idle in transaction, transaction, active, blocking, snapshot, replay_lag.";
    // state
    g.error(
        insert("state, timeout", "'sleeping', '1h'"),
        INVALID_VALUE,
        "invalid rule state \"sleeping\"",
        RULE_STATES,
    );
    g.error(insert("state, timeout", "'', '1h'"), INVALID_VALUE, "invalid rule state \"\"", RULE_STATES);
    g.error(
        insert("state, timeout", "'snapshot xid age', '1h'"),
        INVALID_VALUE,
        "invalid rule state \"snapshot xid age\"",
        RULE_STATES,
    );
    g.error(insert("state, timeout", "NULL, '1h'"), NOT_NULL_VIOLATION, not_null("state"), "");
    g.error(insert("timeout", "'1h'"), NOT_NULL_VIOLATION, not_null("state"), "");
    g.error(
        insert("state, timeout", "repeat('i', 100000), '1h'"),
        INVALID_VALUE,
        "state is too long",
        RULE_COLUMN_HINT,
    );
    // timeout
    g.error(
        insert("state, timeout", "'idle', '0'"),
        INVALID_VALUE,
        "timeout must be positive",
        "set enabled to false",
    );
    g.error(
        insert("state, timeout", "'idle', '-1 microsecond'"),
        INVALID_VALUE,
        "timeout must be positive",
        "set enabled to false",
    );
    g.error(
        insert("state, timeout", "'idle', '101 years'"),
        INVALID_VALUE,
        "timeout is out of range",
        "at most 100 years",
    );
    g.error(
        insert("state, timeout", "'idle', '178000000 years'"),
        INVALID_VALUE,
        "timeout is out of range",
        "at most 100 years",
    );
    g.error(insert("state, timeout", "'idle', NULL"), NOT_NULL_VIOLATION, not_null("timeout"), "");
    g.accepted(insert("state, timeout", "'idle', '1 microsecond'"));
    g.accepted(insert("state, timeout", "'transaction', '100 years'"));
    // action
    g.error(
        row("action", "'nuke'"),
        INVALID_VALUE,
        "invalid rule action \"nuke\"",
        "Valid rule actions are: terminate, cancel_then_terminate.",
    );
    g.error(row("action", "''"), INVALID_VALUE, "invalid rule action \"\"", "Valid rule actions are");
    g.error(row("action", "NULL"), NOT_NULL_VIOLATION, not_null("action"), "");
    // grace
    g.error(row("grace", "'-1s'"), INVALID_VALUE, "grace must not be negative", DURATION_HINT);
    g.error(row("grace", "'101 years'"), INVALID_VALUE, "grace is out of range", "at most 100 years");
    g.error(row("grace", "'178000000 years'"), INVALID_VALUE, "grace is out of range", OUT_OF_RANGE_HINT);
    g.error(row("grace", "NULL"), NOT_NULL_VIOLATION, not_null("grace"), "");
    // patterns: at most 63 bytes each, valid LIKE patterns
    g.error(
        row("database", "repeat('d', 64)"),
        INVALID_VALUE,
        "database pattern is too long",
        RULE_COLUMN_HINT,
    );
    g.error(row("database", "NULL"), NOT_NULL_VIOLATION, not_null("database"), "");
    g.error(row("role", "'oops\\'"), INVALID_VALUE, "invalid pattern \"oops\\\"", "escape character");
    g.error(row("role", "repeat('r', 100000)"), INVALID_VALUE, "role pattern is too long", RULE_COLUMN_HINT);
    g.error(
        row("application", &format!("'{}'", "a".repeat(100_000))),
        INVALID_VALUE,
        "application pattern is too long",
        RULE_COLUMN_HINT,
    );
    g.accepted(row("database, role, application", "'', repeat('%', 63), repeat('é', 31)"));
    // client_addr: PostgreSQL's own cidr input
    g.error(
        row("client_addr", "'10.0.0.300/8'"),
        BAD_SYNTAX,
        "invalid input syntax for type cidr: \"10.0.0.300/8\"",
        "",
    );
    g.error(row("client_addr", "'10.0.0.1/8'"), BAD_SYNTAX, "invalid cidr value: \"10.0.0.1/8\"", "");
    // enabled, priority, comment
    let enabled = |value: &str| {
        format!("INSERT INTO session_kill.rules (state, timeout, enabled) VALUES ('idle', '1h', {value})")
    };
    g.error(enabled("'maybe'"), BAD_SYNTAX, "invalid input syntax for type boolean: \"maybe\"", "");
    g.error(enabled("NULL"), NOT_NULL_VIOLATION, not_null("enabled"), "");
    g.error(row("priority", "2147483648"), "22003", "integer out of range", "");
    g.error(row("priority", "NULL"), NOT_NULL_VIOLATION, not_null("priority"), "");
    g.accepted(row("priority, comment", "-2147483648, repeat('c', 100000)"));
    // An UPDATE passes the same check.
    g.error(
        "BEGIN; INSERT INTO session_kill.rules (enabled, state, timeout) VALUES (false, 'idle', '1h');
         UPDATE session_kill.rules SET state = 'sleeping'; ROLLBACK",
        INVALID_VALUE,
        "invalid rule state \"sleeping\"",
        RULE_STATES,
    );
    // check_rule is callable by anyone: its text is bounded before it is copied too.
    let check = |args: &str| format!("SELECT session_kill.check_rule({args})");
    g.error(
        check("'%', '%', '%', repeat('1', 100000), 'idle', '1h', 'terminate', '5s'"),
        INVALID_VALUE,
        "client_addr is too long",
        RULE_COLUMN_HINT,
    );
    g.error(
        check("'%', '%', '%', 'not a network', 'idle', '1h', 'terminate', '5s'"),
        INVALID_VALUE,
        "invalid network \"not a network\"",
        "CIDR notation",
    );
    g.error(
        check("'%', '%', repeat('a', 100000), NULL, 'idle', '1h', 'terminate', '5s'"),
        INVALID_VALUE,
        "application pattern is too long",
        RULE_COLUMN_HINT,
    );
    // NULLs are left to the table's constraints.
    g.accepted(check("NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"));
    if infinite_intervals {
        g.error(
            insert("state, timeout", "'idle', 'infinity'"),
            INVALID_VALUE,
            "timeout is out of range",
            "at most 100 years",
        );
        g.error(
            insert("state, timeout", "'idle', '-infinity'"),
            INVALID_VALUE,
            "timeout must be positive",
            "set enabled to false",
        );
        g.error(row("grace", "'infinity'"), INVALID_VALUE, "grace is out of range", OUT_OF_RANGE_HINT);
    }
    g
}

/// session_kill's settings are PGC_SIGHUP: PostgreSQL's own checks and errors apply.
fn settings_cases() -> Group {
    let mut g = Group::new("settings", Caller::Admin);
    let alter = |setting: &str, value: &str| format!("ALTER SYSTEM SET session_kill.{setting} = {value}");
    let out_of_range = |value: &str, setting: &str| {
        format!("{value} is outside the valid range for parameter \"session_kill.{setting}\" …")
    };
    let invalid = |setting: &str, value: &str| {
        format!("invalid value for parameter \"session_kill.{setting}\": \"{value}\"")
    };
    for setting in
        ["idle_timeout", "protected_roles", "max_connection_usage", "snapshot_timeout", "snapshot_xid_age"]
    {
        g.error(
            format!("SET session_kill.{setting} = DEFAULT"),
            CANT_CHANGE_NOW,
            format!("parameter \"session_kill.{setting}\" cannot be changed now"),
            "",
        );
    }
    g.error(
        "ALTER DATABASE postgres SET session_kill.transaction_timeout = 0",
        CANT_CHANGE_NOW,
        "parameter \"session_kill.transaction_timeout\" cannot be changed now",
        "",
    );
    g.error(
        "SET session_kill.no_such_setting = 1",
        "42602",
        "invalid configuration parameter name \"session_kill.no_such_setting\"",
        "",
    );
    g.error(alter("idle_timeout", "'-1'"), INVALID_VALUE, out_of_range("-1 ms", "idle_timeout"), "");
    g.error(alter("idle_timeout", "'soon'"), INVALID_VALUE, invalid("idle_timeout", "soon"), "");
    g.error(alter("idle_timeout", "''"), INVALID_VALUE, invalid("idle_timeout", ""), "");
    g.error(
        alter("idle_in_transaction_timeout", "'178000000 years'"),
        INVALID_VALUE,
        invalid("idle_in_transaction_timeout", "178000000 years"),
        "",
    );
    g.error(
        alter("transaction_timeout", "'-1 s'"),
        INVALID_VALUE,
        out_of_range("-1000 ms", "transaction_timeout"),
        "",
    );
    g.error(
        alter("transaction_timeout", "'3000000000'"),
        INVALID_VALUE,
        invalid("transaction_timeout", "3000000000"),
        "",
    );
    g.error(alter("snapshot_timeout", "'-1'"), INVALID_VALUE, out_of_range("-1 ms", "snapshot_timeout"), "");
    g.error(alter("snapshot_xid_age", "-1"), INVALID_VALUE, out_of_range("-1", "snapshot_xid_age"), "");
    g.error(alter("snapshot_xid_age", "'1s'"), INVALID_VALUE, invalid("snapshot_xid_age", "1s"), "");
    g.error(
        alter("snapshot_xid_age", "3000000000"),
        INVALID_VALUE,
        invalid("snapshot_xid_age", "3000000000"),
        "",
    );
    g.error(
        alter("max_connection_usage", "1.5"),
        INVALID_VALUE,
        out_of_range("1.5", "max_connection_usage"),
        "",
    );
    g.error(
        alter("max_connection_usage", "-0.1"),
        INVALID_VALUE,
        out_of_range("-0.1", "max_connection_usage"),
        "",
    );
    g.error(
        alter("max_connection_usage", "'NaN'"),
        INVALID_VALUE,
        invalid("max_connection_usage", "NaN"),
        "",
    );
    g.error(
        alter("max_connection_usage", "'half'"),
        INVALID_VALUE,
        invalid("max_connection_usage", "half"),
        "",
    );
    g.error(
        alter("dry_run", "'maybe'"),
        INVALID_VALUE,
        "parameter \"session_kill.dry_run\" requires a Boolean value",
        "",
    );
    g.error(alter("log_retention", "'-1s'"), INVALID_VALUE, out_of_range("-1 s", "log_retention"), "");
    // A list of roles: any text is accepted (roles are not looked up; a name that is no role
    // protects nobody), and the list may be written as a list.
    g.accepted(alter("protected_roles", "',, ,\"x,'"));
    g.accepted(alter("protected_applications", "'oops\\', '%x%', ''"));
    g.accepted("SELECT pg_reload_conf()");
    g.accepted(dry_run("states => '{idle}'"));
    g.accepted(alter("protected_roles", "backup, monitor"));
    g
}

/// Text that is not UTF-8, in a SQL_ASCII database (which stores any bytes).
fn non_utf8_cases() -> Group {
    let mut g = Group::new("SQL_ASCII", Caller::AdminAscii);
    let high_byte = "'r' || chr(255)";
    g.error(
        kill_sql(&format!("({high_byte})::name")),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xff",
        NOT_UTF8_HINT,
    );
    let db = |args: &str| kill_sql(&format!("'{ASCII_DB}', {args}"));
    g.error(db("chr(255)"), NOT_UTF8, "invalid byte sequence for encoding \"UTF8\": 0xff", NOT_UTF8_HINT);
    g.error(
        db(&format!("usename => {high_byte}")),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xff",
        NOT_UTF8_HINT,
    );
    g.error(
        db(&format!("application_name => {high_byte} || '%'")),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xff",
        NOT_UTF8_HINT,
    );
    // Used to abort the whole server: the array's elements became Rust strings unchecked.
    g.error(
        db(&format!("states => ARRAY['idle', {high_byte}]")),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xff",
        NOT_UTF8_HINT,
    );
    g.error(
        db("reason => 'caf' || chr(233) || '!'"),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xe9",
        NOT_UTF8_HINT,
    );
    g.error(
        format!("SELECT count(*) FROM session_kill.sessions(({high_byte})::name)"),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xff",
        NOT_UTF8_HINT,
    );
    g.error(
        format!("SELECT * FROM session_kill.drain_database(({high_byte})::name)"),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xff",
        NOT_UTF8_HINT,
    );
    g.error(
        format!("SELECT session_kill.undrain_database(({high_byte})::name)"),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xff",
        NOT_UTF8_HINT,
    );
    g.error(
        format!("BEGIN; INSERT INTO session_kill.rules (enabled, state, timeout, role) VALUES (false, 'idle', '1h', {high_byte}); ROLLBACK"),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xff",
        NOT_UTF8_HINT,
    );
    g.error(
        format!("SELECT session_kill.check_rule('%', '%', '%', NULL, {high_byte}, '1h', 'terminate', '5s')"),
        NOT_UTF8,
        "invalid byte sequence for encoding \"UTF8\": 0xff",
        NOT_UTF8_HINT,
    );
    // UTF-8 bytes are fine, and so is listing a session whose role name is not UTF-8.
    g.accepted(kill_sql(&format!(
        "'{ASCII_DB}', 'dry_run', application_name => convert_from('\\x636166c3a925', 'SQL_ASCII'),
         reason => convert_from('\\xc3a9', 'SQL_ASCII')"
    )));
    g.accepted(kill_sql(&format!("'{ASCII_DB}', 'dry_run'")));
    g.accepted(format!("SELECT count(*) FROM session_kill.sessions('{ASCII_DB}')"));
    g
}

#[test]
fn bad_input_is_an_error_with_sqlstate_message_and_hint_and_nothing_is_signalled() {
    let s = server();
    let db = s.fresh_db(DB);
    let mut admin = s.admin();
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {ASCII_DB} WITH (FORCE)")).unwrap();
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {ASCII_DB} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ))
        .unwrap();
    let mut ascii_admin = s.connect(ASCII_DB, "postgres");
    ascii_admin
        .batch_execute(
            "CREATE EXTENSION session_kill;
             DO $$ BEGIN EXECUTE format('CREATE ROLE %I LOGIN', 'r' || chr(255)); END $$;",
        )
        .unwrap();
    let infinite_intervals = admin
        .query_one("SELECT current_setting('server_version_num')::int >= 170000", &[])
        .unwrap()
        .get::<_, bool>(0);

    // Victims: idle and idle-in-transaction sessions in both databases, and a session of the
    // role whose name is not UTF-8, running a statement (psql, as that role can only be named
    // with bytes).
    let mut victims = vec![
        Session::idle(s.connect(&db, APP)),
        Session::idle_in_transaction(s.connect(&db, APP)),
        Session::idle(s.connect(ASCII_DB, APP)),
        Session::idle_in_transaction(s.connect(ASCII_DB, APP)),
    ];
    let mut high_byte_client = s
        .client_program("psql")
        .args(["-X", "-d", ASCII_DB, "-U"])
        .arg(OsStr::from_bytes(HIGH_BYTE_ROLE))
        .args(["-c", "SELECT pg_sleep(600)"])
        .env("PGAPPNAME", "high_byte_role")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let high_byte_pid = || -> Option<i32> {
        s.probe_one(
            "SELECT min(pid) FROM pg_stat_activity WHERE application_name = 'high_byte_role' AND state = 'active'",
            &[],
        )
        .get(0)
    };
    wait_for_described(Duration::from_secs(10), "the high-byte role's session runs", || {
        high_byte_pid().is_some()
    });
    let high_byte_pid = high_byte_pid().unwrap();
    let mut victim_pids: Vec<i32> = victims.iter().map(|v| v.pid).collect();
    victim_pids.push(high_byte_pid);

    let groups = vec![
        kill_sessions_cases(infinite_intervals),
        unprivileged_cases(),
        sessions_cases(),
        drain_cases(infinite_intervals),
        undrain_cases(),
        rules_cases(infinite_intervals),
        settings_cases(),
        non_utf8_cases(),
    ];
    let mut plain = s.connect("postgres", PLAIN);
    let mut counts = Vec::new();
    let mut failures = Vec::new();
    for group in &groups {
        for case in &group.cases {
            let client = match case.caller {
                Caller::Admin => &mut admin,
                Caller::Plain => &mut plain,
                Caller::AdminAscii => &mut ascii_admin,
            };
            let what = format!("[{}] {}", case.group, abbreviated(&case.sql));
            let outcome = check(client, case);
            let crashed = outcome.as_ref().is_err_and(|e| e.starts_with("the backend did not survive"));
            if let Err(wrong) = outcome {
                failures.push(format!("{what}: {wrong}"));
            }
            assert!(!crashed, "the backend crashed; failures so far:\n{}", failures.join("\n"));
            let alive: i64 = s
                .probe_one("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", &[&victim_pids])
                .get(0);
            assert_eq!(alive, victim_pids.len() as i64, "{what}: a victim is gone");
        }
        counts.push(format!("{} {}", group.name, group.cases.len()));
    }
    assert!(failures.is_empty(), "{} of the cases failed:\n{}", failures.len(), failures.join("\n"));
    // A client cannot switch a limit off for itself at login either.
    let mut config = s.config("postgres", APP);
    config.options("-c session_kill.idle_timeout=0");
    let err = config.connect(postgres::NoTls).err().expect("the login is refused");
    let db_err = err.as_db_error().unwrap_or_else(|| panic!("login: {err}"));
    assert_eq!(db_err.code().code(), CANT_CHANGE_NOW, "{}", db_err.message());
    assert_eq!(db_err.message(), "parameter \"session_kill.idle_timeout\" cannot be changed now");
    let total: usize = groups.iter().map(|g| g.cases.len()).sum::<usize>() + 1;
    eprintln!("bad-input matrix: {total} cases ({}, login options 1)", counts.join(", "));
    assert!(total >= 60, "the matrix has {total} cases");

    // Nothing was signalled, no database was closed, nothing was counted or logged as done.
    for v in &mut victims {
        assert_alive(v);
    }
    assert!(s.alive(high_byte_pid), "the high-byte role's session was ended");
    assert!(!s.server_log().contains("session_kill: sent"), "a signal was sent");
    assert_eq!(count(&mut admin, "SELECT count(*) FROM session_kill.drains()"), 0, "a gate is closed");
    wait_for_described(Duration::from_secs(30), "the audit queue is written", || {
        count(&mut admin, "SELECT audit_queued FROM session_kill.worker") == 0
    });
    assert_eq!(count(&mut admin, "SELECT count(*) FROM session_kill.log WHERE action <> 'none'"), 0);
    assert_eq!(
        count(
            &mut admin,
            "SELECT coalesce(sum(sessions), 0) FROM session_kill.stats
              WHERE outcome <> 'dry run' AND outcome NOT LIKE 'skipped:%'"
        ),
        0,
        "session_kill.stats counts an action"
    );

    // Clean up: settings, the psql client, its role.
    for sql in [
        "ALTER SYSTEM RESET session_kill.protected_roles",
        "ALTER SYSTEM RESET session_kill.protected_applications",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).unwrap();
    }
    admin.query_one("SELECT pg_terminate_backend($1)", &[&high_byte_pid]).unwrap();
    let _ = high_byte_client.wait();
    s.wait_until_gone(high_byte_pid);
    ascii_admin.batch_execute("DO $$ BEGIN EXECUTE format('DROP ROLE %I', 'r' || chr(255)); END $$").unwrap();
}

fn count(client: &mut Client, sql: &str) -> i64 {
    client.query_one(&format!("SELECT ({sql})::bigint"), &[]).unwrap().get(0)
}

/// Runs one case and checks its outcome and the style of its error. Returns what is wrong.
fn check(client: &mut Client, case: &Case) -> Result<(), String> {
    let result = client.batch_execute(&case.sql);
    // Leave no failed transaction behind for the next case.
    let _ = client.batch_execute("ROLLBACK");
    if client.simple_query("SELECT 1").is_err() {
        return Err(format!("the backend did not survive ({result:?})"));
    }
    let (Expect::Error { code, message, hint }, Err(e)) = (&case.expect, &result) else {
        return match (&case.expect, result) {
            (Expect::Accepted, Err(e)) => Err(format!("refused: {e}")),
            (Expect::Error { .. }, Ok(())) => Err("accepted".to_owned()),
            _ => Ok(()),
        };
    };
    let db_err = e.as_db_error().ok_or_else(|| format!("not an error from the server: {e}"))?;
    let got = db_err.message();
    let mut wrong = Vec::new();
    if db_err.code().code() != *code {
        wrong.push(format!("SQLSTATE {} instead of {code}", db_err.code().code()));
    }
    let message_ok = match message.strip_suffix(" …") {
        Some(start) => got.starts_with(start),
        None => got == message,
    };
    if !message_ok {
        wrong.push(format!("message {:?} instead of {message:?}", abbreviated(got)));
    }
    if got.starts_with(char::is_uppercase) || got.ends_with('.') {
        wrong.push(format!("message {:?} is not in PostgreSQL's style", abbreviated(got)));
    }
    match (db_err.hint(), hint.is_empty()) {
        (None, false) => wrong.push(format!("no hint (expected one with {hint:?})")),
        (Some(got_hint), false) if !got_hint.contains(hint) => {
            wrong.push(format!("hint {got_hint:?} lacks {hint:?}"))
        }
        _ => {}
    }
    for (field, text) in [("hint", db_err.hint()), ("detail", db_err.detail())] {
        if let Some(text) = text.filter(|t| !t.ends_with('.') || t.starts_with(char::is_lowercase)) {
            wrong.push(format!("{field} {:?} is not a sentence", abbreviated(text)));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

fn abbreviated(sql: &str) -> String {
    if sql.len() <= 200 {
        return sql.to_owned();
    }
    let mut end = 200;
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &sql[..end], sql.len())
}
