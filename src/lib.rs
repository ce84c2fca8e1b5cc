//! session_kill: list, cancel, terminate and drain client sessions from inside the server.
//!
//! `_PG_init` registers the settings and, when preloaded, shared memory (drain gates, counters,
//! rules, audit queue), the authentication hook and the background worker.

use pgrx::prelude::*;

mod act;
mod args;
mod audit;
mod backends;
mod blockers;
mod clock;
mod counters;
mod drain;
mod errors;
mod fixed;
mod gate;
mod gucs;
mod horizon;
mod kill;
mod lock_graph;
mod make_way;
mod policy;
mod reasons;
mod replay;
mod rule_table;
mod rules;
mod shmem;
mod signal;
mod sqltypes;
mod standby;
mod stats;
mod sync;
mod worker;
mod xmin_hold;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::register();
    // SAFETY: reading a flag PostgreSQL sets while loading shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        drain::install_hook();
        rule_table::install_hook();
        reasons::install_hook();
        worker::register();
    }
    // SAFETY: called from _PG_init, where reserving our GUC prefix is allowed.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"session_kill".as_ptr()) };
}

extension_sql!(
    r#"
-- Acting on sessions is opt-in per role: grant EXECUTE to the roles that may use it.
-- Listing stays public; it applies pg_stat_activity's own visibility rules.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA session_kill FROM PUBLIC;
GRANT USAGE ON SCHEMA session_kill TO PUBLIC;
GRANT EXECUTE ON FUNCTION session_kill.sessions(name) TO PUBLIC;
GRANT EXECUTE ON FUNCTION session_kill.blockers(name) TO PUBLIC;
GRANT EXECUTE ON FUNCTION session_kill.horizon() TO PUBLIC;
-- Whoever is granted rights on session_kill.rules must pass its row check.
GRANT EXECUTE ON FUNCTION session_kill.check_rule(text, text, text, text, text, interval, text, interval) TO PUBLIC;
"#,
    name = "privileges",
    finalize
);

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'session_kill'"]
    }
}
