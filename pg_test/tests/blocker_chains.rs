//! Lock chains with real sessions (issue 9, part B): whom `session_kill.blockers()` names, and
//! which session the worker ends under `session_kill.blocker_timeout` or a rule with state
//! 'blocking': only where a chain of waits begins, idle-in-transaction blockers first, never a
//! protected or non-client one. Tests that set a limit or a rule run a server of their own,
//! because limits are server-wide.

use postgres::Client;
use session_kill_pg_test::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Generous: the worker acts a limit (1 s) after a wait began; nothing here measures how soon.
const PATIENCE: Duration = Duration::from_secs(30);

/// What a client's statement ended with: Ok, or the SQLSTATE and DETAIL it got.
type Told = Result<(), (String, Option<String>)>;

/// A statement running in a thread of its own, on a session that may already hold locks.
struct Running {
    pid: i32,
    handle: JoinHandle<(Client, Told)>,
}

impl Running {
    /// Starts `sql` and returns once the server shows it running.
    fn start(s: &Server, mut client: Client, sql: &str) -> Running {
        let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let sql = sql.to_owned();
        let handle = thread::spawn(move || {
            let told = client.batch_execute(&sql).map_err(|e| match e.as_db_error() {
                Some(db) => (db.code().code().to_owned(), db.detail().map(str::to_owned)),
                None => ("closed".to_owned(), None),
            });
            (client, told)
        });
        wait_for_described(PATIENCE, &format!("pid {pid} runs its statement"), || {
            s.probe_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", &[&pid])
                .get::<_, i64>(0)
                == 1
        });
        Running { pid, handle }
    }

    /// The statement's outcome, and the session to look at afterwards.
    fn finish(self) -> (Session, Told) {
        let (client, told) = self.handle.join().unwrap();
        (Session { client, pid: self.pid }, told)
    }
}

/// `pid` waits for a lock it has not been granted.
fn waits_for_lock(s: &Server, pid: i32) -> bool {
    s.probe_one("SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", &[&pid]).get::<_, i64>(0) > 0
}

#[track_caller]
fn wait_until_waiting(s: &Server, pid: i32) {
    wait_for_described(PATIENCE, &format!("pid {pid} waits for a lock"), || waits_for_lock(s, pid));
}

/// `pid` has reached `pg_sleep` (so everything its statement locked before is held).
#[track_caller]
fn wait_until_sleeping(s: &Server, pid: i32) {
    wait_for_described(PATIENCE, &format!("pid {pid} sleeps"), || {
        s.probe_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'PgSleep'",
            &[&pid],
        )
        .get::<_, i64>(0)
            == 1
    });
}

/// `pid` holds a granted lock on the relation `table`.
fn holds_lock_on(s: &Server, pid: i32, table: &str) -> bool {
    s.probe_one(
        "SELECT count(*) FROM pg_locks WHERE pid = $1 AND granted AND relation = $2::text::regclass",
        &[&pid, &table],
    )
    .get::<_, i64>(0)
        > 0
}

fn state_of(s: &Server, pid: i32) -> Option<String> {
    s.probe_one("SELECT max(state) FROM pg_stat_activity WHERE pid = $1", &[&pid]).get(0)
}

/// One row of `session_kill.blockers()`.
#[derive(Debug, Clone, PartialEq)]
struct Blocker {
    lock: String,
    relation: Option<String>,
    mode: String,
    granted: bool,
    blocked: Vec<i32>,
    all_blocked: Vec<i32>,
    protected: Option<String>,
}

/// `session_kill.blockers(db)` by PID, called from a session in `db` (relations are named there).
fn blockers(s: &Server, db: &str) -> BTreeMap<i32, Blocker> {
    s.connect(db, "postgres")
        .query(
            "SELECT pid, lock, relation, mode, granted, blocked_pids, all_blocked_pids, protected
               FROM session_kill.blockers($1)",
            &[&db],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let b = Blocker {
                lock: r.get(1),
                relation: r.get(2),
                mode: r.get(3),
                granted: r.get(4),
                blocked: r.get(5),
                all_blocked: r.get(6),
                protected: r.get(7),
            };
            (r.get(0), b)
        })
        .collect()
}

fn sorted(mut pids: Vec<i32>) -> Vec<i32> {
    pids.sort();
    pids
}

/// Inserts a rule, waits until the worker has it, and returns its id.
fn add_rule(s: &Server, values: &str) -> i64 {
    let id = s
        .admin()
        .query_one(
            &format!(
                "INSERT INTO session_kill.rules (role, state, timeout, action, grace) VALUES ({values}) RETURNING id"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    wait_for_described(PATIENCE, "the worker has the rule", || {
        s.probe_one("SELECT rules FROM session_kill.worker", &[]).get::<_, i32>(0) == 1
    });
    id
}

/// Sets `session_kill.blocker_timeout` on a running server (it is a sighup setting).
fn set_blocker_timeout(s: &Server, limit: &str) {
    s.admin().batch_execute(&format!("ALTER SYSTEM SET session_kill.blocker_timeout = '{limit}'")).unwrap();
    s.admin().batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// Where in the server log session_kill says it sent `signal` ("cancel" or "terminate") to `pid`.
fn sent(s: &Server, signal: &str, pid: i32) -> Option<usize> {
    s.server_log().find(&format!("session_kill: sent {signal} to pid {pid} "))
}

/// `sent`, waiting for the line: the worker logs it after the signal, so a terminated session
/// can be gone before it is written.
#[track_caller]
fn sent_eventually(s: &Server, signal: &str, pid: i32) -> usize {
    wait_for_described(PATIENCE, &format!("session_kill logs its {signal} to pid {pid}"), || {
        sent(s, signal, pid).is_some()
    });
    sent(s, signal, pid).unwrap()
}

/// The DETAIL the server logged with `pid`'s line ending in `message`.
fn logged_detail(s: &Server, pid: i32, message: &str) -> Option<String> {
    let log = s.server_log();
    let lines: Vec<&str> = log.lines().collect();
    lines.windows(2).find_map(|w| {
        (w[0].contains(&format!("[{pid}] ")) && w[0].ends_with(message))
            .then(|| w[1].split_once("DETAIL:  ").map(|(_, d)| d.to_owned()))
            .flatten()
    })
}

/// The session was terminated by an administrator, as its client finds out on its next query.
#[track_caller]
fn assert_terminated_on(s: &Server, session: &mut Session) {
    let view = session.probe();
    assert_ended_by_admin_on(s, session.pid, view);
}

const TERMINATING: &str = "terminating connection due to administrator command";
const CANCELING: &str = "canceling statement due to user request";

/// The server's clock now, as text.
fn server_now(s: &Server) -> String {
    s.probe_one("SELECT clock_timestamp()::text", &[]).get(0)
}

/// Waits until the worker has finished a scan later than `after` past `since` (server clock).
fn wait_for_a_scan_after(s: &Server, since: &str, after: &str) {
    let mark: String =
        s.probe_one(&format!("SELECT ($1::text::timestamptz + interval '{after}')::text"), &[&since]).get(0);
    wait_for_described(PATIENCE, &format!("a worker scan {after} after {since}"), || {
        s.probe_one(
            "SELECT coalesce(last_scan > $1::text::timestamptz, false) FROM session_kill.worker",
            &[&mark],
        )
        .get::<_, bool>(0)
    });
}

/// Tables owned by `app`, so its sessions may lock them in any mode.
fn app_tables(s: &Server, names: &[&str]) {
    app_tables_in(s, "postgres", names)
}

fn app_tables_in(s: &Server, db: &str, names: &[&str]) {
    let mut admin = s.connect(db, "postgres");
    for name in names {
        admin
            .batch_execute(&format!(
                "CREATE TABLE {name} (id int PRIMARY KEY, v int); INSERT INTO {name} VALUES (1, 0);
                 ALTER TABLE {name} OWNER TO {APP}; GRANT SELECT ON {name} TO {OTHER}"
            ))
            .unwrap();
    }
}

/// A chain of three: A changed a row and forgot its transaction; B locked t2 earlier in its
/// transaction and now runs `b_runs`, whose first statement updates the same row (it waits for
/// A); C waits for t2 (for B).
fn chain_of_three(s: &Server, db: &str, b_runs: &str) -> (Session, Running, Running) {
    app_tables_in(s, db, &["t", "t2", "c_saw"]);
    let mut a = Session::idle(s.connect(db, APP));
    a.client.batch_execute("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1").unwrap();
    let mut b = s.connect(db, APP);
    b.batch_execute("BEGIN; LOCK TABLE t2 IN ACCESS EXCLUSIVE MODE").unwrap();
    let b = Running::start(s, b, b_runs);
    wait_until_waiting(s, b.pid);
    let c = Running::start(s, s.connect(db, APP), "INSERT INTO c_saw SELECT 2, count(*) FROM t2");
    wait_until_waiting(s, c.pid);
    (a, b, c)
}

/// What B runs in a chain of three: its row update, then (after `then`) a row in t2 and COMMIT.
fn b_updates_then(then: &str) -> String {
    format!("UPDATE t SET v = v + 10 WHERE id = 1; {then} INSERT INTO t2 VALUES (2, 0); COMMIT")
}

/// B and C proceed: B's statement completed and committed, and C counted t2 after that commit.
#[track_caller]
fn b_and_c_proceed(s: &Server, db: &str, b: Running, c: Running) {
    let (_, b_told) = b.finish();
    assert_eq!(b_told, Ok(()), "B's statement completed and committed");
    let (_, c_told) = c.finish();
    assert_eq!(c_told, Ok(()), "C ran");
    let seen = s
        .connect(db, "postgres")
        .query_one("SELECT (SELECT v FROM t), (SELECT v FROM c_saw WHERE id = 2)", &[])
        .unwrap();
    assert_eq!(
        (seen.get::<_, i32>(0), seen.get::<_, i32>(1)),
        (10, 2),
        "A's change gone, B's kept; C counted t2 after B's commit"
    );
}

/// blockers() names A, holding up B directly and C through B (B waits for A's transaction: the
/// row lock), and B, holding up C on t2; B is not where the chain begins, but it is listed.
#[test]
fn blockers_names_both_links_of_a_chain_of_three() {
    let s = server();
    let db = s.fresh_db("t_chain_of_three");
    let (mut a, b, c) = chain_of_three(s, &db, &b_updates_then(""));

    let rows = blockers(s, &db);
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), sorted(vec![a.pid, b.pid]), "{rows:#?}");
    let (of_a, of_b) = (&rows[&a.pid], &rows[&b.pid]);
    assert_eq!((&of_a.blocked, &of_a.all_blocked), (&vec![b.pid], &sorted(vec![b.pid, c.pid])), "{of_a:?}");
    assert!(of_a.lock.starts_with("transaction ") && of_a.granted && of_a.relation.is_none(), "{of_a:?}");
    assert_eq!(
        (&of_b.blocked, &of_b.all_blocked, of_b.relation.as_deref(), of_b.mode.as_str(), of_b.granted),
        (&vec![c.pid], &vec![c.pid], Some("public.t2"), "AccessExclusiveLock", true),
        "{of_b:?}"
    );

    a.client.batch_execute("ROLLBACK").unwrap();
    b_and_c_proceed(s, &db, b, c);
    assert!(blockers(s, &db).is_empty());
}

/// Under blocker_timeout the worker ends A, where the chain begins, and nobody else: B, freed,
/// does a moment's more work in its transaction (shorter than the limit) and commits, and C then
/// runs. B held C up only while A held B up; it must not be charged with C's whole wait.
#[test]
fn blocker_timeout_ends_only_the_head_of_a_chain_of_three() {
    let s = Server::start(&["session_kill.blocker_timeout = '3s'"]);
    // A rule that matches no session, so the worker looks every 100 ms.
    add_rule(&s, "'nobody', 'idle', '100ms', 'terminate', '0'");
    let (mut a, b, c) = chain_of_three(&s, "postgres", &b_updates_then("SELECT pg_sleep(1);"));
    let (b_pid, c_pid) = (b.pid, c.pid);

    s.wait_until_gone(a.pid);
    assert_ended_by_admin_on(&s, a.pid, a.probe());
    let detail = logged_detail(&s, a.pid, TERMINATING).unwrap_or_default();
    assert!(
        detail.starts_with("session_kill: holding up another session's lock request for ")
            && detail.ends_with(", over session_kill.blocker_timeout (3.0s)"),
        "{detail}"
    );
    b_and_c_proceed(&s, "postgres", b, c);
    assert!(!signalled(&s, b_pid) && !signalled(&s, c_pid), "only A was signalled");
    s.stop();
}

/// A session of `app` running `sql` (which locks t and sleeps), and another waiting for its
/// lock, with the server's clock just before the wait began.
fn blocker_and_waiter(s: &Server, sql: &str) -> (Running, Running, String) {
    let blocker = Running::start(s, s.connect("postgres", APP), sql);
    wait_until_sleeping(s, blocker.pid);
    let before_wait = server_now(s);
    let waiter = Running::start(s, s.connect("postgres", APP), "SELECT count(*) FROM t");
    wait_until_waiting(s, waiter.pid);
    (blocker, waiter, before_wait)
}

/// Under a cancel_then_terminate rule the worker first cancels a blocker's running statement.
/// Here the lock was taken before a savepoint, so the cancel aborts only the savepoint and the
/// transaction (now idle, aborted) still holds the lock: after the rule's grace it is terminated.
#[test]
fn a_running_blocker_that_keeps_its_lock_after_the_cancel_is_terminated_after_grace() {
    let s = Server::start(&[]);
    app_tables(&s, &["t"]);
    let rule = add_rule(&s, "'app', 'blocking', '1s', 'cancel_then_terminate', '5s'");
    let (a, waiter, _) = blocker_and_waiter(
        &s,
        "BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; SAVEPOINT report; SELECT pg_sleep(60)",
    );

    let (mut a, told) = a.finish();
    let (code, detail) = told.expect_err("the statement was cancelled");
    let detail = detail.unwrap_or_default();
    assert_eq!(code, QUERY_CANCELED, "{detail}");
    assert!(
        detail.starts_with("session_kill: holding up another session's lock request for ")
            && detail.ends_with(&format!(", over rule {rule}")),
        "{detail}"
    );
    assert_eq!(
        logged_detail(&s, a.pid, CANCELING).as_deref(),
        Some(detail.as_str()),
        "the server log says the same"
    );
    // Within the grace (5 s): the lock is still held and the waiter still waits. (The client has
    // the error before the server reports the session's new state.)
    wait_for_described(PATIENCE, "the cancelled session leaves 'active'", || {
        state_of(&s, a.pid).as_deref() != Some("active")
    });
    assert_eq!(state_of(&s, a.pid).as_deref(), Some("idle in transaction (aborted)"));
    assert!(holds_lock_on(&s, a.pid, "t") && waits_for_lock(&s, waiter.pid));

    s.wait_until_gone(a.pid);
    assert_ended_by_admin_on(&s, a.pid, a.probe());
    let cancelled = sent_eventually(&s, "cancel", a.pid);
    let terminated = sent_eventually(&s, "terminate", a.pid);
    assert!(cancelled < terminated, "cancelled first, terminated after grace");
    let detail = logged_detail(&s, a.pid, TERMINATING).unwrap_or_default();
    assert!(
        detail.starts_with("session_kill: holding up another session's lock request for ")
            && detail.ends_with(&format!(", over rule {rule}")),
        "{detail}"
    );
    let (waiter, waited) = waiter.finish();
    assert_eq!(waited, Ok(()), "the waiter got its lock");
    assert!(!signalled(&s, waiter.pid));
    s.stop();
}

/// The same rule and blocker without a savepoint: cancelling the statement aborts the whole
/// transaction, which releases its locks (PostgreSQL does that at the error, not at ROLLBACK).
/// The waiter proceeds and the blocker, blocking nobody now, is not terminated.
#[test]
fn a_running_blocker_whose_cancel_releases_the_lock_is_only_cancelled() {
    let s = Server::start(&[]);
    app_tables(&s, &["t"]);
    let rule = add_rule(&s, "'app', 'blocking', '1s', 'cancel_then_terminate', '1s'");
    let (a, waiter, before_wait) =
        blocker_and_waiter(&s, "BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60)");
    // The cancel comes 1 s after the wait began at the earliest, the end of its grace 2 s after.

    let (mut a, told) = a.finish();
    let (code, detail) = told.expect_err("the statement was cancelled");
    assert_eq!(code, QUERY_CANCELED);
    assert!(detail.unwrap_or_default().ends_with(&format!(", over rule {rule}")));
    let (_, waited) = waiter.finish();
    assert_eq!(waited, Ok(()), "the waiter got its lock");
    assert!(!holds_lock_on(&s, a.pid, "t"));

    // At the end of the grace, the worker has looked again and let it be.
    wait_for_a_scan_after(&s, &before_wait, "2s");
    assert_eq!(state_of(&s, a.pid).as_deref(), Some("idle in transaction (aborted)"));
    assert_eq!(sent(&s, "terminate", a.pid), None);
    a.client.batch_execute("ROLLBACK").unwrap();
    assert_alive(&mut a);
    s.stop();
}

/// Four forgotten transactions and four running reports all read a table that an ALTER TABLE
/// waits for, so all eight become due in the same scan: the idle-in-transaction ones are ended
/// first (issue 9: "Idle-in-transaction blockers go first"). Eight, so that a worker taking them
/// in no particular order passes only by chance (1 in 70).
#[test]
fn idle_in_transaction_blockers_are_ended_before_running_ones_due_in_the_same_scan() {
    let s = Server::start(&["session_kill.blocker_timeout = '1s'"]);
    app_tables(&s, &["t"]);
    let mut idle: Vec<Session> = Vec::new();
    let mut running: Vec<Running> = Vec::new();
    for _ in 0..4 {
        let mut forgotten = Session::idle_in_transaction(s.connect("postgres", APP));
        forgotten.client.batch_execute("SELECT count(*) FROM t").unwrap();
        idle.push(forgotten);
        let report = Running::start(
            &s,
            s.connect("postgres", APP),
            "BEGIN; SELECT count(*) FROM t; SELECT pg_sleep(60)",
        );
        wait_until_sleeping(&s, report.pid);
        running.push(report);
    }
    let running_pids: Vec<i32> = running.iter().map(|r| r.pid).collect();
    // All eight hold up the same waiter since the same moment: the same deadline.
    let alter = Running::start(&s, s.connect("postgres", APP), "ALTER TABLE t ADD COLUMN note text");
    wait_until_waiting(&s, alter.pid);
    for report in running {
        let (report, told) = report.finish();
        let (code, _) = told.expect_err("the running report was ended");
        assert_ended_by_admin_on(&s, report.pid, ClientView::Ended(code));
    }
    for forgotten in &mut idle {
        s.wait_until_gone(forgotten.pid);
        assert_terminated_on(&s, forgotten);
    }
    let (_, altered) = alter.finish();
    assert_eq!(altered, Ok(()), "the ALTER TABLE went through");

    // The order of session_kill's "sent terminate" lines: every idle one before every running one.
    let kinds: BTreeMap<i32, &str> = idle
        .iter()
        .map(|f| (f.pid, "idle in transaction"))
        .chain(running_pids.iter().map(|pid| (*pid, "running")))
        .collect();
    let mut order: Vec<(usize, i32)> =
        kinds.keys().map(|pid| (sent_eventually(&s, "terminate", *pid), *pid)).collect();
    order.sort();
    let order: Vec<(i32, &str)> = order.into_iter().map(|(_, pid)| (pid, kinds[&pid])).collect();
    assert!(
        order.iter().map(|(_, kind)| *kind).eq(["idle in transaction"; 4].into_iter().chain(["running"; 4])),
        "terminated in this order: {order:?}"
    );
    s.stop();
}

/// A session of a protected role and a superuser's session each hold up a waiter past
/// blocker_timeout: blockers() reports them with the reason, the worker leaves them alone and the
/// waiters keep waiting until the test releases them. An unprotected chain set up after them is
/// ended: by then the worker has scanned past the protected blockers' deadlines.
#[test]
fn protected_and_superuser_blockers_are_reported_and_left_alone() {
    let s =
        Server::start(&["session_kill.blocker_timeout = '1s'", "session_kill.protected_roles = 'other_app'"]);
    app_tables(&s, &["t_protected", "t_super"]);
    let mut protected = Session::idle_in_transaction(s.connect("postgres", OTHER));
    protected.client.batch_execute("SELECT count(*) FROM t_protected").unwrap();
    let mut superuser = Session::idle_in_transaction(s.connect("postgres", SUPER));
    superuser.client.batch_execute("SELECT count(*) FROM t_super").unwrap();
    let waiters: Vec<Running> = ["t_protected", "t_super"]
        .iter()
        .map(|t| {
            let w = Running::start(
                &s,
                s.connect("postgres", APP),
                &format!("BEGIN; LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE; COMMIT"),
            );
            wait_until_waiting(&s, w.pid);
            w
        })
        .collect();

    an_unprotected_blocker_set_up_now_is_ended(&s);
    let rows = blockers(&s, "postgres");
    let reported = |pid: i32| rows.get(&pid).map(|b| (b.blocked.clone(), b.protected.clone()));
    assert_eq!(
        reported(protected.pid),
        Some((vec![waiters[0].pid], Some("protected role".to_owned()))),
        "{rows:#?}"
    );
    assert_eq!(
        reported(superuser.pid),
        Some((vec![waiters[1].pid], Some("superuser".to_owned()))),
        "{rows:#?}"
    );
    assert_alive(&mut protected);
    assert_alive(&mut superuser);
    assert!(!signalled(&s, protected.pid) && !signalled(&s, superuser.pid));
    for w in &waiters {
        assert!(waits_for_lock(&s, w.pid), "pid {} still waits", w.pid);
    }

    protected.client.batch_execute("COMMIT").unwrap();
    superuser.client.batch_execute("COMMIT").unwrap();
    for w in waiters {
        assert_eq!(w.finish().1, Ok(()), "released by the test, the waiter got its lock");
    }
    s.stop();
}

/// A session holding an advisory lock (idle, outside any transaction) holds up another that asks
/// for it: blockers() names the advisory lock, on no relation; blocker_timeout ends the holder
/// and the waiter gets the lock.
#[test]
fn an_advisory_lock_holder_is_reported_and_ended() {
    let s = Server::start(&[]);
    let mut holder = Session::idle(s.connect("postgres", APP));
    holder.client.batch_execute("SELECT pg_advisory_lock(42)").unwrap();
    let waiter = Running::start(&s, s.connect("postgres", APP), "SELECT pg_advisory_lock(42)");
    wait_until_waiting(&s, waiter.pid);

    let rows = blockers(&s, "postgres");
    let row = rows.get(&holder.pid).unwrap_or_else(|| panic!("the holder is listed: {rows:#?}"));
    assert!(row.lock.starts_with("advisory lock"), "{row:?}");
    assert_eq!(
        (row.relation.as_deref(), row.mode.as_str(), row.granted, &row.blocked),
        (None, "ExclusiveLock", true, &vec![waiter.pid]),
        "{row:?}"
    );
    assert_eq!(rows.len(), 1, "{rows:#?}");

    set_blocker_timeout(&s, "1s");
    s.wait_until_gone(holder.pid);
    assert_terminated_on(&s, &mut holder);
    let (mut waiter, got) = waiter.finish();
    assert_eq!(got, Ok(()), "the waiter got the lock");
    let held: i64 = waiter
        .client
        .query_one(
            "SELECT count(*) FROM pg_locks
              WHERE locktype = 'advisory' AND objid = 42 AND granted AND pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 1);
    s.stop();
}

/// An unprotected forgotten transaction holding up a waiter, set up now and ended by the
/// worker: by then it has scanned past the deadline of every wait that began earlier.
fn an_unprotected_blocker_set_up_now_is_ended(s: &Server) {
    app_tables(s, &["t_control"]);
    let mut control = Session::idle_in_transaction(s.connect("postgres", APP));
    control.client.batch_execute("SELECT count(*) FROM t_control").unwrap();
    let waiter = Running::start(
        s,
        s.connect("postgres", APP),
        "BEGIN; LOCK TABLE t_control IN ACCESS EXCLUSIVE MODE; COMMIT",
    );
    s.wait_until_gone(control.pid);
    assert_terminated_on(s, &mut control);
    assert_eq!(waiter.finish().1, Ok(()), "the control waiter got its lock");
}

/// An autovacuum worker, slowed to a crawl, holds its lock on a table while a session waits for
/// it (with a deadlock_timeout long enough that PostgreSQL does not cancel the autovacuum
/// itself): blockers() reports it as 'autovacuum', and blocker_timeout leaves it alone.
#[test]
fn an_autovacuum_blocker_is_reported_and_left_alone() {
    let s = Server::start(&["session_kill.blocker_timeout = '1s'", "autovacuum_naptime = 1"]);
    // Every page costs the vacuum at least 100 ms: well over a minute for this table.
    s.admin()
        .batch_execute(
            "CREATE TABLE crawl (id int, pad text) WITH (autovacuum_enabled = off);
             INSERT INTO crawl SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g;
             DELETE FROM crawl;
             ALTER TABLE crawl SET (autovacuum_enabled = on, autovacuum_vacuum_threshold = 0,
               autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_cost_delay = 100,
               autovacuum_vacuum_cost_limit = 1)",
        )
        .unwrap();
    let vacuuming = || -> Option<i32> {
        s.probe_one(
            "SELECT max(l.pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE a.backend_type = 'autovacuum worker' AND l.granted AND l.relation = 'crawl'::regclass",
            &[],
        )
        .get(0)
    };
    wait_for_described(Duration::from_secs(60), "autovacuum works on the table", || vacuuming().is_some());
    let vacuum = vacuuming().unwrap();
    let mut client = s.connect("postgres", "postgres");
    client.batch_execute("SET deadlock_timeout = '1h'").unwrap();
    let waiter = Running::start(&s, client, "BEGIN; LOCK TABLE crawl IN SHARE UPDATE EXCLUSIVE MODE; COMMIT");
    wait_until_waiting(&s, waiter.pid);

    an_unprotected_blocker_set_up_now_is_ended(&s);
    let rows = blockers(&s, "postgres");
    let row = rows.get(&vacuum).unwrap_or_else(|| panic!("the autovacuum worker is listed: {rows:#?}"));
    assert_eq!((&row.blocked, row.protected.as_deref()), (&vec![waiter.pid], Some("autovacuum")), "{row:?}");
    assert_eq!(vacuuming(), Some(vacuum), "still vacuuming");
    assert!(waits_for_lock(&s, waiter.pid));
    assert!(!signalled(&s, vacuum));

    s.admin().execute("SELECT pg_cancel_backend($1)", &[&vacuum]).unwrap();
    assert_eq!(waiter.finish().1, Ok(()), "released by the test, the waiter got its lock");
    s.stop();
}

/// psql connected with `replication=database`: a walsender, which can run SQL in its database.
struct Walsender {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: i32,
}

impl Walsender {
    fn open(s: &Server, db: &str, user: &str) -> Walsender {
        let mut child = s
            .client_program("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", user])
            .arg(format!("dbname={db} replication=database"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut w = Walsender { child, stdin, stdout, pid: 0 };
        w.pid = w.query("SELECT pg_backend_pid();").parse().unwrap();
        w
    }

    /// Runs one statement and returns the one line it printed.
    fn query(&mut self, sql: &str) -> String {
        writeln!(self.stdin, "{sql}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

impl Drop for Walsender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A logical-replication walsender (not a client session) holds an advisory lock that a client
/// waits for: blockers() reports it as 'replication', and blocker_timeout leaves it alone.
#[test]
fn a_walsender_blocker_is_reported_and_left_alone() {
    let s = Server::start(&["session_kill.blocker_timeout = '1s'"]);
    s.admin().batch_execute("CREATE ROLE replicator LOGIN REPLICATION").unwrap();
    let mut walsender = Walsender::open(&s, "postgres", "replicator");
    assert_eq!(
        s.probe_one("SELECT backend_type FROM pg_stat_activity WHERE pid = $1", &[&walsender.pid])
            .get::<_, String>(0),
        "walsender"
    );
    walsender.query("SELECT pg_advisory_lock(7);");
    let waiter = Running::start(&s, s.connect("postgres", APP), "SELECT pg_advisory_lock(7)");
    wait_until_waiting(&s, waiter.pid);

    an_unprotected_blocker_set_up_now_is_ended(&s);
    let rows = blockers(&s, "postgres");
    let row = rows.get(&walsender.pid).unwrap_or_else(|| panic!("the walsender is listed: {rows:#?}"));
    assert_eq!((&row.blocked, row.protected.as_deref()), (&vec![waiter.pid], Some("replication")), "{row:?}");
    assert!(s.alive(walsender.pid) && !signalled(&s, walsender.pid));
    assert!(waits_for_lock(&s, waiter.pid));

    assert_eq!(walsender.query("SELECT pg_advisory_unlock(7);"), "t");
    assert_eq!(waiter.finish().1, Ok(()), "released by the test, the waiter got the lock");
    s.stop();
}
