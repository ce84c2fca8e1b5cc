//! Benchmark (not a test): what the worker's scan costs per session, under 1 rule and under 256
//! (as many as the worker loads), with 1000 idle sessions and with none. Each set-up has a 1 s
//! limit that no session reaches, so the worker scans every second; its CPU per scan comes from
//! `/proc/<pid>/schedstat` and its own scan count. Prints a Markdown section.

use session_kill_pg_test::stats::{load_average, server_version, worker_cpu};
use session_kill_pg_test::{wait_for_described, Server, APP};
use std::thread;
use std::time::Duration;

const SESSIONS: usize = 1000;
/// The sessions come from this many pools: application names `pool 0` ... `pool 49`.
const POOLS: usize = 50;
const CPU_WINDOW: Duration = Duration::from_secs(20);

fn main() {
    let server = Server::start(&["max_connections = 1100"]);
    let version = server_version(&server);
    let load_start = load_average();
    let scans = measure_scans(&server);
    let load_end = load_average();
    println!("### The worker's scan, by rules and sessions ({version})\n");
    println!(
        "The worker's CPU over {} s with a 1 s limit that no session reaches (so it scans every second): \
         `/proc/<pid>/schedstat` time on CPU, divided by the scans it counted (`session_kill.worker.scans`). \
         The 256 rules are 255 that match no session (LIKE patterns on role, application and database with \
         `%`, `_` and escapes, every state) plus the 1 s one. The {SESSIONS} sessions are idle, of role `{APP}`, \
         from {POOLS} applications (`pool 0` ... `pool {}`): the worker matches the rules' patterns once per \
         database, role, application and client address in a scan, not once per session. *Per session* is the \
         difference between {SESSIONS} sessions and none, divided by {SESSIONS}.\n",
        CPU_WINDOW.as_secs(),
        POOLS - 1
    );
    println!("| rules | client sessions | CPU (share of a core) | scans | CPU per scan | per session |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for rules in [1, 256] {
        let none = scans.iter().find(|s| s.rules == rules && s.sessions == 0).map(|s| s.per_scan_us);
        for s in scans.iter().filter(|s| s.rules == rules) {
            let per_session = match (s.sessions, none) {
                (n, Some(zero)) if n > 0 => format!("{:.2} µs", (s.per_scan_us - zero) / n as f64),
                _ => "—".to_owned(),
            };
            println!(
                "| {} | {} | {:.4} % | {} | {:.0} µs | {per_session} |",
                s.rules, s.sessions, s.cpu_percent, s.scans, s.per_scan_us
            );
        }
    }
    println!(
        "\nLoad average (1, 5, 15 min) at the start: {load_start}; at the end: {load_end}. Other engineers' builds \
         share these {} cores.\n",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    server.stop();
}

/// SESSIONS idle sessions of `app`, spread over POOLS application names.
fn open_pools(server: &Server) -> Vec<postgres::Client> {
    (0..SESSIONS)
        .map(|i| {
            let mut c = server
                .config("postgres", APP)
                .application_name(&format!("pool {}", i % POOLS))
                .connect(postgres::NoTls)
                .unwrap();
            c.simple_query("SELECT 1").unwrap();
            c
        })
        .collect()
}

struct ScanCost {
    rules: usize,
    sessions: usize,
    cpu_percent: f64,
    scans: u64,
    per_scan_us: f64,
}

/// The worker's CPU per scan under 1 and 256 rules, with SESSIONS idle sessions and without.
fn measure_scans(server: &Server) -> Vec<ScanCost> {
    let mut admin = server.admin();
    let mut out = Vec::new();
    let mut idle = open_pools(server);
    for sessions in [SESSIONS, 0] {
        if sessions == 0 {
            idle.clear();
            wait_for_described(Duration::from_secs(60), "the idle sessions are gone", || {
                server
                    .probe_one("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", &[&APP])
                    .get::<_, i64>(0)
                    == 0
            });
        }
        for rules in [1, 256] {
            load_rules(server, &mut admin, rules);
            let (used, scans) = worker_cpu(server, CPU_WINDOW);
            out.push(ScanCost {
                rules,
                sessions,
                cpu_percent: used.exact,
                scans,
                per_scan_us: used.nanos as f64 / 1e3 / scans.max(1) as f64,
            });
        }
    }
    out
}

/// Replaces the rules with `n`: one 1 s limit no session reaches (idle in transaction, and the
/// sessions are idle) and n - 1 that match none of them, spread over every state.
fn load_rules(server: &Server, admin: &mut postgres::Client, n: usize) {
    admin.batch_execute("DELETE FROM session_kill.rules").unwrap();
    admin
        .batch_execute("INSERT INTO session_kill.rules (state, timeout) VALUES ('idle in transaction', '1s')")
        .unwrap();
    let states = ["idle", "idle in transaction", "transaction", "active", "blocking"];
    for i in 1..n {
        admin
            .execute(
                "INSERT INTO session_kill.rules (database, role, application, state, timeout)
                 VALUES ($1, $2, $3, $4, '1h')",
                &[
                    &format!("db\\_{i}%"),
                    &format!("role_{i}_"),
                    &format!("%app {i}%"),
                    &states[i % states.len()],
                ],
            )
            .unwrap();
    }
    wait_for_described(Duration::from_secs(30), "the worker loads the rules", || {
        server.probe_one("SELECT rules FROM session_kill.worker", &[]).get::<_, i32>(0) == n as i32
    });
}
