//! A real PgBouncer (Debian's `pgbouncer` package, installed by `scripts/install-deps.sh`) in
//! front of a test `Server`, started by the test itself: its own process, run as the `postgres`
//! OS user, with an ini file generated in its own directory next to the server's data directory.
//! It listens on 127.0.0.1 and a free port (and a Unix socket in that directory), lets the test
//! roles in without a password (`auth_type = trust`, all of them in its `auth_file`), and
//! connects to the server over TCP from 127.0.0.1, as a pooler on another host would: its
//! server connections show `client_addr = 127.0.0.1`, the harness's direct sessions (Unix socket)
//! show NULL. Every database name is forwarded (a `*` entry). Dropping the `Bouncer` stops it.
//!
//! Clients: `Bouncer::config`/`connect` (the Rust client), `Psql` (an interactive psql held open:
//! idle, idle in a transaction, running a statement) and `Bouncer::new_client` (`psql -c`), both
//! with `VERBOSITY=verbose` so what they print carries the SQLSTATE; `Bouncer::console`/`admin`
//! for the admin console.

use crate::{
    free_port, path_str, wait_for_described, Server, APP, APP_MEMBER, OTHER, PLAIN, SIGNALLER, SUPER,
};
use postgres::{Client, Config, NoTls, SimpleQueryMessage};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// PgBouncer's `pool_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// A client keeps one server connection from login to logout.
    Session,
    /// A client holds a server connection only for the length of a transaction.
    Transaction,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// The role PgBouncer's admin console (`psql -d pgbouncer`) lets run `SHOW`, `PAUSE`, `KILL`...
pub const BOUNCER_ADMIN: &str = "postgres";

pub struct Bouncer {
    pub port: u16,
    /// Holds the ini file, the auth file, the log, the pid file and the Unix socket.
    pub dir: PathBuf,
    pub mode: PoolMode,
    /// The server's bin directory (for `psql`).
    bindir: PathBuf,
    child: Option<Child>,
}

/// Stops it; its directory is removed unless the test is failing (its log is kept there).
impl Drop for Bouncer {
    fn drop(&mut self) {
        self.stop();
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Bouncer {
    /// Starts a PgBouncer for `server` in `mode`; `extra_ini` lines are appended to the
    /// `[pgbouncer]` section after the defaults (a later setting overrides an earlier one), e.g.
    /// `"server_login_retry = 1"`. Returns once it accepts connections.
    pub fn start(server: &Server, mode: PoolMode, extra_ini: &[&str]) -> Bouncer {
        Bouncer::start_for_users(server, mode, extra_ini, &[])
    }

    /// `start`, letting in `extra_users` too (roles a test created besides the harness's own).
    pub fn start_for_users(
        server: &Server,
        mode: PoolMode,
        extra_ini: &[&str],
        extra_users: &[&str],
    ) -> Bouncer {
        let port = free_port();
        let dir = server.datadir.with_file_name(format!("bouncer-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let users: String = ["postgres", APP, OTHER, SUPER, SIGNALLER, PLAIN, APP_MEMBER]
            .iter()
            .chain(extra_users)
            .map(|u| format!("\"{u}\" \"\"\n"))
            .collect();
        std::fs::write(dir.join("userlist.txt"), users).unwrap();
        let mut ini = vec![
            "[databases]".to_owned(),
            format!("* = host=127.0.0.1 port={}", server.port),
            String::new(),
            "[pgbouncer]".to_owned(),
            "listen_addr = 127.0.0.1".to_owned(),
            format!("listen_port = {port}"),
            format!("unix_socket_dir = {}", dir.display()),
            format!("pidfile = {}", dir.join("pgbouncer.pid").display()),
            format!("logfile = {}", dir.join("pgbouncer.log").display()),
            "auth_type = trust".to_owned(),
            format!("auth_file = {}", dir.join("userlist.txt").display()),
            format!("admin_users = {BOUNCER_ADMIN}"),
            format!("pool_mode = {}", mode.as_str()),
            // Above PgBouncer's defaults (100, 20), so that the benchmark's clients fit.
            "max_client_conn = 500".to_owned(),
            "default_pool_size = 50".to_owned(),
        ];
        ini.extend(extra_ini.iter().map(|l| l.to_string()));
        std::fs::write(dir.join("pgbouncer.ini"), ini.join("\n") + "\n").unwrap();
        crate::run_checked(Command::new("chown").args(["-R", "postgres:", path_str(&dir)]));

        let (uid, gid) = postgres_ids();
        let child = Command::new("pgbouncer")
            .arg("-q") // the log goes to the logfile only
            .arg(dir.join("pgbouncer.ini"))
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run pgbouncer (Debian package `pgbouncer`, see scripts/install-deps.sh)");
        let mut bouncer = Bouncer { port, dir, mode, bindir: server.bindir.clone(), child: Some(child) };
        bouncer.wait_until_listening();
        bouncer
    }

    fn wait_until_listening(&mut self) {
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().unwrap());
            if exited.is_some() || start.elapsed() > Duration::from_secs(20) {
                panic!("pgbouncer did not start ({exited:?}); its log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it at once (SIGTERM: PgBouncer's immediate shutdown), closing every client and
    /// server connection.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Connection settings for a client of the pooler (TCP to 127.0.0.1).
    pub fn config(&self, db: &str, user: &str) -> Config {
        let mut c = Config::new();
        c.host("127.0.0.1").port(self.port).dbname(db).user(user).application_name("pg_test_bouncer");
        c.connect_timeout(Duration::from_secs(10));
        c
    }

    pub fn connect(&self, db: &str, user: &str) -> Client {
        self.config(db, user)
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("connect {user}@{db} via pgbouncer: {e}"))
    }

    /// `psql` (the server's) pointed at the pooler: add `-d DB -U USER` and the rest.
    pub fn psql(&self) -> Command {
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.env("PGHOST", "127.0.0.1").env("PGPORT", self.port.to_string()).env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// A new client of `db` as `APP`: `psql -c 'SELECT 1'` through the pooler, started now
    /// (`VERBOSITY=verbose`: what it prints carries the SQLSTATE).
    pub fn new_client(&self, db: &str) -> Child {
        self.psql()
            .args(["-X", "-A", "-t", "-v", "VERBOSITY=verbose", "-d", db, "-U", APP, "-c", "SELECT 1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `new_client`, waited for: (it printed `1`, its stderr).
    pub fn new_client_outcome(&self, db: &str) -> (bool, String) {
        psql_outcome(self.new_client(db).wait_with_output().unwrap())
    }

    /// Runs one command on the admin console (`SHOW POOLS`, `PAUSE shop`, `KILL shop`,
    /// `RESUME shop`, `RECONNECT shop`...). `PAUSE` returns only once the database's server
    /// connections are released: run it in a thread to act meanwhile.
    pub fn console(&self, command: &str) -> Result<Vec<BTreeMap<String, String>>, postgres::Error> {
        let mut admin = self.config("pgbouncer", BOUNCER_ADMIN).connect(NoTls)?;
        let rows = admin
            .simple_query(command)?
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    row.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.name().to_owned(), row.get(i).unwrap_or("").to_owned()))
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        Ok(rows)
    }

    /// `console`, panicking on error.
    #[track_caller]
    pub fn admin(&self, command: &str) -> Vec<BTreeMap<String, String>> {
        self.console(command).unwrap_or_else(|e| panic!("pgbouncer console {command:?}: {e}"))
    }

    /// The server connections the pooler holds for `user` to `db` (any state), from `SHOW SERVERS`.
    pub fn server_connections(&self, db: &str, user: &str) -> usize {
        let is = |r: &BTreeMap<String, String>, k: &str, v: &str| r.get(k).map(String::as_str) == Some(v);
        self.admin("SHOW SERVERS").iter().filter(|r| is(r, "database", db) && is(r, "user", user)).count()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

fn postgres_ids() -> (u32, u32) {
    // SAFETY: getpwnam with a NUL-terminated name; the fields are copied out at once.
    unsafe {
        let pw = libc::getpwnam(c"postgres".as_ptr());
        assert!(!pw.is_null(), "no `postgres` OS user");
        ((*pw).pw_uid, (*pw).pw_gid)
    }
}

/// What a `new_client` printed: (succeeded with `1`, stderr).
pub fn psql_outcome(out: Output) -> (bool, String) {
    let ok = out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1";
    (ok, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A psql process connected through the pooler, fed statements one at a time, with
/// `VERBOSITY=verbose` (what it prints carries the SQLSTATE).
pub struct Psql {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The backend serving it (in transaction pooling: the one serving its open transaction).
    pub pid: i32,
}

impl Psql {
    fn spawn(b: &Bouncer, db: &str, user: &str) -> Psql {
        let mut child = b
            .psql()
            .args(["-X", "-q", "-A", "-t", "-v", "VERBOSITY=verbose", "-d", db, "-U", user])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Psql { child, stdin, stdout, pid: 0 }
    }

    /// Idle outside a transaction (in transaction pooling its server connection goes back to
    /// the pool after each statement; `pid` is the one that ran its first).
    pub fn open(b: &Bouncer, db: &str, user: &str) -> Psql {
        let mut p = Psql::spawn(b, db, user);
        p.pid = p.line("SELECT pg_backend_pid();").parse().unwrap();
        p
    }

    /// Idle inside a transaction (`BEGIN`, then a statement).
    pub fn open_in_transaction(b: &Bouncer, db: &str, user: &str) -> Psql {
        let mut p = Psql::spawn(b, db, user);
        p.pid = p.line("BEGIN; SELECT pg_backend_pid();").parse().unwrap();
        p
    }

    /// Runs `sql` and returns the first line it printed.
    pub fn line(&mut self, sql: &str) -> String {
        writeln!(self.stdin, "{sql}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "psql printed nothing for {sql:?}");
        line.trim().to_owned()
    }

    /// Starts a long statement and returns once the server shows it running.
    pub fn run_long(&mut self, s: &Server) {
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
    pub fn finish(mut self) -> String {
        let _ = writeln!(self.stdin, "SELECT 1;");
        drop(self.stdin);
        let out = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}
