//! The audit table `session_kill.log`: one exact row per action by every path, kept even when the
//! caller's transaction fails, and bounded by `session_kill.log_retention`.

use postgres::Row;
use session_kill_pg_test::*;
use std::time::Duration;

const COLUMNS: &str = "source, rule, reason, actor, database::text, role::text, application,
                       host(client_addr), state, idle_for > '0', query, action, outcome";

#[derive(Debug, Clone, PartialEq)]
struct AuditRow {
    source: String,
    rule: Option<String>,
    reason: Option<String>,
    actor: Option<String>,
    database: Option<String>,
    role: Option<String>,
    application: Option<String>,
    client: Option<String>,
    state: Option<String>,
    idle_for_positive: Option<bool>,
    query: Option<String>,
    action: String,
    outcome: String,
}

fn audit_row(r: &Row) -> AuditRow {
    AuditRow {
        source: r.get(0),
        rule: r.get(1),
        reason: r.get(2),
        actor: r.get(3),
        database: r.get(4),
        role: r.get(5),
        application: r.get(6),
        client: r.get(7),
        state: r.get(8),
        idle_for_positive: r.get(9),
        query: r.get(10),
        action: r.get(11),
        outcome: r.get(12),
    }
}

/// A row for a session of the harness ("pg_test") that last ran `query` and was terminated.
fn terminated(source: &str, database: &str, role: &str, state: &str, query: &str) -> AuditRow {
    AuditRow {
        source: source.to_owned(),
        rule: None,
        reason: None,
        actor: some("postgres"),
        database: some(database),
        role: some(role),
        application: some("pg_test"),
        client: None,
        state: some(state),
        idle_for_positive: Some(true),
        query: some(query),
        action: "terminate".to_owned(),
        outcome: "terminated".to_owned(),
    }
}

/// The rows for `pid`, once `count` of them have been written.
fn rows_for(s: &Server, pid: i32, count: usize) -> Vec<AuditRow> {
    let query = format!("SELECT {COLUMNS} FROM session_kill.log WHERE pid = $1 ORDER BY id");
    let mut rows = Vec::new();
    wait_for(Duration::from_secs(20), || {
        rows = s.admin().query(&query, &[&pid]).unwrap().iter().map(audit_row).collect();
        rows.len() >= count
    });
    rows
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

#[test]
fn every_path_writes_exact_rows_that_survive_the_callers_rollback() {
    let s = Server::start(&[]);
    let shop = s.fresh_db("shop");
    let mut by_tcp = Session::idle(s.connect_tcp(&shop, APP));
    let mut by_socket = Session::idle(s.connect(&shop, OTHER));

    let mut admin = s.admin();
    admin.batch_execute("BEGIN").unwrap();
    admin
        .query("SELECT * FROM session_kill.kill_sessions('shop', reason => 'maintenance window')", &[])
        .unwrap();
    admin.batch_execute("ROLLBACK").unwrap();
    assert_ended_by_admin_on(&s, by_tcp.pid, by_tcp.probe());
    assert_ended_by_admin_on(&s, by_socket.pid, by_socket.probe());
    let kill_row = |role: &str, application: &str, client: Option<String>| AuditRow {
        reason: some("maintenance window"),
        application: some(application),
        client,
        ..terminated("kill_sessions", "shop", role, "idle", "SELECT pg_backend_pid()")
    };
    assert_eq!(rows_for(&s, by_tcp.pid, 1), vec![kill_row(APP, "pg_test_tcp", some("127.0.0.1"))]);
    assert_eq!(rows_for(&s, by_socket.pid, 1), vec![kill_row(OTHER, "pg_test", None)]);

    // A drain that ends in an ERROR (a superuser session stays) still leaves its record.
    let drained = s.fresh_db("drained");
    let mut app = Session::idle(s.connect(&drained, APP));
    let _superuser = Session::idle(s.connect(&drained, SUPER));
    let err = admin
        .query("SELECT * FROM session_kill.drain_database('drained', timeout => '1s', grace => '0')", &[])
        .unwrap_err();
    assert_eq!(error_code(&err), "55006");
    assert_ended_by_admin_on(&s, app.pid, app.probe());
    assert_eq!(
        rows_for(&s, app.pid, 1),
        vec![AuditRow {
            reason: some("drain of database \"drained\""),
            ..terminated("drain_database", "drained", APP, "idle", "SELECT pg_backend_pid()")
        }]
    );
    admin.batch_execute("SELECT session_kill.undrain_database('drained')").unwrap();

    // The worker, with the rule that ended the session.
    let rule: i64 = admin
        .query_one(
            "INSERT INTO session_kill.rules (role, state, timeout) VALUES ('app', 'idle in transaction', '300ms') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    let mut stuck = Session::idle_in_transaction(s.connect("postgres", APP));
    let rows = rows_for(&s, stuck.pid, 1);
    assert_ended_by_admin_on(&s, stuck.pid, stuck.probe());
    assert_eq!(rows.len(), 1, "{rows:?}");
    let reason = rows[0].reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("rule {rule} (idle in transaction longer than 00:00:00.3) exceeded by ")),
        "{reason}"
    );
    assert_eq!(
        rows[0],
        AuditRow {
            rule: some(&format!("rule {rule}")),
            reason: Some(reason),
            actor: some("session_kill worker"),
            ..terminated("worker", "postgres", APP, "idle in transaction", "BEGIN; SELECT 1")
        }
    );
    s.stop();
}

#[test]
fn log_retention_bounds_the_table() {
    let s = Server::start(&["session_kill.log_retention = '2s'"]);
    let db = s.fresh_db("shop");
    let first = Session::idle(s.connect(&db, APP));
    kill(&s, "'shop'");
    assert_eq!(rows_for(&s, first.pid, 1).len(), 1);
    std::thread::sleep(Duration::from_millis(2500));
    let second = Session::idle(s.connect(&db, APP));
    kill(&s, "'shop'");
    assert_eq!(rows_for(&s, second.pid, 1).len(), 1);
    let old: i64 = s
        .admin()
        .query_one("SELECT count(*) FROM session_kill.log WHERE pid = $1", &[&first.pid])
        .unwrap()
        .get(0);
    assert_eq!(old, 0, "the row older than session_kill.log_retention was deleted when the next was written");
    s.stop();
}

/// A sync blocked on a lock (someone holds session_kill.log) ends at once when terminated, and
/// the entries it held go back to the queue: they are written once the lock is gone.
#[test]
fn a_terminated_sync_loses_no_entries() {
    let s = Server::start(&[]);
    let db = s.fresh_db("shop");
    let mut holder = s.admin();
    holder.batch_execute("BEGIN; LOCK TABLE session_kill.log IN ACCESS EXCLUSIVE MODE").unwrap();
    let victim = Session::idle(s.connect(&db, APP));
    kill(&s, "'shop'");

    let mut sync = 0;
    wait_for(Duration::from_secs(20), || {
        let blocked = s
            .admin()
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'session_kill sync' AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap();
        sync = blocked.map_or(0, |r| r.get(0));
        sync != 0
    });
    let signalled: bool = s.admin().query_one("SELECT pg_terminate_backend($1)", &[&sync]).unwrap().get(0);
    assert!(signalled);
    s.wait_until_gone(sync);
    let ended_by_signal = s.server_log().lines().any(|l| {
        l.contains(&format!("[{sync}] "))
            && l.contains(
                "FATAL:  terminating background worker \"session_kill sync\" due to administrator command",
            )
    });
    assert!(ended_by_signal, "ended by the signal, not by its lock timeout");

    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(rows_for(&s, victim.pid, 1).len(), 1, "the entry was put back and written later");
    s.stop();
}
