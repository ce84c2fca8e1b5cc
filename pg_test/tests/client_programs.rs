//! The real client programs users combine session_kill with: psql scripts with ON_ERROR_STOP,
//! dropdb, pgbench.

use session_kill_pg_test::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn script(server: &Server, name: &str, db: &str) -> std::process::Output {
    script_with(server, name, &[db])
}

fn script_with(server: &Server, name: &str, args: &[&str]) -> std::process::Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name);
    Command::new("bash")
        .arg(path)
        .args(args)
        .env("PATH", format!("{}:{}", server.bindir.display(), std::env::var("PATH").unwrap()))
        .env("PGHOST", &server.datadir)
        .env("PGPORT", server.port.to_string())
        .env("PGUSER", "postgres")
        .output()
        .unwrap()
}

#[test]
fn maintenance_script_ends_sessions_then_dropdb_succeeds() {
    let s = server();
    let db = s.fresh_db("t_nightly");
    let mut sessions: Vec<Session> = (0..10).map(|_| Session::idle(s.connect(&db, APP))).collect();
    sessions.push(Session::idle_in_transaction(s.connect(&db, OTHER)));
    let active = ActiveSession::start(s, s.connect(&db, APP), 60);

    let out = script(s, "maintenance.sh", &db);

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "script failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("terminate | terminated |    12"), "{stdout}");
    assert!(stdout.contains("dropped t_nightly"), "{stdout}");
    sessions.iter_mut().for_each(assert_terminated);
    let active_pid = active.pid;
    let (query, _) = active.finish();
    assert_ended_by_admin(active_pid, ClientView::Ended(query.unwrap_err()));
    assert!(!s.database_exists("t_nightly"), "the database was dropped");
}

#[test]
fn script_with_bad_input_fails_loudly_and_signals_nothing() {
    let s = server();
    let db = s.fresh_db("t_typo");
    let mut idle = Session::idle(s.connect(&db, APP));

    let out = script(s, "bad_input.sh", &db);

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "psql exits 3 on an ON_ERROR_STOP error: {stderr}");
    assert!(stderr.contains("ERROR:  invalid mode \"terminte\""), "{stderr}");
    assert!(
        stderr.contains("HINT:  Valid modes are: cancel, terminate, cancel_then_terminate, dry_run."),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("not reached"));
    assert_alive(&mut idle);
    assert_eq!(s.sessions_in(&db), 1, "the database was not dropped and nobody was signalled");
}

#[test]
fn pgbench_clients_are_ended_by_application_name() {
    let s = server();
    let db = s.fresh_db("t_pgbench");
    let workload = std::env::temp_dir().join(format!("session_kill_sleep_{}.sql", std::process::id()));
    std::fs::write(&workload, "SELECT pg_sleep(0.02);\n").unwrap();
    let pgbench = s
        .client_program("pgbench")
        .args(["-n", "-U", APP, "-c", "8", "-T", "120", "-f"])
        .arg(&workload)
        .arg(&db)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(20), || s.sessions_in(&db) == 8);
    let mut bystander = Session::idle(s.connect(&db, APP));

    let rows = kill(s, "'t_pgbench', application_name => 'pgbench'");

    assert_eq!(rows.len(), 8, "{rows:#?}");
    assert!(rows.values().all(|r| r.action == "terminate" && r.outcome == "terminated"), "{rows:#?}");
    let out = pgbench.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pgbench must notice its clients were ended");
    assert!(stderr.contains("terminating connection due to administrator command"), "{stderr}");
    assert_alive(&mut bystander);
    let _ = std::fs::remove_file(workload);
}

#[test]
fn drain_then_dropdb_succeeds_while_clients_keep_reconnecting() {
    let s = server();
    let db = s.fresh_db("t_migrate");
    let mut sessions: Vec<Session> = (0..20).map(|_| Session::idle(s.connect(&db, APP))).collect();
    let active = ActiveSession::start(s, s.connect(&db, APP), 120);
    let pools: Vec<Reconnector> = (0..3).map(|_| Reconnector::start(s.config(&db, APP))).collect();
    std::thread::sleep(Duration::from_millis(200));

    let out = script(s, "drain_and_drop.sh", &db);

    let attempts: Vec<Attempt> = pools.into_iter().flat_map(Reconnector::stop).collect();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "script failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("dropped t_migrate"), "{stdout}");
    sessions.iter_mut().for_each(assert_terminated);
    assert_eq!(active.finish().0, Err(QUERY_CANCELED.into()));
    assert!(
        attempts.iter().any(|a| a.result == Err(CANNOT_CONNECT_NOW.into())),
        "clients were refused meanwhile"
    );
    assert!(!s.database_exists("t_migrate"), "the database was dropped");
}

#[test]
fn drain_script_stops_before_dropdb_when_sessions_remain() {
    let s = server();
    let db = s.fresh_db("t_no_drop");
    let mut protected = Session::idle(s.connect(&db, SUPER));

    let out = script_with(s, "drain_and_drop.sh", &[&db, "1s"]);

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "psql stopped the script: {stderr}");
    assert!(stderr.contains("ERROR:  database \"t_no_drop\" still has 1 session after 1s"), "{stderr}");
    assert!(stderr.contains("DETAIL:  Remaining: pid"), "{stderr}");
    assert!(stderr.contains("HINT:  The database stays closed to new connections."), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("dropped"));
    assert_alive(&mut protected);
    let closed: i64 = s
        .admin()
        .query_one("SELECT count(*) FROM session_kill.drains() WHERE datname = 't_no_drop'", &[])
        .unwrap()
        .get(0);
    assert_eq!(closed, 1, "the database stays closed");
    s.admin().batch_execute("SELECT session_kill.undrain_database('t_no_drop')").unwrap();
}
