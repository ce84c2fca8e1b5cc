//! A real PostgreSQL server with `shared_preload_libraries = 'session_kill'`, started once per
//! test binary as the `postgres` OS user on a private port and socket directory, plus helpers to
//! open real client sessions in each state.
//!
//! The server comes from `SESSION_KILL_PG_BINDIR` (the `pg_config --bindir` of an installation
//! that has session_kill installed).

pub mod bouncer;
pub mod stats;

use postgres::{Client, Config, NoTls};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Roles every test can use, created at start-up.
pub const APP: &str = "app";
pub const OTHER: &str = "other_app";
pub const SUPER: &str = "dba";
pub const SIGNALLER: &str = "signaller"; // member of pg_signal_backend
pub const PLAIN: &str = "plain"; // no privileges over anyone
pub const APP_MEMBER: &str = "app_member"; // member of `app`

pub struct Server {
    pub bindir: PathBuf,
    pub datadir: PathBuf,
    pub port: u16,
    /// One admin connection for the harness's polling, so probes do not log in every 10 ms
    /// (logins would count against the pressure reaper's threshold and wake the worker).
    probe: Mutex<Option<Client>>,
}

/// A test that fails half-way leaves no postmaster behind.
impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        // A passing test leaves no cluster behind (a full run would fill the disk); a failing
        // one keeps its data directory and server log for a look.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.datadir);
        }
    }
}

static SERVER: OnceLock<Server> = OnceLock::new();

/// The shared server of this test binary, started on first use and stopped at exit.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let server = Server::start(&["max_connections = 400", "log_connections = on"]);
        extern "C" fn stop_at_exit() {
            if let Some(s) = SERVER.get() {
                s.stop();
            }
        }
        // SAFETY: registering a plain extern "C" function to run at process exit.
        unsafe { libc::atexit(stop_at_exit) };
        server
    })
}

impl Server {
    /// initdb + start a fresh cluster with extra `postgresql.conf` lines.
    pub fn start(extra_conf: &[&str]) -> Server {
        Server::start_with_env(extra_conf, &[])
    }

    /// `start`, with extra environment variables for the postmaster and every backend.
    pub fn start_with_env(extra_conf: &[&str], env: &[(&str, &str)]) -> Server {
        let bindir = PathBuf::from(
            std::env::var("SESSION_KILL_PG_BINDIR")
                .expect("set SESSION_KILL_PG_BINDIR to the server's bin directory"),
        );
        let root = PathBuf::from(
            std::env::var("SESSION_KILL_TEST_ROOT").unwrap_or_else(|_| "/var/tmp/session_kill".into()),
        );
        let port = free_port();
        let datadir = root.join(format!("cluster-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let _ = std::fs::remove_dir_all(&datadir);
        std::fs::create_dir_all(&datadir).unwrap();
        run_checked(Command::new("chown").args(["postgres:", path_str(&root), path_str(&datadir)]));
        run_checked(as_postgres(&bindir.join("initdb")).args([
            "-D",
            path_str(&datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]));
        let mut conf = vec![
            format!("port = {port}"),
            format!("unix_socket_directories = '{}'", datadir.display()),
            "listen_addresses = '127.0.0.1'".into(),
            "shared_preload_libraries = 'session_kill'".into(),
            "log_line_prefix = '%m [%p] %u@%d '".into(),
            "fsync = off".into(),
        ];
        conf.extend(extra_conf.iter().map(|s| s.to_string()));
        std::fs::write(datadir.join("postgresql.auto.conf"), conf.join("\n") + "\n").unwrap();
        run_checked(
            Command::new("chown").args(["postgres:", path_str(&datadir.join("postgresql.auto.conf"))]),
        );
        let server = Server { bindir, datadir, port, probe: Mutex::new(None) };
        run_checked(
            as_postgres(&server.bindir.join("pg_ctl"))
                .envs(env.iter().copied())
                .args(["-D", path_str(&server.datadir), "-w", "-t", "60"])
                .args(["-l", path_str(&server.log_path()), "start"]),
        );
        server.bootstrap();
        server
    }

    pub fn stop(&self) {
        let _ = as_postgres(&self.bindir.join("pg_ctl"))
            .args(["-D", path_str(&self.datadir), "-m", "immediate", "stop"])
            .output();
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        run_checked(
            as_postgres(&self.bindir.join("pg_ctl")).args(["-D", path_str(&self.datadir)]).args(args),
        );
    }

    /// The running postmaster's PID, from its postmaster.pid file.
    pub fn postmaster_pid(&self) -> i32 {
        let pid = std::fs::read_to_string(self.datadir.join("postmaster.pid")).unwrap();
        pid.lines().next().unwrap().trim().parse().unwrap()
    }

    pub fn log_path(&self) -> PathBuf {
        self.datadir.join("server.log")
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The server log, once it shows `text`. session_kill logs a signal just after sending it,
    /// so the log may lag what a client saw.
    #[track_caller]
    pub fn log_showing(&self, text: &str) -> String {
        let mut log = String::new();
        wait_for_described(Duration::from_secs(20), &format!("the server log shows {text:?}"), || {
            log = self.server_log();
            log.contains(text)
        });
        log
    }

    fn bootstrap(&self) {
        self.admin()
            .batch_execute(&format!(
                "CREATE ROLE {APP} LOGIN; CREATE ROLE {OTHER} LOGIN;
                 CREATE ROLE {SUPER} LOGIN SUPERUSER;
                 CREATE ROLE {SIGNALLER} LOGIN IN ROLE pg_signal_backend;
                 CREATE ROLE {PLAIN} LOGIN;
                 CREATE ROLE {APP_MEMBER} LOGIN IN ROLE {APP};"
            ))
            .unwrap();
        // template1 too, so every database a test creates has the extension.
        for db in ["template1", "postgres"] {
            self.connect(db, "postgres")
                .batch_execute(&format!(
                    "CREATE EXTENSION session_kill;
                     GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA session_kill
                       TO {SIGNALLER}, {PLAIN}, {APP_MEMBER}, {APP};"
                ))
                .unwrap();
        }
    }

    /// Connection settings for a Unix-socket session (client_addr NULL).
    pub fn config(&self, db: &str, user: &str) -> Config {
        let mut c = Config::new();
        c.host_path(&self.datadir).port(self.port).dbname(db).user(user).application_name("pg_test");
        c.connect_timeout(Duration::from_secs(10));
        c
    }

    pub fn connect(&self, db: &str, user: &str) -> Client {
        self.config(db, user).connect(NoTls).unwrap_or_else(|e| panic!("connect {user}@{db}: {e}"))
    }

    /// A TCP session from 127.0.0.1 (client_addr set).
    pub fn connect_tcp(&self, db: &str, user: &str) -> Client {
        let mut c = Config::new();
        c.host("127.0.0.1").port(self.port).dbname(db).user(user).application_name("pg_test_tcp");
        c.connect(NoTls).unwrap_or_else(|e| panic!("connect tcp {user}@{db}: {e}"))
    }

    /// A superuser session on `postgres` (the caller in most tests).
    pub fn admin(&self) -> Client {
        self.connect("postgres", "postgres")
    }

    /// Creates (or re-creates) a database for one test.
    pub fn fresh_db(&self, name: &str) -> String {
        let mut admin = self.admin();
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        name.to_owned()
    }

    /// Runs a client program (psql, dropdb, pgbench) of this server against it.
    pub fn client_program(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.env("PGHOST", &self.datadir).env("PGPORT", self.port.to_string()).env("PGUSER", "postgres");
        cmd
    }

    /// Runs a one-row query on the harness's shared admin connection (reconnecting if needed).
    pub fn probe_one(&self, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> postgres::Row {
        let mut probe = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        if probe.as_mut().is_none_or(|c| c.is_valid(Duration::from_secs(5)).is_err()) {
            *probe = Some(self.admin());
        }
        let client = probe.as_mut().expect("connected above");
        client.query_one(sql, params).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn database_exists(&self, db: &str) -> bool {
        self.probe_one("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", &[&db]).get(0)
    }

    /// The backend is still in pg_stat_activity.
    pub fn alive(&self, pid: i32) -> bool {
        self.probe_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&pid]).get::<_, i64>(0) == 1
    }

    /// Waits (up to 20 s) until the backend has left pg_stat_activity.
    pub fn wait_until_gone(&self, pid: i32) {
        wait_for(Duration::from_secs(20), || !self.alive(pid));
    }

    /// The number of client sessions connected to `db`, read from pg_stat_activity.
    pub fn sessions_in(&self, db: &str) -> i64 {
        self.probe_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
            &[&db],
        )
        .get(0)
    }
}

/// One real client session held open by a test.
pub struct Session {
    pub client: Client,
    pub pid: i32,
}

impl Session {
    fn new(mut client: Client) -> Session {
        let pid = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        Session { client, pid }
    }

    /// Idle: ran a query, now waits for the client.
    pub fn idle(client: Client) -> Session {
        Session::new(client)
    }

    /// Idle in transaction: `BEGIN` plus a query, then nothing.
    pub fn idle_in_transaction(client: Client) -> Session {
        let mut s = Session::new(client);
        s.client.batch_execute("BEGIN; SELECT 1").unwrap();
        s
    }

    /// What the client sees on its next query: alive, or the error that ended it.
    pub fn probe(&mut self) -> ClientView {
        match self.client.simple_query("SELECT 1") {
            Ok(_) => ClientView::Alive,
            Err(e) => ClientView::Ended(error_code(&e)),
        }
    }
}

/// A session running `pg_sleep` in its own thread; joining yields what its query returned.
pub struct ActiveSession {
    pub pid: i32,
    handle: JoinHandle<(Client, Result<(), String>)>,
}

impl ActiveSession {
    /// Starts `SELECT pg_sleep(secs)` and returns once the server shows it as active.
    pub fn start(server: &Server, client: Client, secs: u32) -> ActiveSession {
        ActiveSession::running(server, client, &format!("SELECT pg_sleep({secs})"))
    }

    /// Starts `sql` and returns once the server shows it as active.
    pub fn running(server: &Server, mut client: Client, sql: &str) -> ActiveSession {
        let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let sql = sql.to_owned();
        let handle = thread::spawn(move || {
            let result = client.batch_execute(&sql).map_err(|e| error_code(&e));
            (client, result)
        });
        ActiveSession::from_parts(server, pid, handle)
    }

    /// A session of `pid` whose statement runs in `handle`; returns once it shows as active.
    pub fn from_parts(
        server: &Server,
        pid: i32,
        handle: JoinHandle<(Client, Result<(), String>)>,
    ) -> ActiveSession {
        wait_for_described(Duration::from_secs(10), "the session shows as active", || {
            server
                .probe_one(
                    "SELECT coalesce(bool_or(state = 'active'), false) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .get::<_, bool>(0)
        });
        ActiveSession { pid, handle }
    }

    /// The query's result (Err with SQLSTATE) and what the session looks like afterwards.
    pub fn finish(self) -> (Result<(), String>, ClientView) {
        let (client, result) = self.handle.join().unwrap();
        let mut s = Session { client, pid: self.pid };
        (result, s.probe())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientView {
    Alive,
    /// The SQLSTATE the client received, or "closed" when the connection just went away.
    Ended(String),
}

/// Terminated by an administrator: `FATAL: terminating connection due to administrator command`.
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// Cancelled: `ERROR: canceling statement due to user request`.
pub const QUERY_CANCELED: &str = "57014";

pub fn error_code(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.code().code().to_owned(),
        None => "closed".to_owned(),
    }
}

/// A refused statement's SQLSTATE and message, or ("closed", the error) when the connection
/// just went away: what a permission matrix compares.
pub fn refusal(e: &postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (db.code().code().to_owned(), db.message().to_owned()),
        None => ("closed".to_owned(), e.to_string()),
    }
}

/// The server log has a line of session_kill sending a cancel or terminate to `pid`.
pub fn signalled(server: &Server, pid: i32) -> bool {
    let (cancel, terminate) = (
        format!("session_kill: sent cancel to pid {pid} "),
        format!("session_kill: sent terminate to pid {pid} "),
    );
    server.server_log().lines().any(|l| l.contains(&cancel) || l.contains(&terminate))
}

/// A connection whose start-up the client slows with `post_auth_delay`, opened in a thread that
/// first runs `before`.
pub fn slow_login_after(
    s: &Server,
    db: &str,
    user: &str,
    delay_secs: u32,
    before: impl FnOnce() + Send + 'static,
) -> thread::JoinHandle<Result<(), String>> {
    let mut config = s.config(db, user);
    config.options(&format!("-c post_auth_delay={delay_secs}"));
    config.connect_timeout(Duration::from_secs(30));
    thread::spawn(move || {
        before();
        let mut client = config.connect(NoTls).map_err(|e| error_code(&e))?;
        client.simple_query("SELECT 1").map(|_| ()).map_err(|e| error_code(&e))
    })
}

/// Whether `text` tells, right after `prefix`, a duration (written `1.2s`) of `limit` seconds to
/// 5 s more. The worker acts at the deadline, but a loaded machine may delay it by a second.
pub fn tells_duration_over(text: &str, prefix: &str, limit: f64) -> bool {
    let told = text.split_once(prefix).and_then(|(_, rest)| rest.split_once('s'));
    let secs = told.and_then(|(secs, _)| secs.parse::<f64>().ok());
    secs.is_some_and(|secs| (limit..limit + 5.0).contains(&secs))
}

/// Polls `done` every 10 ms until true; panics after `timeout`, at the caller's line.
#[track_caller]
pub fn wait_for(timeout: Duration, done: impl FnMut() -> bool) {
    wait_for_described(timeout, "condition", done)
}

/// `wait_for`, saying what was waited for when it times out.
#[track_caller]
pub fn wait_for_described(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not reached within {timeout:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

pub fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(program);
    cmd
}

pub fn run_checked(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// One row of `kill_sessions`' result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acted {
    pub pid: i32,
    pub action: String,
    pub outcome: String,
}

/// Runs a `kill_sessions(...)` call (the argument list) as `caller` and returns its rows by PID.
pub fn kill_as(
    caller: &mut Client,
    args: &str,
) -> Result<std::collections::BTreeMap<i32, Acted>, postgres::Error> {
    let rows =
        caller.query(&format!("SELECT pid, action, outcome FROM session_kill.kill_sessions({args})"), &[])?;
    Ok(rows
        .iter()
        .map(|r| {
            let a = Acted { pid: r.get(0), action: r.get(1), outcome: r.get(2) };
            (a.pid, a)
        })
        .collect())
}

/// `kill_as` for the superuser `postgres`, panicking on error.
pub fn kill(server: &Server, args: &str) -> std::collections::BTreeMap<i32, Acted> {
    kill_as(&mut server.admin(), args).unwrap_or_else(|e| panic!("kill_sessions({args}): {e:?}"))
}

/// Asserts the row for `pid` has this action and outcome.
#[track_caller]
pub fn assert_acted(rows: &std::collections::BTreeMap<i32, Acted>, pid: i32, action: &str, outcome: &str) {
    let row = rows.get(&pid).unwrap_or_else(|| panic!("no row for pid {pid} in {rows:#?}"));
    assert_eq!((row.action.as_str(), row.outcome.as_str()), (action, outcome), "pid {pid}");
}

/// Asserts the client's session was terminated by an administrator: the client got 57P01, or
/// (idle clients, which only notice on their next query) its connection was closed right after
/// the server sent it `FATAL: terminating connection due to administrator command`.
#[track_caller]
pub fn assert_terminated(s: &mut Session) {
    assert_ended_by_admin(s.pid, s.probe());
}

#[track_caller]
pub fn assert_ended_by_admin(pid: i32, view: ClientView) {
    assert_ended_by_admin_on(server(), pid, view)
}

/// `assert_ended_by_admin` for a server of the test's own.
#[track_caller]
pub fn assert_ended_by_admin_on(server: &Server, pid: i32, view: ClientView) {
    let told = || {
        server.server_log().lines().any(|l| {
            l.contains(&format!("[{pid}] "))
                && l.contains("FATAL:  terminating connection due to administrator command")
        })
    };
    match view {
        ClientView::Ended(code) if code == ADMIN_SHUTDOWN => {}
        ClientView::Ended(code) if code == "closed" && told() => {}
        other => panic!("pid {pid} should have been terminated by an administrator, client saw {other:?}"),
    }
}

#[track_caller]
pub fn assert_alive(s: &mut Session) {
    assert_eq!(s.probe(), ClientView::Alive, "pid {} should be alive", s.pid);
}

impl Server {
    /// A streaming hot standby of this server, made with `pg_basebackup -R`, on its own port.
    pub fn start_standby(&self, extra_conf: &[&str]) -> Server {
        let port = free_port();
        let datadir = self.datadir.with_file_name(format!("standby-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&datadir);
        run_checked(as_postgres(&self.bindir.join("pg_basebackup")).args([
            "-h",
            path_str(&self.datadir),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-D",
            path_str(&datadir),
            "-R",
            "-X",
            "stream",
        ]));
        let mut conf =
            vec![format!("port = {port}"), format!("unix_socket_directories = '{}'", datadir.display())];
        conf.extend(extra_conf.iter().map(|s| s.to_string()));
        let auto_conf = datadir.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto_conf).unwrap();
        text.push_str(&(conf.join("\n") + "\n"));
        std::fs::write(&auto_conf, text).unwrap();
        let standby = Server { bindir: self.bindir.clone(), datadir, port, probe: Mutex::new(None) };
        standby.pg_ctl(&["-w", "-t", "60", "-l", path_str(&standby.log_path()), "start"]);
        standby
    }

    pub fn restart(&self) {
        self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "-l", path_str(&self.log_path()), "restart"]);
    }
}

/// One login attempt by a `Reconnector`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub started: std::time::SystemTime,
    /// Ok when the login succeeded, else the SQLSTATE it was refused with.
    pub result: Result<(), String>,
}

/// A client that keeps logging in to a database in a loop (hold briefly, disconnect, again),
/// like an application pool re-filling itself during maintenance.
pub struct Reconnector {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: JoinHandle<Vec<Attempt>>,
}

impl Reconnector {
    /// Each login runs `SELECT 1` (a pool validating its connection), then holds it 20 ms.
    pub fn start(config: Config) -> Reconnector {
        Reconnector::spawn(config, true)
    }

    /// Each login holds its connection 20 ms without running a statement, so its session is
    /// never caught with a query running (never cancelled, only terminated or refused).
    pub fn logins_only(config: Config) -> Reconnector {
        Reconnector::spawn(config, false)
    }

    fn spawn(config: Config, validate: bool) -> Reconnector {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut attempts = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let started = std::time::SystemTime::now();
                let result = config.connect(NoTls).and_then(|mut c| {
                    if validate {
                        c.simple_query("SELECT 1")?;
                    }
                    thread::sleep(Duration::from_millis(20));
                    Ok(())
                });
                attempts.push(Attempt { started, result: result.map_err(|e| error_code(&e)) });
                thread::sleep(Duration::from_millis(2));
            }
            attempts
        });
        Reconnector { stop, handle }
    }

    pub fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Refused because the database is being drained.
pub const CANNOT_CONNECT_NOW: &str = "57P03";
