//! In-backend tests (`cargo pgrx test`): single-session behaviour and every input error.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    #[pg_test]
    fn sessions_lists_own_backend_as_protected() {
        let own: Option<String> =
            Spi::get_one("SELECT protected FROM session_kill.sessions() WHERE pid = pg_backend_pid()")
                .unwrap();
        assert_eq!(own.as_deref(), Some("own session"));
    }
}
