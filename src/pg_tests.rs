//! In-backend tests (`cargo pgrx test`): single-session behaviour and every input error.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use crate::backends;
    use pgrx::prelude::*;
    use std::ffi::CStr;

    fn kill(args: &str) -> Vec<(i32, String, String)> {
        Spi::connect(|client| {
            client
                .select(
                    &format!("SELECT pid, action, outcome FROM session_kill.kill_sessions({args})"),
                    None,
                    &[],
                )
                .unwrap()
                .map(|row| {
                    (
                        row.get::<i32>(1).unwrap().unwrap(),
                        row.get(2).unwrap().unwrap(),
                        row.get(3).unwrap().unwrap(),
                    )
                })
                .collect()
        })
    }

    #[pg_test]
    fn sessions_describes_own_backend() {
        let (state, backend_type, query, protected, same_user) = Spi::connect(|client| {
            let row = client
                .select(
                    "SELECT state, backend_type, query, protected, usename = current_user
                     FROM session_kill.sessions(current_database()) WHERE pid = pg_backend_pid()",
                    None,
                    &[],
                )
                .unwrap()
                .first();
            (
                row.get::<String>(1).unwrap(),
                row.get::<String>(2).unwrap(),
                row.get::<String>(3).unwrap(),
                row.get::<String>(4).unwrap(),
                row.get::<bool>(5).unwrap(),
            )
        });
        assert_eq!(state.as_deref(), Some("active"));
        assert_eq!(backend_type.as_deref(), Some("client backend"));
        assert!(query.unwrap().contains("sessions_describes_own_backend"), "the top-level statement");
        assert_eq!(protected.as_deref(), Some("own session"));
        assert_eq!(same_user, Some(true));
    }

    #[pg_test]
    fn live_read_of_shared_entry_matches_the_snapshot() {
        let own_pid = unsafe { pg_sys::MyProcPid };
        let from_snapshot =
            backends::snapshot().into_iter().find(|b| b.session.pid == own_pid).unwrap().session;
        let live = backends::live_session(own_pid).expect("own backend is live");
        assert_eq!(live.backend_start, from_snapshot.backend_start);
        assert_eq!(live.database_oid, from_snapshot.database_oid);
        assert_eq!(live.role, from_snapshot.role);
        assert_eq!(live.application, from_snapshot.application);
        assert!(live.is_own);
        assert_eq!(backends::live_session(i32::MAX), None, "no such backend");
    }

    #[pg_test]
    fn own_xmin_is_read_like_pg_stat_activity_and_horizon_leaves_the_caller_out() {
        let own_pid = unsafe { pg_sys::MyProcPid };
        let shown: String =
            Spi::get_one("SELECT backend_xmin::text FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                .unwrap()
                .expect("a statement runs: the backend holds a snapshot");
        let from_snapshot =
            backends::snapshot().into_iter().find(|b| b.session.pid == own_pid).unwrap().session;
        let live = backends::live_session(own_pid).unwrap();
        assert_eq!(from_snapshot.xmin.map(|x| x.xid.to_string()), Some(shown.clone()));
        assert_eq!(live.xmin.map(|x| x.xid.to_string()), Some(shown));
        let listed: Option<bool> = Spi::get_one(
            "SELECT xmin_age IS NOT NULL AND xmin_held_for IS NOT NULL FROM session_kill.sessions()
              WHERE pid = pg_backend_pid()",
        )
        .unwrap();
        assert_eq!(listed, Some(true));
        let in_horizon: Option<i64> =
            Spi::get_one("SELECT count(*) FROM session_kill.horizon() WHERE pid = pg_backend_pid()").unwrap();
        assert_eq!(in_horizon, Some(0), "the caller's own snapshot is left out");
    }

    /// The drain gate reads these from `Port`, whose layout pgrx 0.18 has wrong on 17.
    #[pg_test]
    fn login_names_are_the_ones_this_session_logged_in_with() {
        // SAFETY: MyProcPort is this client backend's Port, set before any statement runs.
        let (database, user) = unsafe { crate::drain::login_names(pg_sys::libpq::be::MyProcPort) };
        // SAFETY: both are NUL-terminated strings of the Port, as in the gate.
        let (database, user) = unsafe { (CStr::from_ptr(database), CStr::from_ptr(user)) };
        let expected: (Option<String>, Option<String>) =
            Spi::get_two("SELECT current_database()::text, session_user::text").unwrap();
        assert_eq!(database.to_str().ok(), expected.0.as_deref());
        assert_eq!(user.to_str().ok(), expected.1.as_deref());
    }

    #[pg_test]
    fn system_processes_are_not_client_sessions() {
        let checkpointer: i32 =
            Spi::get_one("SELECT pid FROM session_kill.sessions() WHERE backend_type = 'checkpointer'")
                .unwrap()
                .unwrap();
        assert_eq!(backends::live_session(checkpointer), None, "not in the process array of backends");
    }

    #[pg_test]
    fn dry_run_never_includes_or_touches_the_calling_session() {
        let rows = kill("current_database(), 'dry_run'");
        let own = rows.iter().find(|r| r.0 == unsafe { pg_sys::MyProcPid }).unwrap();
        assert_eq!((own.1.as_str(), own.2.as_str()), ("none", "skipped: own session"));
        let terminated = kill("current_database(), 'terminate', usename => current_user::name");
        assert!(terminated.iter().all(|r| r.2 != "terminated" || r.0 != unsafe { pg_sys::MyProcPid }));
    }

    #[pg_test]
    fn nothing_matches_in_an_idle_database() {
        assert!(kill("'template1'").is_empty());
    }

    #[pg_test(error = "db must not be null")]
    fn null_database() {
        kill("NULL");
    }

    #[pg_test(error = "database \"nowhere\" does not exist")]
    fn unknown_database() {
        kill("'nowhere'");
    }

    #[pg_test(error = "database \"nowhere\" does not exist")]
    fn unknown_database_in_sessions() {
        Spi::run("SELECT * FROM session_kill.sessions('nowhere')").unwrap();
    }

    #[pg_test(error = "invalid mode \"obliterate\"")]
    fn unknown_mode() {
        kill("current_database(), 'obliterate'");
    }

    #[pg_test(error = "min_idle must not be negative")]
    fn negative_min_idle() {
        kill("current_database(), min_idle => '-1 hour'");
    }

    #[pg_test(error = "wait must not be null")]
    fn null_wait() {
        kill("current_database(), wait => NULL");
    }

    #[pg_test(error = "invalid input syntax for type cidr: \"10.0.0.0/40\"")]
    fn malformed_cidr() {
        kill("current_database(), client_addr => '10.0.0.0/40'");
    }

    #[pg_test(error = "invalid session state \"asleep\"")]
    fn unknown_state() {
        kill("current_database(), states => ARRAY['idle', 'asleep']");
    }

    #[pg_test(error = "states must not be empty")]
    fn empty_states() {
        kill("current_database(), states => '{}'");
    }

    #[pg_test(error = "role \"ghost\" does not exist")]
    fn unknown_role() {
        kill("current_database(), usename => 'ghost'");
    }

    #[pg_test(error = "invalid pattern \"trailing\\\"")]
    fn malformed_pattern() {
        kill("current_database(), application_name => 'trailing\\'");
    }

    #[pg_test(error = "db and all_databases => true cannot be combined")]
    fn database_and_all_databases() {
        kill("current_database(), all_databases => true");
    }

    #[pg_test(error = "permission denied to include superuser sessions")]
    fn include_superusers_needs_a_superuser() {
        Spi::run(
            "CREATE ROLE sk_helper;
             GRANT EXECUTE ON FUNCTION session_kill.kill_sessions TO sk_helper;
             SET ROLE sk_helper",
        )
        .unwrap();
        kill("current_database(), include_superusers => true");
    }

    #[pg_test(error = "permission denied for function kill_sessions")]
    fn execute_is_not_granted_to_public() {
        Spi::run("CREATE ROLE sk_nobody; SET ROLE sk_nobody").unwrap();
        kill("current_database(), 'dry_run'");
    }

    #[pg_test]
    fn drain_of_an_empty_database_reports_and_lists_the_gate() {
        let (at_start, terminated, remaining) = Spi::get_three::<i32, i32, i32>(
            "SELECT sessions_at_start, terminated, remaining FROM session_kill.drain_database('template0')",
        )
        .unwrap();
        assert_eq!((at_start, terminated, remaining), (Some(0), Some(0), Some(0)));
        let listed =
            Spi::get_one::<i64>("SELECT count(*) FROM session_kill.drains() WHERE datname = 'template0'");
        assert_eq!(listed, Ok(Some(1)));
        assert_eq!(Spi::get_one::<bool>("SELECT session_kill.undrain_database('template0')"), Ok(Some(true)));
        assert_eq!(
            Spi::get_one::<bool>("SELECT session_kill.undrain_database('template0')"),
            Ok(Some(false))
        );
    }

    #[pg_test(error = "cannot drain the current database \"pgrx_tests\"")]
    fn draining_the_current_database() {
        Spi::run("SELECT * FROM session_kill.drain_database(current_database())").unwrap();
    }

    #[pg_test(error = "db must not be null")]
    fn draining_null() {
        Spi::run("SELECT * FROM session_kill.drain_database(NULL)").unwrap();
    }

    #[pg_test(error = "timeout must not be negative")]
    fn draining_with_negative_timeout() {
        Spi::run("SELECT * FROM session_kill.drain_database('template0', timeout => '-1s')").unwrap();
    }

    #[pg_test(error = "must be owner of database template0")]
    fn draining_needs_ownership() {
        Spi::run(
            "CREATE ROLE sk_drainer;
             GRANT EXECUTE ON FUNCTION session_kill.drain_database TO sk_drainer;
             SET ROLE sk_drainer",
        )
        .unwrap();
        Spi::run("SELECT * FROM session_kill.drain_database('template0')").unwrap();
    }
}
