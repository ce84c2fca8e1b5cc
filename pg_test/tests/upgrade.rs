//! `ALTER EXTENSION session_kill UPDATE` from every released version: the catalog afterwards is
//! the same as a fresh install's, the rules, the audit rows and a closed drain gate are kept, and
//! the worker enforces throughout. Until the update, the new library refuses an old catalog with a
//! clear error instead of misreading it.

use session_kill_pg_test::*;
use std::time::Duration;

/// Everything about the extension's objects that a user or pg_dump could see, one line each.
fn catalog(client: &mut postgres::Client) -> Vec<String> {
    let queries = [
        // Functions: signature, result, volatility, strictness, rights (in a stable order).
        "SELECT format('function %s(%s) returns %s %s %s acl=%s', p.proname,
                pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.provolatile,
                p.proisstrict, coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(p.proacl) x), 'default'))
           FROM pg_proc p WHERE p.pronamespace = 'session_kill'::regnamespace",
        // Tables and views: columns with types, defaults and NOT NULL; rights; view definitions.
        "SELECT format('relation %s kind=%s acl=%s def=%s', c.relname, c.relkind,
                coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(c.relacl) x), 'default'),
                coalesce(pg_get_viewdef(c.oid), ''))
           FROM pg_class c WHERE c.relnamespace = 'session_kill'::regnamespace",
        "SELECT format('column %s.%s %s notnull=%s default=%s identity=%s', c.relname, a.attname,
                format_type(a.atttypid, a.atttypmod), a.attnotnull,
                coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity)
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE c.relnamespace = 'session_kill'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped",
        "SELECT format('trigger %s', pg_get_triggerdef(t.oid))
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          WHERE c.relnamespace = 'session_kill'::regnamespace AND NOT t.tgisinternal",
        "SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid))
           FROM pg_constraint WHERE connamespace = 'session_kill'::regnamespace",
        "SELECT format('comment %s %s', classoid::regclass, description)
           FROM pg_description d
          WHERE (classoid = 'pg_class'::regclass AND objoid IN
                   (SELECT oid FROM pg_class WHERE relnamespace = 'session_kill'::regnamespace))
             OR (classoid = 'pg_proc'::regclass AND objoid IN
                   (SELECT oid FROM pg_proc WHERE pronamespace = 'session_kill'::regnamespace))",
        "SELECT format('member %s', pg_describe_object(classid, objid, objsubid))
           FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
            AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'session_kill')",
        "SELECT format('extension version %s', extversion) FROM pg_extension WHERE extname = 'session_kill'",
    ];
    let mut lines: Vec<String> = queries
        .iter()
        .flat_map(|q| client.query(*q, &[]).unwrap().into_iter().map(|r| r.get::<_, String>(0)))
        .collect();
    lines.sort();
    lines
}

#[test]
fn an_update_from_0_1_0_gives_a_fresh_install_s_catalog_and_keeps_rules_log_and_gates() {
    let s = Server::start(&["session_kill.database = 'old'"]);
    let mut admin = s.admin();
    admin.batch_execute("CREATE DATABASE old TEMPLATE template0").unwrap();
    admin.batch_execute("CREATE DATABASE fresh TEMPLATE template0").unwrap();
    let mut old = s.connect("old", "postgres");
    old.batch_execute(&format!(
        "CREATE EXTENSION session_kill VERSION '0.1.0';
         GRANT EXECUTE ON FUNCTION session_kill.kill_sessions(name, text, interval, name, text, cidr, text[],
             interval, interval, boolean, boolean, text) TO {SIGNALLER};
         GRANT SELECT ON session_kill.worker TO {PLAIN};"
    ))
    .unwrap();

    // The new library refuses the old catalog, clearly, rather than misread its signatures.
    let err = old.query("SELECT * FROM session_kill.kill_sessions('old', 'dry_run')", &[]).unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code().code(), "55000");
    assert_eq!(
        db_err.message(),
        "the session_kill library is version 0.2.0, but the extension in this database is version 0.1.0"
    );
    assert_eq!(db_err.hint(), Some("Run ALTER EXTENSION session_kill UPDATE in this database."));

    // Rules and audit rows at 0.1.0: the worker enforces the old catalog's rules table.
    let rule: i64 = old
        .query_one(
            "INSERT INTO session_kill.rules (role, state, timeout, comment) VALUES ('app', 'idle', '1s', 'kept')
             RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    let ended_before = Session::idle(s.connect("old", APP));
    s.wait_until_gone(ended_before.pid);
    let logged = |client: &mut postgres::Client| -> i64 {
        client
            .query_one("SELECT count(*) FROM session_kill.log WHERE outcome = 'terminated'", &[])
            .unwrap()
            .get(0)
    };
    wait_for_described(Duration::from_secs(20), "the audit row is written at 0.1.0", || {
        logged(&mut old) >= 1
    });
    // A drain gate, closed from a database already at 0.2.0: gates live in shared memory.
    s.fresh_db("drained");
    admin.batch_execute("SELECT * FROM session_kill.drain_database('drained')").unwrap();

    old.batch_execute("ALTER EXTENSION session_kill UPDATE").unwrap();
    let mut fresh = s.connect("fresh", "postgres");
    fresh
        .batch_execute(&format!(
            "CREATE EXTENSION session_kill;
             GRANT EXECUTE ON FUNCTION session_kill.kill_sessions(name, text, interval, name, text, cidr, text[],
                 interval, interval, boolean, boolean, text, interval) TO {SIGNALLER};
             GRANT SELECT ON session_kill.worker TO {PLAIN};"
        ))
        .unwrap();
    let (updated, installed) = (catalog(&mut old), catalog(&mut fresh));
    let only_updated: Vec<&String> = updated.iter().filter(|l| !installed.contains(l)).collect();
    let only_fresh: Vec<&String> = installed.iter().filter(|l| !updated.contains(l)).collect();
    assert!(
        only_updated.is_empty() && only_fresh.is_empty(),
        "updated only: {only_updated:#?}\nfresh only: {only_fresh:#?}"
    );

    // The data is kept, the gate is still closed, and the worker still enforces the rule.
    let kept: (i64, String) = {
        let r = old.query_one("SELECT id, comment FROM session_kill.rules", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(kept, (rule, "kept".to_owned()));
    assert!(logged(&mut old) >= 1, "audit rows kept");
    let gates: i64 = old
        .query_one("SELECT count(*) FROM session_kill.drains() WHERE datname = 'drained'", &[])
        .unwrap()
        .get(0);
    assert_eq!(gates, 1, "the drain gate is still closed");
    let mut ended_after = Session::idle(s.connect("old", APP));
    s.wait_until_gone(ended_after.pid);
    assert_ended_by_admin_on(&s, ended_after.pid, ended_after.probe());
    wait_for_described(Duration::from_secs(20), "the audit row is written at 0.2.0", || {
        logged(&mut old) >= 2
    });
    // And the new functions answer.
    old.batch_execute("SELECT * FROM session_kill.kill_sessions('old', 'dry_run', blocking => '1s')")
        .unwrap();
    s.stop();
}
