//! drain_database against real clients: the gate, escalation, the report, reopening.

use postgres::error::SqlState;
use session_kill_pg_test::*;
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

/// (sessions_at_start, cancelled, terminated, remaining, refused_logins)
fn drain(s: &Server, args: &str) -> Result<(i32, i32, i32, i32, i64), postgres::Error> {
    let row = s.admin().query_one(
        &format!(
            "SELECT sessions_at_start, cancelled, terminated, remaining, refused_logins
             FROM session_kill.drain_database({args})"
        ),
        &[],
    )?;
    Ok((row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
}

/// Sessions ended by drains so far, from the shared-memory counters.
fn drain_counts(s: &Server) -> i64 {
    s.admin()
        .query_one(
            "SELECT coalesce(sum(sessions), 0)::bigint FROM session_kill.stats
             WHERE source = 'drain_database' AND outcome = 'terminated'",
            &[],
        )
        .unwrap()
        .get(0)
}

fn gate_since(s: &Server, db: &str) -> SystemTime {
    let row = s
        .admin()
        .query_one(
            "SELECT extract(epoch FROM since)::float8 FROM session_kill.drains() WHERE datname = $1",
            &[&db],
        )
        .unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_secs_f64(row.get(0))
}

fn login(s: &Server, db: &str, user: &str) -> Result<(), String> {
    s.config(db, user).connect(postgres::NoTls).map(drop).map_err(|e| error_code(&e))
}

/// PIDs the drain of `db` sent a cancel to, from its server-log lines.
fn cancelled_pids(s: &Server, db: &str) -> BTreeSet<i32> {
    let marker = format!(" (database {db}, ");
    s.server_log()
        .lines()
        .filter_map(|l| l.split_once("session_kill: sent cancel to pid ")?.1.split_once(&marker))
        .map(|(pid, _)| pid.parse().unwrap())
        .collect()
}

/// The pool logs in without running statements, so the only sessions caught running a query are
/// the 10 this test started: exactly those are cancelled (a pool that validated each login with
/// `SELECT 1` could be caught mid-statement and add a cancel of its own).
#[test]
fn drain_ends_every_session_while_clients_keep_reconnecting_and_refuses_them_all() {
    let s = server();
    let db = s.fresh_db("t_shop");
    let elsewhere = s.fresh_db("t_shop_neighbour");
    let mut idle: Vec<Session> = (0..50).map(|_| Session::idle(s.connect(&db, APP))).collect();
    let mut in_tx: Vec<Session> = (0..5).map(|_| Session::idle_in_transaction(s.connect(&db, APP))).collect();
    let active: Vec<ActiveSession> =
        (0..10).map(|_| ActiveSession::start(s, s.connect(&db, APP), 120)).collect();
    let mut neighbours: Vec<Session> = (0..5).map(|_| Session::idle(s.connect(&elsewhere, APP))).collect();
    let pool = Reconnector::logins_only(s.config(&db, APP));
    std::thread::sleep(Duration::from_millis(300));

    let drained_before = drain_counts(s);
    let (at_start, cancelled, terminated, remaining, _) = drain(s, "'t_shop', grace => '1s'").unwrap();
    let since = gate_since(s, &db);
    std::thread::sleep(Duration::from_millis(500));
    let attempts = pool.stop();

    assert_eq!(s.sessions_in(&db), 0, "no session of the database is left");
    assert!((65..=66).contains(&at_start), "65 sessions plus possibly the reconnecting client: {at_start}");
    let running: BTreeSet<i32> = active.iter().map(|a| a.pid).collect();
    assert_eq!(cancelled_pids(s, &db), running, "the running queries, and only they, were cancelled");
    assert_eq!(cancelled, 10, "each running query was cancelled first");
    assert!(terminated >= at_start - 1, "everything else was terminated: {terminated}");
    assert_eq!(remaining, 0);
    assert!(drain_counts(s) - drained_before >= 65, "drain actions are counted in session_kill.stats");
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.started > since).collect();
    assert!(after.len() >= 10, "the client kept trying: {} attempts after the gate closed", after.len());
    for a in &after {
        assert_eq!(a.result, Err(CANNOT_CONNECT_NOW.into()), "login after the gate closed: {a:?}");
    }
    let refused: i64 = s
        .admin()
        .query_one("SELECT refused_logins FROM session_kill.drains() WHERE datname = 't_shop'", &[])
        .unwrap()
        .get(0);
    assert!(refused >= after.len() as i64, "every refusal is counted: {refused}");
    idle.iter_mut().chain(in_tx.iter_mut()).for_each(assert_terminated);
    for a in active {
        let pid = a.pid;
        let (query, afterwards) = a.finish();
        assert_eq!(query, Err(QUERY_CANCELED.into()), "running queries were cancelled before termination");
        assert_ended_by_admin(pid, afterwards);
    }
    neighbours.iter_mut().for_each(assert_alive);
    assert_eq!(login(s, &elsewhere, APP), Ok(()), "other databases stay open");
    s.admin().batch_execute("SELECT session_kill.undrain_database('t_shop')").unwrap();
}

#[test]
fn the_refusal_is_a_clear_fatal_with_sqlstate_and_hint() {
    let s = server();
    let db = s.fresh_db("t_refusal");
    drain(s, "'t_refusal', timeout => '5s'").unwrap();

    let err = s.config(&db, APP).connect(postgres::NoTls).err().expect("the login is refused");
    let db_err = err.as_db_error().expect("a server error, not a dropped connection");
    assert_eq!(db_err.severity(), "FATAL");
    assert_eq!(db_err.code(), &SqlState::CANNOT_CONNECT_NOW);
    assert_eq!(db_err.message(), "database \"t_refusal\" is being drained by session_kill");
    assert!(db_err.detail().unwrap().starts_with("It has been closed since "), "{:?}", db_err.detail());
    assert_eq!(
        db_err.hint(),
        Some(
            "New connections are refused until SELECT session_kill.undrain_database('t_refusal') reopens it."
        )
    );
    assert_eq!(login(s, &db, SUPER), Err(CANNOT_CONNECT_NOW.into()), "superusers too, unless allowed");

    let reopened: bool =
        s.admin().query_one("SELECT session_kill.undrain_database('t_refusal')", &[]).unwrap().get(0);
    assert!(reopened);
    assert_eq!(login(s, &db, APP), Ok(()));
    let again: bool =
        s.admin().query_one("SELECT session_kill.undrain_database('t_refusal')", &[]).unwrap().get(0);
    assert!(!again, "it was already open");
}

#[test]
fn drains_lists_closed_gates_with_who_when_and_refusals() {
    let s = server();
    let db = s.fresh_db("t_listed");
    drain(s, "'t_listed'").unwrap();
    for _ in 0..3 {
        assert_eq!(login(s, &db, APP), Err(CANNOT_CONNECT_NOW.into()));
    }
    let row = s
        .admin()
        .query_one(
            "SELECT closed_by::text, refused_logins, since <= now(), reopen_at IS NULL, allow_superusers
             FROM session_kill.drains() WHERE datname = 't_listed'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "postgres");
    assert_eq!(row.get::<_, i64>(1), 3);
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3) && !row.get::<_, bool>(4));
    s.admin().batch_execute("SELECT session_kill.undrain_database('t_listed')").unwrap();
    let listed: i64 = s
        .admin()
        .query_one("SELECT count(*) FROM session_kill.drains() WHERE datname = 't_listed'", &[])
        .unwrap()
        .get(0);
    assert_eq!(listed, 0);
}

#[test]
fn reopen_after_bounds_the_closure() {
    let s = server();
    let db = s.fresh_db("t_bounded");
    // 3 s: the refused login has that long to be tried, on a loaded machine.
    drain(s, "'t_bounded', reopen_after => '3s'").unwrap();
    assert_eq!(login(s, &db, APP), Err(CANNOT_CONNECT_NOW.into()));
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(login(s, &db, APP), Ok(()), "reopened by itself");
}

#[test]
fn superusers_may_be_let_through_and_replication_is_never_blocked() {
    let s = server();
    let db = s.fresh_db("t_su_allowed");
    drain(s, "'t_su_allowed', allow_superusers => true").unwrap();
    assert_eq!(login(s, &db, SUPER), Ok(()));
    assert_eq!(login(s, &db, APP), Err(CANNOT_CONNECT_NOW.into()));
    let out = s
        .client_program("psql")
        .args(["-X", "-d", "dbname=t_su_allowed replication=database", "-c", "IDENTIFY_SYSTEM"])
        .output()
        .unwrap();
    assert!(out.status.success(), "replication connection: {}", String::from_utf8_lossy(&out.stderr));
    s.admin().batch_execute("SELECT session_kill.undrain_database('t_su_allowed')").unwrap();
}

#[test]
fn a_drain_that_cannot_finish_raises_and_leaves_the_database_closed() {
    let s = server();
    let db = s.fresh_db("t_stuck");
    let mut su = Session::idle(s.connect(&db, SUPER));

    let err = drain(s, "'t_stuck', timeout => '1s', grace => '0'").unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code(), &SqlState::OBJECT_IN_USE);
    assert_eq!(db_err.message(), "database \"t_stuck\" still has 1 session after 1s");
    let detail = db_err.detail().unwrap();
    assert!(
        detail.contains(&format!("pid {} (database t_stuck, user {SUPER}", su.pid))
            && detail.contains("superuser"),
        "{detail}"
    );
    assert!(db_err.hint().unwrap().contains("session_kill.undrain_database('t_stuck')"));
    assert_alive(&mut su);
    assert_eq!(login(s, &db, APP), Err(CANNOT_CONNECT_NOW.into()), "still closed after the error");

    let (_, _, terminated, remaining, _) = drain(s, "'t_stuck', include_superusers => true").unwrap();
    assert_eq!((terminated, remaining), (1, 0));
    assert_terminated(&mut su);
    s.admin().batch_execute("SELECT session_kill.undrain_database('t_stuck')").unwrap();
}

#[test]
fn only_the_owner_may_drain_and_never_the_current_database() {
    let s = server();
    let db = s.fresh_db("t_owned");
    s.admin().batch_execute(&format!("ALTER DATABASE t_owned OWNER TO {APP_MEMBER}")).unwrap();
    let mut member = Session::idle(s.connect(&db, APP));

    let err =
        s.connect("postgres", SIGNALLER).query("SELECT * FROM session_kill.drain_database('t_owned')", &[]);
    let err = err.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    assert_eq!(err.as_db_error().unwrap().message(), "must be owner of database t_owned");
    assert_eq!(login(s, &db, APP), Ok(()), "a refused drain closes nothing");

    let own = s.connect(&db, "postgres").query("SELECT * FROM session_kill.drain_database('t_owned')", &[]);
    let own = own.unwrap_err();
    assert_eq!(own.code(), Some(&SqlState::OBJECT_IN_USE));
    assert_eq!(own.as_db_error().unwrap().message(), "cannot drain the current database \"t_owned\"");

    let mut owner = s.connect("postgres", APP_MEMBER);
    owner.query("SELECT * FROM session_kill.drain_database('t_owned')", &[]).unwrap();
    assert_terminated(&mut member);
    owner.query("SELECT session_kill.undrain_database('t_owned')", &[]).unwrap();
    assert_eq!(login(s, &db, APP), Ok(()));
}

#[test]
fn bad_input_is_rejected_before_anything_closes() {
    let s = server();
    let db = s.fresh_db("t_drain_input");
    let mut idle = Session::idle(s.connect(&db, APP));
    let cases = [
        ("NULL", "22004", "db must not be null"),
        ("'t_nowhere'", "3D000", "database \"t_nowhere\" does not exist"),
        ("'t_drain_input', timeout => '-1s'", "22023", "timeout must not be negative"),
        ("'t_drain_input', grace => NULL", "22004", "grace must not be null"),
        ("'t_drain_input', reopen_after => '-1 min'", "22023", "reopen_after must not be negative"),
    ];
    for (args, code, message) in cases {
        let err = drain(s, args).unwrap_err();
        let db_err = err.as_db_error().unwrap();
        assert_eq!((db_err.code().code(), db_err.message()), (code, message), "{args}");
        assert!(db_err.hint().is_some_and(|h| h.ends_with('.')), "{args}: a hint");
    }
    assert_alive(&mut idle);
    assert_eq!(login(s, &db, APP), Ok(()));
}

#[test]
fn a_restart_always_reopens() {
    let s = Server::start(&[]);
    let mut admin = s.admin();
    admin.batch_execute("CREATE DATABASE t_restart").unwrap();
    admin.query("SELECT * FROM session_kill.drain_database('t_restart')", &[]).unwrap();
    assert_eq!(login(&s, "t_restart", "postgres"), Err(CANNOT_CONNECT_NOW.into()));
    drop(admin);

    s.restart();

    assert_eq!(login(&s, "t_restart", "postgres"), Ok(()));
    let listed: i64 = s.admin().query_one("SELECT count(*) FROM session_kill.drains()", &[]).unwrap().get(0);
    assert_eq!(listed, 0);
    s.stop();
}

#[test]
fn without_preloading_the_drain_functions_say_how_to_fix_it() {
    let s = Server::start(&["shared_preload_libraries = ''"]);
    for sql in [
        "SELECT * FROM session_kill.drain_database('template1')",
        "SELECT session_kill.undrain_database('template1')",
        "SELECT * FROM session_kill.drains()",
        "SELECT * FROM session_kill.stats",
        "SELECT * FROM session_kill.worker",
    ] {
        let err = s.admin().query(sql, &[]).unwrap_err();
        let db_err = err.as_db_error().unwrap();
        assert_eq!(db_err.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{sql}");
        assert_eq!(db_err.message(), "session_kill must be loaded via shared_preload_libraries");
        assert_eq!(
            db_err.hint(),
            Some("Add session_kill to shared_preload_libraries in postgresql.conf and restart the server.")
        );
    }
    // Listing and killing work without it.
    s.admin().query("SELECT * FROM session_kill.sessions()", &[]).unwrap();
    s.stop();
}
