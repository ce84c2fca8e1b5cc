//! Benchmark (not a test): how late past `session_kill.snapshot_timeout` the worker ends a
//! session whose snapshot holds back the xmin horizon, and what the snapshot limits cost the
//! worker with 1000 idle sessions and no snapshot held. Prints a Markdown section.
//! `SESSION_KILL_BENCH_ROUNDS` sets the rounds (default 50).
//!
//! Each round: after a random pause of 0-1 s (so the snapshot is taken at any phase of the
//! worker's scans), a session of role `app` runs `BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT
//! count(*) FROM t` in one message and stays idle in that transaction. The snapshot is held since
//! that statement's start (`query_start`, read from pg_stat_activity), so the limit is
//! `query_start` + 1 s; lateness = the server log's timestamp (`%n`) of its `FATAL: terminating
//! connection` minus the limit.

use session_kill_pg_test::stats::{load_average, open_idle, percentile, server_version, settle, worker_cpu};
use session_kill_pg_test::{wait_for_described, Server, APP};
use std::thread;
use std::time::Duration;

const LIMIT_S: f64 = 1.0;
const SESSIONS: usize = 1000;
const CPU_WINDOW: Duration = Duration::from_secs(20);

fn main() {
    let rounds: usize =
        std::env::var("SESSION_KILL_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(50);
    let server = Server::start(&[
        "max_connections = 1100",
        "log_line_prefix = '%n [%p] '",
        "session_kill.snapshot_timeout = '1s'",
    ]);
    let version = server_version(&server);
    let load_start = load_average();
    server
        .admin()
        .batch_execute(&format!(
            "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g; GRANT SELECT ON t TO {APP}"
        ))
        .unwrap();
    let late: Vec<f64> = (0..rounds).map(|i| round(&server, i)).collect();
    let load_mid = load_average();
    let cpu = measure_cpu(&server);
    let load_end = load_average();

    println!("### The horizon guard: how late, and what it costs ({version})\n");
    println!(
        "`session_kill.snapshot_timeout = '1s'`. Each round a session of role `{APP}` runs `BEGIN ISOLATION LEVEL \
         REPEATABLE READ; SELECT count(*) FROM t` (one message), after a random pause of 0–1 s, and stays idle in \
         that transaction. Its snapshot is held since that statement's start (`query_start`), so the limit is \
         `query_start` + 1 s. *Ended* = the server log's timestamp (`%n`) of its `FATAL: terminating connection` \
         minus the limit, in ms; log timestamps are truncated to the millisecond. {rounds} rounds; percentiles are \
         nearest-rank.\n"
    );
    println!("| limit | rounds | ended p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| `snapshot_timeout = '1s'` | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
        late.len(),
        percentile(&late, 0.5),
        percentile(&late, 0.9),
        percentile(&late, 0.99),
        percentile(&late, 1.0)
    );
    println!(
        "\n#### The worker's CPU with {SESSIONS} idle sessions, no snapshot held\n\n\
         Over {} s per line, from `/proc/<pid>/schedstat`, as a share of one core.\n",
        CPU_WINDOW.as_secs()
    );
    println!("| setting | CPU (share of a core) | scans | CPU per scan |");
    println!("|---|---:|---:|---:|");
    for (label, share, scans) in &cpu {
        let per = if *scans > 0 {
            format!("{:.0} µs", share / 100.0 * CPU_WINDOW.as_secs_f64() * 1e6 / *scans as f64)
        } else {
            "—".to_owned()
        };
        println!("| {label} | {share:.4} % | {scans} | {per} |");
    }
    println!(
        "\nLoad average (1, 5, 15 min) at the start: {load_start}; after the rounds: {load_mid}; at the end: {load_end}. \
         Other engineers' builds share these {} cores.\n",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
}

/// One round (see the module comment): ms past the limit at which the holder was ended.
fn round(server: &Server, i: usize) -> f64 {
    // A pause of 0-1 s in a fixed, evenly spread order: the snapshot's phase against the scans.
    thread::sleep(Duration::from_millis((i as u64 * 617) % 1000));
    let mut holder = server.connect("postgres", APP);
    let pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM t").unwrap();
    let held_since: f64 = server
        .probe_one(
            "SELECT extract(epoch FROM query_start)::float8 FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .get(0);
    let ended = wait_for_termination(server, pid);
    drop(holder);
    settle(server);
    (ended - (held_since + LIMIT_S)) * 1000.0
}

/// The epoch seconds of `pid`'s `FATAL: terminating connection` in the server log.
fn wait_for_termination(server: &Server, pid: i32) -> f64 {
    let marker = format!(" [{pid}] FATAL:  terminating connection due to administrator command");
    let mut at = None;
    wait_for_described(Duration::from_secs(20), &format!("pid {pid} is terminated"), || {
        at =
            server.server_log().lines().find(|l| l.contains(&marker)).map(|l| {
                l.split_whitespace().next().and_then(|t| t.parse::<f64>().ok()).expect("%n timestamp")
            });
        at.is_some()
    });
    at.expect("found above")
}

/// The worker's CPU with SESSIONS idle sessions and no snapshot held: under `snapshot_timeout =
/// '1s'` (a scan every second), under `snapshot_xid_age` (a scan every second too), and with no
/// snapshot limit.
fn measure_cpu(server: &Server) -> Vec<(String, f64, i64)> {
    let _idle = open_idle(server, "postgres", APP, SESSIONS);
    let mut admin = server.admin();
    let mut out = Vec::new();
    for (settings, label) in [
        (&[][..], "`snapshot_timeout = '1s'` (scans every 1 s)"),
        (
            &["session_kill.snapshot_timeout = 0", "session_kill.snapshot_xid_age = 1000000"],
            "`snapshot_xid_age = 1000000` (scans every 1 s)",
        ),
        (&["session_kill.snapshot_xid_age = 0"], "no snapshot limit (sleeps until something changes)"),
    ] {
        for setting in settings {
            admin.batch_execute(&format!("ALTER SYSTEM SET {setting}")).unwrap();
        }
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        let (used, scans) = worker_cpu(server, CPU_WINDOW);
        out.push((label.to_owned(), used.exact, scans as i64));
    }
    out
}
