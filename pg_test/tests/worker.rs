//! The background worker enforcing idle limits on real sessions. Each test runs its own server
//! because the limits are server-wide settings.

use postgres::error::SqlState;
use session_kill_pg_test::*;
use std::time::Duration;

/// Waits until the worker has started.
fn wait_for_worker(s: &Server) {
    wait_for(Duration::from_secs(20), || {
        s.admin()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'session_kill worker'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    });
}

fn logged(s: &Server, text: &str) -> bool {
    s.server_log().contains(text)
}

#[test]
fn idle_timeout_ends_idle_sessions_that_opted_out_and_spares_the_rest() {
    let s = Server::start(&[
        "session_kill.idle_timeout = '1s'",
        &format!("session_kill.protected_roles = '{OTHER}'"),
    ]);
    let mut idle = Session::idle(s.connect("postgres", APP));
    let mut opted_out = Session::idle(s.connect("postgres", APP));
    opted_out.client.batch_execute("SET idle_session_timeout = 0").unwrap();
    let mut superuser = Session::idle(s.connect("postgres", SUPER));
    let mut dump_cfg = s.config("postgres", OTHER);
    dump_cfg.application_name("pg_dump");
    let mut backup = Session::idle(dump_cfg.connect(postgres::NoTls).unwrap());
    let mut impostor = Session::idle(dump_cfg.user(APP).connect(postgres::NoTls).unwrap());
    let mut in_tx = Session::idle_in_transaction(s.connect("postgres", APP));
    let active = ActiveSession::start(&s, s.connect("postgres", APP), 2);

    s.wait_until_gone(idle.pid);
    s.wait_until_gone(opted_out.pid);
    s.wait_until_gone(impostor.pid);

    assert_ended_by_admin_on(&s, idle.pid, idle.probe());
    assert_ended_by_admin_on(&s, impostor.pid, impostor.probe());
    assert_ended_by_admin_on(&s, opted_out.pid, opted_out.probe());
    s.log_showing(&format!(
        "session_kill: sent terminate to pid {} (database postgres, user app",
        opted_out.pid
    ));
    s.log_showing("state idle): session_kill.idle_timeout exceeded by");
    assert_eq!(active.finish().0, Ok(()), "a running query is not idle, however long it runs");
    assert_eq!(superuser.probe(), ClientView::Alive, "superusers are protected");
    assert_eq!(backup.probe(), ClientView::Alive, "a backup tool's role is protected");
    assert_eq!(in_tx.probe(), ClientView::Alive, "idle_timeout does not cover transactions");

    let mut admin = s.admin();
    let counted: i64 = admin
        .query_one(
            "SELECT sessions FROM session_kill.stats
             WHERE source = 'worker' AND reason = 'session_kill.idle_timeout' AND outcome = 'terminated'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(counted, 3, "every ended session is counted");
    let scheduled: bool = admin
        .query_one(
            "SELECT pid = (SELECT pid FROM pg_stat_activity WHERE backend_type = 'session_kill worker')
                    AND last_scan <= now() AND next_scan IS NOT NULL AND scans > 0
             FROM session_kill.worker",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(scheduled, "session_kill.worker shows the worker's schedule");
    s.stop();
}

#[test]
fn transaction_limits_end_idle_and_running_transactions() {
    let s = Server::start(&[
        "session_kill.idle_in_transaction_timeout = '1s'",
        "session_kill.transaction_timeout = '3s'",
    ]);
    let mut in_tx = Session::idle_in_transaction(s.connect("postgres", APP));
    let mut aborted = Session::idle_in_transaction(s.connect("postgres", APP));
    assert!(aborted.client.batch_execute("SELECT 1/0").is_err());
    let mut idle = Session::idle(s.connect("postgres", APP));
    let mut long_tx = s.connect("postgres", APP);
    long_tx.batch_execute("BEGIN").unwrap();
    let long = ActiveSession::start(&s, long_tx, 30);

    s.wait_until_gone(in_tx.pid);
    s.wait_until_gone(aborted.pid);
    s.wait_until_gone(long.pid);

    assert_ended_by_admin_on(&s, in_tx.pid, in_tx.probe());
    assert_ended_by_admin_on(&s, aborted.pid, aborted.probe());
    let long_pid = long.pid;
    let (query, _) = long.finish();
    assert_ended_by_admin_on(&s, long_pid, ClientView::Ended(query.unwrap_err()));
    s.log_showing(&format!("sent terminate to pid {long_pid} (database postgres, user app, application \"pg_test\", state active): session_kill.transaction_timeout exceeded"));
    assert_eq!(idle.probe(), ClientView::Alive, "no transaction, no transaction limit");
    s.stop();
}

#[test]
fn dry_run_only_logs() {
    let s = Server::start(&["session_kill.idle_timeout = '500ms'", "session_kill.dry_run = on"]);
    let mut idle = Session::idle(s.connect("postgres", APP));
    wait_for(Duration::from_secs(20), || {
        logged(&s, &format!("dry run, would send terminate to pid {} ", idle.pid))
    });
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(idle.probe(), ClientView::Alive);
    let counted: i64 = s
        .admin()
        .query_one(
            "SELECT sessions FROM session_kill.stats WHERE source = 'worker' AND outcome = 'dry run'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(counted, 1, "reported once, not at every scan");

    // Rules too: the would-be signal is logged, counted under the rule and audited (as nothing
    // done, like a dry run of kill_sessions), no more.
    let rule: i64 = s
        .admin()
        .query_one(
            "INSERT INTO session_kill.rules (role, state, timeout, action) VALUES ('app', 'active', '300ms', 'cancel_then_terminate') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    let running = ActiveSession::start(&s, s.connect("postgres", APP), 2);
    let pid = running.pid;
    wait_for(Duration::from_secs(20), || logged(&s, &format!("dry run, would send cancel to pid {pid} ")));
    assert_eq!(running.finish(), (Ok(()), ClientView::Alive), "neither cancelled nor terminated");
    assert_eq!(idle.probe(), ClientView::Alive);
    wait_for(Duration::from_secs(20), || {
        s.admin()
            .query_one(
                "SELECT count(*) FROM session_kill.log WHERE pid = $1 AND rule = $2 AND action = 'none' AND outcome = 'dry run'",
                &[&pid, &format!("rule {rule}")],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    });
    s.stop();
}

#[test]
fn limits_are_reloaded_and_clients_cannot_change_them() {
    let s = Server::start(&[]);
    let mut idle = Session::idle(s.connect("postgres", APP));
    let err = idle.client.batch_execute("SET session_kill.idle_timeout = 0").unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CANT_CHANGE_RUNTIME_PARAM));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(idle.probe(), ClientView::Alive, "no limit, nothing happens");

    let mut admin = s.admin();
    admin.batch_execute("ALTER SYSTEM SET session_kill.idle_timeout = '300ms'").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    s.wait_until_gone(idle.pid);
    assert_ended_by_admin_on(&s, idle.pid, idle.probe());
    s.stop();
}

#[test]
fn the_worker_is_recognisable_and_protected() {
    let s = Server::start(&[]);
    let mut admin = s.admin();
    wait_for_worker(&s);
    let row = admin
        .query_one(
            "SELECT a.application_name, s.protected FROM pg_stat_activity a
             JOIN session_kill.sessions() s USING (pid) WHERE a.backend_type = 'session_kill worker'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "session_kill worker");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("background worker"));
    s.stop();
}

/// PIDs of the client sessions matching `condition` (SQL over pg_stat_activity).
fn client_pids(s: &Server, condition: &str) -> Vec<i32> {
    s.admin()
        .query(
            &format!(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND {condition}"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// How many of `sessions` (oldest first) were ended, asserting the reaper took the oldest ones
/// and only those.
#[track_caller]
fn oldest_ended(sessions: &[Session], alive: &[i32]) -> usize {
    let ended = sessions.iter().take_while(|st| !alive.contains(&st.pid)).count();
    assert!(
        sessions[ended..].iter().all(|st| alive.contains(&st.pid)),
        "only the oldest were ended, in order"
    );
    ended
}

/// The field report: hundreds of sessions stuck after START TRANSACTION exhaust the slots and new
/// logins fail with "remaining connection slots are reserved ...". With the pressure reaper on,
/// the worker (which needs no client slot) ends the oldest stuck sessions and logins work again.
#[test]
fn pressure_reaper_frees_slots_when_every_connection_is_taken() {
    let s = Server::start(&["max_connections = 303", "superuser_reserved_connections = 3"]);
    let stuck: Vec<Session> = (0..300)
        .map(|_| {
            let mut c = s.connect("postgres", APP);
            c.batch_execute("START TRANSACTION; SELECT 1").unwrap();
            let pid = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
            Session { client: c, pid }
        })
        .collect();
    let refused = s.config("postgres", APP).connect(postgres::NoTls).err().expect("every slot is taken");
    assert_eq!(refused.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{refused}");

    let mut admin = s.admin();
    admin.batch_execute("ALTER SYSTEM SET session_kill.max_connection_usage = 0.9").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    drop(admin);
    let mut fresh = None;
    wait_for(Duration::from_secs(30), || {
        fresh = s.config("postgres", APP).connect(postgres::NoTls).ok();
        fresh.is_some()
    });

    // Logins work again as soon as the first victim is gone; the reaper goes on to the threshold.
    wait_for(Duration::from_secs(30), || client_pids(&s, "true").len() <= 272);
    let ended = oldest_ended(&stuck, &client_pids(&s, "true"));
    assert!(ended >= 28, "at least 300 - floor(0.9 * 303) = 28 sessions were ended: {ended}");
    assert!(logged(
        &s,
        "client sessions above session_kill.max_connection_usage (272 of max_connections 303)"
    ));
    drop(stuck);
    s.stop();
}

/// With the reaper already on, each login wakes the worker: as sessions keep arriving, the oldest
/// idle ones are ended and the count stays at the threshold.
#[test]
fn the_reaper_acts_as_logins_arrive() {
    let s = Server::start(&[
        "max_connections = 23",
        "superuser_reserved_connections = 3",
        "session_kill.max_connection_usage = 0.5",
    ]);
    let sessions: Vec<Session> = (0..16).map(|_| Session::idle(s.connect("postgres", APP))).collect();
    wait_for(Duration::from_secs(20), || client_pids(&s, "usename = 'app'").len() <= 11);
    let ended = oldest_ended(&sessions, &client_pids(&s, "usename = 'app'"));
    assert!(ended >= 5, "16 logins, threshold floor(0.5 * 23) = 11: {ended} ended");
    s.stop();
}

/// An ordinary role's idle session that calls itself pg_dump, opened first (so the longest idle),
/// then 15 plain idle sessions of the same role.
fn impostor_then_crowd(s: &Server) -> Vec<Session> {
    let mut config = s.config("postgres", APP);
    config.application_name("pg_dump");
    let mut sessions = vec![Session::idle(config.connect(postgres::NoTls).unwrap())];
    sessions.extend((0..15).map(|_| Session::idle(s.connect("postgres", APP))));
    sessions
}

/// The pressure reaper under the default configuration (`protected_applications` empty): a
/// client's application_name is its own choice, so an idle session calling itself pg_dump is
/// the longest idle and goes first, like any other. (attacks.rs shows the same for idle_timeout
/// and drains.)
#[test]
fn the_pressure_reaper_ends_a_pg_dump_impostor_like_any_other_session() {
    let s = Server::start(&[
        "max_connections = 23",
        "superuser_reserved_connections = 3",
        "session_kill.max_connection_usage = 0.5",
    ]);
    assert_eq!(s.probe_one("SHOW session_kill.protected_applications", &[]).get::<_, String>(0), "");
    let mut sessions = impostor_then_crowd(&s);
    let impostor = sessions[0].pid;
    wait_for_described(Duration::from_secs(20), "the reaper brings app down to 11", || {
        client_pids(&s, "usename = 'app'").len() <= 11
    });
    let ended = oldest_ended(&sessions, &client_pids(&s, "usename = 'app'"));
    assert!(ended >= 5, "16 logins, threshold floor(0.5 * 23) = 11: {ended} ended, the impostor first");
    assert_ended_by_admin_on(&s, impostor, sessions[0].probe());
    s.log_showing(&format!(
        "session_kill: sent terminate to pid {impostor} (database postgres, user app, application \"pg_dump\", state idle): connection pressure"
    ));
    s.stop();
}

/// A DBA may opt in to protection by application (README: client-chosen, so any client can claim
/// it): with `protected_applications = 'pg_dump'` the pg_dump session is spared by the reaper,
/// which takes the next-longest idle instead, and by `idle_timeout`, which ends younger sessions
/// whose deadlines come after its own.
#[test]
fn a_dba_who_protects_the_pg_dump_name_spares_it_from_the_reaper_and_idle_timeout() {
    let s = Server::start(&[
        "max_connections = 23",
        "superuser_reserved_connections = 3",
        "session_kill.max_connection_usage = 0.5",
        "session_kill.protected_applications = 'pg_dump'",
    ]);
    let mut sessions = impostor_then_crowd(&s);
    let (spared, crowd) = sessions.split_first_mut().unwrap();
    let protected: Option<String> = s
        .probe_one("SELECT (SELECT protected FROM session_kill.sessions() WHERE pid = $1)", &[&spared.pid])
        .get(0);
    assert_eq!(protected.as_deref(), Some("protected application"));
    wait_for_described(Duration::from_secs(20), "the reaper brings app down to 11", || {
        client_pids(&s, "usename = 'app'").len() <= 11
    });
    let alive = client_pids(&s, "usename = 'app'");
    assert!(alive.contains(&spared.pid), "the protected session was spared");
    let ended = oldest_ended(crowd, &alive);
    assert!(ended >= 5, "the next-longest idle went instead: {ended} ended");

    let mut admin = s.admin();
    admin.batch_execute("ALTER SYSTEM SET session_kill.idle_timeout = '500ms'").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    for session in crowd.iter_mut().skip(ended) {
        s.wait_until_gone(session.pid);
        assert_ended_by_admin_on(&s, session.pid, session.probe());
    }
    assert_alive(spared);
    assert!(!logged(&s, &format!("session_kill: sent terminate to pid {} ", spared.pid)), "never acted on");
    s.stop();
}

#[test]
fn a_busy_session_is_never_ended_for_idleness() {
    // 2 s to spare between statements, for a loaded machine; 5 s in all, well past the limit.
    let s = Server::start(&["session_kill.idle_timeout = '3s'"]);
    let mut busy = Session::idle(s.connect("postgres", APP));
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(busy.probe(), ClientView::Alive, "each statement starts its idle time over");
    }
    s.stop();
}

#[test]
fn the_worker_survives_a_burst_of_reloads_and_keeps_enforcing() {
    let s = Server::start(&[]);
    let mut admin = s.admin();
    let worker_pid = || -> i32 {
        s.admin()
            .query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'session_kill worker'", &[])
            .unwrap()
            .get(0)
    };
    wait_for_worker(&s);
    let before = worker_pid();
    for i in 0..50 {
        let limit = if i % 2 == 0 { "'1h'" } else { "0" };
        admin.batch_execute(&format!("ALTER SYSTEM SET session_kill.idle_timeout = {limit}")).unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    }
    admin.batch_execute("ALTER SYSTEM SET session_kill.idle_timeout = '300ms'").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    let mut idle = Session::idle(s.connect("postgres", APP));
    s.wait_until_gone(idle.pid);
    assert_ended_by_admin_on(&s, idle.pid, idle.probe());
    assert_eq!(worker_pid(), before, "the same worker process throughout");
    s.stop();
}

#[test]
fn the_worker_enforces_on_a_hot_standby_and_logs_there() {
    let primary = Server::start(&[]);
    let standby = primary.start_standby(&["session_kill.idle_timeout = '1s'"]);
    let mut idle = Session::idle(standby.connect("postgres", APP));
    let in_recovery: bool = idle.client.query_one("SELECT pg_is_in_recovery()", &[]).unwrap().get(0);
    assert!(in_recovery, "a real hot standby");

    standby.wait_until_gone(idle.pid);

    assert_ended_by_admin_on(&standby, idle.pid, idle.probe());
    // The action is in the standby's server log.
    standby.log_showing(&format!(
        "session_kill: sent terminate to pid {} (database postgres, user app",
        idle.pid
    ));
    let queued: i32 =
        standby.admin().query_one("SELECT audit_queued FROM session_kill.worker", &[]).unwrap().get(0);
    assert_eq!(queued, 0, "a standby queues nothing for session_kill.log: it cannot write");
    standby.stop();
    primary.stop();
}

#[test]
fn sigterm_stops_the_worker_and_the_postmaster_restarts_it() {
    let s = Server::start(&["session_kill.idle_timeout = '1h'"]);
    wait_for_worker(&s);
    let worker: i32 = s
        .admin()
        .query_one("SELECT pid FROM pg_stat_activity WHERE backend_type = 'session_kill worker'", &[])
        .unwrap()
        .get(0);
    let signalled: bool = s.admin().query_one("SELECT pg_terminate_backend($1)", &[&worker]).unwrap().get(0);
    assert!(signalled);
    s.wait_until_gone(worker);
    let stopped = s
        .server_log()
        .lines()
        .any(|l| l.contains(&format!("[{worker}]")) && l.contains("LOG:  session_kill worker stopped"));
    assert!(stopped, "it left its loop cleanly");
    wait_for(Duration::from_secs(30), || {
        s.admin()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'session_kill worker' AND pid <> $1",
                &[&worker],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    });
    s.stop();
}

/// Sessions that start a statement a hair (5 ms) before their idle deadline are not ended: the
/// worker wakes at the deadline, re-reads the session and finds it running.
///
/// Each statement stores in a sequence, which no rollback undoes, the moment the server took it
/// (`statement_timestamp()`, stamped as the backend reads it). So an ended session tells whether
/// and when its statement was taken. The server went idle no sooner than the previous statement's
/// stamp plus its 20 ms `pg_sleep`: that plus the limit is the earliest its deadline can fall. A
/// session ended during a statement the server took before that moment is a failure. One taken
/// later was fairly judged idle, as PostgreSQL's own `idle_session_timeout` would judge it: on a
/// loaded machine a backend may be scheduled milliseconds after the client sent its statement.
/// So is one ended before its statement was taken, as long as the worker acted no sooner than
/// that earliest deadline (by its row in `session_kill.log`). The microseconds between taking a
/// statement and showing it running get 3 ms, for a backend preempted in between.
#[test]
fn a_session_turning_active_at_its_deadline_is_not_ended() {
    use std::time::Instant;
    const LIMIT: Duration = Duration::from_millis(500);
    const MARGIN: Duration = Duration::from_millis(5);
    const STATEMENT_MICROS: i64 = 20_000;
    const PREEMPTED_MICROS: i64 = 3_000;
    const SESSIONS: usize = 8;
    const STATEMENTS: usize = 10;
    let limit_micros = LIMIT.as_micros() as i64;
    let s = Server::start(&["session_kill.idle_timeout = '500ms'"]);
    let sequences: Vec<String> = (0..SESSIONS).map(|i| format!("taken_{i}")).collect();
    for seq in &sequences {
        s.admin()
            .batch_execute(&format!("CREATE SEQUENCE {seq}; GRANT UPDATE ON SEQUENCE {seq} TO app"))
            .unwrap();
    }
    // Runs a statement that stamps the sequence (then runs `and_then`); returns the stamp, in
    // microseconds of the server's clock.
    let stamp = |client: &mut postgres::Client, seq: &str, and_then: &str| {
        let messages = client.simple_query(&format!(
            "SELECT setval('{seq}', (extract(epoch FROM statement_timestamp()) * 1e6)::bigint){and_then}"
        ))?;
        let taken = messages.iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(|v| v.parse::<i64>().unwrap()),
            _ => None,
        });
        Ok::<i64, postgres::Error>(taken.expect("the statement returns its stamp"))
    };
    // Connects and runs one statement; returns the client, its backend's PID, when it went idle
    // (as the client saw it), the statement's stamp and the earliest possible deadline.
    let fresh = |seq: &str| {
        let mut client = s.connect("postgres", APP);
        let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let taken = stamp(&mut client, seq, "").unwrap();
        (client, pid, Instant::now(), taken, taken + limit_micros)
    };
    let outcomes: Vec<([i64; 3], Vec<(i32, i64)>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = sequences
            .iter()
            .map(|seq| {
                let (fresh, stamp, s) = (&fresh, &stamp, &s);
                scope.spawn(move || {
                    // [ran at the deadline, ended while idle, ended after the server took it late]
                    let mut counts = [0; 3];
                    // (PID, earliest deadline) of each ended session
                    let mut ended = Vec::new();
                    let (mut client, mut pid, mut idle_since, mut last_taken, mut earliest_deadline) = fresh(seq);
                    for k in 1..=STATEMENTS {
                        std::thread::sleep((idle_since + LIMIT - MARGIN).saturating_duration_since(Instant::now()));
                        if let Ok(taken) = stamp(&mut client, seq, ", pg_sleep(0.02)") {
                            counts[0] += 1;
                            idle_since = Instant::now();
                            (last_taken, earliest_deadline) = (taken, taken + STATEMENT_MICROS + limit_micros);
                            continue;
                        }
                        let stamped: i64 =
                            s.admin().query_one(&format!("SELECT last_value FROM {seq}"), &[]).unwrap().get(0);
                        if stamped == last_taken {
                            counts[1] += 1;
                        } else {
                            let early = earliest_deadline - stamped;
                            assert!(
                                early < PREEMPTED_MICROS,
                                "{seq}: ended while statement {k} was running, taken by the server {early} µs before its deadline"
                            );
                            counts[2] += 1;
                        }
                        ended.push((pid, earliest_deadline));
                        (client, pid, idle_since, last_taken, earliest_deadline) = fresh(seq);
                    }
                    (counts, ended)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (pid, earliest_deadline) in outcomes.iter().flat_map(|o| &o.1) {
        let mut acted_at = None;
        let logged = format!("pid {pid}'s end reaches session_kill.log");
        wait_for_described(Duration::from_secs(20), &logged, || {
            acted_at = s
                .admin()
                .query_opt(
                    "SELECT (extract(epoch FROM acted_at) * 1e6)::bigint FROM session_kill.log WHERE pid = $1",
                    &[pid],
                )
                .unwrap()
                .map(|r| r.get::<_, i64>(0));
            acted_at.is_some()
        });
        let early = earliest_deadline - acted_at.unwrap();
        assert!(early <= 0, "pid {pid} was ended {early} µs before its earliest deadline");
    }
    let at_deadline: i64 = outcomes.iter().map(|o| o.0[0]).sum();
    let counts: Vec<_> = outcomes.iter().map(|o| o.0).collect();
    assert!(at_deadline > 0, "some statements started just before their deadline: {counts:?}");
    s.stop();
}

/// Kilobytes of stack the postmaster has touched and keeps (its `[stack]` mapping's Rss).
fn postmaster_stack_kb(s: &Server) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", s.postmaster_pid())).unwrap();
    smaps
        .lines()
        .skip_while(|l| !l.ends_with("[stack]"))
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|kb| kb.trim().trim_end_matches(" kB").parse().ok())
        .expect("the postmaster has a [stack] mapping with an Rss line")
}

/// Building the shared structures took the postmaster 3 MB of stack (pgrx builds each first
/// value on the stack; the audit queue is 1 MB), which every fork then copied the page table of:
/// 10 % more CPU per login. The library gives it back once they are built, at start and at the
/// re-initialisation after a backend crashes (in a signal handler, before PostgreSQL 16).
#[test]
fn the_postmaster_keeps_no_stack_from_building_shared_memory() {
    let s = Server::start(&[]);
    let kb = postmaster_stack_kb(&s);
    assert!(kb < 512, "the postmaster keeps {kb} kB of stack");

    let mut victim = Session::idle(s.connect("postgres", APP));
    run_checked(std::process::Command::new("kill").args(["-9", &victim.pid.to_string()]));
    wait_for_described(Duration::from_secs(30), "the server restarted after the crash", || {
        s.server_log().contains("database system is ready to accept connections")
            && s.server_log().matches("all server processes terminated; reinitializing").count() == 1
            && s.config("postgres", "postgres").connect(postgres::NoTls).is_ok()
    });
    let kb = postmaster_stack_kb(&s);
    assert!(kb < 512, "after the crash restart the postmaster keeps {kb} kB of stack");
    assert!(victim.client.simple_query("SELECT 1").is_err());
    let mut after = Session::idle(s.connect("postgres", APP));
    assert_alive(&mut after);
    s.stop();
}
