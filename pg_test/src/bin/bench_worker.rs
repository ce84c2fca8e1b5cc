//! Benchmark (not a test): how late idle sessions are ended after their limit, and what the
//! enforcer costs while nothing is due, for the session_kill worker, PostgreSQL's built-in
//! `idle_session_timeout`, and a client polling `pg_terminate_backend` every second. One run,
//! 100 and 1000 idle sessions. Prints a Markdown section.

use session_kill_pg_test::stats::{max, median, server_version};
use session_kill_pg_test::{Server, APP};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

const LIMIT: Duration = Duration::from_secs(2);
const CPU_WINDOW: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq)]
enum Enforcer {
    Worker,
    BuiltIn,
    Polling,
}

impl Enforcer {
    fn name(self) -> &'static str {
        match self {
            Enforcer::Worker => "session_kill worker (`session_kill.idle_timeout = '2s'`)",
            Enforcer::BuiltIn => "PostgreSQL `idle_session_timeout = '2s'`",
            Enforcer::Polling => "client polling `pg_terminate_backend` every 1 s",
        }
    }

    fn conf(self) -> Vec<&'static str> {
        match self {
            Enforcer::Worker => vec!["session_kill.idle_timeout = '2s'"],
            Enforcer::BuiltIn => vec!["idle_session_timeout = '2s'"],
            Enforcer::Polling => vec![],
        }
    }
}

const POLL_SQL: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND state = 'idle' AND pid <> pg_backend_pid()
      AND usename = 'app' AND clock_timestamp() - state_change > interval '2s'";

fn main() {
    let mut version = String::new();
    println!("### Idle-limit enforcement: lateness and cost\n");
    println!("Lateness = when the server logged the session's termination minus (when its last query returned to the client + 2 s limit), in ms; the log's timestamps are truncated to the millisecond and the client sees its query return slightly after the server went idle, so figures read up to ~1 ms low (hence the built-in timer's negative values). CPU = the enforcing process's CPU time (utime + stime from /proc) over {} s with every session idle and no limit due, as a share of one core; one clock tick over the window is {:.3} %, so 0.000 % means less than that.\n", CPU_WINDOW.as_secs(), 100.0 / (CPU_WINDOW.as_secs_f64() * clock_ticks_per_second()));
    println!("| enforcer | sessions | p50 | p95 | p99 | max | ended | CPU while nothing is due |\n|---|---:|---:|---:|---:|---:|---:|---:|");
    for n in [100usize, 1000] {
        for e in [Enforcer::Worker, Enforcer::BuiltIn, Enforcer::Polling] {
            let (late, cpu, v) = measure(e, n);
            version = v;
            let mut sorted = late.clone();
            sorted.sort_by(f64::total_cmp);
            let pct = |p: f64| sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1];
            println!(
                "| {} | {n} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{n} | {} |",
                e.name(),
                median(&late),
                pct(0.95),
                pct(0.99),
                max(&late),
                late.len(),
                cpu.map_or("n/a (a timer in each backend)".to_owned(), |c| format!("{c:.3} %")),
            );
        }
    }
    println!(
        "\n{version}; targets: worker p99 ≤ 10 ms, worker CPU ≤ 0.1 % of a core while nothing is due.\n"
    );
}

/// (lateness per ended session in ms, CPU share while nothing is due, server version)
fn measure(e: Enforcer, n: usize) -> (Vec<f64>, Option<f64>, String) {
    let mut conf = vec!["max_connections = 1100", "log_line_prefix = '%n [%p] '"];
    conf.extend(e.conf());
    let server = Server::start(&conf);
    let version = server_version(&server);

    // Lateness: n sessions go idle one after another; wait until all are gone.
    let mut idle_since: HashMap<i32, SystemTime> = HashMap::new();
    let mut clients = Vec::new();
    for _ in 0..n {
        let mut c = server.connect("postgres", APP);
        let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        idle_since.insert(pid, SystemTime::now());
        clients.push(c);
    }
    let mut poller = server.admin();
    let deadline = Instant::now() + LIMIT + Duration::from_secs(30);
    while count_app_sessions(&server) > 0 && Instant::now() < deadline {
        if e == Enforcer::Polling {
            poller.execute(POLL_SQL, &[]).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let ended = termination_times(&server.server_log());
    let late: Vec<f64> = idle_since
        .iter()
        .filter_map(|(pid, since)| {
            let limit_at = since.duration_since(SystemTime::UNIX_EPOCH).unwrap() + LIMIT;
            ended.get(pid).map(|at| (at - limit_at.as_secs_f64()) * 1000.0)
        })
        .collect();
    drop(clients);

    // Cost while nothing is due: sessions idle, limit far away.
    let cpu = match e {
        Enforcer::BuiltIn => None,
        Enforcer::Worker => {
            let mut admin = server.admin();
            admin.batch_execute("ALTER SYSTEM SET session_kill.idle_timeout = '1h'").unwrap();
            admin.batch_execute("SELECT pg_reload_conf()").unwrap();
            let _idle = open_idle(&server, n);
            let worker: i32 = admin
                .query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'session_kill worker'", &[])
                .unwrap()
                .get(0);
            std::thread::sleep(Duration::from_secs(1));
            Some(cpu_share(worker, || std::thread::sleep(CPU_WINDOW)))
        }
        Enforcer::Polling => {
            let _idle = open_idle(&server, n);
            let mut poller = server.admin();
            let backend: i32 = poller.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
            Some(cpu_share(backend, || {
                let end = Instant::now() + CPU_WINDOW;
                while Instant::now() < end {
                    poller.execute(POLL_SQL, &[]).unwrap();
                    std::thread::sleep(Duration::from_secs(1));
                }
            }))
        }
    };
    server.stop();
    (late, cpu, version)
}

fn open_idle(server: &Server, n: usize) -> Vec<postgres::Client> {
    session_kill_pg_test::stats::open_idle(server, "postgres", APP, n)
}

fn count_app_sessions(server: &Server) -> i64 {
    server
        .admin()
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'", &[])
        .unwrap()
        .get(0)
}

/// Epoch seconds of each backend's termination FATAL, from `%n [%p]` log lines.
fn termination_times(log: &str) -> HashMap<i32, f64> {
    log.lines()
        .filter(|l| l.contains("FATAL:  terminating connection due to"))
        .filter_map(|l| {
            let (epoch, rest) = l.split_once(" [")?;
            let (pid, _) = rest.split_once(']')?;
            Some((pid.parse().ok()?, epoch.parse().ok()?))
        })
        .collect()
}

/// The share of one core process `pid` used while `during` ran.
fn cpu_share(pid: i32, during: impl FnOnce()) -> f64 {
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let hz = clock_ticks_per_second();
    let (before, start) = (ticks(), Instant::now());
    during();
    let used = (ticks() - before) as f64 / hz;
    used / start.elapsed().as_secs_f64() * 100.0
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
