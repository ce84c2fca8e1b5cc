//! The rules table `session_kill.rules`: edits reach sessions already open, priorities, actions,
//! the row check, and a worker that survives its rules table and database going away. Each test
//! runs its own server because rules are server-wide.

use postgres::error::SqlState;
use session_kill_pg_test::*;
use std::time::Duration;

fn with_application(s: &Server, db: &str, role: &str, application: &str) -> postgres::Client {
    let mut cfg = s.config(db, role);
    cfg.application_name(application);
    cfg.connect(postgres::NoTls).unwrap()
}

/// Inserts a rule and returns its id.
fn add_rule(s: &Server, columns: &str, values: &str) -> i64 {
    s.admin()
        .query_one(&format!("INSERT INTO session_kill.rules ({columns}) VALUES ({values}) RETURNING id"), &[])
        .unwrap()
        .get(0)
}

/// `rules`, `rules_status` from the session_kill.worker view.
fn rules_in_force(s: &Server) -> (i32, String) {
    let row = s
        .admin()
        .query_one("SELECT rules, coalesce(rules_status, '') FROM session_kill.worker", &[])
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn a_rule_inserted_while_sessions_are_open_reaches_them_and_edits_apply() {
    let s = Server::start(&[]);
    let mut app = Session::idle(s.connect("postgres", APP));
    let mut app_tx = Session::idle_in_transaction(s.connect("postgres", APP));
    let mut other = Session::idle(s.connect("postgres", OTHER));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(app.probe(), ClientView::Alive, "no rule yet");

    let id = add_rule(&s, "role, state, timeout, comment", "'app', 'idle', '500ms', 'app pools'");
    s.wait_until_gone(app.pid);
    assert_ended_by_admin_on(&s, app.pid, app.probe());
    wait_for(Duration::from_secs(10), || {
        s.server_log().contains(&format!(
        "session_kill: sent terminate to pid {} (database postgres, user app, application \"pg_test\", state idle): rule {id} (idle longer than 00:00:00.5) exceeded by",
        app.pid
    ))
    });
    assert_eq!(other.probe(), ClientView::Alive, "another role");
    assert_eq!(app_tx.probe(), ClientView::Alive, "an 'idle' rule does not cover transactions");
    assert_eq!(rules_in_force(&s), (1, "1 rule from session_kill.rules in database \"postgres\"".into()));

    s.admin().batch_execute("UPDATE session_kill.rules SET enabled = false").unwrap();
    wait_for(Duration::from_secs(10), || rules_in_force(&s).0 == 0);
    let mut spared = Session::idle(s.connect("postgres", APP));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(spared.probe(), ClientView::Alive, "a disabled rule is not enforced");

    s.admin().batch_execute("UPDATE session_kill.rules SET enabled = true, role = 'other%'").unwrap();
    s.wait_until_gone(other.pid);
    assert_ended_by_admin_on(&s, other.pid, other.probe());
    assert_eq!(spared.probe(), ClientView::Alive, "the edited rule no longer matches app");

    // A rolled-back edit changes nothing.
    let mut admin = s.admin();
    admin.batch_execute("BEGIN; DELETE FROM session_kill.rules; ROLLBACK").unwrap();
    let mut other_again = Session::idle(s.connect("postgres", OTHER));
    s.wait_until_gone(other_again.pid);
    assert_ended_by_admin_on(&s, other_again.pid, other_again.probe());
    s.stop();
}

#[test]
fn the_highest_priority_rule_governs_and_settings_rank_last() {
    let s = Server::start(&["session_kill.idle_timeout = '500ms'"]);
    let exception = add_rule(&s, "application, state, timeout, priority", "'report%', 'idle', '1h', 10");
    let strict = add_rule(&s, "role, state, timeout, priority", "'other_app', 'idle', '200ms', 0");
    wait_for(Duration::from_secs(10), || rules_in_force(&s).0 == 2);
    let mut report = Session::idle(with_application(&s, "postgres", OTHER, "reporting"));
    let mut other = Session::idle(s.connect("postgres", OTHER));
    let mut app = Session::idle(s.connect("postgres", APP));

    s.wait_until_gone(other.pid);
    s.wait_until_gone(app.pid);
    assert_ended_by_admin_on(&s, other.pid, other.probe());
    assert_ended_by_admin_on(&s, app.pid, app.probe());
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(report.probe(), ClientView::Alive, "rule {exception} outranks rule {strict} and the setting");

    let reasons: Vec<(String, i64)> = s
        .admin()
        .query("SELECT reason, sessions FROM session_kill.stats WHERE source = 'worker' ORDER BY reason", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(reasons, vec![(format!("rule {strict}"), 1), ("session_kill.idle_timeout".into(), 1)]);
    s.stop();
}

/// A statement that swallows cancels (an exception handler catching query_canceled, as buggy
/// application code does) is cancelled, then terminated once grace has passed.
const STUBBORN: &str = "DO $$ BEGIN LOOP BEGIN PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP; END $$";

/// Runs `sql` on the session in a thread of its own; joining yields the result (SQLSTATE on error)
/// and the session.
fn running(
    mut session: Session,
    sql: &'static str,
) -> std::thread::JoinHandle<(Result<(), String>, Session)> {
    std::thread::spawn(move || (session.client.batch_execute(sql).map_err(|e| error_code(&e)), session))
}

#[test]
fn cancel_then_terminate_cancels_first_and_terminates_after_grace() {
    let s = Server::start(&[]);
    add_rule(
        &s,
        "role, state, timeout, action, grace",
        "'app', 'active', '1s', 'cancel_then_terminate', '1s'",
    );
    add_rule(
        &s,
        "role, state, timeout, action, grace",
        "'other_app', 'transaction', '1s', 'cancel_then_terminate', '1s'",
    );
    wait_for(Duration::from_secs(10), || rules_in_force(&s).0 == 2);

    let stubborn = running(Session::idle(s.connect("postgres", APP)), STUBBORN);
    let mut in_tx = Session::idle(s.connect("postgres", OTHER));
    in_tx.client.batch_execute("BEGIN").unwrap();
    let long_tx = running(in_tx, "SELECT pg_sleep(30)");

    let (result, mut stubborn) = stubborn.join().unwrap();
    let swallowed_cancel_then_ended = result.expect_err("the statement never ends by itself");
    assert_ended_by_admin_on(&s, stubborn.pid, ClientView::Ended(swallowed_cancel_then_ended));
    assert_ne!(stubborn.probe(), ClientView::Alive);
    // The worker logs each signal just after sending it: the client may hear first.
    let terminate_line = format!("sent terminate to pid {} ", stubborn.pid);
    wait_for_described(Duration::from_secs(10), "the termination is logged", || {
        s.server_log().contains(&terminate_line)
    });
    let log = s.server_log();
    let cancelled = log.find(&format!("sent cancel to pid {} ", stubborn.pid)).expect("cancel logged");
    let terminated = log.find(&terminate_line).expect("termination logged");
    assert!(cancelled < terminated, "cancelled first, terminated after grace");

    // Cancelling a statement in a transaction block aborts the transaction: its locks and snapshot
    // are released, so the transaction limit is met and the session stays.
    let (result, in_tx) = long_tx.join().unwrap();
    assert_eq!(result, Err(QUERY_CANCELED.to_owned()));
    std::thread::sleep(Duration::from_millis(2500));
    let state: Option<String> = s
        .admin()
        .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&in_tx.pid])
        .unwrap()
        .map(|r| r.get(0));
    assert_eq!(state.as_deref(), Some("idle in transaction (aborted)"), "not terminated");
    s.stop();
}

#[test]
fn bad_rules_are_refused_with_sqlstate_and_hint() {
    let s = Server::start(&[]);
    let mut admin = s.admin();
    for (values, message) in [
        ("'sleeping', '1s', 'terminate'", "invalid rule state \"sleeping\""),
        ("'idle', '0', 'terminate'", "timeout must be positive"),
        ("'idle', '-1s', 'terminate'", "timeout must be positive"),
        ("'idle', '1s', 'kill'", "invalid rule action \"kill\""),
    ] {
        let err = admin
            .batch_execute(&format!(
                "INSERT INTO session_kill.rules (state, timeout, action) VALUES ({values})"
            ))
            .unwrap_err();
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.code(), &SqlState::INVALID_PARAMETER_VALUE, "{values}");
        assert_eq!(db.message(), message);
        assert!(db.hint().is_some_and(|h| h.ends_with('.')), "{values}: a hint written as a sentence");
    }
    let err = admin
        .batch_execute(
            "INSERT INTO session_kill.rules (state, timeout, application) VALUES ('idle', '1s', 'a\\')",
        )
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().message(), "invalid pattern \"a\\\"");
    let err = admin.batch_execute("INSERT INTO session_kill.rules (timeout) VALUES ('1s')").unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::NOT_NULL_VIOLATION));
    let count: i64 = admin.query_one("SELECT count(*) FROM session_kill.rules", &[]).unwrap().get(0);
    assert_eq!(count, 0);
    s.stop();
}

#[test]
fn rules_edited_outside_the_rules_database_warn() {
    let s = Server::start(&[]);
    // Created from template1, where the harness installed the extension.
    let db = s.fresh_db("elsewhere");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = notices.clone();
    let mut cfg = s.config(&db, "postgres");
    cfg.notice_callback(move |n| {
        seen.lock().unwrap().push((n.message().to_owned(), n.hint().map(str::to_owned)))
    });
    let mut client = cfg.connect(postgres::NoTls).unwrap();
    client.batch_execute("INSERT INTO session_kill.rules (state, timeout) VALUES ('idle', '1h')").unwrap();
    let notices = notices.lock().unwrap();
    assert_eq!(
        notices.as_slice(),
        [(
            "session_kill.rules in database \"elsewhere\" is not enforced".to_owned(),
            Some("The worker reads rules from database \"postgres\" (session_kill.database).".to_owned())
        )]
    );
    s.stop();
}

#[test]
fn the_worker_survives_its_rules_table_going_bad_and_its_database_going_away() {
    let s = Server::start(&["session_kill.database = 'rulesdb'"]);
    s.fresh_db("rulesdb");
    let worker = || -> i32 {
        s.admin()
            .query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'session_kill worker'", &[])
            .unwrap()
            .get(0)
    };
    let before = worker();
    let reload = || s.admin().batch_execute("SELECT pg_reload_conf()").unwrap();
    let in_rulesdb = |sql: &str| s.connect("rulesdb", "postgres").batch_execute(sql).unwrap();
    let ended_by_rule = |application: &str| {
        let mut victim = Session::idle(with_application(&s, "postgres", APP, application));
        s.wait_until_gone(victim.pid);
        assert_ended_by_admin_on(&s, victim.pid, victim.probe());
    };

    in_rulesdb(
        "INSERT INTO session_kill.rules (application, state, timeout) VALUES ('victim%', 'idle', '300ms')",
    );
    wait_for(Duration::from_secs(10), || rules_in_force(&s).0 == 1);
    ended_by_rule("victim 1");

    // Malformed: the rules in force stay, and the view says why.
    in_rulesdb("ALTER TABLE session_kill.rules RENAME COLUMN timeout TO how_long");
    reload();
    wait_for(Duration::from_secs(10), || {
        rules_in_force(&s).1.starts_with("could not read session_kill.rules")
    });
    assert!(rules_in_force(&s).1.ends_with("the previous rules stay in force"), "{:?}", rules_in_force(&s));
    ended_by_rule("victim 2");
    assert!(s
        .server_log()
        .contains("WARNING:  session_kill: could not read session_kill.rules in database \"rulesdb\""));

    // Dropped: no rules, without a reload (and with no audit write pending that would start a sync).
    session_kill_pg_test::stats::settle(&s);
    in_rulesdb("DROP EXTENSION session_kill");
    wait_for(Duration::from_secs(10), || {
        let (rules, status) = rules_in_force(&s);
        rules == 0 && status.starts_with("extension session_kill is not installed in database \"rulesdb\"")
    });

    // Renamed, then dropped: no rules, and nothing holds the database open for long (a sync lasts
    // milliseconds; a rename that meets one fails like with any other connection, and is retried).
    wait_for(Duration::from_secs(10), || {
        s.admin().batch_execute("ALTER DATABASE rulesdb RENAME TO gone").is_ok()
    });
    reload();
    wait_for(Duration::from_secs(10), || {
        rules_in_force(&s).1 == "database \"rulesdb\" does not exist (session_kill.database)"
    });
    s.admin().batch_execute("DROP DATABASE gone").unwrap();

    // The same worker still enforces the settings.
    s.admin().batch_execute("ALTER SYSTEM SET session_kill.idle_timeout = '300ms'").unwrap();
    reload();
    ended_by_rule("anything");
    assert_eq!(worker(), before, "the same worker process throughout");
    s.stop();
}

/// A fault outside our control: the rules database stops accepting connections, so every sync
/// worker dies at login (FATAL). Attempts back off (1 s, 2 s, 4 s, ...) instead of looping, the
/// view says what is wrong, and the worker keeps enforcing; it recovers once the fault is gone.
#[test]
fn a_failing_sync_backs_off_and_recovers() {
    let s = Server::start(&["session_kill.idle_timeout = '300ms'"]);
    s.fresh_db("closed");
    s.admin().batch_execute("ALTER DATABASE closed ALLOW_CONNECTIONS false").unwrap();
    s.admin().batch_execute("ALTER SYSTEM SET session_kill.database = 'closed'").unwrap();
    s.admin().batch_execute("SELECT pg_reload_conf()").unwrap();
    let refusals = || {
        s.server_log().matches("FATAL:  database \"closed\" is not currently accepting connections").count()
    };
    // (failures in a row, next attempt in microseconds since the epoch) as the worker view shows it.
    let sync = || -> (i32, Option<i64>) {
        let row = s.probe_one(
            "SELECT sync_failures, (extract(epoch FROM sync_retry_at) * 1000000)::int8 FROM session_kill.worker",
            &[],
        );
        (row.get(0), row.get(1))
    };

    // The next attempt is planned when a failure is counted, and never starts before it: so the
    // planned attempts of failures n and n + 1 are at least the n-th backoff, 2^n s, apart.
    let mut planned = std::collections::BTreeMap::new();
    wait_for_described(Duration::from_secs(60), "four failed syncs in a row", || {
        if let (failures @ 1.., Some(retry_at)) = sync() {
            planned.insert(failures, retry_at);
        }
        planned.contains_key(&4)
    });
    assert_eq!(planned.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4], "counted one at a time");
    for n in 1..4 {
        let gap = planned[&(n + 1)] - planned[&n];
        assert!(
            gap >= 1_000_000 << n,
            "failure {}: retried {gap} µs after the previous plan, not 2^{n} s",
            n + 1
        );
    }
    // Each failure is one refused login, not a loop: the log has at most the one in flight more.
    let (failures, _) = sync();
    let refused = refusals();
    assert!(
        (failures as usize..=failures as usize + 1).contains(&refused),
        "{failures} failures, {refused} refusals in the server log"
    );
    let (_, status) = rules_in_force(&s);
    assert!(status.starts_with("the sync worker failed"), "{status}");

    // Settings keep being enforced while the sync fails.
    let mut idle = Session::idle(s.connect("postgres", APP));
    s.wait_until_gone(idle.pid);
    assert_ended_by_admin_on(&s, idle.pid, idle.probe());

    s.admin().batch_execute("ALTER DATABASE closed ALLOW_CONNECTIONS true").unwrap();
    wait_for_described(
        Duration::from_secs(90),
        "a sync succeeds once the database accepts connections",
        || sync() == (0, None),
    );
    let (_, status) = rules_in_force(&s);
    assert!(
        status == "no table session_kill.rules in database \"closed\"" || status.starts_with("0 rules"),
        "{status}"
    );
    s.stop();
}

/// The rules are configuration: `pg_dump` keeps them (and the id sequence), so a restored database
/// takes new rules without clashing ids.
#[test]
fn pg_dump_keeps_the_rules() {
    let s = Server::start(&[]);
    let first = add_rule(&s, "role, state, timeout, comment", "'app', 'idle', '10min', 'pools'");
    add_rule(&s, "state, timeout", "'active', '1h'");
    let dump = run_checked(s.client_program("pg_dump").args(["-d", "postgres"])).stdout;
    s.admin().batch_execute("CREATE DATABASE restored TEMPLATE template0").unwrap();
    let mut psql = s.client_program("psql");
    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "restored"]).stdin(std::process::Stdio::piped());
    let mut restoring = psql.stdout(std::process::Stdio::null()).spawn().unwrap();
    std::io::Write::write_all(&mut restoring.stdin.take().unwrap(), &dump).unwrap();
    assert!(restoring.wait().unwrap().success(), "the dump restores");

    let mut restored = s.connect("restored", "postgres");
    let kept: Vec<(i64, String, String)> = restored
        .query("SELECT id, state, coalesce(comment, '') FROM session_kill.rules ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        kept,
        vec![(first, "idle".into(), "pools".into()), (first + 1, "active".into(), String::new())]
    );
    let next: i64 = restored
        .query_one("INSERT INTO session_kill.rules (state, timeout) VALUES ('idle', '1h') RETURNING id", &[])
        .unwrap()
        .get(0);
    assert_eq!(next, first + 2, "the id sequence was dumped too");
    s.stop();
}
