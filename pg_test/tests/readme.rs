//! The README's psql transcripts, run for real and compared with the README's text, so that
//! they cannot drift from what session_kill does.
//!
//! In README.md a transcript is the text between `<!-- transcript: NAME -->` and
//! `<!-- /transcript -->`. Each fenced code block there without a language is a session:
//! - `DB=# SQL` runs SQL with `psql -X -d DB` as the superuser `postgres` (one psql per command;
//!   a command goes on over indented lines until it ends with `;` or a psql `\g...` command);
//! - `$ COMMAND` runs COMMAND with bash, with PGHOST, PGPORT and PGUSER=postgres set for the test
//!   server and its bin directory first on PATH (stdout and stderr together);
//! - the lines that follow, up to the next command, are what it must print.
//!
//! A ```sql block in a transcript must run without error (`psql -v ON_ERROR_STOP=1 -d postgres`).
//! Other blocks are left alone. The scenario below sets up, around each transcript, what the
//! README's text says is there (the demo's sessions, a superuser's psql, a PgBouncer...).
//!
//! Before comparing, both texts are normalised, the same way, for what legitimately differs from
//! run to run (and is illustrative in the README):
//! - timestamps (`2026-11-22 03:13:23.205717+00`) become `<timestamp>`;
//! - measured durations (intervals with fractional seconds, `00:00:02.003325`) become
//!   `<duration>`;
//! - PIDs (in a column named `pid` or ending in `_pid`/`_pids`, and after the word `pid`) become
//!   `<pid N>`, numbered by first appearance in the transcript: the same PID must appear at the
//!   same places;
//! - a socket path in `on socket "..."` becomes `<socket>`;
//! - `psql:<stdin>:N: ` (psql's prefix for errors in a script) is dropped;
//! - table cells are compared without their padding (the widths follow the values), lines
//!   without trailing blanks, and blank lines at the end of a command's output are dropped;
//! - the columns named in the marker's `vary=a,b` (e.g. a scan counter) become `<varies>`.
//!
//! The actual output of every transcript is written to `$SESSION_KILL_TEST_ROOT/readme-actual/`
//! (as README text, with the README's commands), to copy from when a transcript changes.

use session_kill_pg_test::bouncer::{Bouncer, PoolMode};
use session_kill_pg_test::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const README: &str = include_str!("../../README.md");

// ---------------------------------------------------------------------------------------------
// The README's transcripts

#[derive(Debug)]
struct Transcript {
    name: String,
    vary: Vec<String>,
    blocks: Vec<Block>,
}

#[derive(Debug)]
enum Block {
    Session(Vec<Step>),
    Sql(String),
}

#[derive(Debug, Clone)]
struct Step {
    /// The command's lines as the README shows them (prompt included).
    shown: Vec<String>,
    command: Cmd,
    expected: Vec<String>,
}

#[derive(Debug, Clone)]
enum Cmd {
    Psql { db: String, sql: String },
    Shell(String),
}

fn transcripts(readme: &str) -> Vec<Transcript> {
    let mut out: Vec<Transcript> = Vec::new();
    let mut current: Option<Transcript> = None;
    let mut fence: Option<(String, Vec<String>)> = None;
    for (n, line) in readme.lines().enumerate() {
        if let Some((info, body)) = fence.as_mut() {
            if line.trim_start().starts_with("```") {
                let (info, body) = (std::mem::take(info), std::mem::take(body));
                fence = None;
                if let Some(t) = current.as_mut() {
                    match info.as_str() {
                        "" => t.blocks.push(Block::Session(steps(&body))),
                        "sql" => t.blocks.push(Block::Sql(body.join("\n"))),
                        _ => {}
                    }
                }
            } else {
                body.push(line.to_owned());
            }
            continue;
        }
        if let Some(rest) = line.trim().strip_prefix("<!-- transcript:") {
            assert!(current.is_none(), "README line {}: transcript inside a transcript", n + 1);
            let rest = rest.trim().trim_end_matches("-->").trim();
            let mut words = rest.split_whitespace();
            let name = words.next().expect("a transcript name").to_owned();
            let mut vary = Vec::new();
            for w in words {
                let list = w.strip_prefix("vary=").unwrap_or_else(|| panic!("unknown option {w:?}"));
                vary.extend(list.split(',').map(str::to_owned));
            }
            current = Some(Transcript { name, vary, blocks: Vec::new() });
        } else if line.trim() == "<!-- /transcript -->" {
            out.push(current.take().unwrap_or_else(|| panic!("README line {}: no transcript to end", n + 1)));
        } else if line.trim_start().starts_with("```") {
            fence = Some((line.trim_start().trim_start_matches('`').trim().to_owned(), Vec::new()));
        }
    }
    assert!(current.is_none(), "a transcript is not ended");
    out
}

/// `DB=# ` at the start of a line: a psql command in DB.
fn psql_prompt(line: &str) -> Option<(&str, &str)> {
    let (db, sql) = line.split_once("=# ")?;
    (!db.is_empty() && db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some((db, sql))
}

fn steps(body: &[String]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let line = &body[i];
        let (shown, command) = if let Some((db, sql)) = psql_prompt(line) {
            let mut shown = vec![line.clone()];
            let mut sql = sql.to_owned();
            while !ends_command(&sql) && i + 1 < body.len() && body[i + 1].starts_with(' ') {
                i += 1;
                shown.push(body[i].clone());
                sql.push('\n');
                sql.push_str(body[i].trim());
            }
            (shown, Cmd::Psql { db: db.to_owned(), sql })
        } else if let Some(cmd) = line.strip_prefix("$ ") {
            (vec![line.clone()], Cmd::Shell(cmd.to_owned()))
        } else {
            panic!("README transcript: output before any command: {line:?}");
        };
        i += 1;
        let mut expected = Vec::new();
        while i < body.len() && psql_prompt(&body[i]).is_none() && !body[i].starts_with("$ ") {
            expected.push(body[i].clone());
            i += 1;
        }
        trim_blank_end(&mut expected);
        steps.push(Step { shown, command, expected });
    }
    steps
}

fn ends_command(sql: &str) -> bool {
    let sql = sql.trim_end();
    sql.ends_with(';') || sql.rsplit(' ').next().is_some_and(|w| w.starts_with("\\g"))
}

fn trim_blank_end(lines: &mut Vec<String>) {
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    while lines.first().is_some_and(|l| l.trim().is_empty()) {
        lines.remove(0);
    }
}

// ---------------------------------------------------------------------------------------------
// Normalisation

/// PIDs numbered by first appearance, per transcript and per side (README or actual).
#[derive(Default)]
struct Pids(HashMap<String, usize>);

impl Pids {
    fn name(&mut self, pid: &str) -> String {
        let next = self.0.len() + 1;
        format!("<pid {}>", self.0.entry(pid.to_owned()).or_insert(next))
    }

    /// Every number in `text` (a cell: `12345`, `{1,2,3}`) as a PID.
    fn all_numbers(&mut self, text: &str) -> String {
        replace_runs(text, |c| c.is_ascii_digit(), |n| self.name(n))
    }

    /// `pid 12345` in running text.
    fn after_word(&mut self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(at) = rest.find("pid ") {
            let before_ok = at == 0 || !rest[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_');
            out.push_str(&rest[..at + 4]);
            rest = &rest[at + 4..];
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if before_ok && digits > 0 {
                out.push_str(&self.name(&rest[..digits]));
                rest = &rest[digits..];
            }
        }
        out.push_str(rest);
        out
    }
}

/// Replaces each maximal run of characters matching `class` with `f(run)`.
fn replace_runs(text: &str, class: impl Fn(char) -> bool, mut f: impl FnMut(&str) -> String) -> String {
    let mut out = String::new();
    let mut run = String::new();
    for c in text.chars() {
        if class(c) {
            run.push(c);
        } else {
            if !run.is_empty() {
                out.push_str(&f(&run));
                run.clear();
            }
            out.push(c);
        }
    }
    if !run.is_empty() {
        out.push_str(&f(&run));
    }
    out
}

/// Timestamps and measured durations: `<timestamp>`, `<duration>`.
fn times(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let digits =
        |from: usize, n: usize| from + n <= b.len() && b[from..from + n].iter().all(u8::is_ascii_digit);
    let at = |k: usize, c: u8| k < b.len() && b[k] == c;
    while i < b.len() {
        let boundary = i == 0 || !b[i - 1].is_ascii_digit();
        // 2026-11-22 03:13:23[.205717]+00[:00]
        if boundary
            && digits(i, 4)
            && at(i + 4, b'-')
            && digits(i + 5, 2)
            && at(i + 7, b'-')
            && digits(i + 8, 2)
            && at(i + 10, b' ')
            && digits(i + 11, 2)
            && at(i + 13, b':')
            && digits(i + 14, 2)
            && at(i + 16, b':')
            && digits(i + 17, 2)
        {
            let mut j = i + 19;
            if at(j, b'.') {
                j += 1;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
            }
            if (at(j, b'+') || at(j, b'-')) && digits(j + 1, 2) {
                j += 3;
                if at(j, b':') && digits(j + 1, 2) {
                    j += 3;
                }
            }
            out.push_str("<timestamp>");
            i = j;
            continue;
        }
        // 00:00:02.003325
        if boundary
            && digits(i, 2)
            && at(i + 2, b':')
            && digits(i + 3, 2)
            && at(i + 5, b':')
            && digits(i + 6, 2)
            && at(i + 8, b'.')
            && digits(i + 9, 1)
        {
            let mut j = i + 9;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            out.push_str("<duration>");
            i = j;
            continue;
        }
        let c = text[i..].chars().next().unwrap();
        out.push(c);
        i += c.len_utf8();
    }
    out
}

fn is_pid_column(name: &str) -> bool {
    name == "pid" || name.ends_with("_pid") || name.ends_with("_pids")
}

fn is_separator(line: &str) -> bool {
    !line.is_empty() && line.chars().all(|c| c == '-' || c == '+') && line.contains('-')
}

/// One command's output lines in comparable form.
fn normalise(lines: &[String], vary: &[String], pids: &mut Pids) -> Vec<String> {
    let mut out = Vec::new();
    let mut columns: Option<Vec<String>> = None;
    let mut expanded = false;
    for (k, raw) in lines.iter().enumerate() {
        let mut line = raw.trim_end().to_owned();
        if let Some(rest) = line.strip_prefix("psql:<stdin>:") {
            if let Some((_, message)) = rest.split_once(": ") {
                line = message.to_owned();
            }
        }
        if let Some(at) = line.find("on socket \"") {
            if let Some(end) = line[at + 11..].find('"') {
                line = format!("{}on socket \"<socket>\"{}", &line[..at], &line[at + 11 + end + 1..]);
            }
        }
        line = times(&line);
        if is_separator(&line) && k > 0 {
            // The line before was the header of an aligned table.
            let names: Vec<String> = lines[k - 1].split('|').map(|c| c.trim().to_owned()).collect();
            out.push("<separator>".to_owned());
            columns = Some(names);
            expanded = false;
            continue;
        }
        if line.starts_with("-[ RECORD ") {
            out.push(line.split(" ]").next().unwrap_or_default().to_owned() + " ]");
            columns = None;
            expanded = true;
            continue;
        }
        if (line.starts_with('(') && (line.ends_with(" rows)") || line.ends_with(" row)"))) || line.is_empty()
        {
            columns = None;
            expanded = false;
            out.push(line);
            continue;
        }
        if expanded {
            if let Some((key, value)) = line.split_once('|') {
                let key = key.trim();
                let value = cell(key, value.trim(), vary, pids);
                out.push(format!("{key} | {value}"));
                continue;
            }
        }
        if let Some(names) = &columns {
            let cells: Vec<String> = line
                .split('|')
                .enumerate()
                .map(|(i, c)| cell(names.get(i).map_or("", String::as_str), c.trim(), vary, pids))
                .collect();
            out.push(cells.join(" | "));
            continue;
        }
        if line.contains(" | ") {
            // A header line (its separator comes next): cells without padding.
            out.push(line.split('|').map(str::trim).collect::<Vec<_>>().join(" | "));
            continue;
        }
        out.push(pids.after_word(line.trim()));
    }
    trim_blank_end(&mut out);
    out
}

fn cell(column: &str, value: &str, vary: &[String], pids: &mut Pids) -> String {
    if vary.iter().any(|v| v == column) {
        "<varies>".to_owned()
    } else if is_pid_column(column) {
        pids.all_numbers(value)
    } else {
        pids.after_word(value)
    }
}

// ---------------------------------------------------------------------------------------------
// Running commands

struct Env {
    server: Server,
    /// Extra environment for `$` commands (a transcript behind PgBouncer points psql at it).
    shell_env: Vec<(String, String)>,
}

fn psql_output(server: &Server, db: &str, sql: &str) -> Vec<String> {
    let mut child = server
        .client_program("psql")
        .args(["-X", "-d", db])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{sql}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    // A notice is printed as it arrives, before the result: stderr first.
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    text.lines().map(str::to_owned).collect()
}

fn shell(env: &Env, command: &str) -> Child {
    let path = format!("{}:{}", env.server.bindir.display(), std::env::var("PATH").unwrap_or_default());
    Command::new("bash")
        .arg("-c")
        .arg(format!("exec 2>&1\n{command}"))
        .env("PATH", path)
        .env("PGHOST", &env.server.datadir)
        .env("PGPORT", env.server.port.to_string())
        .env("PGUSER", "postgres")
        .envs(env.shell_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(mut child: Child) -> Vec<String> {
    let mut text = String::new();
    child.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    child.wait().unwrap();
    text.lines().map(str::to_owned).collect()
}

/// A real psql session held open on a pipe, as `scripts/demo.sh` opens them.
struct Holder(Child);

impl Holder {
    fn open(server: &Server, db: &str, user: &str, app: Option<&str>, lines: &[&str]) -> Holder {
        let mut cmd = server.client_program("psql");
        cmd.args(["-X", "-q", "-d", db, "-U", user]);
        if let Some(app) = app {
            cmd.env("PGAPPNAME", app);
        }
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let stdin = child.stdin.as_mut().unwrap();
        for line in lines {
            writeln!(stdin, "{line}").unwrap();
        }
        stdin.flush().unwrap();
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the client sessions of `db` are in exactly these states (with counts).
#[track_caller]
fn wait_states(server: &Server, db: &str, want: &[(&str, i64)]) {
    let mut want: Vec<String> = want.iter().map(|(s, n)| format!("{s}={n}")).collect();
    want.sort();
    let want = want.join(",");
    let mut have = String::new();
    let start = Instant::now();
    while have != want {
        assert!(start.elapsed() < Duration::from_secs(20), "sessions of {db}: want {want}, have {have}");
        thread::sleep(Duration::from_millis(20));
        have = server
            .probe_one(
                "SELECT coalesce(string_agg(state || '=' || n, ',' ORDER BY state || '=' || n), '')
                   FROM (SELECT coalesce(state, '') AS state, count(*) AS n FROM pg_stat_activity
                          WHERE datname = $1 AND backend_type = 'client backend' GROUP BY 1) AS s",
                &[&db],
            )
            .get(0);
    }
}

/// Waits until a session of `db` runs a statement that contains `text`.
fn wait_running(server: &Server, db: &str, text: &str) {
    wait_for_described(Duration::from_secs(20), "the statement runs", || {
        server
            .probe_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state = 'active' AND query LIKE '%' || $2 || '%'",
                &[&db, &text],
            )
            .get::<_, i64>(0)
            == 1
    });
}

fn sql(server: &Server, db: &str, statements: &str) {
    server
        .connect(db, "postgres")
        .batch_execute(statements)
        .unwrap_or_else(|e| panic!("{statements}: {e:?}"));
}

/// Ends every client session of `db` and waits until they are gone.
fn empty(server: &Server, db: &str) {
    sql(
        server,
        "postgres",
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"),
    );
    wait_for_described(Duration::from_secs(20), "the database is empty", || server.sessions_in(db) == 0);
}

// ---------------------------------------------------------------------------------------------
// The scenario: what each transcript's text says is there, in README order.

#[derive(Default)]
struct Scenario {
    holders: Vec<Holder>,
    bouncer: Option<Bouncer>,
}

impl Scenario {
    fn hold(&mut self, server: &Server, db: &str, user: &str, app: Option<&str>, lines: &[&str]) {
        self.holders.push(Holder::open(server, db, user, app, lines));
    }

    fn before(&mut self, env: &mut Env, transcript: &str) {
        let s = &env.server;
        match transcript {
            "tour" => {
                // scripts/demo.sh's set-up, with its sessions opened one after the other.
                sql(s, "postgres", "CREATE DATABASE shop");
                sql(
                    s,
                    "postgres",
                    "CREATE ROLE shop_app LOGIN; CREATE ROLE reporting LOGIN;
                     CREATE ROLE alice LOGIN IN ROLE pg_signal_backend;
                     GRANT EXECUTE ON FUNCTION session_kill.kill_sessions TO alice;",
                );
                sql(
                    s,
                    "shop",
                    "CREATE TABLE orders (id int PRIMARY KEY, status text);
                     INSERT INTO orders VALUES (1, 'new');
                     GRANT SELECT, UPDATE ON orders TO shop_app;",
                );
                let update = ["START TRANSACTION;", "UPDATE orders SET status = 'paid' WHERE id = 1;"];
                for n in 1..=3 {
                    self.hold(s, "shop", "shop_app", Some("web"), &["SELECT 1;"]);
                    wait_states(s, "shop", &[("idle", n)]);
                }
                self.hold(s, "shop", "shop_app", Some("web"), &update);
                wait_states(s, "shop", &[("idle", 3), ("idle in transaction", 1)]);
                self.hold(s, "shop", "shop_app", Some("web"), &update);
                wait_states(s, "shop", &[("idle", 3), ("idle in transaction", 1), ("active", 1)]);
                self.hold(s, "shop", "shop_app", Some("batch"), &["SELECT pg_sleep(120);"]);
                wait_states(s, "shop", &[("idle", 3), ("idle in transaction", 1), ("active", 2)]);
                self.hold(s, "shop", "reporting", Some("dashboard"), &["SELECT 1;"]);
                wait_states(s, "shop", &[("idle", 4), ("idle in transaction", 1), ("active", 2)]);
                thread::sleep(Duration::from_secs(2));
            }
            "drain-fail" => {
                self.hold(s, "shop", "postgres", None, &["SELECT 1;"]);
                wait_states(s, "shop", &[("idle", 1)]);
            }
            "pgbouncer-told" => {
                let bouncer = Bouncer::start_for_users(s, PoolMode::Session, &[], &["shop_app"]);
                env.shell_env = vec![
                    ("PGHOST".to_owned(), "127.0.0.1".to_owned()),
                    ("PGPORT".to_owned(), bouncer.port.to_string()),
                ];
                self.bouncer = Some(bouncer);
            }
            "blockers" => {
                self.hold(s, "shop", "shop_app", Some("web"), &["BEGIN;", "SELECT count(*) FROM orders;"]);
                wait_states(s, "shop", &[("idle in transaction", 1)]);
                self.hold(s, "shop", "postgres", None, &["ALTER TABLE orders ADD COLUMN note text;"]);
                wait_states(s, "shop", &[("idle in transaction", 1), ("active", 1)]);
                for n in 2..=3 {
                    self.hold(s, "shop", "shop_app", Some("web"), &["SELECT * FROM orders;"]);
                    wait_states(s, "shop", &[("idle in transaction", 1), ("active", n)]);
                }
                thread::sleep(Duration::from_secs(1));
            }
            "upgrade" => {
                sql(s, "postgres", "CREATE DATABASE legacy TEMPLATE template0");
                sql(s, "legacy", "CREATE EXTENSION session_kill VERSION '0.1.0'");
            }
            _ => {}
        }
    }

    /// Before step `index` of `transcript` runs.
    fn before_step(&mut self, env: &mut Env, transcript: &str, index: usize) {
        let s = &env.server;
        if let ("log", 2) = (transcript, index) {
            // After the two INSERTs: a report running, then a pooled connection left idle (its
            // 2 s limit ends it after the report's 1 s, however slowly the two start).
            self.hold(s, "shop", "reporting", Some("nightly_report"), &["SELECT pg_sleep(60);"]);
            self.hold(s, "shop", "shop_app", Some("web"), &["SELECT 1;"]);
            wait_for_described(
                Duration::from_secs(30),
                "the worker's two actions in session_kill.log",
                || {
                    s.probe_one("SELECT count(*) FROM session_kill.log WHERE source = 'worker'", &[])
                        .get::<_, i64>(0)
                        == 2
                },
            );
        }
    }

    /// While the `$` command of step `index` runs (it waits for this to return).
    fn during(&mut self, env: &Env, transcript: &str, _index: usize) {
        let s = &env.server;
        match transcript {
            "told" | "pgbouncer-told" => {
                wait_running(s, "shop", "pg_sleep(60)");
                let user = if transcript == "told" { "alice" } else { "postgres" };
                s.connect("postgres", user)
                    .batch_execute(
                        "SELECT * FROM session_kill.kill_sessions('shop', reason => 'nightly rebuild')",
                    )
                    .unwrap();
            }
            _ => {}
        }
    }

    fn after(&mut self, env: &mut Env, transcript: &str) {
        let s = &env.server;
        match transcript {
            "tour" | "typo" => {}
            "drain" => wait_for(Duration::from_secs(10), || s.sessions_in("shop") == 0),
            "drain-fail" => {
                sql(s, "postgres", "SELECT session_kill.undrain_database('shop')");
                self.holders.clear();
                empty(s, "shop");
            }
            "rules" | "pgbouncer-rule" => sql(s, "postgres", "DELETE FROM session_kill.rules"),
            "stats" => {
                sql(s, "postgres", "DELETE FROM session_kill.rules");
                self.holders.clear();
                empty(s, "shop");
            }
            "pgbouncer-told" => {
                env.shell_env.clear();
                self.bouncer = None;
                empty(s, "shop");
            }
            "blockers" => {
                self.holders.clear();
                empty(s, "shop");
                sql(s, "shop", "ALTER TABLE orders DROP COLUMN IF EXISTS note");
            }
            _ => {}
        }
    }
}

fn run_step(env: &Env, scenario: &mut Scenario, transcript: &str, index: usize, step: &Step) -> Vec<String> {
    match &step.command {
        Cmd::Psql { db, sql } => psql_output(&env.server, db, sql),
        Cmd::Shell(command) => {
            let child = shell(env, command);
            scenario.during(env, transcript, index);
            finish(child)
        }
    }
}

#[test]
fn readme_transcripts() {
    let all = transcripts(README);
    assert!(
        all.len() >= 10,
        "README transcripts found: {:?}",
        all.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    let mut env = Env { server: Server::start(&["max_connections = 100"]), shell_env: Vec::new() };
    let mut scenario = Scenario::default();
    let root = PathBuf::from(
        std::env::var("SESSION_KILL_TEST_ROOT").unwrap_or_else(|_| "/var/tmp/session_kill".into()),
    );
    let actual_dir = root.join("readme-actual");
    let _ = std::fs::remove_dir_all(&actual_dir);
    std::fs::create_dir_all(&actual_dir).unwrap();
    let mut failures = Vec::new();
    for t in &all {
        scenario.before(&mut env, &t.name);
        let (mut readme_pids, mut actual_pids) = (Pids::default(), Pids::default());
        let mut actual_text = String::new();
        let mut index = 0;
        for block in &t.blocks {
            match block {
                Block::Sql(text) => {
                    let out = env
                        .server
                        .client_program("psql")
                        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", text])
                        .output()
                        .unwrap();
                    if !out.status.success() {
                        failures.push(format!(
                            "{}: the SQL block failed:\n{text}\n{}",
                            t.name,
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                }
                Block::Session(steps) => {
                    actual_text.push_str("```\n");
                    for (k, step) in steps.iter().enumerate() {
                        scenario.before_step(&mut env, &t.name, index);
                        let mut actual = run_step(&env, &mut scenario, &t.name, index, step);
                        trim_blank_end(&mut actual);
                        if k > 0 {
                            actual_text.push('\n');
                        }
                        for l in step.shown.iter().chain(&actual) {
                            actual_text.push_str(l);
                            actual_text.push('\n');
                        }
                        let want = normalise(&step.expected, &t.vary, &mut readme_pids);
                        let got = normalise(&actual, &t.vary, &mut actual_pids);
                        if want != got {
                            failures.push(format!(
                                "transcript {}, command {:?}:\n--- README (normalised)\n{}\n--- actual (normalised)\n{}\n--- actual\n{}",
                                t.name,
                                step.shown.join("\n"),
                                want.join("\n"),
                                got.join("\n"),
                                actual.join("\n")
                            ));
                        }
                        index += 1;
                    }
                    actual_text.push_str("```\n\n");
                }
            }
        }
        std::fs::write(actual_dir.join(format!("{}.md", t.name)), actual_text).unwrap();
        scenario.after(&mut env, &t.name);
    }
    drop(scenario);
    assert!(
        failures.is_empty(),
        "{} README transcripts differ:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn normalisation() {
    let mut pids = Pids::default();
    let lines: Vec<String> = [
        "  pid  | idle_for        | blocked_pids | query",
        "-------+-----------------+--------------+---------",
        " 17131 | 00:00:02.003325 | {17132,17131} | pid 17132",
        "(1 row)",
        "DETAIL:  Remaining: pid 17132 (user postgres): superuser.",
        "DETAIL:  It has been closed since 2026-11-22 03:13:23.205717+00.",
        "psql: error: connection to server on socket \"/tmp/x/.s.PGSQL.5432\" failed: FATAL:  no",
        "psql:<stdin>:1: ERROR:  invalid mode \"x\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        normalise(&lines, &[], &mut pids),
        [
            "pid | idle_for | blocked_pids | query",
            "<separator>",
            "<pid 1> | <duration> | {<pid 2>,<pid 1>} | pid <pid 2>",
            "(1 row)",
            "DETAIL:  Remaining: pid <pid 2> (user postgres): superuser.",
            "DETAIL:  It has been closed since <timestamp>.",
            "psql: error: connection to server on socket \"<socket>\" failed: FATAL:  no",
            "ERROR:  invalid mode \"x\"",
        ]
    );
}
