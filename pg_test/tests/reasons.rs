//! Clients ended by session_kill are told why: PostgreSQL's own message and SQLSTATE, plus a
//! DETAIL that starts with `session_kill:`, in psql, in libpq's error fields and in the server
//! log; a signal from anyone else carries no such detail.

use session_kill_pg_test::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::thread;
use std::time::Duration;

/// A psql process fed statements one at a time, as a person types them.
struct Psql {
    child: Child,
    stdin: ChildStdin,
    pid: i32,
}

impl Psql {
    fn open(s: &Server, db: &str, user: &str) -> Psql {
        let mut child = s
            .client_program("psql")
            .args(["-X", "-A", "-t", "-d", db, "-U", user])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "SELECT pg_backend_pid();").unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let pid = line.trim().parse().unwrap_or_else(|_| panic!("psql printed {line:?}"));
        Psql { child, stdin, pid }
    }

    /// Starts a long statement and returns once the server shows it running.
    fn run_long(&mut self, s: &Server) {
        writeln!(self.stdin, "SELECT pg_sleep(60);").unwrap();
        wait_for_described(Duration::from_secs(10), "the statement runs", || {
            s.probe_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&self.pid],
            )
            .get::<_, i64>(0)
                == 1
        });
    }

    /// Types one more statement (which finds out what happened meanwhile), quits, and returns
    /// what psql printed on stderr.
    fn finish(mut self) -> String {
        // psql quits by itself when it finds its connection ended while running a statement.
        let _ = writeln!(self.stdin, "SELECT 1;");
        drop(self.stdin);
        let out = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// psql's stderr holds `message` followed by the DETAIL line `detail`.
#[track_caller]
fn assert_told(stderr: &str, message: &str, detail: &str) {
    let expected = format!("{message}\nDETAIL:  {detail}\n");
    assert!(stderr.contains(&expected), "psql should print {expected:?}, printed {stderr:?}");
}

/// The server log's line for `pid` reporting `message` is followed by the DETAIL line.
#[track_caller]
fn assert_logged(s: &Server, pid: i32, message: &str, detail: &str) {
    let log = s.server_log();
    let lines: Vec<&str> = log.lines().collect();
    let found = lines.windows(2).any(|w| {
        w[0].contains(&format!("[{pid}] "))
            && w[0].ends_with(message)
            && w[1].ends_with(&format!("DETAIL:  {detail}"))
    });
    assert!(found, "the server log should show {message:?} with DETAIL {detail:?} for pid {pid}");
}

const TERMINATED: &str = "FATAL:  terminating connection due to administrator command";
const CANCELLED: &str = "ERROR:  canceling statement due to user request";

/// A statement run in a thread by the Rust client (libpq's protocol): its SQLSTATE and DETAIL.
fn long_statement(s: &Server, db: &str) -> (i32, thread::JoinHandle<(String, Option<String>)>) {
    let mut client = s.connect(db, APP);
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let handle = thread::spawn(move || {
        let err = client.batch_execute("SELECT pg_sleep(60)").unwrap_err();
        let db_err = err.as_db_error().expect("an error from the server");
        (db_err.code().code().to_owned(), db_err.detail().map(str::to_owned))
    });
    wait_for(Duration::from_secs(10), || {
        s.probe_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", &[&pid])
            .get::<_, i64>(0)
            == 1
    });
    (pid, handle)
}

#[test]
fn kill_sessions_tells_idle_and_running_clients_who_ended_them_and_why() {
    let s = server();
    let db = s.fresh_db("t_told_kill");
    let idle = Psql::open(s, &db, APP);
    let mut running = Psql::open(s, &db, APP);
    running.run_long(s);
    let (idle_pid, running_pid) = (idle.pid, running.pid);
    kill(s, &format!("'{db}', reason => 'nightly rebuild'"));
    let detail = "session_kill: terminated by postgres: nightly rebuild";
    assert_told(&idle.finish(), TERMINATED, detail);
    assert_told(&running.finish(), TERMINATED, detail);
    assert_logged(s, idle_pid, "terminating connection due to administrator command", detail);
    assert_logged(s, running_pid, "terminating connection due to administrator command", detail);

    let (pid, statement) = long_statement(s, &db);
    kill(s, &format!("'{db}', 'cancel'"));
    assert_eq!(
        statement.join().unwrap(),
        (QUERY_CANCELED.to_owned(), Some("session_kill: cancelled by postgres".to_owned()))
    );
    assert_logged(s, pid, "canceling statement due to user request", "session_kill: cancelled by postgres");
}

#[test]
fn a_drain_tells_clients_which_database_is_drained_and_by_whom() {
    let s = server();
    let db = s.fresh_db("t_told_drain");
    let idle = Psql::open(s, &db, APP);
    let mut running = Psql::open(s, &db, APP);
    running.run_long(s);
    s.admin().execute("SELECT * FROM session_kill.drain_database($1, grace => '1s')", &[&db]).unwrap();
    let detail = format!("session_kill: database \"{db}\" is being drained by postgres");
    assert_told(&idle.finish(), TERMINATED, &detail);
    let running = running.finish();
    assert_told(&running, CANCELLED, &detail);
    assert_told(&running, TERMINATED, &detail);
    s.admin().execute("SELECT session_kill.undrain_database($1)", &[&db]).unwrap();
}

#[test]
fn signals_from_anyone_else_carry_no_detail() {
    let s = server();
    let db = s.fresh_db("t_told_others");
    let mut target = Psql::open(s, &db, APP);
    // A cancel of an idle session interrupts nothing; its reason must not wait for the next cancel.
    kill(s, &format!("'{db}', 'cancel'"));
    thread::sleep(Duration::from_millis(2500));
    target.run_long(s);
    s.admin().execute("SELECT pg_cancel_backend($1)", &[&target.pid]).unwrap();
    wait_for(Duration::from_secs(10), || {
        s.probe_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
            &[&target.pid],
        )
        .get::<_, i64>(0)
            == 0
    });
    s.admin().execute("SELECT pg_terminate_backend($1)", &[&target.pid]).unwrap();
    let stderr = target.finish();
    assert!(stderr.contains(CANCELLED) && stderr.contains(TERMINATED), "{stderr}");
    assert!(!stderr.contains("session_kill"), "someone else's signals are not ours: {stderr}");
}

#[test]
fn the_worker_tells_clients_which_limit_or_rule_ended_them() {
    let s = Server::start(&["session_kill.idle_timeout = '2s'"]);
    let rule: i64 = s
        .admin()
        .query_one(
            "INSERT INTO session_kill.rules (role, state, timeout, action, grace, comment)
             VALUES ('app', 'active', '1s', 'cancel_then_terminate', '30s', 'runaway reports') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    wait_for(Duration::from_secs(20), || {
        s.admin().query_one("SELECT rules FROM session_kill.worker", &[]).unwrap().get::<_, i32>(0) == 1
    });
    let idle = Psql::open(&s, "postgres", APP);
    let idle_pid = idle.pid;
    let (pid, statement) = long_statement(&s, "postgres");
    let (code, detail) = statement.join().unwrap();
    assert_eq!(code, QUERY_CANCELED);
    let detail = detail.expect("a detail");
    assert!(
        detail.starts_with("session_kill: running a statement for ")
            && tells_duration_over(&detail, "session_kill: running a statement for ", 1.0)
            && detail.ends_with(&format!("s, over rule {rule} (runaway reports)")),
        "{detail}"
    );
    assert_logged(&s, pid, "canceling statement due to user request", &detail);
    s.wait_until_gone(idle_pid);
    let stderr = idle.finish();
    let told = stderr.lines().find(|l| l.starts_with("DETAIL:  ")).unwrap_or_default();
    assert!(
        told.starts_with("DETAIL:  session_kill: idle for ")
            && tells_duration_over(told, "DETAIL:  session_kill: idle for ", 2.0)
            && told.ends_with(", over session_kill.idle_timeout (2.0s)"),
        "{stderr}"
    );
    s.stop();
}

#[test]
fn the_pressure_reaper_tells_its_victims_why() {
    let s = Server::start(&["max_connections = 20", "session_kill.max_connection_usage = 0.5"]);
    let crowd: Vec<Session> = (0..12).map(|_| Session::idle(s.connect("postgres", APP))).collect();
    wait_for(Duration::from_secs(20), || crowd.iter().filter(|c| s.alive(c.pid)).count() <= 10);
    let ended: Vec<i32> = crowd.iter().map(|c| c.pid).filter(|pid| !s.alive(*pid)).collect();
    assert!(!ended.is_empty());
    for pid in ended {
        let log = s.server_log();
        let detail = log
            .lines()
            .skip_while(|l| {
                !(l.contains(&format!("[{pid}] "))
                    && l.ends_with("terminating connection due to administrator command"))
            })
            .nth(1)
            .unwrap_or_default();
        assert!(
            detail.contains("DETAIL:  session_kill: idle for ")
                && detail.contains(" while client sessions crowd max_connections ("),
            "{detail}"
        );
    }
    s.stop();
}
