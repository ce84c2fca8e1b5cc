//! Benchmark (not a test): time until 500 idle sessions are gone, for `kill_sessions` versus the
//! hand-written recipes, and the cost of `sessions()` versus `pg_stat_activity`, in one run.
//! Prints a Markdown section for the benchmark results file.

use session_kill_pg_test::stats::{max, median, min, open_idle, rounds, server_version, settle};
use session_kill_pg_test::{Server, APP};
use std::time::{Duration, Instant};

const SESSIONS: usize = 500;
const ROUNDS: usize = 9;
const LISTING_CALLS: usize = 200;

fn main() {
    let server = Server::start(&["max_connections = 600"]);
    let db = server.fresh_db("bench");
    let mut admin = server.admin();

    // (name, rounds, run): PostgreSQL's waiting variant takes ~100 ms per session, so it runs once.
    type Method = (&'static str, usize, fn(&mut postgres::Client, &str));
    let methods: [Method; 3] = [
        ("`session_kill.kill_sessions(db, 'terminate', '0')` (waits by contract)", ROUNDS, |c, db| {
            c.execute("SELECT count(*) FROM session_kill.kill_sessions($1, 'terminate', '0')", &[&db]).unwrap();
        }),
        ("hand-written recipe: `pg_terminate_backend(pid)` over `pg_stat_activity`, then poll every 1 ms until empty", ROUNDS, |c, db| {
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db],
            )
            .unwrap();
            while c.query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", &[&db]).unwrap().get::<_, i64>(0) > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }),
        ("`pg_terminate_backend(pid, 5000)` per row (PostgreSQL's own waiting variant)", 1, |c, db| {
            c.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db],
            )
            .unwrap();
        }),
    ];

    let mut timings: Vec<Vec<f64>> = vec![Vec::new(); methods.len()];
    for round in 0..ROUNDS {
        for (i, (_, _, run)) in methods.iter().enumerate().filter(|(_, m)| round < m.1) {
            let sessions = open_idle(&server, &db, APP, SESSIONS);
            settle(&server);
            let start = Instant::now();
            run(&mut admin, &db);
            timings[i].push(start.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(server.sessions_in(&db), 0, "every session must be gone");
            drop(sessions);
        }
    }

    let sessions = open_idle(&server, &db, APP, SESSIONS);
    let mut listing = |sql: &str| {
        admin.query(sql, &[]).unwrap();
        let start = Instant::now();
        for _ in 0..LISTING_CALLS {
            admin.query(sql, &[]).unwrap();
        }
        start.elapsed().as_secs_f64() * 1000.0 / LISTING_CALLS as f64
    };
    let ours = listing("SELECT * FROM session_kill.sessions()");
    let theirs = listing("SELECT * FROM pg_stat_activity");
    drop(sessions);
    server.stop();

    let version = server_version(&server);
    println!("### Ending {SESSIONS} idle sessions ({version})\n");
    println!("Time from the call until no session of the database is left, in ms; rounds interleaved ({ROUNDS} each, one for the per-row waiting variant).\n");
    println!("| method | median | min | max | all rounds |\n|---|---:|---:|---:|---|");
    let baseline = median(&timings[1]);
    for ((name, _, _), t) in methods.iter().zip(&timings) {
        println!("| {name} | {:.1} | {:.1} | {:.1} | {} |", median(t), min(t), max(t), rounds(t));
    }
    println!(
        "\n`kill_sessions` / hand-written recipe (medians): **{:.2}×** (target ≤ 1.1×).\n",
        median(&timings[0]) / baseline
    );
    println!("### Listing {SESSIONS} sessions ({version})\n");
    println!("| query | mean ms per call ({LISTING_CALLS} calls) |\n|---|---:|");
    println!("| `SELECT * FROM session_kill.sessions()` | {ours:.2} |");
    println!("| `SELECT * FROM pg_stat_activity` | {theirs:.2} |");
}
