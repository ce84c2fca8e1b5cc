//! The horizon guard: `session_kill.snapshot_timeout`, `session_kill.snapshot_xid_age`, rules of
//! state `snapshot`, `sessions().xmin_age / xmin_held_for` and `horizon()`, with real clients
//! holding snapshots in each way PostgreSQL lets them (REPEATABLE READ, a READ COMMITTED
//! statement, a cursor, a prepared transaction, a replication slot). "Held since" is defined in
//! src/xmin_hold.rs and the README; each of its cases is shown here.

use session_kill_pg_test::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Waits until the worker enforces `n` rules of the table.
fn wait_for_rules(s: &Server, n: i32) {
    wait_for_described(Duration::from_secs(20), "the worker loads the rules", || {
        s.admin().query_one("SELECT rules FROM session_kill.worker", &[]).unwrap().get::<_, i32>(0) == n
    });
}

/// A rule that limits nobody (no such role) but makes the worker watch every xmin once a second.
fn watch_every_second(s: &Server) {
    s.admin()
        .batch_execute(
            "INSERT INTO session_kill.rules (role, state, timeout) VALUES ('nobody', 'snapshot', '1s')",
        )
        .unwrap();
    wait_for_rules(s, 1);
}

/// What `sessions()` says of `pid`'s snapshot, in seconds: (xmin_age, xmin_held_for, xact_age,
/// query_start - xact_start).
fn hold(s: &Server, pid: i32) -> (Option<i32>, Option<f64>, Option<f64>, Option<f64>) {
    let r = s.probe_one(
        "SELECT xmin_age, extract(epoch FROM xmin_held_for)::float8, extract(epoch FROM xact_age)::float8,
                extract(epoch FROM query_start - xact_start)::float8
           FROM session_kill.sessions() WHERE pid = $1",
        &[&pid],
    );
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

#[track_caller]
fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!((actual - expected).abs() < 0.05, "{what}: {actual} s, expected {expected} s");
}

/// The server log shows `pid` terminated by an administrator with a DETAIL starting `detail`.
fn told_terminated(s: &Server, pid: i32) -> String {
    told(s, pid, "FATAL:  terminating connection due to administrator command")
}

fn told(s: &Server, pid: i32, message: &str) -> String {
    let log = s.server_log();
    let lines: Vec<&str> = log.lines().collect();
    lines
        .windows(2)
        .find(|w| w[0].contains(&format!("[{pid}] ")) && w[0].ends_with(message))
        .map(|w| w[1].split("DETAIL:  ").nth(1).unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// A session of `user` idle in a REPEATABLE READ transaction that has read once.
fn repeatable_read(s: &Server, user: &str) -> Session {
    let mut rr = Session::idle(s.connect("postgres", user));
    rr.client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1").unwrap();
    rr
}

/// Assigns transaction IDs, one transaction at a time, until stopped; returns how many.
struct XidBurner {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<u64>,
}

impl XidBurner {
    fn start(s: &Server, pause: Duration) -> XidBurner {
        let mut c = s.admin();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                c.batch_execute("SELECT txid_current()").unwrap();
                n += 1;
                thread::sleep(pause);
            }
            n
        });
        XidBurner { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn burn_xids(s: &Server, n: usize) {
    let mut c = s.admin();
    for _ in 0..n {
        c.batch_execute("SELECT txid_current()").unwrap();
    }
}

/// Each way of holding a snapshot, as `sessions()` measures it while the worker watches.
#[test]
fn held_since_is_the_transaction_start_the_statement_start_or_the_cursor_s_statement() {
    let s = Server::start(&[]);
    watch_every_second(&s);

    // REPEATABLE READ: the transaction's snapshot, from its first statement (right after BEGIN).
    let rr = repeatable_read(&s, APP);
    thread::sleep(Duration::from_millis(1500));
    let (age, held, xact_age, _) = hold(&s, rr.pid);
    assert!(age.is_some(), "a snapshot is held");
    assert_close(held.unwrap(), xact_age.unwrap(), "REPEATABLE READ: since the transaction start");
    assert!(held.unwrap() >= 1.5);

    // REPEATABLE READ after a pause between BEGIN and the first statement, which the worker saw
    // without a snapshot: since that statement.
    let mut late = Session::idle(s.connect("postgres", APP));
    late.client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    thread::sleep(Duration::from_millis(2200));
    assert_eq!(hold(&s, late.pid).0, None, "BEGIN alone takes no snapshot");
    late.client.batch_execute("SELECT 1").unwrap();
    thread::sleep(Duration::from_millis(500));
    let (_, held, xact_age, query_after) = hold(&s, late.pid);
    assert_close(held.unwrap(), xact_age.unwrap() - query_after.unwrap(), "since the first statement");

    // READ COMMITTED, idle in a transaction without a snapshot: nothing held.
    let rc_idle = Session::idle_in_transaction(s.connect("postgres", APP));
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(hold(&s, rc_idle.pid).0, None);
    assert_eq!(hold(&s, rc_idle.pid).1, None);

    // READ COMMITTED, a long statement in an old transaction: since the statement began.
    let mut old_tx = s.connect("postgres", APP);
    old_tx.batch_execute("BEGIN; SELECT 1").unwrap();
    let pid: i32 = old_tx.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    thread::sleep(Duration::from_millis(2200));
    let running = ActiveSession::start(&s, old_tx, 30);
    thread::sleep(Duration::from_millis(1500));
    let (_, held, xact_age, query_after) = hold(&s, pid);
    assert!(xact_age.unwrap() > 3.5);
    assert_close(held.unwrap(), xact_age.unwrap() - query_after.unwrap(), "since the statement");
    // A statement on its own: its transaction and the statement start together.
    let single = ActiveSession::start(&s, s.connect("postgres", APP), 30);
    thread::sleep(Duration::from_millis(1200));
    let (_, held, xact_age, _) = hold(&s, single.pid);
    assert_close(held.unwrap(), xact_age.unwrap(), "a single statement: since it began");

    // READ COMMITTED, idle in a transaction with an open cursor: since the statement that opened
    // it, through later statements of the transaction, once transactions have been assigned IDs
    // since (until then its xmin holds nothing back, see the next test).
    let mut cursor = Session::idle_in_transaction(s.connect("postgres", APP));
    thread::sleep(Duration::from_millis(2200));
    cursor.client.batch_execute("DECLARE c CURSOR FOR SELECT * FROM generate_series(1, 1000)").unwrap();
    burn_xids(&s, 3);
    let (_, _, _, declared_after) = hold(&s, cursor.pid);
    thread::sleep(Duration::from_millis(1500));
    cursor.client.batch_execute("FETCH 10 FROM c").unwrap();
    thread::sleep(Duration::from_millis(1200));
    let (_, held, xact_age, fetched_after) = hold(&s, cursor.pid);
    assert!(fetched_after.unwrap() > declared_after.unwrap() + 1.0);
    assert_close(held.unwrap(), xact_age.unwrap() - declared_after.unwrap(), "since DECLARE");
    cursor.client.batch_execute("CLOSE c").unwrap();
    assert_eq!(hold(&s, cursor.pid).0, None, "closing the cursor releases its snapshot");

    // The xmin matches pg_stat_activity's, and its age is age(backend_xmin).
    burn_xids(&s, 5);
    let r = s.probe_one(
        "SELECT s.xmin_age, age(a.backend_xmin) FROM session_kill.sessions() s JOIN pg_stat_activity a USING (pid)
          WHERE pid = $1",
        &[&rr.pid],
    );
    assert_eq!(r.get::<_, Option<i32>>(0), r.get::<_, Option<i32>>(1));
    assert!(r.get::<_, Option<i32>>(0).unwrap() >= 5);
    // Without rights over a session a caller sees its xmin age (as pg_stat_activity shows
    // backend_xmin to everyone) but not how long it has been held.
    let plain = s
        .connect("postgres", PLAIN)
        .query_one(
            "SELECT xmin_age, xmin_held_for IS NULL FROM session_kill.sessions() WHERE pid = $1",
            &[&rr.pid],
        )
        .unwrap();
    assert!(plain.get::<_, Option<i32>>(0).is_some() && plain.get::<_, bool>(1));
    let _ = (running.pid, single.pid, late.pid);
    s.stop();
}

/// Without a snapshot limit the worker does not watch xmins: `xmin_held_for` counts from the
/// start of the statement running (or last run), never from before it.
#[test]
fn without_a_watch_xmin_held_for_counts_from_the_statement() {
    let s = server();
    let db = s.fresh_db("t_unwatched");
    let mut c = s.connect(&db, APP);
    c.batch_execute("BEGIN; SELECT 1").unwrap();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    thread::sleep(Duration::from_millis(300));
    let running = ActiveSession::start(s, c, 30);
    let (age, held, xact_age, query_after) = hold(s, pid);
    assert!(age.is_some());
    assert!(query_after.unwrap() >= 0.3);
    assert_close(held.unwrap(), xact_age.unwrap() - query_after.unwrap(), "since the statement");
    kill(s, &format!("'{db}'"));
    let _ = running.finish();
}

/// On a server where no transaction ID is assigned, every statement of a READ COMMITTED
/// transaction gets the same xmin (the next transaction ID, age 0): a new statement's snapshot
/// is not charged with the earlier ones'.
#[test]
fn read_committed_statements_on_a_quiet_server_are_not_one_long_hold() {
    let s = Server::start(&["session_kill.snapshot_timeout = '1s'"]);
    let mut quiet = Session::idle(s.connect("postgres", APP));
    quiet.client.batch_execute("BEGIN").unwrap();
    for _ in 0..12 {
        quiet.client.batch_execute("SELECT pg_sleep(0.25)").unwrap();
    }
    quiet.client.batch_execute("COMMIT").unwrap();
    let mut rr = repeatable_read(&s, APP);
    s.wait_until_gone(rr.pid);
    assert_ended_by_admin_on(&s, rr.pid, rr.probe());
    s.stop();
}

/// `snapshot_timeout` by setting: a REPEATABLE READ transaction idle past the limit and a long
/// statement are terminated and told why; READ COMMITTED transactions whose snapshots come and go
/// (none while idle, a new one per statement) are not, however old; nor are superusers and
/// protected roles. VACUUM then removes the rows the snapshot kept.
#[test]
fn snapshot_timeout_ends_the_holders_and_vacuum_can_clean_up() {
    let s = Server::start(&[
        "session_kill.snapshot_timeout = '2s'",
        &format!("session_kill.protected_roles = '{OTHER}'"),
    ]);
    let mut admin = s.admin();
    admin
        .batch_execute(
            "CREATE TABLE churn (id int) WITH (autovacuum_enabled = off);
             INSERT INTO churn SELECT generate_series(1, 1000);
             GRANT SELECT ON churn TO app, other_app",
        )
        .unwrap();
    let mut holder = Session::idle(s.connect("postgres", APP));
    holder.client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM churn").unwrap();
    admin.batch_execute("DELETE FROM churn").unwrap();
    let vacuum = || {
        let out = run_checked(s.client_program("psql").args([
            "-X",
            "-d",
            "postgres",
            "-c",
            "VACUUM (VERBOSE) churn",
        ]));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let before = vacuum();
    assert!(before.contains("1000 are dead but not yet removable"), "{before}");

    let mut protected = repeatable_read(&s, OTHER);
    let mut superuser = repeatable_read(&s, SUPER);
    let mut rc_idle = Session::idle_in_transaction(s.connect("postgres", APP));
    // READ COMMITTED, many statements in one transaction while transaction IDs are assigned:
    // each statement's snapshot has a new xmin, none held for 2 s.
    let burner = XidBurner::start(&s, Duration::from_millis(50));
    let mut busy = Session::idle(s.connect("postgres", APP));
    busy.client.batch_execute("BEGIN").unwrap();
    for _ in 0..16 {
        busy.client.batch_execute("SELECT pg_sleep(0.3)").unwrap();
    }
    let running = ActiveSession::start(&s, s.connect("postgres", APP), 60);
    let running_pid = running.pid;

    s.wait_until_gone(holder.pid);
    let (result, _) = running.finish();
    assert_ended_by_admin_on(&s, running_pid, ClientView::Ended(result.unwrap_err()));
    burner.stop();
    assert_ended_by_admin_on(&s, holder.pid, holder.probe());
    let detail = told_terminated(&s, holder.pid);
    assert!(
        detail.starts_with("session_kill: holding back the xmin horizon for ")
            && tells_duration_over(&detail, "session_kill: holding back the xmin horizon for ", 2.0)
            && detail.contains("s (xmin age ")
            && detail.ends_with("), over session_kill.snapshot_timeout (2.0s)"),
        "{detail}"
    );
    let detail = told_terminated(&s, running_pid);
    assert!(
        detail.starts_with("session_kill: holding back the xmin horizon for ")
            && tells_duration_over(&detail, "session_kill: holding back the xmin horizon for ", 2.0),
        "{detail}"
    );
    assert!(
        busy.client.batch_execute("COMMIT").is_ok(),
        "a moving xmin is not held for the whole transaction"
    );
    assert_alive(&mut rc_idle);
    assert_alive(&mut protected);
    assert_alive(&mut superuser);
    protected.client.batch_execute("COMMIT").unwrap();
    superuser.client.batch_execute("COMMIT").unwrap();
    let after = vacuum();
    assert!(after.contains("tuples: 1000 removed"), "{after}");
    s.stop();
}

/// A `snapshot` rule with `cancel_then_terminate`: a running statement is cancelled and the
/// session lives on without its snapshot; a statement that survives the cancel (it catches it)
/// still holds the snapshot after the grace and is terminated. Sessions idle in a transaction are
/// terminated at once.
#[test]
fn a_snapshot_rule_cancels_first_then_terminates_what_still_holds() {
    let s = Server::start(&[]);
    let rule: i64 = s
        .admin()
        .query_one(
            "INSERT INTO session_kill.rules (role, state, timeout, action, grace, comment)
             VALUES ('app', 'snapshot', '2s', 'cancel_then_terminate', '1s', 'reports hold vacuum back') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    wait_for_rules(&s, 1);
    let mut cancelled_client = s.connect("postgres", APP);
    let cancelled_pid: i32 = cancelled_client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let cancelled = thread::spawn(move || {
        let err = cancelled_client.batch_execute("SELECT pg_sleep(60)").unwrap_err();
        let db = err.as_db_error().unwrap();
        let seen = (db.code().code().to_owned(), db.detail().map(str::to_owned));
        (cancelled_client, seen)
    });
    let stubborn = ActiveSession::running(
        &s,
        s.connect("postgres", APP),
        "DO $$ BEGIN LOOP BEGIN PERFORM pg_sleep(60); EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP; END $$",
    );
    let stubborn_pid = stubborn.pid;
    let mut idle_rr = repeatable_read(&s, APP);

    let (mut client, (code, detail)) = cancelled.join().unwrap();
    assert_eq!(code, QUERY_CANCELED);
    let detail = detail.unwrap_or_default();
    assert!(
        detail.starts_with("session_kill: holding back the xmin horizon for ")
            && tells_duration_over(&detail, "session_kill: holding back the xmin horizon for ", 2.0)
            && detail.ends_with(&format!(", over rule {rule} (reports hold vacuum back)")),
        "{detail}"
    );
    assert!(client.batch_execute("SELECT 1").is_ok(), "cancelled, not terminated");
    assert_eq!(hold(&s, cancelled_pid).0, None, "and it holds no snapshot any more");

    let (result, _) = stubborn.finish();
    assert_ended_by_admin_on(&s, stubborn_pid, ClientView::Ended(result.unwrap_err()));
    let terminated = format!("session_kill: sent terminate to pid {stubborn_pid} ");
    let log = s.log_showing(&terminated);
    let cancel =
        log.find(&format!("session_kill: sent cancel to pid {stubborn_pid} ")).expect("cancelled first");
    let terminate = log.find(&terminated).unwrap();
    assert!(cancel < terminate);
    let detail = told_terminated(&s, stubborn_pid);
    assert!(
        detail.starts_with("session_kill: holding back the xmin horizon for ")
            && tells_duration_over(&detail, "session_kill: holding back the xmin horizon for ", 3.0),
        "{detail}"
    );
    assert_ended_by_admin_on(&s, idle_rr.pid, idle_rr.probe());
    s.stop();
}

/// `snapshot_xid_age`: a snapshot is ended once `age(backend_xmin)` passes the limit, however
/// briefly it has been held; a younger one and a protected role's are not.
#[test]
fn snapshot_xid_age_ends_a_snapshot_older_than_so_many_transactions() {
    let s = Server::start(&[
        "session_kill.snapshot_xid_age = 50",
        &format!("session_kill.protected_roles = '{OTHER}'"),
    ]);
    let mut old = repeatable_read(&s, APP);
    let mut protected = repeatable_read(&s, OTHER);
    burn_xids(&s, 30);
    let mut young = repeatable_read(&s, APP);
    thread::sleep(Duration::from_millis(1500));
    assert_alive(&mut old);
    burn_xids(&s, 30);
    s.wait_until_gone(old.pid);
    assert_ended_by_admin_on(&s, old.pid, old.probe());
    let detail = told_terminated(&s, old.pid);
    assert!(
        detail.starts_with("session_kill: holding back the xmin horizon for ")
            && detail.ends_with("), over session_kill.snapshot_xid_age (50)"),
        "{detail}"
    );
    // The worker looks once a second, so it may read the age while the second batch burns.
    let age: u32 = detail
        .split_once(" (xmin age ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .and_then(|(age, _)| age.parse().ok())
        .unwrap_or_else(|| panic!("an xmin age in {detail}"));
    assert!((51..=70).contains(&age), "{detail}");
    thread::sleep(Duration::from_millis(1500));
    assert_alive(&mut young);
    assert_alive(&mut protected);
    s.stop();
}

/// The oldest holder of each kind, including what session_kill cannot end: a prepared
/// transaction, a logical replication slot's catalog_xmin, a superuser's snapshot and a client
/// session, oldest first; the caller's own session is left out.
#[test]
fn horizon_names_the_oldest_holder_of_each_kind() {
    let s = Server::start(&["max_prepared_transactions = 5", "wal_level = logical"]);
    let mut admin = s.admin();
    admin.batch_execute("CREATE TABLE px (id int)").unwrap();
    // The slot first: creating a logical slot waits for every transaction in progress, a
    // prepared one too. Snapshots taken while the prepared transaction is in progress would have
    // its ID as their xmin, so the sessions' come before it.
    admin.batch_execute("SELECT pg_create_logical_replication_slot('hslot', 'pgoutput')").unwrap();
    burn_xids(&s, 3);
    let superuser = repeatable_read(&s, SUPER);
    burn_xids(&s, 3);
    let app = repeatable_read(&s, APP);
    burn_xids(&s, 3);
    let mut prepare = s.admin();
    prepare.batch_execute("BEGIN; INSERT INTO px VALUES (1); PREPARE TRANSACTION 'stuck''gid'").unwrap();
    burn_xids(&s, 3);
    thread::sleep(Duration::from_millis(200));

    // Autovacuum or session_kill's own workers may hold an xmin for a moment: left out here.
    let rows: Vec<postgres::Row> = admin
        .query(
            "SELECT kind, pid, name, datname::text, xmin::text, xmin_age, held_for IS NOT NULL, can_end, detail
               FROM session_kill.horizon() WHERE kind <> 'other backend'",
            &[],
        )
        .unwrap();
    let kinds: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(kinds, ["replication slot (catalog)", "session", "prepared transaction"], "{rows:#?}");
    let ages: Vec<i32> = rows.iter().map(|r| r.get(5)).collect();
    assert!(ages.windows(2).all(|w| w[0] > w[1]), "oldest first: {ages:?}");
    let (slot, session, prepared) = (&rows[0], &rows[1], &rows[2]);

    assert_eq!(prepared.get::<_, Option<i32>>(1), None);
    assert_eq!(prepared.get::<_, Option<String>>(2).as_deref(), Some("stuck'gid"));
    assert_eq!(prepared.get::<_, Option<String>>(3).as_deref(), Some("postgres"));
    let xid: String = admin.query_one("SELECT transaction::text FROM pg_prepared_xacts", &[]).unwrap().get(0);
    assert_eq!(prepared.get::<_, String>(4), xid);
    assert!(prepared.get::<_, bool>(6), "held since it was prepared");
    assert!(!prepared.get::<_, bool>(7), "session_kill cannot end a prepared transaction");
    assert!(prepared.get::<_, String>(8).contains("ROLLBACK PREPARED 'stuck''gid'"));

    assert_eq!(slot.get::<_, Option<String>>(2).as_deref(), Some("hslot"));
    let catalog_xmin: String =
        admin.query_one("SELECT catalog_xmin::text FROM pg_replication_slots", &[]).unwrap().get(0);
    assert_eq!(slot.get::<_, String>(4), catalog_xmin);
    assert!(!slot.get::<_, bool>(6) && !slot.get::<_, bool>(7));
    assert!(slot.get::<_, String>(8).starts_with("catalog_xmin of logical slot, inactive"));

    // The oldest session is the superuser's: named, but not something session_kill ends.
    assert_eq!(session.get::<_, Option<i32>>(1), Some(superuser.pid));
    assert_eq!(session.get::<_, Option<String>>(2).as_deref(), Some(SUPER));
    let backend_xmin: String = admin
        .query_one("SELECT backend_xmin::text FROM pg_stat_activity WHERE pid = $1", &[&superuser.pid])
        .unwrap()
        .get(0);
    assert_eq!(session.get::<_, String>(4), backend_xmin);
    assert!(session.get::<_, bool>(6));
    assert!(!session.get::<_, bool>(7));
    assert!(
        session.get::<_, String>(8).ends_with("protected: superuser"),
        "{:?}",
        session.get::<_, String>(8)
    );

    // Once the older holders are gone, the app session is named, and may be ended.
    admin.batch_execute("ROLLBACK PREPARED 'stuck''gid'").unwrap();
    admin.batch_execute("SELECT pg_drop_replication_slot('hslot')").unwrap();
    drop(superuser);
    wait_for(Duration::from_secs(10), || {
        let r = s.probe_one("SELECT pid, can_end FROM session_kill.horizon() WHERE kind = 'session'", &[]);
        r.get::<_, Option<i32>>(0) == Some(app.pid) && r.get::<_, bool>(1)
    });
    drop(prepare);
    s.stop();
}

/// A standby with `hot_standby_feedback` and no replication slot: its walsender on the primary
/// carries the standby's xmin, which a REPEATABLE READ query on the standby holds back. The
/// primary's `horizon()` names that walsender; session_kill does not end it. On the standby,
/// `snapshot_timeout` ends that query, and the primary's horizon moves on.
#[test]
fn horizon_names_a_walsender_holding_a_standby_s_feedback_and_the_standby_s_guard_frees_it() {
    let primary = Server::start(&[]);
    let standby =
        primary.start_standby(&["hot_standby_feedback = on", "wal_receiver_status_interval = '1s'"]);
    let reader = repeatable_read(&standby, APP);
    let standby_xmin: String = standby
        .admin()
        .query_one("SELECT backend_xmin::text FROM pg_stat_activity WHERE pid = $1", &[&reader.pid])
        .unwrap()
        .get(0);
    burn_xids(&primary, 5);
    let walsender: i32 = primary.probe_one("SELECT pid FROM pg_stat_replication", &[]).get(0);
    wait_for_described(Duration::from_secs(20), "the walsender carries the standby's xmin", || {
        primary
            .probe_one(
                "SELECT backend_xmin::text = $1 FROM pg_stat_activity WHERE pid = $2",
                &[&standby_xmin, &walsender],
            )
            .get::<_, Option<bool>>(0)
            == Some(true)
    });
    let row = primary.probe_one(
        "SELECT pid, xmin::text, xmin_age, held_for IS NULL, can_end, detail FROM session_kill.horizon()
          WHERE kind = 'walsender'",
        &[],
    );
    assert_eq!(row.get::<_, Option<i32>>(0), Some(walsender));
    assert_eq!(row.get::<_, String>(1), standby_xmin);
    assert!(row.get::<_, i32>(2) >= 5);
    assert!(row.get::<_, bool>(3), "how long is not knowable");
    assert!(!row.get::<_, bool>(4));
    assert!(
        row.get::<_, String>(5).starts_with("hot_standby_feedback of standby \""),
        "{}",
        row.get::<_, String>(5)
    );

    // The snapshot guard, run by the standby's own worker, ends the standby query that holds
    // the primary's horizon back; the feedback then lets the primary's xmin move on.
    let mut reader = reader;
    standby.admin().batch_execute("ALTER SYSTEM SET session_kill.snapshot_timeout = '2s'").unwrap();
    standby.admin().batch_execute("SELECT pg_reload_conf()").unwrap();
    standby.wait_until_gone(reader.pid);
    assert_ended_by_admin_on(&standby, reader.pid, reader.probe());
    let detail = told_terminated(&standby, reader.pid);
    assert!(detail.starts_with("session_kill: holding back the xmin horizon for "), "{detail}");
    burn_xids(&primary, 1);
    wait_for_described(
        Duration::from_secs(20),
        "the primary's walsender lets go of the standby's xmin",
        || {
            primary
            .probe_one(
                "SELECT backend_xmin IS NULL OR backend_xmin::text <> $1 FROM pg_stat_activity WHERE pid = $2",
                &[&standby_xmin, &walsender],
            )
            .get::<_, Option<bool>>(0)
            == Some(true)
        },
    );
    standby.stop();
    primary.stop();
}
