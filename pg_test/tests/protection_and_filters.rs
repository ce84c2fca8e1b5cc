//! Who may be touched: filters, protection rules, PostgreSQL's signalling permissions, and
//! what `sessions()` shows to whom.

use postgres::error::SqlState;
use session_kill_pg_test::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// A fresh set of idle sessions that differ in one attribute each.
struct Crowd {
    socket_app: Session,
    tcp_app: Session,
    other_role: Session,
    in_tx: Session,
    batch_job: Session,
}

impl Crowd {
    fn gather(s: &Server, db: &str) -> Crowd {
        let mut batch = s.config(db, APP);
        batch.application_name("batch-7");
        Crowd {
            socket_app: Session::idle(s.connect(db, APP)),
            tcp_app: Session::idle(s.connect_tcp(db, APP)),
            other_role: Session::idle(s.connect(db, OTHER)),
            in_tx: Session::idle_in_transaction(s.connect(db, APP)),
            batch_job: Session::idle(batch.connect(postgres::NoTls).unwrap()),
        }
    }

    fn all(&mut self) -> [&mut Session; 5] {
        [&mut self.socket_app, &mut self.tcp_app, &mut self.other_role, &mut self.in_tx, &mut self.batch_job]
    }

    /// Terminates with `filter`, then asserts exactly `expected` (by field name) were ended.
    fn terminate_where(s: &Server, db: &str, filter: &str, expected: &[&str]) {
        let mut crowd = Crowd::gather(s, db);
        let rows = kill(s, &format!("'{db}', {filter}"));
        let names = ["socket_app", "tcp_app", "other_role", "in_tx", "batch_job"];
        for (name, session) in names.iter().zip(crowd.all()) {
            if expected.contains(name) {
                assert_acted(&rows, session.pid, "terminate", "terminated");
                assert_terminated(session);
            } else {
                assert!(!rows.contains_key(&session.pid), "{filter}: {name} must not match");
                assert_alive(session);
            }
        }
        assert_eq!(rows.len(), expected.len(), "{filter}: {rows:#?}");
        kill(s, &format!("'{db}'"));
    }
}

#[test]
fn each_filter_selects_exactly_its_sessions() {
    let s = server();
    let db = s.fresh_db("t_filters");
    Crowd::terminate_where(s, &db, "usename => 'other_app'", &["other_role"]);
    Crowd::terminate_where(s, &db, "application_name => 'batch-%'", &["batch_job"]);
    Crowd::terminate_where(s, &db, "client_addr => '127.0.0.0/8'", &["tcp_app"]);
    Crowd::terminate_where(s, &db, "states => '{idle in transaction}'", &["in_tx"]);
    Crowd::terminate_where(
        s,
        &db,
        "usename => 'app', states => '{idle}', application_name => 'pg\\_test'",
        &["socket_app"],
    );
}

#[test]
fn protected_roles_and_applications_are_never_touched_and_clients_cannot_opt_out() {
    let s = server();
    let db = s.fresh_db("t_protected");
    let mut admin = s.admin();
    admin.batch_execute("DROP ROLE IF EXISTS keeper; CREATE ROLE keeper LOGIN").unwrap();
    for sql in [
        "ALTER SYSTEM SET session_kill.protected_roles = 'keeper'",
        "ALTER SYSTEM SET session_kill.protected_applications = 'pg_dump,nightly-backup%'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).unwrap();
    }
    wait_for(Duration::from_secs(10), || {
        s.admin().query_one("SHOW session_kill.protected_roles", &[]).unwrap().get::<_, String>(0) == "keeper"
    });
    let mut keeper = Session::idle(s.connect(&db, "keeper"));
    let mut backup_cfg = s.config(&db, APP);
    backup_cfg.application_name("nightly-backup-3");
    let mut backup = Session::idle(backup_cfg.connect(postgres::NoTls).unwrap());
    let mut plain = Session::idle(s.connect(&db, APP));

    // A client cannot lift its own protection or change anyone's.
    let err = plain.client.batch_execute("SET session_kill.protected_roles = 'app'").unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CANT_CHANGE_RUNTIME_PARAM));

    let shown: BTreeMap<i32, Option<String>> = s
        .admin()
        .query("SELECT pid, protected FROM session_kill.sessions($1)", &[&db])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(shown[&keeper.pid].as_deref(), Some("protected role"));
    assert_eq!(shown[&backup.pid].as_deref(), Some("protected application"));
    assert_eq!(shown[&plain.pid], None);

    let rows = kill(s, "'t_protected'");
    assert_acted(&rows, keeper.pid, "none", "skipped: protected role");
    assert_acted(&rows, backup.pid, "none", "skipped: protected application");
    assert_acted(&rows, plain.pid, "terminate", "terminated");
    assert_alive(&mut keeper);
    assert_alive(&mut backup);
    assert_terminated(&mut plain);

    for sql in [
        "ALTER SYSTEM RESET session_kill.protected_roles",
        "ALTER SYSTEM RESET session_kill.protected_applications",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).unwrap();
    }
}

#[test]
fn superuser_sessions_need_a_superuser_who_asks() {
    let s = server();
    let db = s.fresh_db("t_superusers");
    let mut su = Session::idle(s.connect(&db, SUPER));

    let err = kill_as(&mut s.connect("postgres", SIGNALLER), "'t_superusers', include_superusers => true")
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    assert_eq!(err.as_db_error().unwrap().message(), "permission denied to include superuser sessions");
    assert_alive(&mut su);

    let rows = kill(s, "'t_superusers', include_superusers => true");
    assert_acted(&rows, su.pid, "terminate", "terminated");
    assert_terminated(&mut su);
}

/// For every caller and target role, kill_sessions ends the target exactly when PostgreSQL's own
/// pg_terminate_backend would, and says why when it does not.
#[test]
fn permissions_are_exactly_those_of_pg_terminate_backend() {
    let s = server();
    let db = s.fresh_db("t_permissions");
    // (caller, target, expected outcome of kill_sessions)
    let matrix = [
        ("postgres", APP, "terminated"),
        ("postgres", SUPER, "terminated"),
        (SIGNALLER, APP, "terminated"),
        (SIGNALLER, OTHER, "terminated"),
        (SIGNALLER, SUPER, "skipped: superuser"),
        (PLAIN, APP, "skipped: permission denied"),
        (PLAIN, SUPER, "skipped: superuser"),
        (APP_MEMBER, APP, "terminated"),
        (APP_MEMBER, OTHER, "skipped: permission denied"),
        (APP_MEMBER, SUPER, "skipped: superuser"),
    ];
    for (caller, target, expected) in matrix {
        let mut caller_session = s.connect("postgres", caller);
        let include = if caller == "postgres" { "true" } else { "false" };

        let mut ours = Session::idle(s.connect(&db, target));
        let rows = kill_as(
            &mut caller_session,
            &format!("'t_permissions', usename => '{target}', include_superusers => {include}"),
        )
        .unwrap();
        assert_eq!(rows[&ours.pid].outcome, expected, "{caller} -> {target}");

        let mut theirs = Session::idle(s.connect(&db, target));
        let pg_allows = caller_session
            .query_one("SELECT pg_terminate_backend($1, 10000)", &[&theirs.pid])
            .map(|r| r.get::<_, bool>(0));
        if expected == "terminated" {
            assert!(pg_allows.unwrap(), "{caller} -> {target}: PostgreSQL agrees");
            assert_terminated(&mut ours);
            assert_terminated(&mut theirs);
        } else {
            let err = pg_allows.unwrap_err();
            assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{caller} -> {target}: {err}");
            assert_alive(&mut ours);
            assert_alive(&mut theirs);
        }
        kill(s, "'t_permissions', include_superusers => true");
    }
}

#[test]
fn acting_requires_an_explicit_grant() {
    let s = server();
    s.admin().batch_execute("DROP ROLE IF EXISTS nobody_special; CREATE ROLE nobody_special LOGIN").unwrap();
    let mut c = s.connect("postgres", "nobody_special");
    let err = kill_as(&mut c, "'postgres', 'dry_run'").unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "EXECUTE is revoked from PUBLIC");
    // Listing stays open to everyone, like pg_stat_activity.
    c.query("SELECT * FROM session_kill.sessions()", &[]).unwrap();
}

/// Roles of the permission matrices below, besides the harness's (`SUPER` a superuser, `PLAIN`
/// with EXECUTE on every function, `SIGNALLER` in pg_signal_backend, `APP_MEMBER` a member of the
/// target role `APP`).
const DB_OWNER: &str = "perm_db_owner"; // owns the matrices' databases; EXECUTE granted; no superuser
const NO_GRANT: &str = "perm_no_grant"; // nothing granted at all
const RULE_EDITOR: &str = "perm_rule_editor"; // the table rights the README suggests for rules
const LOG_READER: &str = "perm_log_reader"; // the table right the README suggests for the audit

/// Creates the matrices' roles once, and a database `db` owned by `DB_OWNER`.
fn matrix_database(s: &Server, db: &str) -> String {
    static ROLES: std::sync::Once = std::sync::Once::new();
    ROLES.call_once(|| {
        s.admin()
            .batch_execute(&format!(
                "CREATE ROLE {DB_OWNER} LOGIN; CREATE ROLE {NO_GRANT} LOGIN;
                 CREATE ROLE {RULE_EDITOR} LOGIN; CREATE ROLE {LOG_READER} LOGIN;
                 GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA session_kill TO {DB_OWNER};"
            ))
            .unwrap();
    });
    let db = s.fresh_db(db);
    s.admin().batch_execute(&format!("ALTER DATABASE {db} OWNER TO {DB_OWNER}")).unwrap();
    db
}

/// Runs `sql` as `caller` on `db`: the rows it affected or returned, or its refusal.
fn attempt(s: &Server, db: &str, caller: &str, sql: &str) -> Result<u64, (String, String)> {
    s.connect(db, caller).execute(sql, &[]).map_err(|e| refusal(&e))
}

fn denied(code: &str, message: &str) -> Result<u64, (String, String)> {
    Err((code.to_owned(), message.to_owned()))
}

/// Who closed the gate of `db`, if it is closed.
fn closed_by(s: &Server, db: &str) -> Option<String> {
    s.probe_one("SELECT max(closed_by::text) FROM session_kill.drains() WHERE datname = $1", &[&db]).get(0)
}

/// Draining needs EXECUTE and then the rights ALTER DATABASE needs (owner or superuser); the
/// owner closes the gate but still signals only the sessions pg_terminate_backend lets it.
/// Nothing is closed or signalled on a denial.
#[test]
fn drain_database_needs_execute_and_ownership_of_the_database() {
    let s = server();
    let db = matrix_database(s, "t_perm_drain");
    let drain = format!("SELECT * FROM session_kill.drain_database('{db}', timeout => '1s', grace => '0')");
    let not_owner = denied("42501", &format!("must be owner of database {db}"));
    // (caller, what the call returns, the gate is closed afterwards, the APP session was ended)
    let matrix = [
        (SUPER, Ok(1), true, true),
        (DB_OWNER, denied("55006", &format!("database \"{db}\" still has 1 session after 1s")), true, false),
        (PLAIN, not_owner.clone(), false, false),
        (NO_GRANT, denied("42501", "permission denied for function drain_database"), false, false),
        (SIGNALLER, not_owner.clone(), false, false),
        (APP_MEMBER, not_owner, false, false),
    ];
    for (caller, expected, closes, ends) in matrix {
        let mut target = Session::idle(s.connect(&db, APP));
        let mut caller_session = s.connect("postgres", caller);
        let result = caller_session.query(&drain, &[]);
        if caller == DB_OWNER {
            // The owner's drain times out on the session it may not signal, and says why.
            let err = result.as_ref().unwrap_err();
            let detail = err.as_db_error().and_then(|d| d.detail()).unwrap_or_default();
            assert!(
                detail.contains(&format!("pid {} (database {db}, user {APP}", target.pid))
                    && detail.ends_with(": permission denied."),
                "{caller}: {detail}"
            );
        }
        assert_eq!(result.map(|rows| rows.len() as u64).map_err(|e| refusal(&e)), expected, "{caller}");
        assert_eq!(closed_by(s, &db), closes.then(|| caller.to_owned()), "{caller}: the gate");
        if ends {
            assert_terminated(&mut target);
        } else {
            assert_alive(&mut target);
            assert!(!signalled(s, target.pid), "{caller}: nothing was signalled");
        }
        if closes {
            s.admin().execute("SELECT session_kill.undrain_database($1)", &[&db]).unwrap();
        }
        drop(target);
        s.admin()
            .execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = $1",
                &[&db],
            )
            .unwrap();
    }
}

/// Reopening needs the same rights as draining; listing the gates needs EXECUTE only.
#[test]
fn undrain_database_needs_execute_and_ownership_and_drains_needs_execute() {
    let s = server();
    let db = matrix_database(s, "t_perm_undrain");
    let undrain = format!("SELECT session_kill.undrain_database('{db}')");
    let not_owner = denied("42501", &format!("must be owner of database {db}"));
    // (caller, what undrain_database returns, the gate is still closed afterwards)
    let matrix = [
        (SUPER, Ok(1), false),
        (DB_OWNER, Ok(1), false),
        (PLAIN, not_owner.clone(), true),
        (NO_GRANT, denied("42501", "permission denied for function undrain_database"), true),
        (SIGNALLER, not_owner.clone(), true),
        (APP_MEMBER, not_owner, true),
    ];
    for (caller, expected, stays_closed) in matrix {
        if closed_by(s, &db).is_none() {
            s.admin().execute(&format!("SELECT * FROM session_kill.drain_database('{db}')"), &[]).unwrap();
        }
        let mut c = s.connect("postgres", caller);
        let reopened = c.query(&undrain, &[]).map_err(|e| refusal(&e));
        if let Ok(rows) = &reopened {
            assert!(rows[0].get::<_, bool>(0), "{caller}: it was closed");
        }
        assert_eq!(reopened.map(|rows| rows.len() as u64), expected, "{caller}");
        assert_eq!(closed_by(s, &db).is_some(), stays_closed, "{caller}: the gate");

        let listed = c.query("SELECT * FROM session_kill.drains()", &[]).map(drop).map_err(|e| refusal(&e));
        let may_list = if caller == NO_GRANT {
            Err(("42501".to_owned(), "permission denied for function drains".to_owned()))
        } else {
            Ok(())
        };
        assert_eq!(listed, may_list, "{caller}: drains()");
    }
    s.admin().execute("SELECT session_kill.undrain_database($1)", &[&db]).unwrap();
    // Permission comes before the gate's state: a non-owner learns nothing from an open gate.
    let err = s.connect("postgres", PLAIN).query(&undrain, &[]).unwrap_err();
    assert_eq!(refusal(&err), ("42501".to_owned(), format!("must be owner of database {db}")));
}

/// `session_kill.rules` and `session_kill.log` belong to the extension's owner: nobody else reads
/// or writes them, not the database's owner, not a role that may call every function or signal
/// every session, until granted table rights. Rules written by a grantee still pass the row
/// check; the audit log can be granted for reading, and only its owner (the sync) writes it.
#[test]
fn the_rules_and_the_audit_log_belong_to_the_extension_owner() {
    let s = server();
    let db = matrix_database(s, "t_perm_tables");
    let mut admin = s.connect(&db, "postgres");
    admin
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON session_kill.rules TO {RULE_EDITOR};
             GRANT SELECT ON session_kill.log TO {LOG_READER};
             INSERT INTO session_kill.log (acted_at, source, pid, action, outcome)
             VALUES (now(), 'kill_sessions', 1, 'terminate', 'terminated');"
        ))
        .unwrap();
    let planted: i64 = admin
        .query_one("INSERT INTO session_kill.rules (state, timeout, comment) VALUES ('idle', '1h', 'planted') RETURNING id", &[])
        .unwrap()
        .get(0);
    let rule_comments = |admin: &mut postgres::Client| -> Vec<String> {
        admin
            .query("SELECT comment FROM session_kill.rules ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let no_rules = denied("42501", "permission denied for table rules");
    for caller in [SUPER, DB_OWNER, PLAIN, NO_GRANT, SIGNALLER, APP_MEMBER, RULE_EDITOR, LOG_READER] {
        let writes = caller == SUPER || caller == RULE_EDITOR;
        let expect = |allowed: u64| if writes { Ok(allowed) } else { no_rules.clone() };
        let sql = format!("SELECT count(*) FROM session_kill.rules WHERE id = {planted}");
        assert_eq!(attempt(s, &db, caller, &sql), expect(1), "{caller}: SELECT rules");

        let sql = format!(
            "INSERT INTO session_kill.rules (state, timeout, comment) VALUES ('idle', '1h', '{caller}')"
        );
        assert_eq!(attempt(s, &db, caller, &sql), expect(1), "{caller}: INSERT rules");
        assert_eq!(rule_comments(&mut admin).contains(&caller.to_owned()), writes, "{caller}: the new row");

        let sql = format!("UPDATE session_kill.rules SET comment = 'seen by {caller}' WHERE id = {planted}");
        assert_eq!(attempt(s, &db, caller, &sql), expect(1), "{caller}: UPDATE rules");
        let planted_now = if writes { format!("seen by {caller}") } else { "planted".to_owned() };
        assert_eq!(rule_comments(&mut admin)[0], planted_now, "{caller}: the planted row");
        admin
            .execute("UPDATE session_kill.rules SET comment = 'planted' WHERE id = $1", &[&planted])
            .unwrap();

        let sql = format!("DELETE FROM session_kill.rules WHERE comment = '{caller}'");
        assert_eq!(attempt(s, &db, caller, &sql), expect(1), "{caller}: DELETE rules");
        assert_eq!(
            rule_comments(&mut admin),
            vec!["planted".to_owned()],
            "{caller}: only the planted rule is left"
        );

        if caller != SUPER {
            let sql = "TRUNCATE session_kill.rules";
            assert_eq!(attempt(s, &db, caller, sql), no_rules, "{caller}: TRUNCATE rules");
        }
    }

    let no_log = denied("42501", "permission denied for table log");
    let log_rows = || -> Vec<(String, String)> {
        s.connect(&db, "postgres")
            .query("SELECT source, outcome FROM session_kill.log", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    for caller in [SUPER, DB_OWNER, PLAIN, NO_GRANT, SIGNALLER, APP_MEMBER, RULE_EDITOR, LOG_READER] {
        let reads = caller == SUPER || caller == LOG_READER;
        let read = attempt(s, &db, caller, "SELECT * FROM session_kill.log");
        assert_eq!(read, if reads { Ok(1) } else { no_log.clone() }, "{caller}: SELECT log");
        if caller == SUPER {
            continue; // a superuser may do anything, writing the audit log included
        }
        for sql in [
            "INSERT INTO session_kill.log (acted_at, source, pid, action, outcome) VALUES (now(), 'forged', 1, 'none', 'none')",
            "UPDATE session_kill.log SET outcome = 'forged'",
            "DELETE FROM session_kill.log",
            "TRUNCATE session_kill.log",
        ] {
            assert_eq!(attempt(s, &db, caller, sql), no_log, "{caller}: {sql}");
        }
        assert_eq!(
            log_rows(),
            vec![("kill_sessions".to_owned(), "terminated".to_owned())],
            "{caller}: untouched"
        );
    }

    // A grantee's rows pass the same check as the owner's.
    let bad = "INSERT INTO session_kill.rules (state, timeout) VALUES ('sleeping', '1h')";
    let (code, message) = attempt(s, &db, RULE_EDITOR, bad).unwrap_err();
    assert_eq!((code.as_str(), message.as_str()), ("22023", "invalid rule state \"sleeping\""));
}

#[test]
fn sessions_reports_state_ages_and_protection_like_pg_stat_activity() {
    let s = server();
    let db = s.fresh_db("t_sessions");
    let idle = Session::idle(s.connect(&db, APP));
    let mut in_tx = Session::idle_in_transaction(s.connect(&db, APP));
    in_tx.client.batch_execute("SELECT 'marker-in-tx'").unwrap();
    let tcp = Session::idle(s.connect_tcp(&db, APP));
    let active = ActiveSession::start(s, s.connect(&db, APP), 3);
    let mut me = s.connect(&db, "postgres");
    let my_pid: i32 = me.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    std::thread::sleep(Duration::from_millis(200));

    let rows = me
        .query(
            "SELECT s.pid, s.state, s.idle_for > '150ms', s.xact_age > '150ms', s.client_addr::text,
                    s.backend_type, s.query, s.protected,
                    s.state IS NOT DISTINCT FROM a.state AND s.backend_start = a.backend_start
                      AND s.query_start IS NOT DISTINCT FROM a.query_start AND s.usename = a.usename
                      AND s.application_name = a.application_name
             FROM session_kill.sessions('t_sessions') s JOIN pg_stat_activity a USING (pid)",
            &[],
        )
        .unwrap();
    type Row = (
        Option<String>,
        Option<bool>,
        Option<bool>,
        Option<String>,
        String,
        Option<String>,
        Option<String>,
        bool,
    );
    let by_pid: BTreeMap<i32, Row> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7), r.get(8))))
        .collect();
    assert_eq!(by_pid.len(), 5, "one row per session of the database: {by_pid:#?}");
    let idle_row = &by_pid[&idle.pid];
    assert_eq!((idle_row.0.as_deref(), idle_row.1, idle_row.2), (Some("idle"), Some(true), None));
    let tx_row = &by_pid[&in_tx.pid];
    assert_eq!((tx_row.0.as_deref(), tx_row.2), (Some("idle in transaction"), Some(true)));
    assert_eq!(tx_row.5.as_deref(), Some("SELECT 'marker-in-tx'"));
    assert_eq!(by_pid[&tcp.pid].3.as_deref(), Some("127.0.0.1/32"));
    assert_eq!(by_pid[&idle.pid].3, None, "Unix-socket clients have no address");
    let active_row = &by_pid[&active.pid];
    assert_eq!((active_row.0.as_deref(), active_row.1), (Some("active"), None));
    assert_eq!(by_pid[&my_pid].6.as_deref(), Some("own session"));
    assert!(by_pid.values().all(|r| r.4 == "client backend" && r.7), "matches pg_stat_activity: {by_pid:#?}");

    // System processes are listed (all databases) and protected.
    let system: Vec<(String, Option<String>)> = me
        .query("SELECT backend_type, protected FROM session_kill.sessions() WHERE datname IS NULL", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(system.contains(&("checkpointer".into(), Some("system process".into()))), "{system:?}");
    assert!(system.contains(&("autovacuum launcher".into(), Some("autovacuum".into()))), "{system:?}");

    // Without privileges over a role, its details are hidden exactly as in pg_stat_activity.
    let mut plain = s.connect("postgres", PLAIN);
    let hidden = plain
        .query_one(
            "SELECT query, state, client_addr::text, protected FROM session_kill.sessions() WHERE pid = $1",
            &[&tcp.pid],
        )
        .unwrap();
    assert_eq!(hidden.get::<_, Option<String>>(0).as_deref(), Some("<insufficient privilege>"));
    assert_eq!(hidden.get::<_, Option<String>>(1), None);
    assert_eq!(hidden.get::<_, Option<String>>(2), None);
    assert_eq!(hidden.get::<_, Option<String>>(3).as_deref(), Some("permission denied"));
    assert_eq!(active.finish().0, Ok(()), "listing touched nothing");
}
