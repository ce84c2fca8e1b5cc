//! Benchmark (not a test): on a real streaming standby with `session_kill.replay_lag_timeout`,
//! how late past the limit the standby query that holds back replay is cancelled, for lock
//! conflicts (`DROP TABLE` on the primary) and snapshot conflicts (`DELETE` + `VACUUM`), and what
//! the worker costs on the standby while replay is held back by nobody. Prints a Markdown
//! section. `SESSION_KILL_BENCH_ROUNDS` sets the rounds per conflict (default 20).

use session_kill_pg_test::stats::{cpu_share, load_average, max, median, percentile, server_version};
use session_kill_pg_test::{error_code, wait_for, Server, APP, QUERY_CANCELED};
use std::collections::HashMap;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LIMIT: Duration = Duration::from_secs(1);
const CPU_WINDOW: Duration = Duration::from_secs(20);

#[derive(Clone, Copy)]
enum Conflict {
    Lock,
    Snapshot,
}

fn main() {
    let rounds: usize =
        std::env::var("SESSION_KILL_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(20);
    let primary = Server::start(&["log_line_prefix = '%n [%p] '"]);
    let standby = primary.start_standby(&[
        "hot_standby = on",
        "max_standby_streaming_delay = -1",
        "session_kill.replay_lag_timeout = '1s'",
    ]);
    primary.admin().batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {APP}")).unwrap();
    wait_caught_up(&primary, &standby);
    println!("### Standby replay-lag limit: lateness and idle cost\n");
    println!(
        "A real streaming standby (`hot_standby = on`, `max_standby_streaming_delay = -1`) with \
         `session_kill.replay_lag_timeout = '1s'`; load average when it started: {}. \
         Lateness = when the standby logged the cancel of the query that held back replay \
         minus (when the conflicting command returned on the primary + 1 s), in ms, {rounds} \
         rounds per conflict. The replay-lag limit counts from the worker's first look at the \
         startup process in the conflict (it looks every tenth of the limit, here 100 ms), so \
         up to one look interval of lateness is by design. CPU = the standby worker's CPU time \
         (/proc schedstat) over {} s with a replay-lag limit set and no conflict, as a share of \
         one core, with its wake-ups per second.\n",
        load_average(),
        CPU_WINDOW.as_secs()
    );
    println!("| conflict | p50 | p99 | max | cancelled |\n|---|---:|---:|---:|---:|");
    for conflict in [Conflict::Lock, Conflict::Snapshot] {
        let late: Vec<f64> = (0..rounds).filter_map(|i| round(&primary, &standby, conflict, i)).collect();
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {}/{rounds} |",
            match conflict {
                Conflict::Lock => "lock (`DROP TABLE` on the primary)",
                Conflict::Snapshot => "snapshot (`DELETE` + `VACUUM` on the primary)",
            },
            if late.is_empty() { f64::NAN } else { median(&late) },
            percentile(&late, 0.99),
            max(&late),
            late.len()
        );
    }
    let worker: i32 = standby
        .admin()
        .query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'session_kill worker'", &[])
        .unwrap()
        .get(0);
    thread::sleep(Duration::from_secs(1));
    let idle = cpu_share(worker, || thread::sleep(CPU_WINDOW));
    println!(
        "\nWorker on the standby, limit set, no conflict: {:.3} % of a core, {:.1} wake-ups/s.\n",
        idle.exact,
        idle.runs as f64 / CPU_WINDOW.as_secs_f64()
    );
    println!("{}\n", server_version(&standby));
    standby.stop();
    primary.stop();
}

/// One conflict: the lateness of the cancel in ms, or `None` if the query was not cancelled.
fn round(primary: &Server, standby: &Server, conflict: Conflict, i: usize) -> Option<f64> {
    let table = format!("r{i}");
    let mut admin = primary.admin();
    admin
        .batch_execute(&format!(
            "CREATE TABLE {table} AS SELECT g FROM generate_series(1, 1000) g; GRANT SELECT ON {table} TO {APP}"
        ))
        .unwrap();
    wait_caught_up(primary, standby);
    let mut client = standby.connect("postgres", APP);
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let setup = match conflict {
        Conflict::Lock => format!("BEGIN; SELECT count(*) FROM {table}"),
        Conflict::Snapshot => format!("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM {table}"),
    };
    client.batch_execute(&setup).unwrap();
    let query =
        thread::spawn(move || client.batch_execute("SELECT pg_sleep(60)").map_err(|e| error_code(&e)));
    wait_for(Duration::from_secs(10), || {
        standby
            .probe_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", &[&pid])
            .get::<_, i64>(0)
            == 1
    });
    match conflict {
        Conflict::Lock => admin.batch_execute(&format!("DROP TABLE {table}")).unwrap(),
        Conflict::Snapshot => {
            admin.batch_execute(&format!("DELETE FROM {table}")).unwrap();
            admin.batch_execute(&format!("VACUUM {table}")).unwrap();
        }
    }
    let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let result = query.join().unwrap();
    wait_caught_up(primary, standby);
    if let Conflict::Snapshot = conflict {
        admin.batch_execute(&format!("DROP TABLE {table}")).unwrap();
        wait_caught_up(primary, standby);
    }
    if result != Err(QUERY_CANCELED.to_owned()) {
        return None;
    }
    cancel_times(&standby.server_log()).get(&pid).map(|at| (at - started - LIMIT.as_secs_f64()) * 1000.0)
}

fn wait_caught_up(primary: &Server, standby: &Server) {
    wait_for(Duration::from_secs(60), || {
        let lsn: String = primary.probe_one("SELECT pg_current_wal_lsn()::text", &[]).get(0);
        standby
            .probe_one("SELECT pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn()) <= 0", &[&lsn])
            .get(0)
    });
}

/// Epoch seconds of each backend's cancel ERROR, from `%n [%p]` log lines.
fn cancel_times(log: &str) -> HashMap<i32, f64> {
    log.lines()
        .filter(|l| l.contains("ERROR:  canceling statement due to user request"))
        .filter_map(|l| {
            let (epoch, rest) = l.split_once(" [")?;
            let (pid, _) = rest.split_once(']')?;
            Some((pid.parse().ok()?, epoch.parse().ok()?))
        })
        .collect()
}
