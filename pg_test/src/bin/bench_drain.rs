//! Benchmark (not a test): time until a database with 200 idle sessions has none left while 20
//! clients keep reconnecting, for `drain_database(grace => '0')` versus the manual recipe
//! (`ALTER DATABASE ... ALLOW_CONNECTIONS false` + a `pg_terminate_backend` loop until empty),
//! and how many logins slipped in after the database was closed. Prints a Markdown section.

use session_kill_pg_test::stats::{max, median, min, open_idle, rounds, server_version, settle};
use session_kill_pg_test::{Attempt, Reconnector, Server, APP};
use std::time::{Duration, Instant, SystemTime};

const SESSIONS: usize = 200;
const RECONNECTING: usize = 20;
const ROUNDS: usize = 5;

struct Run {
    ms: f64,
    slipped: usize,
    refused: usize,
}

fn main() {
    let server = Server::start(&["max_connections = 400"]);
    let db = server.fresh_db("bench_drain");
    let mut drain_runs = Vec::new();
    let mut manual_runs = Vec::new();
    for _ in 0..ROUNDS {
        drain_runs.push(round(&server, &db, drain));
        manual_runs.push(round(&server, &db, manual));
    }
    let version = server_version(&server);
    server.stop();

    println!("### Draining {SESSIONS} idle sessions while {RECONNECTING} clients reconnect ({version})\n");
    println!("Time from the call until no session of the database is left, in ms, {ROUNDS} interleaved rounds. A slipped login is a successful login that started after the database was closed.\n");
    println!("| method | median | min | max | all rounds | slipped logins | refused logins |\n|---|---:|---:|---:|---|---:|---:|");
    for (name, runs) in [
        ("`session_kill.drain_database(db, grace => '0')` (closes, terminates, waits, reports)", &drain_runs),
        ("manual: `ALTER DATABASE ... ALLOW_CONNECTIONS false`, then `pg_terminate_backend` over `pg_stat_activity` every 1 ms until empty", &manual_runs),
    ] {
        let ms: Vec<f64> = runs.iter().map(|r| r.ms).collect();
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            median(&ms),
            min(&ms),
            max(&ms),
            rounds(&ms),
            runs.iter().map(|r| r.slipped).sum::<usize>(),
            runs.iter().map(|r| r.refused).sum::<usize>(),
        );
    }
    let ratio = median(&drain_runs.iter().map(|r| r.ms).collect::<Vec<_>>())
        / median(&manual_runs.iter().map(|r| r.ms).collect::<Vec<_>>());
    println!("\n`drain_database` / manual recipe (medians): **{ratio:.2}×** (target ≤ 1.1×, and 0 slipped logins).\n");
}

/// Opens the sessions and the reconnecting clients, runs `method` (which returns the moment the
/// database was closed), checks it is empty, and reopens it.
fn round(server: &Server, db: &str, method: fn(&Server, &str) -> SystemTime) -> Run {
    let sessions = open_idle(server, db, APP, SESSIONS);
    settle(server);
    let pool: Vec<Reconnector> =
        (0..RECONNECTING).map(|_| Reconnector::start(server.config(db, APP))).collect();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let closed_at = method(server, db);
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(server.sessions_in(db), 0, "the database must be empty");
    std::thread::sleep(Duration::from_millis(100));
    let attempts: Vec<Attempt> = pool.into_iter().flat_map(Reconnector::stop).collect();
    let mut admin = server.admin();
    admin.batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true")).unwrap();
    admin.query("SELECT session_kill.undrain_database($1)", &[&db]).unwrap();
    drop(sessions);
    Run {
        ms,
        slipped: attempts.iter().filter(|a| a.started > closed_at && a.result.is_ok()).count(),
        refused: attempts.iter().filter(|a| a.started > closed_at && a.result.is_err()).count(),
    }
}

fn drain(server: &Server, db: &str) -> SystemTime {
    let mut admin = server.admin();
    admin.query("SELECT * FROM session_kill.drain_database($1, grace => '0')", &[&db]).unwrap();
    let since: f64 = admin
        .query_one(
            "SELECT extract(epoch FROM since)::float8 FROM session_kill.drains() WHERE datname = $1",
            &[&db],
        )
        .unwrap()
        .get(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs_f64(since)
}

fn manual(server: &Server, db: &str) -> SystemTime {
    let mut admin = server.admin();
    admin.batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false")).unwrap();
    let closed_at = SystemTime::now();
    loop {
        admin
            .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&db])
            .unwrap();
        let left: i64 = admin
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", &[&db])
            .unwrap()
            .get(0);
        if left == 0 {
            return closed_at;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
