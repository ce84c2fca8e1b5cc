//! Clients behind a real PgBouncer (Debian's package, started by each test: see
//! `session_kill_pg_test::bouncer`), in session and in transaction pooling. The clients are psql
//! (libpq) with `VERBOSITY=verbose`, so what they print carries the SQLSTATE. Covered: what a
//! client is told when session_kill ends its server connection (kill_sessions, the worker's idle
//! limits, a drain); that the pool goes on serving every other client; what a new client of a
//! drained database is told; when logins work again after undrain_database, with PgBouncer's
//! defaults, with the drain procedure the README recommends for short maintenance (`PAUSE db`,
//! drain, undrain, `RESUME db`) and with `RECONNECT db` after the drain (new clients are told our
//! message); and a rule by client address that leaves the pooler's idle server connections to
//! the pooler. Figures (how fast, how many) are in benchmarks/results.md, from
//! `scripts/bench.sh --only pgbouncer`.

use session_kill_pg_test::bouncer::*;
use session_kill_pg_test::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The server's message, forwarded by PgBouncer as it is (SQLSTATE, DETAIL and all).
const TERMINATED: &str = "FATAL:  57P01: terminating connection due to administrator command";
/// PgBouncer's own errors (always SQLSTATE 08P01, no DETAIL).
const CRASHED: &str = "FATAL:  08P01: server conn crashed?";
const LOGIN_FAILING: &str =
    "FATAL:  08P01: server login has been failing, try again later (server_login_retry)";
const QUERY_WAIT_TIMEOUT: &str = "FATAL:  08P01: query_wait_timeout";
/// How psql reports a refused login (as opposed to an error after it logged in).
const LOGIN_FAILED_AT_LOGIN: &str = "psql: error: connection to server";

#[track_caller]
fn assert_works(b: &Bouncer, db: &str) {
    assert_eq!(b.new_client_outcome(db), (true, String::new()), "a new client through the pooler");
}

/// psql printed the server's `message` with the DETAIL line `detail`, then PgBouncer's
/// `server conn crashed?`.
#[track_caller]
fn assert_told_then_crashed(stderr: &str, message: &str, detail: &str) {
    let told = format!("{message}\nDETAIL:  {detail}\n");
    let at = stderr.find(&told).unwrap_or_else(|| panic!("psql should print {told:?}, printed {stderr:?}"));
    assert!(stderr[at..].contains(CRASHED), "then PgBouncer's {CRASHED:?}: {stderr:?}");
}

/// The DETAIL line psql printed after `message`.
fn detail_after<'a>(stderr: &'a str, message: &str) -> &'a str {
    let rest = &stderr[stderr.find(message).unwrap_or_else(|| panic!("no {message:?} in {stderr:?}"))..];
    rest.lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("DETAIL:  "))
        .unwrap_or_else(|| panic!("no DETAIL: {stderr:?}"))
}

/// The backend serving this statement. The simple query protocol: in transaction pooling, a
/// prepared statement may not meet the server connection it was prepared on.
fn backend_pid(c: &mut postgres::Client) -> i32 {
    let messages = c.simple_query("SELECT pg_backend_pid()").unwrap();
    let row = messages.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    row.expect("a row").get(0).unwrap().parse().unwrap()
}

/// PgBouncer's log lines about closing server connections for `reason`.
fn servers_closed(b: &Bouncer, reason: &str) -> usize {
    b.log()
        .lines()
        .filter(|l| l.contains(" S-0x") && l.contains(&format!("closing because: {reason}")))
        .count()
}

/// A pooled client of another role that runs `SELECT 1` every 100 ms until stopped; returns
/// the errors it met.
fn busy_client(b: &Bouncer, db: &str, stop: &'static AtomicBool) -> thread::JoinHandle<Vec<String>> {
    let mut c = b.connect(db, OTHER);
    thread::spawn(move || {
        let mut errors = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = c.simple_query("SELECT 1") {
                errors.push(e.to_string());
            }
            thread::sleep(Duration::from_millis(100));
        }
        errors
    })
}

/// (sessions_at_start, terminated, remaining)
fn drain(s: &Server, db: &str) -> (i32, i32, i32) {
    let row = s
        .admin()
        .query_one(
            "SELECT sessions_at_start, terminated, remaining FROM session_kill.drain_database($1, grace => '1s')",
            &[&db],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

fn undrain(s: &Server, db: &str) {
    s.admin().execute("SELECT session_kill.undrain_database($1)", &[&db]).unwrap();
}

fn drained_message(db: &str) -> String {
    format!("session_kill: database \"{db}\" is being drained by postgres")
}

// ---------------------------------------------------------------------------------------------
// kill_sessions

#[test]
fn kill_sessions_behind_session_pooling() {
    let s = server();
    let db = s.fresh_db("t_pgb_kill_session");
    let b = Bouncer::start(s, PoolMode::Session, &[]);
    let idle = Psql::open(&b, &db, APP);
    let mut running = Psql::open(&b, &db, APP);
    running.run_long(s);
    let mut bystander = b.connect(&db, OTHER);
    let bystander_pid = backend_pid(&mut bystander);

    let rows = kill(s, &format!("'{db}', usename => '{APP}', reason => 'nightly rebuild'"));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_acted(&rows, idle.pid, "terminate", "terminated");
    assert_acted(&rows, running.pid, "terminate", "terminated");
    // Each client gets our message with its DETAIL, forwarded by PgBouncer, then PgBouncer's own.
    let detail = "session_kill: terminated by postgres: nightly rebuild";
    assert_told_then_crashed(&idle.finish(), TERMINATED, detail);
    assert_told_then_crashed(&running.finish(), TERMINATED, detail);
    assert_eq!(servers_closed(&b, "server conn crashed?"), 2);

    // Everyone else: the other pooled client keeps its server connection, new clients get new ones.
    assert_eq!(backend_pid(&mut bystander), bystander_pid);
    assert_works(&b, &db);
}

#[test]
fn kill_sessions_behind_transaction_pooling() {
    let s = server();
    let db = s.fresh_db("t_pgb_kill_transaction");
    let b = Bouncer::start(s, PoolMode::Transaction, &[]);
    let in_transaction = Psql::open_in_transaction(&b, &db, APP);
    let mut running = Psql::open_in_transaction(&b, &db, APP);
    running.run_long(s);
    // Between statements this client holds no server connection: the one that served it
    // waits idle in the pool.
    let idle = Psql::open(&b, &db, APP);
    let pooled = idle.pid;
    assert!(pooled != in_transaction.pid && pooled != running.pid);
    let mut bystander = b.connect(&db, OTHER);
    let bystander_pid = backend_pid(&mut bystander);

    let rows = kill(s, &format!("'{db}', usename => '{APP}', reason => 'nightly rebuild'"));
    assert_eq!(rows.len(), 3, "{rows:?}");
    for pid in [in_transaction.pid, running.pid, pooled] {
        assert_acted(&rows, pid, "terminate", "terminated");
    }
    let detail = "session_kill: terminated by postgres: nightly rebuild";
    assert_told_then_crashed(&in_transaction.finish(), TERMINATED, detail);
    assert_told_then_crashed(&running.finish(), TERMINATED, detail);

    // The pooler drops the idle server connection that was ended (it logs a FATAL "when not
    // linked"); the client it served is told nothing, and its next statement gets a new one.
    wait_for_described(Duration::from_secs(10), "PgBouncer drops the ended connections", || {
        b.server_connections(&db, APP) == 0
    });
    assert_eq!(servers_closed(&b, "server conn crashed?"), 3);
    assert!(b.log().contains("got packet 'E' from server when not linked"));
    assert_eq!(idle.finish(), "", "the idle client sees nothing");
    assert_eq!(backend_pid(&mut bystander), bystander_pid);
    assert_works(&b, &db);
}

// ---------------------------------------------------------------------------------------------
// The worker

#[test]
fn the_worker_behind_session_pooling() {
    let s = Server::start(&["session_kill.idle_timeout = '1s'"]);
    let db = s.fresh_db("t_pgb_worker_session");
    let b = Bouncer::start(&s, PoolMode::Session, &[]);
    static STOP: AtomicBool = AtomicBool::new(false);
    let busy = busy_client(&b, &db, &STOP);
    let idle = Psql::open(&b, &db, APP);
    s.wait_until_gone(idle.pid);
    let stderr = idle.finish();
    let detail = detail_after(&stderr, TERMINATED);
    assert!(
        detail.starts_with("session_kill: idle for ")
            && tells_duration_over(detail, "session_kill: idle for ", 1.0)
            && detail.ends_with(", over session_kill.idle_timeout (1.0s)"),
        "{stderr}"
    );
    assert_told_then_crashed(&stderr, TERMINATED, detail);
    // A client that keeps its session busy, and new clients, are not affected.
    assert_works(&b, &db);
    STOP.store(true, Ordering::Relaxed);
    assert_eq!(busy.join().unwrap(), Vec::<String>::new());
    // The pooler goes first: a client of a pooler whose server is gone waits for a server.
    drop(b);
    s.stop();
}

#[test]
fn the_worker_behind_transaction_pooling() {
    let s = Server::start(&[
        "session_kill.idle_timeout = '1s'",
        "session_kill.idle_in_transaction_timeout = '1s'",
    ]);
    let db = s.fresh_db("t_pgb_worker_transaction");
    let b = Bouncer::start(&s, PoolMode::Transaction, &[]);
    let in_transaction = Psql::open_in_transaction(&b, &db, APP);
    let idle = Psql::open(&b, &db, APP);
    let pooled = idle.pid;
    // The server connection idle in the pool is ended by idle_timeout, the forgotten
    // transaction by idle_in_transaction_timeout.
    s.wait_until_gone(pooled);
    s.wait_until_gone(in_transaction.pid);
    let stderr = in_transaction.finish();
    let detail = detail_after(&stderr, TERMINATED);
    assert!(
        detail.starts_with("session_kill: idle in transaction for ")
            && tells_duration_over(detail, "session_kill: idle in transaction for ", 1.0)
            && detail.ends_with(", over session_kill.idle_in_transaction_timeout (1.0s)"),
        "{stderr}"
    );
    assert_told_then_crashed(&stderr, TERMINATED, detail);
    // The client whose pooled connection was ended is told nothing: its next statement runs
    // on a new server connection once the pooler has dropped the dead one.
    wait_for_described(Duration::from_secs(10), "PgBouncer drops the ended connections", || {
        b.server_connections(&db, APP) == 0
    });
    assert_eq!(idle.finish(), "", "the idle client sees nothing");
    assert_works(&b, &db);
    // The pooler goes first: a client of a pooler whose server is gone waits for a server.
    drop(b);
    s.stop();
}

/// In transaction pooling, idle server connections are the pooler's to close
/// (`server_idle_timeout`): a rule by the pooler's address lifts `idle_timeout` for them only,
/// and leaves `idle_in_transaction_timeout` in force for its clients.
#[test]
fn a_rule_by_client_addr_leaves_the_poolers_idle_connections_alone() {
    let s = Server::start(&[
        "session_kill.idle_timeout = '1s'",
        "session_kill.idle_in_transaction_timeout = '1s'",
    ]);
    s.admin()
        .batch_execute(
            "INSERT INTO session_kill.rules (client_addr, state, timeout, priority, comment)
             VALUES ('127.0.0.1/32', 'idle', '1h', 10, 'pgbouncer closes its idle server connections')",
        )
        .unwrap();
    wait_for(Duration::from_secs(20), || {
        s.admin().query_one("SELECT rules FROM session_kill.worker", &[]).unwrap().get::<_, i32>(0) == 1
    });
    let db = s.fresh_db("t_pgb_exempt");
    let b = Bouncer::start(&s, PoolMode::Transaction, &[]);
    let mut client = b.connect(&db, APP);
    let pooled = backend_pid(&mut client);
    // A direct session (Unix socket: no client address), idle for less time than the pooled
    // connection, is ended by idle_timeout; the pooled one is still there and serves again.
    let direct = Session::idle(s.connect(&db, APP));
    s.wait_until_gone(direct.pid);
    assert!(s.alive(pooled), "the pooler's idle server connection is exempt");
    assert_eq!(backend_pid(&mut client), pooled);
    let in_transaction = Psql::open_in_transaction(&b, &db, APP);
    s.wait_until_gone(in_transaction.pid);
    let stderr = in_transaction.finish();
    assert!(
        detail_after(&stderr, TERMINATED).ends_with(", over session_kill.idle_in_transaction_timeout (1.0s)"),
        "{stderr}"
    );
    // The pooler goes first: a client of a pooler whose server is gone waits for a server.
    drop(b);
    s.stop();
}

// ---------------------------------------------------------------------------------------------
// Drains

/// A drain with PgBouncer's defaults, except `query_wait_timeout` (120 s by default; 2 s keeps
/// the test short): clients of the drained database are told our message if they hold a server
/// connection; a new client never sees our 57P03 (PgBouncer answers its login from cached
/// server parameters, then fails its first statement); after undrain_database PgBouncer goes on
/// refusing until `server_login_retry` (15 s) has passed since its last failed login.
fn drain_with_pgbouncer_defaults(mode: PoolMode) {
    let s = server();
    let db = s.fresh_db(&format!("t_pgb_drain_{}", mode.as_str()));
    let b = Bouncer::start(s, mode, &["query_wait_timeout = 2"]);
    let holding = match mode {
        PoolMode::Session => Psql::open(&b, &db, APP),
        PoolMode::Transaction => Psql::open_in_transaction(&b, &db, APP),
    };
    // Transaction pooling: a client between statements, its server connection in the pool.
    let between = (mode == PoolMode::Transaction).then(|| Psql::open(&b, &db, APP));
    let mut elsewhere = b.connect("postgres", APP);

    let (at_start, terminated, remaining) = drain(s, &db);
    assert_eq!((terminated, remaining), (at_start, 0));
    assert_told_then_crashed(&holding.finish(), TERMINATED, &drained_message(&db));
    // (Once PgBouncer has dropped the ended connections: one it still held idle could be handed
    // to the next statement first.)
    wait_for_described(Duration::from_secs(10), "PgBouncer drops the ended connections", || {
        b.server_connections(&db, APP) == 0
    });

    // The first statement that needs a server connection (a new client's; in transaction
    // pooling, the client between statements) waits for a server login that the gate refuses
    // (PgBouncer logs our message) and is told query_wait_timeout. A new client's login itself
    // is answered by PgBouncer.
    let first = match between {
        Some(between) => between.finish(),
        None => b.new_client_outcome(&db).1,
    };
    assert!(first.contains(QUERY_WAIT_TIMEOUT), "{first}");
    assert!(
        !first.contains("57P03") && !first.contains(TERMINATED) && !first.contains(LOGIN_FAILED_AT_LOGIN),
        "{first}"
    );
    assert!(
        b.log().contains(&format!("login failed: FATAL: database \"{db}\" is being drained by session_kill")),
        "PgBouncer's log has our message"
    );
    // Later clients are turned away at once: PgBouncer's last server login failed.
    let (ok, next) = b.new_client_outcome(&db);
    assert!(!ok && next.contains(LOGIN_FAILING) && !next.contains(LOGIN_FAILED_AT_LOGIN), "{next}");
    let refused: i64 = s
        .admin()
        .query_one("SELECT refused_logins FROM session_kill.drains() WHERE datname = $1", &[&db])
        .unwrap()
        .get(0);
    assert!(refused >= 1, "the gate refused PgBouncer's logins");

    // Reopened: PgBouncer still turns clients away until server_login_retry has passed since
    // its last failed server login (well under 15 s ago here), then logins work.
    undrain(s, &db);
    let (ok, right_after) = b.new_client_outcome(&db);
    assert!(!ok && right_after.contains(LOGIN_FAILING), "{right_after}");
    let reopened = Instant::now();
    let mut refused_after = 1;
    wait_for_described(Duration::from_secs(60), "logins through PgBouncer work again", || {
        let (ok, stderr) = b.new_client_outcome(&db);
        assert!(ok || stderr.contains(LOGIN_FAILING), "{stderr}");
        refused_after += usize::from(!ok);
        thread::sleep(Duration::from_millis(100));
        ok
    });
    println!(
        "{mode:?} pooling: logins worked again {:.1} s after undrain_database, {refused_after} clients refused meanwhile",
        reopened.elapsed().as_secs_f64()
    );
    // Other databases behind the same pooler were never affected.
    assert_eq!(backend_pid(&mut elsewhere), backend_pid(&mut elsewhere));
}

#[test]
fn a_drain_behind_session_pooling_with_pgbouncer_defaults() {
    drain_with_pgbouncer_defaults(PoolMode::Session);
}

#[test]
fn a_drain_behind_transaction_pooling_with_pgbouncer_defaults() {
    drain_with_pgbouncer_defaults(PoolMode::Transaction);
}

/// The README's procedure: `PAUSE db` on the pooler first (it returns once the drain has ended
/// the server connections it waits for), drain_database, the maintenance, undrain_database,
/// `RESUME db`. Clients holding a server connection are told our message; a client arriving
/// meanwhile waits (within `query_wait_timeout`) and then runs; nobody is told
/// `server login has been failing`, because PgBouncer never tried to log in while the gate was
/// closed.
fn pause_drain_undrain_resume(mode: PoolMode) {
    let s = server();
    let db = s.fresh_db(&format!("t_pgb_pause_{}", mode.as_str()));
    let b = Bouncer::start(s, mode, &[]);
    let holding = match mode {
        PoolMode::Session => Psql::open(&b, &db, APP),
        PoolMode::Transaction => Psql::open_in_transaction(&b, &db, APP),
    };
    let between = (mode == PoolMode::Transaction).then(|| Psql::open(&b, &db, APP));

    thread::scope(|scope| {
        let pause = scope.spawn(|| b.console(&format!("PAUSE {db}")));
        wait_for_described(Duration::from_secs(10), "PgBouncer got PAUSE", || {
            b.log().contains(&format!("PAUSE '{db}' command issued"))
        });
        // PAUSE waits for the server connection that `holding` uses.
        assert!(!pause.is_finished());
        let (at_start, terminated, remaining) = drain(s, &db);
        assert_eq!((terminated, remaining), (at_start, 0));
        pause.join().unwrap().expect("PAUSE completes once the drain ended the connections");
    });
    assert_told_then_crashed(&holding.finish(), TERMINATED, &drained_message(&db));

    // Maintenance: a new client is let in, and its statement waits.
    let waiting = b.new_client(&db);
    wait_for_described(Duration::from_secs(10), "the new client waits", || {
        b.admin("SHOW CLIENTS")
            .iter()
            .any(|c| c.get("database") == Some(&db) && c.get("state").map(String::as_str) == Some("waiting"))
    });
    undrain(s, &db);
    b.admin(&format!("RESUME {db}"));
    assert_eq!(
        psql_outcome(waiting.wait_with_output().unwrap()),
        (true, String::new()),
        "the waiting client"
    );
    if let Some(between) = between {
        assert_eq!(between.finish(), "", "a client between statements sees nothing");
    }
    assert_works(&b, &db);
    assert!(!b.log().contains("login failed"), "PgBouncer never logged in while the gate was closed");
}

#[test]
fn pause_drain_undrain_resume_behind_session_pooling() {
    pause_drain_undrain_resume(PoolMode::Session);
}

#[test]
fn pause_drain_undrain_resume_behind_transaction_pooling() {
    pause_drain_undrain_resume(PoolMode::Transaction);
}

/// `RECONNECT db` right after the drain makes PgBouncer forget the server parameters it answers
/// logins with: a new client's login then waits for a server login of its own, and when the
/// gate refuses that, PgBouncer passes our message on to the waiting clients, as a refused login
/// (its own SQLSTATE 08P01, the message text only: no DETAIL, no HINT). With
/// `server_login_retry = 1` each new client is told within about a second, and once the
/// database is reopened the next login works.
fn drain_then_reconnect(mode: PoolMode) {
    let s = server();
    let db = s.fresh_db(&format!("t_pgb_reconnect_{}", mode.as_str()));
    let b = Bouncer::start(s, mode, &["server_login_retry = 1"]);
    let holding = match mode {
        PoolMode::Session => Psql::open(&b, &db, APP),
        PoolMode::Transaction => Psql::open_in_transaction(&b, &db, APP),
    };
    drain(s, &db);
    b.admin(&format!("RECONNECT {db}"));
    assert_told_then_crashed(&holding.finish(), TERMINATED, &drained_message(&db));

    let message = format!("database \"{db}\" is being drained by session_kill");
    for _ in 0..2 {
        let (ok, stderr) = b.new_client_outcome(&db);
        assert!(!ok, "{stderr}");
        assert!(
            stderr.contains(LOGIN_FAILED_AT_LOGIN)
                && stderr.contains(&format!("failed: FATAL:  {message}\n")),
            "psql is told our message as a refused login: {stderr:?}"
        );
        let err = b.config(&db, APP).connect(postgres::NoTls).err().expect("the login is refused");
        let db_err = err.as_db_error().unwrap_or_else(|| panic!("a server error, got {err:?}"));
        assert_eq!(
            (db_err.severity(), db_err.code().code(), db_err.message(), db_err.detail(), db_err.hint()),
            ("FATAL", "08P01", message.as_str(), None, None)
        );
    }
    undrain(s, &db);
    assert_works(&b, &db);
}

#[test]
fn drain_then_reconnect_behind_session_pooling() {
    drain_then_reconnect(PoolMode::Session);
}

#[test]
fn drain_then_reconnect_behind_transaction_pooling() {
    drain_then_reconnect(PoolMode::Transaction);
}
