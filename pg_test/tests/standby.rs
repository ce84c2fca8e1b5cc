//! The replay-lag limit on a real streaming standby (`pg_basebackup -R`, `hot_standby = on`,
//! `max_standby_streaming_delay = -1`, so PostgreSQL itself never cancels anything): standby
//! queries that hold back replay through a snapshot conflict (rows they can see are removed by a
//! VACUUM on the primary) or a lock conflict (`DROP TABLE` on the primary) are cancelled once
//! replay has been held back longer than the limit, and replay catches up; without a limit, or
//! for a role exempted by a higher-priority rule, the query keeps running and the lag grows.
//! Each test runs its own primary and standby.

use session_kill_pg_test::*;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A primary with two tables readable by the test roles, and its standby caught up with it.
fn pair(standby_conf: &[&str]) -> (Server, Server) {
    let primary = Server::start(&[]);
    primary
        .admin()
        .batch_execute(&format!(
            "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g;
             CREATE TABLE t2 (x int); INSERT INTO t2 VALUES (1);
             CREATE TABLE t3 (x int); INSERT INTO t3 VALUES (1);
             GRANT SELECT ON t, t2, t3 TO {APP}, {OTHER};"
        ))
        .unwrap();
    let mut conf = vec!["hot_standby = on", "max_standby_streaming_delay = -1", "hot_standby_feedback = off"];
    conf.extend_from_slice(standby_conf);
    let standby = primary.start_standby(&conf);
    // A commit replayed on the standby, so pg_last_xact_replay_timestamp() is set.
    primary.admin().batch_execute("INSERT INTO t3 VALUES (2)").unwrap();
    wait_caught_up(&primary, &standby);
    (primary, standby)
}

/// How far replay is behind the primary's current WAL position, in bytes.
fn replay_gap(primary: &Server, standby: &Server) -> f64 {
    let lsn: String = primary.probe_one("SELECT pg_current_wal_lsn()::text", &[]).get(0);
    standby
        .probe_one("SELECT pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn())::float8", &[&lsn])
        .get(0)
}

/// WAL received by the standby but not yet replayed, in bytes, and how long ago the last
/// replayed transaction committed on the primary, in seconds.
fn standby_lag(standby: &Server) -> (f64, f64) {
    let row = standby.probe_one(
        "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::float8,
                coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)::float8",
        &[],
    );
    (row.get(0), row.get(1))
}

fn wait_caught_up(primary: &Server, standby: &Server) {
    wait_for_described(Duration::from_secs(30), "replay catches up with the primary", || {
        replay_gap(primary, standby) <= 0.0
    });
}

/// The startup process's wait event on the standby ('' when it waits for nothing).
fn startup_wait(standby: &Server) -> String {
    standby
        .probe_one(
            "SELECT coalesce(max(wait_event), '') FROM pg_stat_activity WHERE backend_type = 'startup'",
            &[],
        )
        .get(0)
}

/// How a standby query's statement ended: its error's SQLSTATE and DETAIL, if any, and its client.
type Ended = (Option<String>, Option<String>, postgres::Client);

/// A standby session that runs `setup`, then `SELECT pg_sleep(60)` in the same transaction
/// (so it keeps what `setup` took: a snapshot, a lock). Joining yields the SQLSTATE and DETAIL
/// of the error that ended its statement, if any.
fn standby_query(standby: &Server, user: &str, setup: &str) -> (i32, JoinHandle<Ended>) {
    let mut client = standby.connect("postgres", user);
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    client.batch_execute(setup).unwrap();
    let handle = thread::spawn(move || match client.batch_execute("SELECT pg_sleep(60)") {
        Ok(()) => (None, None, client),
        Err(e) => {
            let db = e.as_db_error();
            (Some(error_code(&e)), db.and_then(|d| d.detail().map(str::to_owned)), client)
        }
    });
    wait_for_described(Duration::from_secs(10), "the standby query runs", || {
        standby
            .probe_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", &[&pid])
            .get::<_, i64>(0)
            == 1
    });
    (pid, handle)
}

/// Waits until replay is held back: the startup process waits in `wait_event`.
fn wait_for_conflict(standby: &Server, wait_event: &str) {
    wait_for_described(
        Duration::from_secs(20),
        &format!("the startup process waits in {wait_event}"),
        || startup_wait(standby) == wait_event,
    );
}

#[track_caller]
fn assert_told_replay(detail: Option<String>, origin: &str) {
    let detail = detail.expect("a DETAIL");
    assert!(
        detail.starts_with("session_kill: holding back replay on this standby for ")
            && detail.contains(origin),
        "{detail}"
    );
}

/// The DETAIL of `pid`'s `FATAL: terminating connection due to administrator command` in `log`.
fn logged_termination_detail(log: &str, pid: i32) -> Option<String> {
    let fatal = format!("[{pid}] ");
    log.lines()
        .skip_while(|l| {
            !(l.contains(&fatal)
                && l.ends_with("FATAL:  terminating connection due to administrator command"))
        })
        .nth(1)
        .and_then(|l| l.split_once("DETAIL:  ").map(|(_, detail)| detail.to_owned()))
}

#[test]
fn a_snapshot_conflict_cancels_the_oldest_snapshot_and_replay_catches_up() {
    let (primary, standby) = pair(&["session_kill.replay_lag_timeout = '2s'"]);
    // Holds a REPEATABLE READ snapshot that still sees t's rows.
    let (holder, query) =
        standby_query(&standby, APP, "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM t");
    let mut idle = Session::idle(standby.connect("postgres", OTHER));
    let mut admin = primary.admin();
    admin.batch_execute("DELETE FROM t").unwrap();
    wait_caught_up(&primary, &standby);
    // A snapshot taken after the delete: younger, and in no conflict with the VACUUM.
    let (bystander, bystander_query) =
        standby_query(&standby, OTHER, "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM t3");
    admin.batch_execute("VACUUM t").unwrap();
    let vacuumed = Instant::now();
    wait_for_conflict(&standby, "RecoveryConflictSnapshot");
    let (unreplayed, _) = standby_lag(&standby);
    assert!(unreplayed > 0.0, "received WAL waits for replay");

    let (code, detail, _) = query.join().unwrap();
    let ended_after = vacuumed.elapsed();
    assert_eq!(code.as_deref(), Some(QUERY_CANCELED), "the holder's statement was cancelled");
    assert_told_replay(detail, "over session_kill.replay_lag_timeout (2.0s)");
    // The standby may start waiting before VACUUM returns here: 1 s to spare for that.
    assert!(ended_after >= Duration::from_millis(1000), "not before the limit: {ended_after:?}");
    assert!(ended_after < Duration::from_secs(12), "safety net: {ended_after:?}");
    wait_caught_up(&primary, &standby);
    let (unreplayed, _) = standby_lag(&standby);
    assert!(unreplayed <= 0.0, "everything received is replayed");
    standby.log_showing(&format!("session_kill: sent cancel to pid {holder} "));
    assert!(!signalled(&standby, bystander), "the younger snapshot held nothing back");
    assert!(!signalled(&standby, idle.pid));
    assert_eq!(idle.probe(), ClientView::Alive);
    assert!(standby.alive(bystander));
    standby.admin().query_one("SELECT pg_cancel_backend($1)", &[&bystander]).unwrap();
    let _ = bystander_query.join();
    standby.stop();
    primary.stop();
}

#[test]
fn a_lock_conflict_from_drop_table_cancels_the_lock_holder_only() {
    let (primary, standby) = pair(&[]);
    let id: i64 = primary
        .admin()
        .query_one(
            "INSERT INTO session_kill.rules (role, state, timeout, action, grace, comment)
             VALUES ('%', 'replay_lag', '1500ms', 'cancel_then_terminate', '5s', 'standby reports') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    wait_caught_up(&primary, &standby);
    // On a standby the rules table changes by replay, which fires no trigger: a reload reads it.
    standby.admin().batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for_described(Duration::from_secs(20), "the standby's worker has the rule", || {
        standby.probe_one("SELECT rules FROM session_kill.worker", &[]).get::<_, i32>(0) == 1
    });
    let (holder, query) = standby_query(&standby, APP, "BEGIN; SELECT count(*) FROM t2");
    // Reads another table: holds no lock the startup process waits for.
    let (bystander, bystander_query) = standby_query(&standby, OTHER, "BEGIN; SELECT count(*) FROM t3");
    primary.admin().batch_execute("DROP TABLE t2").unwrap();
    let dropped = Instant::now();
    wait_for_conflict(&standby, "relation");

    let (code, detail, _) = query.join().unwrap();
    let ended_after = dropped.elapsed();
    assert_eq!(code.as_deref(), Some(QUERY_CANCELED));
    assert_told_replay(detail, &format!("over rule {id} (standby reports)"));
    // As above, 0.8 s to spare.
    assert!(ended_after >= Duration::from_millis(700), "not before the limit: {ended_after:?}");
    assert!(ended_after < Duration::from_secs(12), "safety net: {ended_after:?}");
    wait_caught_up(&primary, &standby);
    let gone: bool = standby.probe_one("SELECT to_regclass('t2') IS NULL", &[]).get(0);
    assert!(gone, "the DROP TABLE was replayed");
    assert!(!signalled(&standby, bystander), "held no conflicting lock");
    assert!(standby.alive(bystander));
    standby.admin().query_one("SELECT pg_cancel_backend($1)", &[&bystander]).unwrap();
    let _ = bystander_query.join();
    let _ = holder;
    standby.stop();
    primary.stop();
}

#[test]
fn without_a_limit_the_query_keeps_running_and_the_lag_grows() {
    let (primary, standby) = pair(&[]);
    let (holder, query) = standby_query(&standby, APP, "BEGIN; SELECT count(*) FROM t2");
    primary.admin().batch_execute("DROP TABLE t2").unwrap();
    wait_for_conflict(&standby, "relation");
    // More WAL from the primary queues up behind the held record.
    let started = Instant::now();
    let mut admin = primary.admin();
    let mut gaps = Vec::new();
    while started.elapsed() < Duration::from_secs(5) {
        admin.batch_execute("INSERT INTO t3 SELECT generate_series(1, 100)").unwrap();
        thread::sleep(Duration::from_millis(500));
        gaps.push(replay_gap(&primary, &standby));
    }
    assert!(gaps.windows(2).all(|w| w[1] >= w[0]) && gaps.last() > gaps.first(), "the lag grows: {gaps:?}");
    let (_, replay_age) = standby_lag(&standby);
    assert!(replay_age >= 4.0, "the last replayed commit is as old as the hold: {replay_age}");
    assert!(standby.alive(holder) && !signalled(&standby, holder));
    standby.admin().query_one("SELECT pg_cancel_backend($1)", &[&holder]).unwrap();
    let (code, detail, _) = query.join().unwrap();
    assert_eq!((code.as_deref(), detail), (Some(QUERY_CANCELED), None), "ended by the test, told nothing");
    wait_caught_up(&primary, &standby);
    standby.stop();
    primary.stop();
}

#[test]
fn a_role_exempted_by_a_higher_priority_rule_keeps_its_query() {
    let (primary, standby) = pair(&["session_kill.replay_lag_timeout = '1s'"]);
    primary
        .admin()
        .batch_execute(&format!(
            "INSERT INTO session_kill.rules (role, state, timeout, priority, comment)
             VALUES ('{OTHER}', 'replay_lag', '1h', 10, 'nightly report may hold replay')"
        ))
        .unwrap();
    wait_caught_up(&primary, &standby);
    standby.admin().batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for_described(Duration::from_secs(20), "the standby's worker has the rule", || {
        standby.probe_one("SELECT rules FROM session_kill.worker", &[]).get::<_, i32>(0) == 1
    });
    let (exempt, query) = standby_query(&standby, OTHER, "BEGIN; SELECT count(*) FROM t2");
    primary.admin().batch_execute("DROP TABLE t2").unwrap();
    wait_for_conflict(&standby, "relation");
    thread::sleep(Duration::from_secs(4));
    assert_eq!(startup_wait(&standby), "relation", "replay is still held back");
    assert!(standby.alive(exempt) && !signalled(&standby, exempt), "the exempted role keeps its query");
    assert!(replay_gap(&primary, &standby) > 0.0);
    // The same conflict from a role the setting covers is ended.
    standby.admin().query_one("SELECT pg_cancel_backend($1)", &[&exempt]).unwrap();
    let _ = query.join();
    wait_caught_up(&primary, &standby);
    primary.admin().batch_execute("CREATE TABLE t4 (x int); GRANT SELECT ON t4 TO app").unwrap();
    wait_caught_up(&primary, &standby);
    let (app, app_query) = standby_query(&standby, APP, "BEGIN; SELECT count(*) FROM t4");
    primary.admin().batch_execute("DROP TABLE t4").unwrap();
    let (code, detail, _) = app_query.join().unwrap();
    assert_eq!(code.as_deref(), Some(QUERY_CANCELED), "pid {app}");
    assert_told_replay(detail, "over session_kill.replay_lag_timeout (1.0s)");
    wait_caught_up(&primary, &standby);
    standby.stop();
    primary.stop();
}

#[test]
fn protected_roles_and_superusers_are_never_ended_for_replay_lag() {
    let protect = format!("session_kill.protected_roles = '{APP}'");
    let (primary, standby) = pair(&["session_kill.replay_lag_timeout = '1s'", protect.as_str()]);
    let (protected, query) = standby_query(&standby, APP, "BEGIN; SELECT count(*) FROM t2");
    let (superuser, super_query) = standby_query(&standby, SUPER, "BEGIN; SELECT count(*) FROM t2");
    primary.admin().batch_execute("DROP TABLE t2").unwrap();
    wait_for_conflict(&standby, "relation");
    thread::sleep(Duration::from_secs(3));
    assert!(standby.alive(protected) && !signalled(&standby, protected));
    assert!(standby.alive(superuser) && !signalled(&standby, superuser));
    // The startup process and the walreceiver are never touched either.
    let others: i64 = standby
        .probe_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type IN ('startup', 'walreceiver')",
            &[],
        )
        .get(0);
    assert_eq!(others, 2);
    for pid in [protected, superuser] {
        standby.admin().query_one("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
    }
    let _ = (query.join(), super_query.join());
    wait_caught_up(&primary, &standby);
    assert!(!standby.server_log().contains("session_kill: sent "), "nothing was signalled");
    standby.stop();
    primary.stop();
}

#[test]
fn a_query_that_ignores_the_cancel_is_terminated_after_grace() {
    let (primary, standby) = pair(&[]);
    let id: i64 = primary
        .admin()
        .query_one(
            "INSERT INTO session_kill.rules (role, state, timeout, action, grace)
             VALUES ('app', 'replay_lag', '1s', 'cancel_then_terminate', '1s') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    wait_caught_up(&primary, &standby);
    standby.admin().batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for_described(Duration::from_secs(20), "the standby's worker has the rule", || {
        standby.probe_one("SELECT rules FROM session_kill.worker", &[]).get::<_, i32>(0) == 1
    });
    // The lock on t2 belongs to the transaction; the block swallows every cancel and sleeps on.
    let mut client = standby.connect("postgres", APP);
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    client.batch_execute("BEGIN; SELECT count(*) FROM t2").unwrap();
    let query = thread::spawn(move || {
        client
            .batch_execute(
                "DO $$ BEGIN LOOP BEGIN PERFORM pg_sleep(60); EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP; END $$",
            )
            .map_err(|e| (error_code(&e), e.as_db_error().and_then(|d| d.detail().map(str::to_owned))))
    });
    primary.admin().batch_execute("DROP TABLE t2").unwrap();
    wait_for_conflict(&standby, "relation");
    let (code, detail) = query.join().unwrap().unwrap_err();
    // The worker logs a signal just after sending it.
    let terminate_sent = format!("session_kill: sent terminate to pid {pid} ");
    wait_for_described(Duration::from_secs(10), "the worker logged the terminate", || {
        standby.server_log().contains(&terminate_sent)
    });
    let log = standby.server_log();
    // The client may find the connection closed before it reads the FATAL (as
    // assert_ended_by_admin allows); the server log then holds what it was told.
    let detail = if code == "closed" { logged_termination_detail(&log, pid) } else { detail };
    assert!(
        code == ADMIN_SHUTDOWN || (code == "closed" && detail.is_some()),
        "terminated once the grace was over, client saw {code}"
    );
    assert_told_replay(detail, &format!("over rule {id}"));
    assert!(log.contains(&format!("session_kill: sent cancel to pid {pid} ")), "cancelled first");
    wait_caught_up(&primary, &standby);
    standby.stop();
    primary.stop();
}
