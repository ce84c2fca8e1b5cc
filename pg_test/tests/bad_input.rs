//! Every kind of bad input is an ERROR with a SQLSTATE, a PostgreSQL-style message and a hint,
//! and nothing is signalled.

use session_kill_pg_test::*;

#[test]
fn bad_input_is_an_error_with_sqlstate_message_and_hint_and_nothing_is_signalled() {
    let s = server();
    let db = s.fresh_db("t_bad_input");
    let mut idle = Session::idle(s.connect(&db, APP));
    let mut in_tx = Session::idle_in_transaction(s.connect(&db, APP));
    // (arguments, SQLSTATE, message, hint fragment)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("NULL", "22004", "db must not be null", "all_databases => true"),
        ("'no_such_db'", "3D000", "database \"no_such_db\" does not exist", "pg_database"),
        (
            "'t_bad_input', 'nuke'",
            "22023",
            "invalid mode \"nuke\"",
            "Valid modes are: cancel, terminate, cancel_then_terminate, dry_run.",
        ),
        ("'t_bad_input', NULL", "22004", "mode must not be null", "Valid modes are"),
        ("'t_bad_input', min_idle => '-5 min'", "22023", "min_idle must not be negative", "zero or more"),
        ("'t_bad_input', min_idle => NULL", "22004", "min_idle must not be null", "'0'"),
        ("'t_bad_input', wait => NULL", "22004", "wait must not be null", "'5s'"),
        (
            "'t_bad_input', 'cancel_then_terminate', grace => '-1s'",
            "22023",
            "grace must not be negative",
            "zero or more",
        ),
        (
            "'t_bad_input', client_addr => '10.0.0.300/8'",
            "22P02",
            "invalid input syntax for type cidr: \"10.0.0.300/8\"",
            "",
        ),
        (
            "'t_bad_input', states => '{idle,sleeping}'",
            "22023",
            "invalid session state \"sleeping\"",
            "idle in transaction (aborted)",
        ),
        ("'t_bad_input', states => '{}'", "22023", "states must not be empty", "Valid states are"),
        (
            "'t_bad_input', states => '{idle,NULL}'",
            "22004",
            "states element must not be null",
            "Valid states are",
        ),
        (
            "'t_bad_input', usename => 'nobody_here'",
            "42704",
            "role \"nobody_here\" does not exist",
            "pg_roles",
        ),
        (
            "'t_bad_input', application_name => 'oops\\'",
            "22023",
            "invalid pattern \"oops\\\"",
            "escape character",
        ),
        (
            "'t_bad_input', all_databases => true",
            "22023",
            "db and all_databases => true cannot be combined",
            "either",
        ),
        (
            "'t_bad_input', include_superusers => NULL",
            "22004",
            "include_superusers must not be null",
            "true or false",
        ),
    ];
    let mut admin = s.admin();
    for (args, code, message, hint) in cases {
        let err = kill_as(&mut admin, args).expect_err(args);
        let db_err = err.as_db_error().unwrap_or_else(|| panic!("{args}: {err}"));
        assert_eq!(db_err.code().code(), *code, "{args}: {}", db_err.message());
        assert_eq!(db_err.message(), *message, "{args}");
        if !hint.is_empty() {
            let got = db_err.hint().unwrap_or_default();
            assert!(got.contains(hint), "{args}: hint {got:?} lacks {hint:?}");
            assert!(got.ends_with('.'), "{args}: a hint is a sentence: {got:?}");
        }
        assert!(!message.ends_with('.') && message.chars().next().unwrap().is_lowercase(), "{message}");
    }
    let err = admin.query("SELECT * FROM session_kill.sessions('no_such_db')", &[]).unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "3D000");

    assert_alive(&mut idle);
    assert_alive(&mut in_tx);
    assert!(!s.server_log().contains("session_kill: sent"), "no signal was sent");
}
