//! `session_kill.blockers()`: who holds up whom in the lock manager, checked against
//! PostgreSQL's own `pg_blocking_pids()` with real sessions queued on a real table.

use session_kill_pg_test::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// (blocked_pids, all_blocked_pids, granted, mode, relation, protected) by blocker PID.
type Rows = BTreeMap<i32, (Vec<i32>, Vec<i32>, bool, String, Option<String>, Option<String>)>;

fn blockers(client: &mut postgres::Client, db: &str) -> Rows {
    client
        .query(
            "SELECT pid, blocked_pids, all_blocked_pids, granted, mode, relation, protected
               FROM session_kill.blockers($1)",
            &[&db],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6))))
        .collect()
}

fn waiting(s: &Server, pids: &[i32]) -> i64 {
    s.probe_one("SELECT count(*) FROM pg_locks WHERE NOT granted AND pid = ANY($1)", &[&pids]).get(0)
}

/// A transaction that read the table blocks an ALTER TABLE, which blocks the SELECTs queued
/// behind it: the reader blocks all three (one directly), the ALTER blocks the two SELECTs.
#[test]
fn blockers_names_holders_and_queue_jumpers_like_pg_blocking_pids() {
    let s = server();
    let db = s.fresh_db("t_blockers");
    let mut admin = s.connect(&db, "postgres");
    admin.batch_execute("CREATE TABLE orders (id int); GRANT SELECT ON orders TO app").unwrap();
    let mut reader = Session::idle_in_transaction(s.connect(&db, APP));
    reader.client.batch_execute("SELECT count(*) FROM orders").unwrap();
    let alter =
        ActiveSession::running(s, s.connect(&db, "postgres"), "ALTER TABLE orders ADD COLUMN note text");
    wait_for_described(Duration::from_secs(10), "the ALTER waits", || waiting(s, &[alter.pid]) == 1);
    let selects: Vec<ActiveSession> = (0..2)
        .map(|_| ActiveSession::running(s, s.connect(&db, APP), "SELECT count(*) FROM orders"))
        .collect();
    let select_pids: Vec<i32> = selects.iter().map(|a| a.pid).collect();
    wait_for_described(Duration::from_secs(10), "the SELECTs queue", || waiting(s, &select_pids) == 2);

    let rows = blockers(&mut admin, &db);
    let mut behind_alter = select_pids.clone();
    behind_alter.sort();
    let mut everyone = [behind_alter.clone(), vec![alter.pid]].concat();
    everyone.sort();
    assert_eq!(
        rows.get(&reader.pid),
        Some(&(
            vec![alter.pid],
            everyone,
            true,
            "AccessShareLock".to_owned(),
            Some("public.orders".to_owned()),
            None
        )),
        "{rows:?}"
    );
    assert_eq!(
        rows.get(&alter.pid),
        Some(&(
            behind_alter.clone(),
            behind_alter,
            false,
            "AccessExclusiveLock".to_owned(),
            Some("public.orders".to_owned()),
            Some("superuser".to_owned())
        )),
        "{rows:?}"
    );
    assert_eq!(rows.len(), 2, "{rows:?}");

    // The same edges as PostgreSQL's own pg_blocking_pids(), waiter by waiter.
    for waiter in [vec![alter.pid], select_pids.clone()].concat() {
        let mut theirs: Vec<i32> =
            s.probe_one("SELECT pg_blocking_pids($1)", &[&waiter]).get::<_, Vec<i32>>(0);
        theirs.sort();
        let ours: Vec<i32> =
            rows.iter().filter(|(_, r)| r.0.contains(&waiter)).map(|(pid, _)| *pid).collect();
        assert_eq!(ours, theirs, "blockers of {waiter}");
    }
    let (lock, longest): (String, f64) = {
        let r = admin
            .query_one(
                "SELECT lock, extract(epoch FROM longest_wait)::float8 FROM session_kill.blockers($1)
                  WHERE pid = $2",
                &[&db, &reader.pid],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(lock.starts_with("relation "), "PostgreSQL's words for the lock: {lock}");
    assert!(longest > 0.0, "{longest}");

    // A caller without rights over the sessions sees that they block, not what they do.
    let mut plain = s.connect(&db, PLAIN);
    let state: Option<String> = plain
        .query_one("SELECT state FROM session_kill.blockers($1) WHERE pid = $2", &[&db, &reader.pid])
        .unwrap()
        .get(0);
    assert_eq!(state, None);
    assert!(blockers(&mut admin, "postgres").is_empty(), "another database's blockers are left out");

    reader.client.batch_execute("COMMIT").unwrap();
    assert_eq!(alter.finish().0, Ok(()));
    for select in selects {
        assert_eq!(select.finish().0, Ok(()));
    }
    assert!(blockers(&mut admin, &db).is_empty());
}

/// A forgotten transaction holds up an ALTER TABLE and the SELECTs behind it: once the ALTER has
/// waited past the limit, the worker ends the forgotten transaction (where the chain of waits
/// begins), never the ALTER or the SELECTs that are only queued, nor a bystander idle in a
/// transaction that holds nobody up.
fn the_worker_ends_where_the_chain_of_waits_begins(s: &Server, told_over: &str) {
    let mut admin = s.admin();
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS queue_t (id int); GRANT SELECT ON queue_t TO app")
        .unwrap();
    let mut bystander = Session::idle_in_transaction(s.connect("postgres", APP));
    let mut reader = Session::idle_in_transaction(s.connect("postgres", APP));
    reader.client.batch_execute("SELECT count(*) FROM queue_t").unwrap();
    let alter =
        ActiveSession::running(s, s.connect("postgres", "postgres"), "ALTER TABLE queue_t ADD COLUMN n int");
    let select = ActiveSession::running(s, s.connect("postgres", APP), "SELECT count(*) FROM queue_t");
    s.wait_until_gone(reader.pid);
    assert_eq!(alter.finish().0, Ok(()), "the ALTER got its lock");
    assert_eq!(select.finish().0, Ok(()), "the SELECT queued behind it ran");
    assert_alive(&mut bystander);
    let log = s.server_log();
    let detail = log
        .lines()
        .skip_while(|l| {
            !(l.contains(&format!("[{}] ", reader.pid))
                && l.ends_with("terminating connection due to administrator command"))
        })
        .nth(1)
        .unwrap_or_default();
    assert!(
        tells_duration_over(
            &detail,
            "DETAIL:  session_kill: holding up another session's lock request for ",
            1.0
        ) && detail.ends_with(told_over),
        "{detail}"
    );
    let _ = reader.probe();
}

#[test]
fn blocker_timeout_ends_the_session_that_holds_everyone_up() {
    let s = Server::start(&["session_kill.blocker_timeout = '1s'"]);
    the_worker_ends_where_the_chain_of_waits_begins(&s, "over session_kill.blocker_timeout (1.0s)");
    s.stop();
}

/// A blocking limit alone does not make the worker copy every session's status once per limit:
/// while nobody waits for a lock it only looks at each process's lock wait, and scans once
/// someone waits. (The old worker scanned once a second here, 4 or 5 times in the window.)
#[test]
fn a_blocking_limit_costs_no_scan_until_someone_waits_for_a_lock() {
    let s = Server::start(&["session_kill.blocker_timeout = '1s'"]);
    let scans = || -> i64 { s.probe_one("SELECT scans FROM session_kill.worker", &[]).get(0) };
    wait_for_described(Duration::from_secs(20), "the worker has loaded the rules table", || {
        s.probe_one("SELECT rules_status IS NOT NULL FROM session_kill.worker", &[]).get(0)
    });
    std::thread::sleep(Duration::from_secs(1));
    let mut idle: Vec<Session> =
        (0..5).map(|_| Session::idle_in_transaction(s.connect("postgres", APP))).collect();
    let before = scans();
    std::thread::sleep(Duration::from_millis(4500));
    let quiet = scans() - before;
    // One spare scan for a wake-up from elsewhere (a sync the worker started at boot).
    assert!(quiet <= 1, "the worker scanned {quiet} times with nobody waiting for a lock");
    idle.iter_mut().for_each(assert_alive);

    s.admin().batch_execute("CREATE TABLE watched (id int); GRANT SELECT ON watched TO app").unwrap();
    let mut reader = Session::idle_in_transaction(s.connect("postgres", APP));
    reader.client.batch_execute("SELECT count(*) FROM watched").unwrap();
    let alter =
        ActiveSession::running(&s, s.connect("postgres", "postgres"), "ALTER TABLE watched ADD COLUMN n int");
    s.wait_until_gone(reader.pid);
    assert_eq!(alter.finish().0, Ok(()), "the ALTER got its lock");
    assert!(scans() > before + quiet, "the lock wait made the worker scan");
    idle.iter_mut().for_each(assert_alive);
    let _ = reader.probe();
    s.stop();
}

#[test]
fn a_blocking_rule_ends_the_session_that_holds_everyone_up() {
    let s = Server::start(&[]);
    let id: i64 = s
        .admin()
        .query_one("INSERT INTO session_kill.rules (role, state, timeout) VALUES ('app', 'blocking', '1s') RETURNING id", &[])
        .unwrap()
        .get(0);
    wait_for(Duration::from_secs(20), || {
        s.admin().query_one("SELECT rules FROM session_kill.worker", &[]).unwrap().get::<_, i32>(0) == 1
    });
    the_worker_ends_where_the_chain_of_waits_begins(&s, &format!("over rule {id}"));
    s.stop();
}

/// `kill_sessions(..., blocking => ...)` acts only where a chain of lock waits begins and only
/// once its longest victim has waited that long: not on a bystander idle in a transaction, not
/// on the ALTER TABLE that waits (though it holds up the SELECT behind it).
#[test]
fn kill_sessions_blocking_ends_only_where_a_long_enough_chain_of_waits_begins() {
    let s = server();
    let db = s.fresh_db("t_kill_blocking");
    let mut admin = s.connect(&db, "postgres");
    admin.batch_execute("CREATE TABLE stock (id int); GRANT SELECT ON stock TO app").unwrap();
    let mut bystander = Session::idle_in_transaction(s.connect(&db, APP));
    let mut reader = Session::idle_in_transaction(s.connect(&db, APP));
    reader.client.batch_execute("SELECT count(*) FROM stock").unwrap();
    let alter = ActiveSession::running(s, s.connect(&db, "postgres"), "ALTER TABLE stock ADD COLUMN n int");
    let select = ActiveSession::running(s, s.connect(&db, APP), "SELECT count(*) FROM stock");

    let not_yet = kill(s, &format!("'{db}', blocking => '1h'"));
    assert!(not_yet.is_empty(), "nobody has waited an hour: {not_yet:?}");
    std::thread::sleep(Duration::from_millis(1200));
    let dry = kill(s, &format!("'{db}', 'dry_run', blocking => '1s'"));
    assert_eq!(dry.keys().copied().collect::<Vec<_>>(), vec![reader.pid], "{dry:?}");
    let acted = kill(s, &format!("'{db}', blocking => '1s', include_superusers => true"));
    assert_eq!(acted.keys().copied().collect::<Vec<_>>(), vec![reader.pid], "{acted:?}");
    assert_acted(&acted, reader.pid, "terminate", "terminated");
    assert_eq!(alter.finish().0, Ok(()));
    assert_eq!(select.finish().0, Ok(()));
    assert_alive(&mut bystander);
    assert!(kill(s, &format!("'{db}', blocking => '0'")).is_empty(), "nobody blocks anyone now");
}

/// A migration's `SET session_kill.make_way_after` ends the sessions that hold up its ALTER TABLE
/// once it has waited that long, but only those its own role could end with
/// `pg_terminate_backend`: never another role's session, never a superuser's.
#[test]
fn make_way_after_ends_only_the_blockers_the_waiting_role_may_end() {
    let s = Server::start(&[]);
    let mut admin = s.admin();
    admin
        .batch_execute(&format!(
            "CREATE TABLE ledger (id int); ALTER TABLE ledger OWNER TO {APP_MEMBER};
             GRANT SELECT ON ledger TO {APP}, {OTHER}"
        ))
        .unwrap();
    let reader = |role: &str| {
        let mut r = Session::idle_in_transaction(s.connect("postgres", role));
        r.client.batch_execute("SELECT count(*) FROM ledger").unwrap();
        r
    };
    let mut own_kind = reader(APP); // app_member is a member of app: it may end this one
    let mut foreign = reader(OTHER);
    let mut superuser = reader(SUPER);
    let migrate = |sql: &str| {
        ActiveSession::running(
            &s,
            s.connect("postgres", APP_MEMBER),
            &format!("SET session_kill.make_way_after = '1s'; SET lock_timeout = '6s'; {sql}"),
        )
    };
    let alter = migrate("ALTER TABLE ledger ADD COLUMN note text");
    s.wait_until_gone(own_kind.pid);
    let (result, _) = alter.finish();
    assert_eq!(result, Err("55P03".to_owned()), "the others still hold the table: lock_timeout");
    assert_alive(&mut foreign);
    assert_alive(&mut superuser);
    let log = s.server_log();
    let told = log
        .lines()
        .skip_while(|l| {
            !(l.contains(&format!("[{}] ", own_kind.pid))
                && l.ends_with("terminating connection due to administrator command"))
        })
        .nth(1)
        .unwrap_or_default();
    assert!(
        told.contains("DETAIL:  session_kill: holding a lock that pid ")
            && told.contains("asked to make way after 1.0s"),
        "{told}"
    );
    let _ = own_kind.probe();

    // With only its own kind in the way, the migration goes through.
    foreign.client.batch_execute("COMMIT").unwrap();
    superuser.client.batch_execute("COMMIT").unwrap();
    let mut again = reader(APP);
    let alter = migrate("ALTER TABLE ledger ADD COLUMN note text");
    assert_eq!(alter.finish().0, Ok(()));
    assert_ended_by_admin_on(&s, again.pid, again.probe());
    assert_alive(&mut foreign);
    s.stop();
}
