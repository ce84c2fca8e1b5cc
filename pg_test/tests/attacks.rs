//! The attack tier: what a role with CREATEDB, a client choosing its own name or options, or a
//! caller that gives up half-way could do to session_kill, each tried for real. Every test here
//! failed on the code before the trust issue (issue 8) was fixed.

use postgres::NoTls;
use session_kill_pg_test::*;
use std::process::Stdio;
use std::thread;
use std::time::Duration;

fn is_superuser(s: &Server, role: &str) -> bool {
    s.admin().query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role]).unwrap().get(0)
}

fn worker_status(s: &Server) -> String {
    s.admin().query_one("SELECT coalesce(rules_status, '') FROM session_kill.worker", &[]).unwrap().get(0)
}

/// Queues one audit entry (a dry run) so that the sync has something to write.
fn queue_an_audit_entry(s: &Server) {
    s.admin().simple_query("SELECT * FROM session_kill.kill_sessions('postgres', 'dry_run')").unwrap();
}

/// Item 1: a role with only CREATEDB creates the database that `session_kill.database` names,
/// plants look-alike `session_kill.rules` and `session_kill.log` there, and waits for the sync.
#[test]
fn a_createdb_role_cannot_become_superuser_through_the_sync_or_plant_rules() {
    let s = Server::start(&["session_kill.database = 'attack'"]);
    let mut admin = s.admin();
    admin.batch_execute("CREATE ROLE mallory LOGIN CREATEDB").unwrap();
    let mut mallory = s.connect("postgres", "mallory");
    // template0: unlike template1 here, it lacks the extension, like a database a user creates.
    mallory.batch_execute("CREATE DATABASE attack TEMPLATE template0").unwrap();
    let mut planted = s.connect("attack", "mallory");
    planted
        .batch_execute(
            "CREATE SCHEMA session_kill;
             CREATE TABLE session_kill.rules (id bigint, database text, role text, application text,
                 client_addr cidr, state text, timeout interval, action text, grace interval,
                 enabled boolean, priority int);
             INSERT INTO session_kill.rules VALUES (1, '%', '%', '%', NULL, 'idle', '1s', 'terminate', '0', true, 0);
             CREATE TABLE session_kill.log (acted_at timestamptz, source text, rule text, reason text,
                 actor text, pid int, database name, role name, application text, client_addr inet,
                 state text, idle_for interval, query text, action text, outcome text);
             CREATE FUNCTION public.escalate() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN ALTER ROLE mallory SUPERUSER; RETURN NULL; END $$;
             CREATE TRIGGER escalate AFTER INSERT OR DELETE ON session_kill.log
               FOR EACH STATEMENT EXECUTE FUNCTION public.escalate();",
        )
        .unwrap();
    let mut victim = Session::idle(s.connect("postgres", APP));
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    queue_an_audit_entry(&s);
    wait_for_described(Duration::from_secs(20), "the sync reports that the extension is missing", || {
        worker_status(&s).contains("extension session_kill is not installed in database \"attack\"")
    });
    // Give a sync that did write the planted log (and so fired the trigger) time to show it.
    queue_an_audit_entry(&s);
    thread::sleep(Duration::from_secs(3));
    assert!(!is_superuser(&s, "mallory"), "the planted trigger ran as a superuser");
    assert_alive(&mut victim);
    let rules: i32 = admin.query_one("SELECT rules FROM session_kill.worker", &[]).unwrap().get(0);
    assert_eq!(rules, 0, "no planted rule is in force");
    wait_for_described(
        Duration::from_secs(20),
        "nothing waits for the planted log, and both entries with nowhere to go are counted as dropped",
        || {
            let row =
                admin.query_one("SELECT audit_queued, audit_dropped FROM session_kill.worker", &[]).unwrap();
            (row.get::<_, i32>(0), row.get::<_, i64>(1) >= 2) == (0, true)
        },
    );
    s.stop();
}

/// Item 1, second half: where the extension is installed, the sync writes its log as the
/// extension's owner, so a trigger added to that table runs with no more rights than the owner.
#[test]
fn the_sync_acts_as_the_extension_owner_never_as_the_bootstrap_superuser() {
    let s = Server::start(&["session_kill.database = 'owned'"]);
    let mut admin = s.admin();
    admin.batch_execute("CREATE ROLE ext_owner LOGIN SUPERUSER").unwrap();
    admin.batch_execute("CREATE DATABASE owned TEMPLATE template0").unwrap();
    s.connect("owned", "ext_owner").batch_execute("CREATE EXTENSION session_kill").unwrap();
    let mut owned = s.connect("owned", "postgres");
    owned
        .batch_execute(
            "CREATE TABLE public.seen (who name, was_superuser boolean);
             GRANT INSERT ON public.seen TO PUBLIC;
             CREATE FUNCTION public.note_writer() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN
                    INSERT INTO public.seen SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user;
                    RETURN NULL;
                  END $$;
             CREATE TRIGGER note_writer AFTER INSERT ON session_kill.log
               FOR EACH STATEMENT EXECUTE FUNCTION public.note_writer();",
        )
        .unwrap();
    admin.batch_execute("ALTER ROLE ext_owner NOSUPERUSER; SELECT pg_reload_conf()").unwrap();
    queue_an_audit_entry(&s);
    wait_for_described(Duration::from_secs(20), "the sync writes the log", || {
        owned.query_one("SELECT count(*) FROM public.seen", &[]).unwrap().get::<_, i64>(0) > 0
    });
    let writers: Vec<(String, bool)> = owned
        .query("SELECT DISTINCT who::text, was_superuser FROM public.seen", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(writers, vec![("ext_owner".to_owned(), false)]);
    s.stop();
}

/// A connection whose start-up the client slows with `post_auth_delay`, opened in a thread.
fn slow_login(s: &Server, db: &str, user: &str, delay_secs: u32) -> thread::JoinHandle<Result<(), String>> {
    slow_login_after(s, db, user, delay_secs, || {})
}

/// Waits until the server has authenticated (and the gate admitted) a login of `user` to `db`.
fn wait_until_authorized(s: &Server, db: &str, user: &str, logins_before: usize) {
    let line = format!("connection authorized: user={user} database={db}");
    wait_for_described(Duration::from_secs(20), "the slow login is authorized", || {
        s.server_log().matches(&line).count() > logins_before
    });
}

fn authorized_logins(s: &Server, db: &str, user: &str) -> usize {
    s.server_log().matches(&format!("connection authorized: user={user} database={db}")).count()
}

/// Item 2: a login admitted just before the gate closes and slowed in start-up never gets to run
/// queries in the drained database, on every major (PG 18 shows it early, in no database).
#[test]
fn a_login_slowed_in_start_up_never_slips_into_a_drained_database() {
    let s = server();
    let db = s.fresh_db("t_attack_slow_login");
    let before = authorized_logins(s, &db, APP);
    let login = slow_login(s, &db, APP, 4);
    wait_until_authorized(s, &db, APP, before); // admitted, now in post_auth_delay
    let remaining: i32 = s
        .admin()
        .query_one(
            &format!("SELECT remaining FROM session_kill.drain_database('{db}', timeout => '15s')"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(remaining, 0);
    let result = login.join().unwrap();
    assert!(result.is_err(), "the slowed login ran a query in the drained database");
    run_checked(s.client_program("dropdb").arg(&db));
    s.admin().execute("SELECT session_kill.undrain_database($1)", &[&db]).unwrap();
}

/// Item 2: a starting superuser login is protected like a connected one. A server of its own:
/// any signal, such as the barrier that another test's DROP DATABASE sends to every backend, cuts
/// `post_auth_delay` short.
#[test]
fn a_starting_superuser_login_is_protected_like_a_connected_one() {
    let server = Server::start(&["log_connections = on"]);
    let s = &server;
    let db = s.fresh_db("t_attack_slow_super");
    let before = authorized_logins(s, &db, SUPER);
    let login = slow_login(s, &db, SUPER, 4);
    wait_until_authorized(s, &db, SUPER, before);
    let err = s
        .admin()
        .query_one(&format!("SELECT * FROM session_kill.drain_database('{db}', timeout => '1s')"), &[])
        .unwrap_err();
    let detail = err.as_db_error().unwrap().detail().unwrap_or_default().to_owned();
    assert!(detail.contains("a login still starting up): superuser"), "{detail}");
    assert_eq!(login.join().unwrap(), Ok(()), "the superuser's login was ended while starting");
    s.stop();
}

/// A psql process holding a `replication=database` connection open (stdin kept open).
struct ReplicationClient {
    child: std::process::Child,
}

impl ReplicationClient {
    fn start(s: &Server, db: &str, user: &str) -> ReplicationClient {
        let child = s
            .client_program("psql")
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &format!("dbname={db} replication=database user={user}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        ReplicationClient { child }
    }

    fn finish(mut self) -> std::process::Output {
        drop(self.child.stdin.take());
        self.child.wait_with_output().unwrap()
    }
}

fn replication_connections(s: &Server, db: &str) -> i64 {
    s.admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' AND datname = $1",
            &[&db],
        )
        .unwrap()
        .get(0)
}

/// Item 3: logical replication connections (walsenders that can run SQL in their database) are
/// refused while the database is drained and ended by the drain; physical replication is not
/// affected.
#[test]
fn logical_replication_connections_are_refused_and_ended_by_a_drain() {
    let s = server();
    let db = s.fresh_db("t_attack_logical");
    s.admin().batch_execute("DO $$ BEGIN CREATE ROLE repl LOGIN REPLICATION; EXCEPTION WHEN duplicate_object THEN NULL; END $$").unwrap();
    let connected = ReplicationClient::start(s, &db, "repl");
    wait_for_described(Duration::from_secs(10), "the logical replication connection shows up", || {
        replication_connections(s, &db) == 1
    });
    let terminated: i32 = s
        .admin()
        .query_one(&format!("SELECT terminated + cancelled FROM session_kill.drain_database('{db}', timeout => '10s', grace => '1s')"), &[])
        .unwrap()
        .get(0);
    assert!(terminated >= 1);
    assert_eq!(replication_connections(s, &db), 0);
    let refused = ReplicationClient::start(s, &db, "repl").finish();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains(&format!("database \"{db}\" is being drained by session_kill")),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let physical = s
        .client_program("psql")
        .args(["-X", "-d", &format!("dbname={db} replication=true user=repl"), "-c", "IDENTIFY_SYSTEM"])
        .output()
        .unwrap();
    assert!(physical.status.success(), "{}", String::from_utf8_lossy(&physical.stderr));
    drop(connected.finish());
    run_checked(s.client_program("dropdb").arg(&db));
    s.admin().execute("SELECT session_kill.undrain_database($1)", &[&db]).unwrap();
}

/// Item 4: under the default configuration, calling yourself pg_dump protects nothing: not from
/// a worker limit and not from a drain.
#[test]
fn a_client_chosen_application_name_exempts_nobody_by_default() {
    let s = Server::start(&["session_kill.idle_timeout = '2s'"]);
    let mut config = s.config("postgres", APP);
    config.application_name("pg_dump");
    let mut impostor = Session::idle(config.connect(NoTls).unwrap());
    let protected: Option<String> = s
        .admin()
        .query_one("SELECT protected FROM session_kill.sessions() WHERE pid = $1", &[&impostor.pid])
        .unwrap()
        .get(0);
    assert_eq!(protected, None);
    s.wait_until_gone(impostor.pid);
    assert_ended_by_admin_on(&s, impostor.pid, impostor.probe());

    s.admin().batch_execute("CREATE DATABASE dumped").unwrap();
    let mut dumping = s.config("dumped", APP);
    dumping.application_name("pg_dump");
    let dumping = ActiveSession::start(&s, dumping.connect(NoTls).unwrap(), 60);
    let remaining: i32 = s
        .admin()
        .query_one(
            "SELECT remaining FROM session_kill.drain_database('dumped', timeout => '10s', grace => '1s')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(remaining, 0);
    assert_ne!(dumping.finish().0, Ok(()));
    s.stop();
}

/// A session that ignores cancels: its statement catches query_canceled and goes on.
fn stubborn(s: &Server, db: &str, name: &str) -> ActiveSession {
    let mut config = s.config(db, APP);
    config.application_name(name);
    let mut client = config.connect(NoTls).unwrap();
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let handle = thread::spawn(move || {
        let result = client
            .batch_execute(
                "DO $$ BEGIN
                   FOR i IN 1..600 LOOP
                     BEGIN PERFORM pg_sleep(0.1); EXCEPTION WHEN query_canceled THEN NULL; END;
                   END LOOP;
                 END $$",
            )
            .map_err(|e| error_code(&e));
        (client, result)
    });
    ActiveSession::from_parts(s, pid, handle)
}

fn audit_rows(s: &Server, pid: i32) -> Vec<(String, String)> {
    s.admin()
        .query("SELECT action, outcome FROM session_kill.log WHERE pid = $1 ORDER BY id", &[&pid])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Item 5: a signal is on record (table and counters) even when the caller never gets to the end
/// of its wait: its statement times out, or it is terminated itself.
#[test]
fn every_signal_is_audited_whatever_happens_to_the_caller() {
    let s = server();
    let db = s.fresh_db("t_attack_audit_caller");
    let timed_out = stubborn(s, &db, "stubborn_1");
    let mut caller = s.admin();
    caller.batch_execute("SET statement_timeout = '1s'").unwrap();
    let err = caller
        .simple_query(&format!(
            "SELECT * FROM session_kill.kill_sessions('{db}', 'cancel', application_name => 'stubborn_1', wait => '30s')"
        ))
        .unwrap_err();
    assert_eq!(error_code(&err), QUERY_CANCELED);

    let killed_caller = stubborn(s, &db, "stubborn_2");
    let mut caller = s.admin();
    let caller_pid: i32 = caller.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let call = thread::spawn(move || {
        caller.simple_query(&format!(
            "SELECT * FROM session_kill.kill_sessions('{db}', 'cancel', application_name => 'stubborn_2', wait => '30s')"
        ))
        .map(|_| ())
        .map_err(|e| error_code(&e))
    });
    let sent = format!("session_kill: sent cancel to pid {} ", killed_caller.pid);
    wait_for_described(Duration::from_secs(20), "the caller has sent its cancel", || {
        s.server_log().contains(&sent)
    });
    s.admin().execute("SELECT pg_terminate_backend($1)", &[&caller_pid]).unwrap();
    assert!(call.join().unwrap().is_err());

    for pid in [timed_out.pid, killed_caller.pid] {
        wait_for_described(Duration::from_secs(20), "the signal reaches session_kill.log", || {
            !audit_rows(s, pid).is_empty()
        });
        assert_eq!(audit_rows(s, pid), vec![("cancel".to_owned(), "signalled".to_owned())], "pid {pid}");
    }
    let counted: i64 = s
        .admin()
        .query_one(
            "SELECT coalesce(sum(sessions), 0)::int8 FROM session_kill.stats WHERE source = 'kill_sessions' AND reason = 'cancel' AND outcome = 'signalled'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(counted >= 2, "counted {counted}");
    s.admin().execute("SELECT pg_terminate_backend($1)", &[&timed_out.pid]).unwrap();
    s.admin().execute("SELECT pg_terminate_backend($1)", &[&killed_caller.pid]).unwrap();
}

/// Item 5, between two signals: a caller interrupted right after sending one (here by its own
/// `statement_timeout`, which PostgreSQL acts on at the next interrupt check, such as the end of
/// the LOG line that reports the signal) still leaves a row for every signal it sent. Each round
/// terminates 30 idle sessions under a timeout of 1 to 10 ms, until a few rounds were interrupted
/// half-way; every session the server log says was sent a terminate must have its row.
#[test]
fn a_caller_interrupted_between_two_signals_leaves_every_sent_one_on_record() {
    let s = server();
    let db = s.fresh_db("t_attack_interrupted_sender");
    let mut half_way = 0;
    for round in 0..60 {
        if half_way == 3 {
            break;
        }
        let targets: Vec<Session> = (0..30).map(|_| Session::idle(s.connect(&db, APP))).collect();
        let mut caller = s.admin();
        caller.batch_execute(&format!("SET statement_timeout = '{}ms'", 1 + round % 10)).unwrap();
        let call =
            caller.simple_query(&format!("SELECT * FROM session_kill.kill_sessions('{db}', wait => '0')"));
        let log = s.server_log();
        let sent: Vec<i32> = targets
            .iter()
            .map(|t| t.pid)
            .filter(|pid| log.contains(&format!("session_kill: sent terminate to pid {pid} ")))
            .collect();
        if call.is_err() && !sent.is_empty() && sent.len() < targets.len() {
            half_way += 1;
        }
        for pid in sent {
            wait_for_described(
                Duration::from_secs(20),
                &format!("pid {pid}'s signal reaches session_kill.log"),
                || !audit_rows(s, pid).is_empty(),
            );
        }
        drop(targets);
        wait_for_described(Duration::from_secs(20), "the round's sessions are gone", || {
            s.sessions_in(&db) == 0
        });
    }
    assert_eq!(half_way, 3, "rounds interrupted half-way through their signals");
}

/// Item 5: a flood of dry runs while the log cannot be written never pushes a real signal out
/// of the queue, and what is dropped is counted.
#[test]
fn dry_runs_never_evict_real_signals_and_drops_are_counted() {
    let s = Server::start(&["max_connections = 200"]);
    s.admin().batch_execute("CREATE DATABASE flood").unwrap();
    // Hold the log table so the sync cannot write (it times out, puts the entries back, retries).
    let mut blocker = s.admin();
    blocker.batch_execute("BEGIN; LOCK TABLE session_kill.log IN ACCESS EXCLUSIVE MODE").unwrap();
    let mut victim = Session::idle(s.connect("flood", APP));
    let rows = kill(&s, &format!("'flood', usename => '{APP}'"));
    assert_acted(&rows, victim.pid, "terminate", "terminated");
    assert_ended_by_admin_on(&s, victim.pid, victim.probe());
    let crowd: Vec<Session> = (0..60).map(|_| Session::idle(s.connect("flood", OTHER))).collect();
    for _ in 0..20 {
        kill(&s, "'flood', 'dry_run'");
    }
    blocker.batch_execute("COMMIT").unwrap();
    wait_for_described(Duration::from_secs(90), "the real signal reaches session_kill.log", || {
        !audit_rows(&s, victim.pid).is_empty()
    });
    assert_eq!(audit_rows(&s, victim.pid), vec![("terminate".to_owned(), "terminated".to_owned())]);
    let dropped: i64 =
        s.admin().query_one("SELECT audit_dropped FROM session_kill.worker", &[]).unwrap().get(0);
    assert!(dropped > 0, "1200 dry-run rows cannot all fit in the queue");
    drop(crowd);
    s.stop();
}

/// Item 6: a rule's timeout means the same on write (the row check) and on load (the worker):
/// what the check accepts is in force, what would be ignored is refused.
#[test]
fn a_rule_the_check_accepts_is_in_force() {
    let s = Server::start(&[]);
    let mut admin = s.admin();
    admin
        .batch_execute(
            "INSERT INTO session_kill.rules (role, state, timeout) VALUES ('nobody', 'idle', '100 years')",
        )
        .unwrap();
    wait_for_described(Duration::from_secs(20), "the rule is in force", || {
        admin.query_one("SELECT rules FROM session_kill.worker", &[]).unwrap().get::<_, i32>(0) == 1
    });
    let err = admin
        .batch_execute(
            "INSERT INTO session_kill.rules (role, state, timeout) VALUES ('nobody', 'idle', '101 years')",
        )
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().message(), "timeout is out of range");
    s.stop();
}

fn worker_scans(s: &Server) -> i64 {
    s.probe_one("SELECT scans FROM session_kill.worker", &[]).get(0)
}

/// Item 6: the worker's deadlines do not move with the wall clock. The server runs under
/// libfaketime, whose offset the test steps an hour ahead while sessions are idle; only the
/// monotonic clock stays real, as it does when an administrator or a time daemon steps the clock.
#[test]
fn a_wall_clock_step_ends_no_session_early() {
    let root = std::env::var("SESSION_KILL_TEST_ROOT").unwrap_or_else(|_| "/var/tmp/session_kill".into());
    let offset_file = std::path::Path::new(&root).join(format!("faketime-{}", std::process::id()));
    std::fs::write(&offset_file, "+0\n").unwrap();
    let s = Server::start_with_env(
        &["session_kill.idle_timeout = '15s'"],
        &[
            ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
            ("FAKETIME_TIMESTAMP_FILE", offset_file.to_str().unwrap()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    // libfaketime stops faking in a process that a PostgreSQL 15 postmaster forks from a signal
    // handler, as it does for background workers at start-up; after a restart the worker is
    // forked from the postmaster's main loop.
    let first: i32 = s.probe_one("SELECT pid FROM session_kill.worker", &[]).get(0);
    s.admin().batch_execute(&format!("SELECT pg_terminate_backend({first})")).unwrap();
    wait_for_described(Duration::from_secs(30), "the worker restarts", || {
        let pid: i32 = s.probe_one("SELECT pid FROM session_kill.worker", &[]).get(0);
        pid != first && pid != 0
    });
    let before = Session::idle(s.connect("postgres", APP));
    let clock_gap = || {
        let server_now: f64 = s.probe_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[]).get(0);
        server_now - std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
    };
    assert!(clock_gap().abs() < 60.0, "the server starts on the real time");

    let scans = worker_scans(&s);
    std::fs::write(&offset_file, "+1h\n").unwrap();
    assert!(clock_gap() > 3500.0, "libfaketime stepped the server's clock");
    // A reload wakes the worker, which scans at once in the new wall time.
    s.admin().batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for_described(Duration::from_secs(10), "the worker scans after the step", || {
        worker_scans(&s) > scans
    });
    let worker_stepped: bool =
        s.probe_one("SELECT clock_timestamp() - last_scan < '1 min' FROM session_kill.worker", &[]).get(0);
    assert!(worker_stepped, "the worker runs on the stepped clock too");
    let after = Session::idle(s.connect("postgres", APP));
    assert!(s.alive(before.pid), "idle for seconds, not for the hour the wall clock jumped");

    // Both still end at their real deadlines: the one from before the step is not an hour early,
    // and the one from after it is not an hour late.
    wait_for_described(Duration::from_secs(60), "the idle_timeout ends both sessions", || {
        !s.alive(before.pid) && !s.alive(after.pid)
    });
    let logged_idle_for = || -> Option<f64> {
        s.probe_one(
            "SELECT extract(epoch FROM max(idle_for))::float8 FROM session_kill.log WHERE pid = $1",
            &[&before.pid],
        )
        .get(0)
    };
    wait_for_described(Duration::from_secs(20), "the audit row is written", || logged_idle_for().is_some());
    let idle_for = logged_idle_for().unwrap();
    assert!(idle_for < 600.0, "the audit shows the time really spent idle, not an hour more: {idle_for} s");
    s.stop();
    let _ = std::fs::remove_file(&offset_file);
}

/// Item 6: hints that show a database name quote it as a SQL literal, so a copy-pasted hint
/// cannot run anything else.
#[test]
fn hints_quote_names_as_sql_literals() {
    let s = server();
    let db = "t_attack_o'hint";
    let mut admin = s.admin();
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\"")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE \"{db}\"")).unwrap();
    let mut superuser = Session::idle(s.connect(db, SUPER));
    let err =
        admin.query("SELECT * FROM session_kill.drain_database($1, timeout => '0.5s')", &[&db]).unwrap_err();
    let hint = err.as_db_error().unwrap().hint().unwrap_or_default().to_owned();
    assert!(hint.contains("session_kill.undrain_database('t_attack_o''hint')"), "{hint}");
    let Err(refused) = s.config(db, APP).connect(NoTls) else {
        panic!("a login to a drained database was admitted")
    };
    let hint = refused.as_db_error().unwrap().hint().unwrap_or_default().to_owned();
    assert!(hint.contains("session_kill.undrain_database('t_attack_o''hint')"), "{hint}");
    assert_alive(&mut superuser);
    admin.execute("SELECT session_kill.undrain_database($1)", &[&db]).unwrap();
}

/// Item 6: control characters in names and reasons are escaped in log lines, so nobody can
/// forge a line of the server log.
#[test]
fn control_characters_cannot_forge_server_log_lines() {
    let s = server();
    let db = s.fresh_db("t_attack_log_forgery");
    let role = "forger\nFATAL:  forged line";
    let mut admin = s.admin();
    admin.batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\"; CREATE ROLE \"{role}\" LOGIN")).unwrap();
    let mut config = s.config(&db, role);
    config.application_name("app\rFATAL:  forged app");
    let _session = Session::idle(config.connect(NoTls).unwrap());
    admin
        .query(
            "SELECT * FROM session_kill.kill_sessions($1, reason => E'nightly\\nFATAL:  forged reason')",
            &[&db],
        )
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    let log = s.server_log();
    assert!(log.contains("user forger\\nFATAL:  forged line"), "the role is logged escaped");
    assert!(log.contains(": nightly\\nFATAL:  forged reason"), "the reason is logged escaped");
    // (PostgreSQL's own log_line_prefix prints the role as it is: only our text is checked.)
    for line in log.lines() {
        assert!(!line.starts_with("FATAL:  forged reason"), "a forged log line: {line}");
    }
}

/// Item 6: filters on what a caller may not see (state, idle time, client address) never match
/// a session it may not see, so a dry run cannot probe them.
#[test]
fn dry_run_filters_reveal_nothing_the_caller_may_not_see() {
    let s = server();
    let db = s.fresh_db("t_attack_probe");
    let idle = Session::idle(s.connect_tcp(&db, APP));
    let _in_tx = Session::idle_in_transaction(s.connect(&db, APP));
    thread::sleep(Duration::from_millis(1100));
    let mut plain = s.connect("postgres", PLAIN);
    let visible_to_all = kill_as(&mut plain, &format!("'{db}', 'dry_run'")).unwrap();
    assert_eq!(visible_to_all.len(), 2, "pids are public, as in pg_stat_activity");
    for probe in ["min_idle => '1s'", "states => '{idle in transaction}'", "client_addr => '127.0.0.0/8'"] {
        let rows = kill_as(&mut plain, &format!("'{db}', 'dry_run', {probe}")).unwrap();
        assert!(rows.is_empty(), "{probe} revealed {rows:?}");
    }
    let rows = kill(s, &format!("'{db}', 'dry_run', client_addr => '127.0.0.0/8'"));
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), vec![idle.pid], "those who may see still filter");
}

/// Any role may set `session_kill.make_way_after`, and every change used to wake the worker for a
/// scan of every session: a client changing it in a loop kept the worker scanning, and a client
/// asking for 1 ms made it look at every process every millisecond. A change now wakes the worker
/// only when it does not already look for lock waits often enough, and it looks at most every
/// 100 ms; the request made during the loop is still served.
#[test]
fn a_client_changing_make_way_after_in_a_loop_cannot_keep_the_worker_scanning() {
    let s = Server::start(&[]);
    wait_for_described(Duration::from_secs(20), "the worker has loaded the rules table", || {
        s.probe_one("SELECT rules_status IS NOT NULL FROM session_kill.worker", &[]).get(0)
    });
    s.admin().batch_execute(&format!("CREATE TABLE queue (id int); GRANT ALL ON queue TO {PLAIN}")).unwrap();
    let mut attacker = s.connect("postgres", PLAIN);
    attacker.batch_execute("SET session_kill.make_way_after = '1ms'").unwrap();
    thread::sleep(Duration::from_secs(1));
    let before = worker_scans(&s);
    let changes: String = (0..300)
        .map(|i| {
            format!(
                "SET session_kill.make_way_after = '{}ms'; RESET session_kill.make_way_after; ",
                1 + i % 7
            )
        })
        .collect();
    for _ in 0..5 {
        attacker.batch_execute(&changes).unwrap();
    }
    attacker.batch_execute("SET session_kill.make_way_after = '1ms'").unwrap();
    thread::sleep(Duration::from_millis(500));
    let scans = worker_scans(&s) - before;
    assert!(scans <= 2, "3000 changes of make_way_after made the worker scan {scans} times");

    let mut holder = Session::idle_in_transaction(s.connect("postgres", PLAIN));
    holder.client.batch_execute("LOCK queue").unwrap();
    let waiter = ActiveSession::running(&s, attacker, "SET lock_timeout = '10s'; SELECT count(*) FROM queue");
    assert_eq!(waiter.finish().0, Ok(()), "the holder was ended once the waiter had waited 1 ms");
    assert_ended_by_admin_on(&s, holder.pid, holder.probe());
    s.stop();
}
