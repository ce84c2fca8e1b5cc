//! Every `session_kill.*` setting, in one place. All are `PGC_SIGHUP`: set in postgresql.conf
//! or with `ALTER SYSTEM` plus a reload, never by a client with `SET`, so a session cannot
//! exempt itself.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// `session_kill.protected_roles`: comma-separated role names whose sessions are never
/// cancelled or terminated by session_kill (e.g. monitoring or replication-management roles).
pub static PROTECTED_ROLES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));

/// `session_kill.protected_applications`: comma-separated `LIKE` patterns on
/// `application_name` that are never touched. The default covers common backup tools.
pub static PROTECTED_APPLICATIONS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(
    c"pg_dump,pg_dumpall,pg_restore,pg_basebackup,pg_receivewal,pgbackrest%,barman%,wal-g%,pg_probackup%",
));

pub fn register() {
    GucRegistry::define_string_guc(
        c"session_kill.protected_roles",
        c"Roles whose sessions session_kill never cancels or terminates.",
        c"Comma-separated role names.",
        &PROTECTED_ROLES,
        GucContext::Sighup,
        list_input(),
    );
    GucRegistry::define_string_guc(
        c"session_kill.protected_applications",
        c"application_name patterns whose sessions session_kill never cancels or terminates.",
        c"Comma-separated LIKE patterns; the default covers common backup tools.",
        &PROTECTED_APPLICATIONS,
        GucContext::Sighup,
        list_input(),
    );
}

/// The current value of a list setting, as the text the policy module parses.
pub fn list(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|v| v.to_string_lossy().into_owned()).unwrap_or_default()
}

fn list_input() -> GucFlags {
    GucFlags::from_bits_truncate(pgrx::pg_sys::GUC_LIST_INPUT as i32)
}
