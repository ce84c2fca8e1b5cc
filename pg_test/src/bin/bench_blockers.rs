//! Benchmark (not a test): how late after its limit a lock blocker is ended, and from the limit
//! until the DDL it held up completes, for four ways of clearing it, side by side on the same
//! scenario: the session_kill worker (`session_kill.blocker_timeout = '1s'`),
//! `session_kill.make_way_after = '1s'` set by the DDL session, a client script polling
//! `pg_blocking_pids()` every second, and a `lock_timeout = '3s'` retry loop on the DDL side.
//! Then what the worker costs with 1000 idle sessions and nothing blocked while
//! `blocker_timeout` is on (it reads the lock manager at every scan). Prints a Markdown section.
//!
//! Scenario of each round: a fresh table; a session (role `app`) runs `BEGIN; SELECT count(*)`
//! on it and stays idle in transaction, holding AccessShareLock; the table's owner (`app_member`,
//! a member of `app`, so it may end `app`'s sessions) runs `ALTER TABLE ... ADD COLUMN`, which
//! waits for AccessExclusiveLock. The limit is the ALTER's wait start (`pg_locks.waitstart`,
//! read while it waits) + 1 s.
//!
//! Each method has a server of its own, so a server-wide setting or the polling script never
//! acts in another method's round: the worker's (`blocker_timeout = '1s'`), the polled one (the
//! script runs every second for the whole run, so its phase against a round is arbitrary, as in
//! real life), and a plain one for `make_way_after` and the retry loop. Rounds are interleaved,
//! and before each round every server's audit writes from earlier rounds are settled.

use session_kill_pg_test::stats::{
    clock_ticks_per_second, cpu_share, load_average, percentile, server_version, settle, worker_cpu, CpuUse,
};
use session_kill_pg_test::{error_code, Server, APP, APP_MEMBER};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// Rounds per method (`SESSION_KILL_BENCH_ROUNDS` overrides it for a quick trial).
fn rounds() -> usize {
    std::env::var("SESSION_KILL_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(100)
}
/// A retry-loop round every this many rounds: its blocker never goes away, so each such round
/// lasts the whole retry budget, and every one ends the same way.
const RETRY_EVERY: usize = 10;
const LIMIT_S: f64 = 1.0;
/// The retry loop gives up once an attempt fails this long after its first attempt started.
const RETRY_FOR: Duration = Duration::from_secs(10);
/// Harness guard: a blocker not ended this long after the ALTER started is ended by hand and the
/// round counted as not cleared.
const GIVE_UP: Duration = Duration::from_secs(20);
const SESSIONS: usize = 1000;
const CPU_WINDOW: Duration = Duration::from_secs(20);

const TERMINATED: &str = "FATAL:  terminating connection due to administrator command";

/// The polling script: every second, end whatever blocks a lock request that has waited at
/// least 1 s, unless it waits itself (a request queued behind the real blocker).
const POLL_SQL: &str = "SELECT pg_terminate_backend(blocker)
    FROM (SELECT DISTINCT unnest(pg_blocking_pids(pid)) AS blocker
            FROM pg_locks WHERE NOT granted AND waitstart <= clock_timestamp() - interval '1s') AS b
    WHERE blocker NOT IN (SELECT pid FROM pg_locks WHERE NOT granted AND pid IS NOT NULL)";

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Worker,
    MakeWay,
    Polling,
    Retry,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Worker => "session_kill worker, `session_kill.blocker_timeout = '1s'`",
            Method::MakeWay => {
                "`SET session_kill.make_way_after = '1s'` in the DDL session (the worker acts with its rights)"
            }
            Method::Polling => {
                "client script every 1 s: `pg_terminate_backend` of `pg_blocking_pids()` of requests waiting ≥ 1 s"
            }
            Method::Retry => "DDL side: `SET lock_timeout = '3s'`, retry the ALTER on 55P03 (no pause)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Method::Worker => "worker",
            Method::MakeWay => "makeway",
            Method::Polling => "polling",
            Method::Retry => "retry",
        }
    }
}

#[derive(Default)]
struct Results {
    rounds: usize,
    /// ms past the limit at which the blocker's termination was logged.
    ended: Vec<f64>,
    /// ms past the limit at which the ALTER returned to its client.
    ddl_done: Vec<f64>,
    /// The worker's own "exceeded by X ms" for the blocker, from its log line.
    worker_says: Vec<f64>,
    /// Retry loop: attempts per round, and how long each round's loop ran, in s.
    attempts: Vec<u32>,
    gave_up_after: Vec<f64>,
    /// Retry loop: the error its last attempt ended with, when it gave up.
    last_errors: Vec<String>,
}

struct Round {
    ended_late: Option<f64>,
    ddl_late: Option<f64>,
    worker_says: Option<f64>,
    attempts: u32,
    loop_secs: f64,
    last_error: Option<String>,
}

fn main() {
    let load_start = load_average();
    let base = ["log_line_prefix = '%n [%p] '"];
    let worker_srv = Cluster::start(
        &[&base[..], &["session_kill.blocker_timeout = '1s'", "max_connections = 1100"]].concat(),
    );
    let polled = Cluster::start(&base);
    let plain = Cluster::start(&base);
    let version = server_version(&worker_srv);

    let stop_polling = Arc::new(AtomicBool::new(false));
    let poller = {
        let mut client = polled.admin();
        let stop = stop_polling.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                client.execute(POLL_SQL, &[]).unwrap();
                thread::sleep(Duration::from_secs(1));
            }
        })
    };

    // A reference for the machine's scheduling delay during the rounds: a thread that sleeps to
    // random deadlines (as the worker waits on its latch until a deadline) and notes how late it
    // wakes. No PostgreSQL involved.
    let stop_reference = Arc::new(AtomicBool::new(false));
    let reference = {
        let stop = stop_reference.clone();
        thread::spawn(move || {
            let mut late = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let pause = Duration::from_micros(random_below(1_000_000));
                let start = Instant::now();
                thread::sleep(pause);
                late.push((start.elapsed() - pause).as_secs_f64() * 1000.0);
            }
            late
        })
    };

    let methods = [Method::Worker, Method::MakeWay, Method::Polling, Method::Retry];
    let mut results: Vec<Results> = methods.iter().map(|_| Results::default()).collect();
    let started = Instant::now();
    for round in 0..rounds() {
        for (i, &m) in methods.iter().enumerate() {
            if m == Method::Retry && round % RETRY_EVERY != RETRY_EVERY / 2 {
                continue;
            }
            for s in [&worker_srv, &polled, &plain] {
                settle(s);
            }
            let server = match m {
                Method::Worker => &worker_srv,
                Method::Polling => &polled,
                Method::MakeWay | Method::Retry => &plain,
            };
            let r = run_round(server, m, round);
            let res = &mut results[i];
            res.rounds += 1;
            res.ended.extend(r.ended_late);
            res.ddl_done.extend(r.ddl_late);
            res.worker_says.extend(r.worker_says);
            if m == Method::Retry {
                res.attempts.push(r.attempts);
                if r.ddl_late.is_none() {
                    res.gave_up_after.push(r.loop_secs);
                    res.last_errors.extend(r.last_error);
                }
            }
        }
    }
    let rounds_took = started.elapsed();
    stop_polling.store(true, Ordering::Relaxed);
    poller.join().unwrap();
    stop_reference.store(true, Ordering::Relaxed);
    let reference = reference.join().unwrap();
    drop((polled, plain));
    let load_mid = load_average();

    let cpu = measure_cpu(&worker_srv);
    drop(worker_srv);
    let load_end = load_average();

    let load = [load_start, load_mid, load_end];
    print_section(&version, &methods, &results, &reference, &cpu, rounds_took, load);
}

/// A server whose cluster is removed once it is stopped (a benchmark's clusters are of no use
/// afterwards, and take space), unless the benchmark failed: then its log is worth reading.
struct Cluster(Server);

impl Cluster {
    fn start(conf: &[&str]) -> Cluster {
        Cluster(Server::start(conf))
    }
}

impl std::ops::Deref for Cluster {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.0.stop();
        if thread::panicking() {
            eprintln!("kept for inspection: {}", self.0.datadir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0.datadir);
        }
    }
}

/// One round of `m` on `server`: see the module comment for the scenario.
fn run_round(server: &Server, m: Method, round: usize) -> Round {
    let table = format!("t_{}_{round}", m.tag());
    let mut admin = server.admin();
    admin
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int); INSERT INTO {table} SELECT generate_series(1, 100);
             ALTER TABLE {table} OWNER TO {APP_MEMBER}; GRANT SELECT ON {table} TO {APP};"
        ))
        .unwrap();
    let mut blocker = server.connect("postgres", APP);
    let blocker_pid: i32 = blocker.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    blocker.batch_execute(&format!("BEGIN; SELECT count(*) FROM {table}")).unwrap();

    let mut ddl = server.connect("postgres", APP_MEMBER);
    let ddl_pid: i32 = ddl.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    match m {
        Method::Retry => ddl.batch_execute("SET lock_timeout = '3s'").unwrap(),
        Method::MakeWay => ddl.batch_execute("SET session_kill.make_way_after = '1s'").unwrap(),
        Method::Worker | Method::Polling => {}
    }
    // A random pause (0-1 s) before the ALTER, so its wait starts at an arbitrary phase of the
    // polling script's 1 s loop (and of the worker's scans) instead of at a phase set by the
    // rhythm of the harness's rounds.
    thread::sleep(Duration::from_micros(random_below(1_000_000)));
    let log_offset = server.server_log().len();
    let alter = format!("ALTER TABLE {table} ADD COLUMN c int");
    let (tx, rx) = mpsc::channel();
    let ddl_thread = thread::spawn(move || {
        let loop_start = Instant::now();
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            match ddl.batch_execute(&alter) {
                Ok(()) => break Ok(SystemTime::now()),
                Err(e)
                    if m == Method::Retry
                        && error_code(&e) == "55P03"
                        && loop_start.elapsed() < RETRY_FOR => {}
                Err(e) => break Err(error_code(&e)),
            }
        };
        let _ = tx.send(());
        (ddl, outcome, attempts, loop_start.elapsed().as_secs_f64())
    });

    // The ALTER's wait start, as the lock manager records it (before its first attempt ends).
    let since: f64 = {
        let begun = Instant::now();
        loop {
            let row = admin
                .query_opt(
                    "SELECT extract(epoch FROM waitstart)::float8 FROM pg_locks
                      WHERE pid = $1 AND NOT granted AND waitstart IS NOT NULL",
                    &[&ddl_pid],
                )
                .unwrap();
            if let Some(row) = row {
                break row.get(0);
            }
            assert!(begun.elapsed() < Duration::from_secs(10), "the ALTER never waited for its lock");
            thread::sleep(Duration::from_millis(2));
        }
    };
    let limit_at = since + LIMIT_S;

    let guard = if m == Method::Retry { RETRY_FOR + Duration::from_secs(10) } else { GIVE_UP };
    let cleared_in_time = rx.recv_timeout(guard).is_ok();
    // The retry loop never gets its blocker out of the way, and a method that has not cleared it
    // within the guard is not counted: the harness ends the blocker by hand.
    let ended_by_method = cleared_in_time && m != Method::Retry;
    if !ended_by_method {
        admin.execute("SELECT pg_terminate_backend($1)", &[&blocker_pid]).unwrap();
    }
    let (_ddl, outcome, attempts, loop_secs) = ddl_thread.join().unwrap();
    let (ddl_late, last_error) = match outcome {
        Ok(at) if cleared_in_time => (Some((epoch(at) - limit_at) * 1000.0), None),
        Ok(_) => (None, None),
        Err(code) => (None, Some(code)),
    };

    // The blocker's termination as the server logged it (written before its locks are released,
    // so before the ALTER can complete; waited for anyway in case the file lags).
    let tag = format!("[{blocker_pid}] ");
    let mut ended_at = None;
    let mut worker_says = None;
    let begun = Instant::now();
    while ended_at.is_none() && begun.elapsed() < Duration::from_secs(5) {
        let log = server.server_log();
        let new = log.get(log_offset..).unwrap_or(&log);
        ended_at = new
            .lines()
            .filter(|l| l.contains(&tag) && l.contains(TERMINATED))
            .find_map(|l| l.split_once(" [")?.0.parse::<f64>().ok());
        worker_says = new
            .lines()
            .find(|l| l.contains(&format!("sent terminate to pid {blocker_pid} ")))
            .and_then(|l| l.split_once("exceeded by ")?.1.split_once(" ms")?.0.parse::<f64>().ok());
        if ended_at.is_none() {
            thread::sleep(Duration::from_millis(10));
        }
    }
    drop(blocker);
    Round {
        ended_late: ended_at.filter(|_| ended_by_method).map(|at| (at - limit_at) * 1000.0),
        ddl_late,
        worker_says: worker_says.filter(|_| m == Method::Worker),
        attempts,
        loop_secs,
        last_error,
    }
}

struct Cpu {
    label: String,
    used: CpuUse,
    /// Worker scans (or script polls) during the window.
    scans: u64,
}

/// The worker's CPU with SESSIONS idle sessions and nothing blocked, with `blocker_timeout` on;
/// for comparison with another 1 s limit that needs no lock manager read, and with none; and the
/// polling script's backend.
fn measure_cpu(server: &Server) -> Vec<Cpu> {
    let _idle = session_kill_pg_test::stats::open_idle(server, "postgres", APP, SESSIONS);
    let mut admin = server.admin();
    let mut out = Vec::new();
    for (settings, label) in [
        (
            &["session_kill.blocker_timeout = '1s'"][..],
            "session_kill worker, `blocker_timeout = '1s'` (looks for a lock wait every 1 s; scans backend status and the lock manager only when one waits)",
        ),
        (
            &["session_kill.blocker_timeout = '5s'"],
            "session_kill worker, `blocker_timeout = '5s'` (looks every 5 s)",
        ),
        (
            &["session_kill.blocker_timeout = 0", "session_kill.idle_in_transaction_timeout = '1s'"],
            "for comparison: worker, `idle_in_transaction_timeout = '1s'` instead (scans every 1 s: backend status only)",
        ),
        (
            &["session_kill.idle_in_transaction_timeout = 0"],
            "for comparison: worker, no limit on (sleeps until something changes)",
        ),
    ] {
        for setting in settings {
            admin.batch_execute(&format!("ALTER SYSTEM SET {setting}")).unwrap();
        }
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        let (used, scans) = worker_cpu(server, CPU_WINDOW);
        out.push(Cpu { label: label.to_owned(), used, scans });
    }
    let mut poller = server.admin();
    let backend: i32 = poller.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let mut polls = 0;
    let used = cpu_share(backend, || {
        let end = Instant::now() + CPU_WINDOW;
        while Instant::now() < end {
            poller.execute(POLL_SQL, &[]).unwrap();
            polls += 1;
            thread::sleep(Duration::from_secs(1));
        }
    });
    out.push(Cpu {
        label: "the polling script's backend (its query every 1 s)".to_owned(),
        used,
        scans: polls,
    });
    out
}

fn print_section(
    version: &str,
    methods: &[Method],
    results: &[Results],
    reference: &[f64],
    cpu: &[Cpu],
    rounds_took: Duration,
    load: [String; 3],
) {
    let n = rounds();
    println!("### Lock blockers: how late they are ended, and what it costs ({version})\n");
    println!(
        "Each round: a fresh table; a session of role `app` runs `BEGIN; SELECT count(*) FROM t` and stays idle in transaction (AccessShareLock); the table's owner runs `ALTER TABLE t ADD COLUMN c int`, which waits for AccessExclusiveLock. \
         The limit is the ALTER's wait start (`pg_locks.waitstart`, read while it waits) + 1 s. \
         *Blocker ended* = the server log's timestamp (`%n`) of the blocker's `FATAL: terminating connection` minus the limit; *ALTER done* = when the ALTER returned to its client minus the limit; both in ms. \
         Log timestamps are truncated to the millisecond, so *blocker ended* reads up to 1 ms low. \
         Before each ALTER a random pause of 0–1 s puts the start of its wait at an arbitrary phase of the polling script's loop and of the worker's scans. \
         {rounds} rounds interleaved across methods (a retry-loop round every {RETRY_EVERY}th: its blocker never leaves, so every such round lasts its whole budget); each method on a server of its own, every server's audit writes settled before each round; rounds took {:.0} s. \
         Percentiles are nearest-rank: with {rounds} rounds p99 is the value ranked {} from the top.\n",
        rounds_took.as_secs_f64(),
        n - ((n as f64 * 0.99).ceil() as usize).clamp(1, n) + 1,
        rounds = n
    );
    println!("| method | rounds | blocker ended p50 | p90 | p99 | max | ALTER done p50 | p90 | p99 | max | ALTER got through |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (m, r) in methods.iter().zip(results) {
        let cells = |v: &[f64]| -> String {
            if v.is_empty() {
                return "— | — | — | —".to_owned();
            }
            format!(
                "{:.1} | {:.1} | {:.1} | {:.1}",
                percentile(v, 0.5),
                percentile(v, 0.9),
                percentile(v, 0.99),
                percentile(v, 1.0)
            )
        };
        let through = if *m == Method::Retry && r.rounds > 0 {
            let attempts = dedup_counts(&r.attempts);
            let mut errors = r.last_errors.clone();
            errors.sort();
            errors.dedup();
            let gave_up = if r.gave_up_after.is_empty() {
                String::new()
            } else {
                format!(
                    "; gave up after {:.1}–{:.1} s, last attempt failing with {}; the blocker stays (ended by the harness)",
                    percentile(&r.gave_up_after, 0.0),
                    percentile(&r.gave_up_after, 1.0),
                    errors.join(", ")
                )
            };
            format!(
                "{}/{} within {} s; {} attempts a round{gave_up}",
                r.ddl_done.len(),
                r.rounds,
                RETRY_FOR.as_secs(),
                attempts.join(", "),
            )
        } else {
            format!("{}/{}", r.ddl_done.len(), r.rounds)
        };
        println!(
            "| {} | {} | {} | {} | {through} |",
            m.name(),
            r.rounds,
            cells(&r.ended),
            cells(&r.ddl_done)
        );
    }
    if let Some(w) = results.iter().zip(methods).find(|(_, m)| **m == Method::Worker).map(|(r, _)| r) {
        if !w.worker_says.is_empty() {
            println!(
                "\nThe worker's own log line (`session_kill.blocker_timeout exceeded by … ms`, its clock when it decided) puts its decision at p50 {:.1} / p99 {:.1} / max {:.1} ms past the limit; the rest of *blocker ended* is the signal reaching the blocker and its FATAL being written.",
                percentile(&w.worker_says, 0.5),
                percentile(&w.worker_says, 0.99),
                percentile(&w.worker_says, 1.0)
            );
        }
    }
    println!(
        "\nFor reference, the machine's scheduling delay during the same rounds: a thread of this benchmark sleeping to random deadlines ({} sleeps of 0–1 s, no PostgreSQL involved) woke p50 {:.1} / p90 {:.1} / p99 {:.1} / max {:.1} ms late. The worker waits on its latch to a deadline the same way (rounded up to whole ms), so it pays that delay too.",
        reference.len(),
        percentile(reference, 0.5),
        percentile(reference, 0.9),
        percentile(reference, 0.99),
        percentile(reference, 1.0)
    );
    println!(
        "\n#### CPU with {SESSIONS} idle sessions, nothing blocked\n\n\
         Over {} s per line, as a share of one core: from utime + stime in `/proc/<pid>/stat` (clock ticks: one tick over the window is {:.3} %, so 0.000 % means less than that) and from `/proc/<pid>/schedstat` (time on CPU in ns, not tick-sampled).\n",
        CPU_WINDOW.as_secs(),
        100.0 / (CPU_WINDOW.as_secs_f64() * clock_ticks_per_second())
    );
    println!("| process | CPU (/proc stat) | CPU (schedstat) | times run (schedstat) | scans (worker) or queries (script) | CPU per time run |");
    println!("|---|---:|---:|---:|---:|---:|");
    for c in cpu {
        let u = &c.used;
        let per = if u.runs > 0 {
            format!("{:.0} µs", u.nanos as f64 / 1e3 / u.runs as f64)
        } else {
            "—".to_owned()
        };
        println!("| {} | {:.3} % | {:.4} % | {} | {} | {per} |", c.label, u.ticks, u.exact, u.runs, c.scans);
    }
    println!(
        "\nLoad average (1, 5, 15 min) from `/proc/loadavg` at the start: {}; after the rounds: {}; at the end: {}. \
         Other engineers' builds and tests share these {} cores, so single rounds can be delayed by them.\n",
        load[0],
        load[1],
        load[2],
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{version}; targets: blocker ended ≤ 10 ms past the limit; worker CPU ≤ 0.1 % of a core with {SESSIONS} idle sessions.\n");
}

/// Nearest-rank percentile.
/// "4 (×9), 5 (×1)": how often each value occurs.
fn dedup_counts(v: &[u32]) -> Vec<String> {
    let mut s = v.to_vec();
    s.sort_unstable();
    let mut out: Vec<(u32, usize)> = Vec::new();
    for x in s {
        match out.last_mut() {
            Some((y, n)) if *y == x => *n += 1,
            _ => out.push((x, 1)),
        }
    }
    out.iter().map(|(x, n)| if out.len() == 1 { format!("{x}") } else { format!("{x} (×{n})") }).collect()
}

/// A pseudo-random number below `n` (xorshift, seeded from the clock): enough to spread phases.
fn random_below(n: u64) -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1,
        );
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x % n
    })
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}
