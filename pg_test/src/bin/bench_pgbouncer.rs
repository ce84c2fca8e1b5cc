//! Benchmark (not a test): session_kill behind a real PgBouncer (Debian's package), in session
//! and in transaction pooling. Prints a Markdown section.
//!
//! 1. Drains. For each PgBouncer set-up and drain procedure: a new client (`psql -c 'SELECT 1'`)
//!    starts every 100 ms; the database is drained, kept closed for 3 s (the "maintenance"), and
//!    reopened. Reported: what clients holding a server connection were told; what the new clients
//!    that started while the database was closed were told and after how long; how soon after
//!    the reopening a new client's login worked; how many logins of the pooler the gate refused.
//! 2. The worker's idle limit against a pool: 40 clients run a statement, then pause up to 2.5 s,
//!    for 30 s, under `session_kill.idle_timeout = '1s'`. Reported: statements, errors the
//!    clients saw, server connections the worker ended, server logins the pooler made; with and
//!    without PgBouncer checking each connection before reuse, and with a rule by the pooler's
//!    address that lifts the idle limit for its connections.

use session_kill_pg_test::bouncer::*;
use session_kill_pg_test::stats::{max, median, server_version};
use session_kill_pg_test::*;
use std::collections::BTreeMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const DB: &str = "shop";
const MAINTENANCE: Duration = Duration::from_secs(3);
const CLIENT_EVERY: Duration = Duration::from_millis(100);
const CHURN_CLIENTS: u64 = 40;
const CHURN_MAX_PAUSE_MS: u64 = 2500;
const CHURN_FOR: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq)]
enum Procedure {
    /// `drain_database`, maintenance, `undrain_database`.
    DrainOnly,
    /// `PAUSE db` on the pooler first (it returns once the drain has ended the server connections
    /// it waits for), then the drain ... `undrain_database`, `RESUME db`.
    Pause,
    /// `KILL db` on the pooler first (it closes the pool's client and server connections at once
    /// and pauses the database), then the drain ... `undrain_database`, `RESUME db`.
    Kill,
    /// The drain, then `RECONNECT db` on the pooler (it forgets the server parameters it answers
    /// logins with), maintenance, `undrain_database`.
    ReconnectAfterDrain,
    /// `RECONNECT db` first (with `server_fast_close`, the pooler closes its server connections
    /// itself at once), then the drain, maintenance, `undrain_database`.
    ReconnectBeforeDrain,
}

struct Variant {
    name: &'static str,
    ini: &'static [&'static str],
    procedure: Procedure,
}

const VARIANTS: &[Variant] = &[
    Variant { name: "PgBouncer's defaults, drain only", ini: &[], procedure: Procedure::DrainOnly },
    Variant {
        name: "`server_login_retry = 1`, drain only",
        ini: &["server_login_retry = 1"],
        procedure: Procedure::DrainOnly,
    },
    Variant {
        name: "`server_login_retry = 1`, drain, then `RECONNECT db`",
        ini: &["server_login_retry = 1"],
        procedure: Procedure::ReconnectAfterDrain,
    },
    Variant {
        name: "`server_login_retry = 0.2`, drain, then `RECONNECT db`",
        ini: &["server_login_retry = 0.2"],
        procedure: Procedure::ReconnectAfterDrain,
    },
    Variant {
        name: "`server_fast_close = 1`, `RECONNECT db`, then drain",
        ini: &["server_fast_close = 1"],
        procedure: Procedure::ReconnectBeforeDrain,
    },
    Variant { name: "`KILL db`, drain, undrain, `RESUME db`", ini: &[], procedure: Procedure::Kill },
    Variant { name: "`PAUSE db`, drain, undrain, `RESUME db`", ini: &[], procedure: Procedure::Pause },
    Variant {
        name: "`PAUSE db` ... `RESUME db`, `query_wait_timeout = 2` (shorter than the maintenance)",
        ini: &["query_wait_timeout = 2"],
        procedure: Procedure::Pause,
    },
];

/// One new client: when it started and was answered, and what it was told.
struct Answer {
    started: Instant,
    answered: Instant,
    ok: bool,
    told: String,
}

/// What psql printed, in one line: `ok`, the first FATAL/ERROR line, or how the connection ended.
fn told(ok: bool, stderr: &str) -> String {
    if ok {
        return "ok".into();
    }
    let first = stderr.lines().find(|l| l.contains("FATAL:") || l.contains("ERROR:"));
    match first {
        // A refused login: "psql: error: connection to server at ... failed: FATAL:  ..."
        Some(l) if l.starts_with("psql: error:") => {
            format!("login refused: {}", &l[l.find("FATAL:").or(l.find("ERROR:")).unwrap()..])
        }
        Some(l) => l.to_owned(),
        None if stderr.contains("server closed the connection unexpectedly") => {
            "connection closed without a message".into()
        }
        None => stderr.lines().next().unwrap_or("no output").to_owned(),
    }
}

/// Starts a new client every `CLIENT_EVERY` until stopped, each waited for in its own thread.
struct Stream {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<thread::JoinHandle<Answer>>>,
}

impl Stream {
    fn start(b: &Arc<Bouncer>) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, b) = (stop.clone(), b.clone());
        let handle = thread::spawn(move || {
            let mut clients = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                let child: Child = b.new_client(DB);
                clients.push(thread::spawn(move || {
                    let (ok, stderr) = psql_outcome(child.wait_with_output().unwrap());
                    Answer { started, answered: Instant::now(), ok, told: told(ok, &stderr) }
                }));
                thread::sleep(CLIENT_EVERY.saturating_sub(started.elapsed()));
            }
            clients
        });
        Stream { stop, handle }
    }

    fn stop(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap().into_iter().map(|h| h.join().unwrap()).collect()
    }
}

struct DrainRun {
    held: Vec<String>,
    during: Vec<Answer>,
    after: Vec<Answer>,
    refused_logins: i64,
    reopened_after: Option<f64>,
}

/// The two lines psql printed for a client that held a server connection (message + DETAIL).
fn held_told(stderr: &str) -> String {
    let mut lines = stderr.lines().filter(|l| !l.starts_with("LOCATION:"));
    let mut out: Vec<String> = Vec::new();
    for l in lines.by_ref() {
        if l.starts_with("FATAL:") || l.starts_with("ERROR:") || l.starts_with("DETAIL:") {
            out.push(format!("`{}`", l.split_whitespace().collect::<Vec<_>>().join(" ")));
        }
    }
    if out.is_empty() {
        "nothing".into()
    } else {
        out.join(" ")
    }
}

fn drain_run(s: &Server, mode: PoolMode, v: &Variant) -> DrainRun {
    s.admin().batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)")).unwrap();
    s.admin().batch_execute(&format!("CREATE DATABASE {DB}")).unwrap();
    let b = Arc::new(Bouncer::start(s, mode, v.ini));
    // Clients holding a server connection when the drain comes; in transaction pooling also
    // clients between two statements (no server connection).
    let mut held: Vec<Psql> = (0..3)
        .map(|_| match mode {
            PoolMode::Session => Psql::open(&b, DB, APP),
            PoolMode::Transaction => Psql::open_in_transaction(&b, DB, APP),
        })
        .collect();
    if mode == PoolMode::Transaction {
        held.extend((0..3).map(|_| Psql::open(&b, DB, APP)));
    }
    let stream = Stream::start(&b);
    thread::sleep(Duration::from_secs(1));

    let closed_at = thread::scope(|scope| {
        let pause = (v.procedure == Procedure::Pause).then(|| {
            let b = &b;
            let pause = scope.spawn(move || b.admin(&format!("PAUSE {DB}")));
            wait_for(Duration::from_secs(10), || b.log().contains(&format!("PAUSE '{DB}' command issued")));
            pause
        });
        match v.procedure {
            Procedure::Kill => drop(b.admin(&format!("KILL {DB}"))),
            Procedure::ReconnectBeforeDrain => drop(b.admin(&format!("RECONNECT {DB}"))),
            _ => {}
        }
        let closed_at = Instant::now();
        s.admin()
            .query_one("SELECT remaining FROM session_kill.drain_database($1, grace => '1s')", &[&DB])
            .unwrap();
        if let Some(pause) = pause {
            pause.join().unwrap();
        }
        closed_at
    });
    if v.procedure == Procedure::ReconnectAfterDrain {
        b.admin(&format!("RECONNECT {DB}"));
    }
    thread::sleep(MAINTENANCE);
    let refused_logins: i64 = s
        .admin()
        .query_one("SELECT refused_logins FROM session_kill.drains() WHERE datname = $1", &[&DB])
        .unwrap()
        .get(0);
    s.admin().execute("SELECT session_kill.undrain_database($1)", &[&DB]).unwrap();
    if matches!(v.procedure, Procedure::Pause | Procedure::Kill) {
        b.admin(&format!("RESUME {DB}"));
    }
    let reopened_at = Instant::now();
    // Until a client that started after the reopening succeeds (and 1 s more), at most 30 s.
    let deadline = reopened_at + Duration::from_secs(30);
    let mut first_ok = None::<Instant>;
    while first_ok.is_none_or(|t| t.elapsed() < Duration::from_secs(1)) && Instant::now() < deadline {
        if b.new_client_outcome(DB).0 {
            first_ok.get_or_insert(Instant::now());
        }
        thread::sleep(CLIENT_EVERY);
    }
    let answers = stream.stop();
    let held = held.into_iter().map(|p| held_told(&p.finish())).collect();
    let (during, after): (Vec<Answer>, Vec<Answer>) =
        answers.into_iter().filter(|a| a.started >= closed_at).partition(|a| a.started < reopened_at);
    let reopened_after = after
        .iter()
        .filter(|a| a.ok)
        .map(|a| a.started.saturating_duration_since(reopened_at).as_secs_f64())
        .reduce(f64::min);
    DrainRun { held, during, after, refused_logins, reopened_after }
}

/// "told (n), told (n)", most frequent first.
fn tally<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for i in items {
        *counts.entry(i).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v.into_iter().map(|(t, n)| format!("{t} ({n})")).collect::<Vec<_>>().join("; ")
}

fn print_drains(s: &Server) {
    println!("#### Drains\n");
    println!(
        "A new client (`psql -c 'SELECT 1'`, as `{APP}`, `PGCONNECT_TIMEOUT=10`) starts every {} ms \
         through the pooler. The \
         database is drained (`drain_database(grace => '1s')`, preceded or followed by the pooler \
         command shown), stays closed for {} s, and is reopened (`undrain_database`, then \
         `RESUME db` where the pooler was paused). *Held*: what psql printed for clients holding a \
         server connection at the drain (session pooling: idle clients; transaction pooling: \
         clients idle in a transaction, then clients between two statements). *While closed*: \
         the clients that started between the drain and the reopening, what they were told and \
         how long after they started (median / max); `ok` means the statement ran, after the \
         reopening. *Logins work after*: from the reopening to the start of the first client that \
         succeeded (clients start every {} ms). *Refused*: `drains().refused_logins` before the \
         reopening, the pooler's own server logins refused by the gate.\n",
        CLIENT_EVERY.as_millis(),
        MAINTENANCE.as_secs(),
        CLIENT_EVERY.as_millis()
    );
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        println!("{} pooling:\n", if mode == PoolMode::Session { "Session" } else { "Transaction" });
        println!("| set-up | held | while closed: told (clients) | answered after, s | logins work after, s | failed after reopening | refused |");
        println!("|---|---|---|---:|---:|---:|---:|");
        for v in VARIANTS {
            let r = drain_run(s, mode, v);
            let waits: Vec<f64> = r.during.iter().map(|a| (a.answered - a.started).as_secs_f64()).collect();
            println!(
                "| {} | {} | {} | {:.2} / {:.2} | {} | {} | {} |",
                v.name,
                tally(r.held.iter().map(String::as_str)),
                tally(r.during.iter().map(|a| a.told.as_str())),
                if waits.is_empty() { 0.0 } else { median(&waits) },
                if waits.is_empty() { 0.0 } else { max(&waits) },
                r.reopened_after.map_or("not within 30 s".into(), |t| format!("{t:.2}")),
                r.after.iter().filter(|a| !a.ok).count(),
                r.refused_logins,
            );
        }
        println!();
    }
}

struct ChurnRun {
    statements: usize,
    errors: Vec<String>,
    ended: usize,
    logins: usize,
}

/// `CHURN_CLIENTS` pooled clients, each running `SELECT 1` then pausing up to
/// `CHURN_MAX_PAUSE_MS` (transaction pooling: one connection each; session pooling: connect,
/// run, disconnect), for `CHURN_FOR`.
fn churn_run(s: &Server, mode: PoolMode, ini: &[&str], exempt_pooler: bool) -> ChurnRun {
    let db = "churn";
    s.admin().batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).unwrap();
    s.admin().batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    if exempt_pooler {
        s.admin()
            .batch_execute(
                "INSERT INTO session_kill.rules (client_addr, state, timeout, priority, comment)
                 VALUES ('127.0.0.1/32', 'idle', '1h', 10, 'the pooler closes its idle connections')",
            )
            .unwrap();
    }
    wait_for(Duration::from_secs(20), || {
        s.admin().query_one("SELECT rules FROM session_kill.worker", &[]).unwrap().get::<_, i32>(0)
            == i32::from(exempt_pooler)
    });
    let log_before = s.server_log().len();
    let b = Bouncer::start(s, mode, ini);
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..CHURN_CLIENTS)
        .map(|i| {
            let (config, stop) = (b.config(db, APP), stop.clone());
            thread::spawn(move || {
                let (mut statements, mut errors) = (0, Vec::new());
                let mut client = None;
                let mut seed = i * 7919 + 1;
                while !stop.load(Ordering::Relaxed) {
                    let result = (|| {
                        if client.is_none() {
                            client = Some(config.connect(postgres::NoTls)?);
                        }
                        client.as_mut().unwrap().simple_query("SELECT 1")
                    })();
                    match result {
                        Ok(_) => statements += 1,
                        Err(e) => {
                            errors.push(e.to_string());
                            client = None;
                        }
                    }
                    if mode == PoolMode::Session {
                        client = None;
                    }
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    thread::sleep(Duration::from_millis((seed >> 33) % CHURN_MAX_PAUSE_MS));
                }
                (statements, errors)
            })
        })
        .collect();
    thread::sleep(CHURN_FOR);
    stop.store(true, Ordering::Relaxed);
    let (mut statements, mut errors) = (0, Vec::new());
    for t in threads {
        let (n, e) = t.join().unwrap();
        statements += n;
        errors.extend(e);
    }
    let logins = b.log().lines().filter(|l| l.contains("new connection to server")).count();
    drop(b);
    let ended = s.server_log()[log_before..]
        .lines()
        .filter(|l| {
            l.contains("session_kill: sent terminate to pid") && l.contains(&format!("(database {db},"))
        })
        .count();
    if exempt_pooler {
        s.admin().batch_execute("DELETE FROM session_kill.rules").unwrap();
    }
    ChurnRun { statements, errors, ended, logins }
}

fn print_churn(s: &Server) {
    println!("#### The worker's idle limit against a pool\n");
    println!(
        "`session_kill.idle_timeout = '1s'`. {CHURN_CLIENTS} clients (as `{APP}`) each run `SELECT 1`, \
         then pause 0–{:.1} s (pseudo-random), for {} s; in session pooling each statement is a new \
         client (connect, run, disconnect). *Ended*: server connections the worker terminated; \
         *server logins*: connections the pooler opened.\n",
        CHURN_MAX_PAUSE_MS as f64 / 1000.0,
        CHURN_FOR.as_secs()
    );
    println!("| pooling | set-up | statements | client errors | ended by the worker | server logins |");
    println!("|---|---|---:|---|---:|---:|");
    let setups: &[(&str, &[&str], bool)] = &[
        ("PgBouncer's defaults", &[], false),
        (
            "`server_check_delay = 0` (PgBouncer runs `server_check_query` before each reuse)",
            &["server_check_delay = 0"],
            false,
        ),
        ("rule: `client_addr '127.0.0.1/32'`, state `idle`, `1h`, priority 10", &[], true),
    ];
    for mode in [PoolMode::Transaction, PoolMode::Session] {
        for (name, ini, exempt) in setups {
            let r = churn_run(s, mode, ini, *exempt);
            let errors = if r.errors.is_empty() {
                "0".to_owned()
            } else {
                format!("{}: {}", r.errors.len(), tally(r.errors.iter().map(String::as_str)))
            };
            println!(
                "| {} | {name} | {} | {errors} | {} | {} |",
                mode.as_str(),
                r.statements,
                r.ended,
                r.logins
            );
        }
    }
    println!();
}

fn main() {
    let s = Server::start(&["max_connections = 300", "session_kill.idle_timeout = '1s'"]);
    let version = server_version(&s);
    let bouncer_version = std::process::Command::new("pgbouncer").arg("--version").output().unwrap();
    let bouncer_version =
        String::from_utf8_lossy(&bouncer_version.stdout).lines().next().unwrap_or("").to_owned();
    println!("### {bouncer_version}, {version}\n");
    // The drains must not meet the idle limit: a rule lifts it for `shop`.
    s.admin()
        .batch_execute(&format!(
            "INSERT INTO session_kill.rules (database, state, timeout, priority) VALUES ('{DB}', 'idle', '1h', 10)"
        ))
        .unwrap();
    wait_for(Duration::from_secs(20), || {
        s.admin().query_one("SELECT rules FROM session_kill.worker", &[]).unwrap().get::<_, i32>(0) == 1
    });
    print_drains(&s);
    s.admin().batch_execute("DELETE FROM session_kill.rules").unwrap();
    print_churn(&s);
    s.stop();
}
