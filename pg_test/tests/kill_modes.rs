//! kill_sessions against real client sessions: every mode, min_idle, waiting, and what the
//! killed clients saw.

use session_kill_pg_test::*;
use std::thread;
use std::time::Duration;

#[test]
fn terminate_ends_every_client_session_of_the_database_and_only_those() {
    let s = server();
    let db = s.fresh_db("t_terminate");
    let other_db = s.fresh_db("t_terminate_other");
    let mut idle = Session::idle(s.connect(&db, APP));
    let mut in_tx = Session::idle_in_transaction(s.connect(&db, APP));
    let mut other_role = Session::idle(s.connect(&db, OTHER));
    let mut superuser = Session::idle(s.connect(&db, SUPER));
    let mut elsewhere = Session::idle(s.connect(&other_db, APP));
    let active = ActiveSession::start(s, s.connect(&db, APP), 60);

    let counted = |outcome: &str| -> i64 {
        s.admin()
            .query_one(
                "SELECT coalesce(sum(sessions), 0)::bigint FROM session_kill.stats
                 WHERE source = 'kill_sessions' AND reason = 'terminate' AND outcome = $1",
                &[&outcome],
            )
            .unwrap()
            .get(0)
    };
    let (terminated_before, skipped_before) = (counted("terminated"), counted("skipped: superuser"));

    let rows = kill(s, "'t_terminate'");

    for pid in [idle.pid, in_tx.pid, other_role.pid, active.pid] {
        assert_acted(&rows, pid, "terminate", "terminated");
    }
    assert_acted(&rows, superuser.pid, "none", "skipped: superuser");
    assert_eq!(rows.len(), 5, "other databases are not touched: {rows:#?}");
    // It waited: the only session left is the protected one.
    assert_eq!(s.sessions_in(&db), 1);
    assert_terminated(&mut idle);
    assert_terminated(&mut in_tx);
    assert_terminated(&mut other_role);
    let active_pid = active.pid;
    let (query, _) = active.finish();
    assert_ended_by_admin(active_pid, ClientView::Ended(query.unwrap_err()));
    assert_alive(&mut superuser);
    assert_alive(&mut elsewhere);
    assert!(counted("terminated") - terminated_before >= 4, "counted in session_kill.stats");
    assert!(counted("skipped: superuser") - skipped_before >= 1);
}

#[test]
fn min_idle_spares_recent_and_active_sessions() {
    let s = server();
    let db = s.fresh_db("t_min_idle");
    let mut old: Vec<Session> = (0..3).map(|_| Session::idle(s.connect(&db, APP))).collect();
    old.push(Session::idle_in_transaction(s.connect(&db, APP)));
    // The recent sessions have 3 s to be listed in, for a loaded machine.
    thread::sleep(Duration::from_millis(3100));
    let mut recent: Vec<Session> = (0..2).map(|_| Session::idle(s.connect(&db, APP))).collect();
    let active = ActiveSession::start(s, s.connect(&db, APP), 3);

    let rows = kill(s, "'t_min_idle', 'terminate', min_idle => '3s'");

    assert_eq!(rows.len(), old.len(), "only the sessions idle for 3s match: {rows:#?}");
    for session in &mut old {
        assert_acted(&rows, session.pid, "terminate", "terminated");
        assert_terminated(session);
    }
    recent.iter_mut().for_each(assert_alive);
    assert_eq!(active.finish(), (Ok(()), ClientView::Alive));
}

#[test]
fn cancel_stops_running_queries_and_keeps_every_session() {
    let s = server();
    let db = s.fresh_db("t_cancel");
    let mut idle = Session::idle(s.connect(&db, APP));
    let mut in_tx = Session::idle_in_transaction(s.connect(&db, APP));
    let running: Vec<ActiveSession> =
        (0..2).map(|_| ActiveSession::start(s, s.connect(&db, APP), 60)).collect();

    let rows = kill(s, "'t_cancel', 'cancel'");

    assert_acted(&rows, idle.pid, "none", "skipped: no query to cancel");
    assert_acted(&rows, in_tx.pid, "none", "skipped: no query to cancel");
    for active in running {
        assert_acted(&rows, active.pid, "cancel", "cancelled");
        assert_eq!(active.finish(), (Err(QUERY_CANCELED.into()), ClientView::Alive));
    }
    assert_alive(&mut idle);
    assert_alive(&mut in_tx);
}

#[test]
fn cancel_then_terminate_escalates_survivors_after_grace() {
    let s = server();
    let db = s.fresh_db("t_escalate");
    let mut idle = Session::idle(s.connect(&db, APP));
    let stubborn = ActiveSession::start(s, s.connect(&db, APP), 60);
    // A client that disconnects by itself when its query is cancelled.
    let mut polite = s.connect(&db, APP);
    let polite_pid: i32 = polite.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let polite_thread = thread::spawn(move || {
        let result = polite.batch_execute("SELECT pg_sleep(60)").map_err(|e| error_code(&e));
        drop(polite);
        result
    });
    wait_for(Duration::from_secs(10), || {
        s.admin()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state = 'active'",
                &[&db],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 2
    });

    let rows = kill(s, "'t_escalate', 'cancel_then_terminate', grace => '2s'");

    assert_acted(&rows, idle.pid, "terminate", "terminated");
    assert_acted(&rows, stubborn.pid, "cancel, terminate", "terminated");
    assert_acted(&rows, polite_pid, "cancel", "exited after cancel");
    assert_terminated(&mut idle);
    let stubborn_pid = stubborn.pid;
    let (query, after) = stubborn.finish();
    assert_eq!(query, Err(QUERY_CANCELED.into()), "cancelled first");
    assert_ended_by_admin(stubborn_pid, after);
    assert_eq!(polite_thread.join().unwrap(), Err(QUERY_CANCELED.into()));
    assert_eq!(s.sessions_in(&db), 0);
}

#[test]
fn dry_run_reports_and_signals_nothing() {
    let s = server();
    let db = s.fresh_db("t_dry_run");
    let mut idle = Session::idle(s.connect(&db, APP));
    let mut superuser = Session::idle(s.connect(&db, SUPER));
    let active = ActiveSession::start(s, s.connect(&db, APP), 2);

    let rows = kill(s, "'t_dry_run', 'dry_run'");

    assert_acted(&rows, idle.pid, "none", "dry run");
    assert_acted(&rows, active.pid, "none", "dry run");
    assert_acted(&rows, superuser.pid, "none", "skipped: superuser");
    assert_alive(&mut idle);
    assert_alive(&mut superuser);
    assert_eq!(active.finish(), (Ok(()), ClientView::Alive));
    assert!(!s.server_log().contains(&format!("to pid {} ", idle.pid)), "dry run logs no signal");
}

#[test]
fn waits_until_sessions_are_gone_so_dropdb_succeeds_at_once() {
    let s = server();
    let db = s.fresh_db("t_dropdb");
    let sessions: Vec<Session> = (0..40).map(|_| Session::idle(s.connect(&db, APP))).collect();

    let rows = kill(s, "'t_dropdb'");

    assert_eq!(rows.len(), 40);
    assert!(rows.values().all(|r| r.outcome == "terminated"), "{rows:#?}");
    let out = s.client_program("dropdb").arg(&db).output().unwrap();
    assert!(
        out.status.success(),
        "dropdb right after kill_sessions: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(sessions);
}

#[test]
fn wait_zero_signals_without_waiting_and_says_so() {
    let s = server();
    let db = s.fresh_db("t_no_wait");
    let mut idle = Session::idle(s.connect(&db, APP));

    let rows = kill(s, "'t_no_wait', wait => '0'");

    assert_acted(&rows, idle.pid, "terminate", "signalled");
    wait_for(Duration::from_secs(10), || s.sessions_in(&db) == 0);
    assert_terminated(&mut idle);
}

#[test]
fn every_signal_is_logged_with_its_reason() {
    let s = server();
    let db = s.fresh_db("t_logged");
    let idle = Session::idle(s.connect(&db, APP));

    kill(s, "'t_logged', reason => 'nightly cleanup'");

    let line = format!(
        "session_kill: sent terminate to pid {} (database t_logged, user app, application \"pg_test\", state idle): nightly cleanup",
        idle.pid
    );
    assert!(s.server_log().contains(&line), "server log lacks: {line}");
}

#[test]
fn all_databases_must_be_asked_for_explicitly() {
    let s = server();
    let (db1, db2) = (s.fresh_db("t_all_1"), s.fresh_db("t_all_2"));
    s.admin().batch_execute("DROP ROLE IF EXISTS roamer; CREATE ROLE roamer LOGIN").unwrap();
    let mut a = Session::idle(s.connect(&db1, "roamer"));
    let mut b = Session::idle(s.connect(&db2, "roamer"));

    let err = kill_as(&mut s.admin(), "NULL").unwrap_err();
    assert_eq!(err.code(), Some(&postgres::error::SqlState::NULL_VALUE_NOT_ALLOWED));
    assert_alive(&mut a);

    let rows = kill(s, "NULL, all_databases => true, usename => 'roamer'");
    assert_acted(&rows, a.pid, "terminate", "terminated");
    assert_acted(&rows, b.pid, "terminate", "terminated");
    assert_eq!(rows.len(), 2);
    assert_terminated(&mut a);
    assert_terminated(&mut b);
}
