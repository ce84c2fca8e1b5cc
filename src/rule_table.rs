//! The table `session_kill.rules`: its definition, the check every row passes, and the
//! notification that makes a committed change (or the table's drop) reach the worker, and so
//! every open session, without a reload.

use crate::args::duration_arg;
use crate::errors::{or_raise, raise};
use crate::rules::{Rule, RuleRow, MAX_PATTERN_LEN};
use crate::sqltypes::Text;
use crate::{gucs, sync};
use pgrx::datum::Interval;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use std::cell::Cell;

/// Checks one row of `session_kill.rules` (called by its trigger); raises 22023 with a hint
/// when the row could not be enforced. NULLs are left to the table's NOT NULL constraints.
#[pg_extern(stable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn check_rule(
    database: Option<Text>,
    role: Option<Text>,
    application: Option<Text>,
    client_addr: Option<Text>,
    state: Option<Text>,
    timeout: Option<Interval>,
    action: Option<Text>,
    grace: Option<Interval>,
) {
    let (
        Some(database),
        Some(role),
        Some(application),
        Some(state),
        Some(timeout),
        Some(action),
        Some(grace),
    ) = (database, role, application, state, timeout, action, grace)
    else {
        return;
    };
    // Lengths are checked before anything is converted or copied: a row may carry megabytes of
    // text (and check_rule may be called directly by anyone).
    let row = RuleRow {
        id: 0,
        database: bounded("database pattern", database),
        role: bounded("role pattern", role),
        application: bounded("application pattern", application),
        client_addr: client_addr.map(|c| bounded("client_addr", c)),
        state: bounded("state", state),
        timeout: crate::args::interval_micros(timeout),
        action: bounded("action", action),
        grace: duration_arg("grace", Some(grace)),
        priority: 0,
        comment: String::new(),
    };
    or_raise(Rule::from_row(&row));
}

fn bounded(column: &str, text: Text) -> String {
    if text.len() > MAX_PATTERN_LEN {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{column} is too long"),
            format!("Rules' text columns hold at most {MAX_PATTERN_LEN} bytes, like PostgreSQL names."),
        );
    }
    text.to_str().into_owned()
}

thread_local! {
    /// This transaction changed the rules; tell the worker when (if) it commits.
    static CHANGED: Cell<bool> = const { Cell::new(false) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Statement trigger on `session_kill.rules`.
#[pg_trigger]
fn rules_changed<'a>(
    _trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::heap_tuple::PgHeapTupleError> {
    note_change();
    warn_if_not_enforced();
    Ok(None)
}

/// This transaction changed the rules (or dropped their table): the worker is told at COMMIT.
fn note_change() {
    CHANGED.set(true);
    if !CALLBACK_REGISTERED.replace(true) {
        // SAFETY: registers a callback that lives as long as the process.
        unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut()) };
    }
}

static mut PREVIOUS_OBJECT_ACCESS_HOOK: pg_sys::object_access_hook_type = None;

/// From `_PG_init` when preloaded: DROP TABLE or DROP EXTENSION runs no trigger, so a drop of the
/// rules table is noticed here and reaches the worker at COMMIT like any other change.
pub fn install_hook() {
    // SAFETY: _PG_init runs once in the postmaster before any backend; we chain the previous hook.
    unsafe {
        PREVIOUS_OBJECT_ACCESS_HOOK = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(on_object_access);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: i32,
    arg: *mut std::ffi::c_void,
) {
    // SAFETY: the previous hook gets the arguments PostgreSQL passed to us.
    unsafe {
        if let Some(previous) = PREVIOUS_OBJECT_ACCESS_HOOK {
            previous(access, class_id, object_id, sub_id, arg);
        }
    }
    if access == pg_sys::ObjectAccessType::OAT_DROP
        && class_id == pg_sys::RelationRelationId
        && sub_id == 0
        && is_rules_table(object_id)
    {
        note_change();
    }
}

fn is_rules_table(relation: pg_sys::Oid) -> bool {
    use crate::backends::c_string;
    // SAFETY: syscache lookups of a relation still in the catalogs (the hook runs before the
    // drop); NULL results are handled.
    unsafe {
        c_string(pg_sys::get_rel_name(relation)).as_deref() == Some("rules")
            && c_string(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relation))).as_deref()
                == Some("session_kill")
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT if CHANGED.replace(false) => {
            sync::request_rules();
        }
        // A prepared transaction's change shows at COMMIT PREPARED, which runs no trigger: the
        // worker's minutely refresh picks it up.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => CHANGED.set(false),
        _ => {}
    }
}

/// Rules are read from one database only; say so when they are edited elsewhere.
fn warn_if_not_enforced() {
    // SAFETY: MyDatabaseId is set in every backend connected to a database.
    let here = crate::backends::database_name(unsafe { pg_sys::MyDatabaseId });
    let enforced = gucs::database();
    if here.is_some() && here == enforced {
        return;
    }
    let hint = match &enforced {
        Some(db) => format!("The worker reads rules from database \"{db}\" (session_kill.database)."),
        None => "session_kill.database is empty, so no rules table is read.".to_owned(),
    };
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_WARNING,
        format!("session_kill.rules in database \"{}\" is not enforced", here.unwrap_or_default()),
        "",
    )
    .set_hint(hint)
    .report(PgLogLevel::WARNING);
}

extension_sql!(
    r#"
CREATE TABLE session_kill.rules (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    database    text NOT NULL DEFAULT '%',
    role        text NOT NULL DEFAULT '%',
    application text NOT NULL DEFAULT '%',
    client_addr cidr,
    state       text NOT NULL,
    timeout     interval NOT NULL,
    action      text NOT NULL DEFAULT 'terminate',
    grace       interval NOT NULL DEFAULT '5s',
    enabled     boolean NOT NULL DEFAULT true,
    priority    integer NOT NULL DEFAULT 0,
    comment     text
);
COMMENT ON TABLE session_kill.rules IS 'Limits the session_kill worker enforces; the highest priority rule matching a session in its state governs it';
COMMENT ON COLUMN session_kill.rules.database IS 'LIKE pattern on the database name';
COMMENT ON COLUMN session_kill.rules.role IS 'LIKE pattern on the role name';
COMMENT ON COLUMN session_kill.rules.application IS 'LIKE pattern on application_name';
COMMENT ON COLUMN session_kill.rules.client_addr IS 'Client network; NULL matches every client, Unix sockets included';
COMMENT ON COLUMN session_kill.rules.state IS 'idle, idle in transaction, transaction (age of the open transaction), active (running statement), blocking (holding up a lock request), snapshot (holding back the xmin horizon) or replay_lag (holding back replay on a hot standby)';
COMMENT ON COLUMN session_kill.rules.timeout IS 'How long a session may stay in that state';
COMMENT ON COLUMN session_kill.rules.action IS 'terminate, or cancel_then_terminate (cancel the statement, terminate after grace if still over)';

CREATE FUNCTION session_kill.rules_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM session_kill.check_rule(NEW.database, NEW.role, NEW.application, NEW.client_addr::text,
                                    NEW.state, NEW.timeout, NEW.action, NEW.grace);
    RETURN NEW;
END
$$;
CREATE TRIGGER rules_check BEFORE INSERT OR UPDATE ON session_kill.rules
    FOR EACH ROW EXECUTE FUNCTION session_kill.rules_check();
CREATE TRIGGER rules_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON session_kill.rules
    FOR EACH STATEMENT EXECUTE FUNCTION session_kill.rules_changed();
SELECT pg_catalog.pg_extension_config_dump('session_kill.rules', '');
SELECT pg_catalog.pg_extension_config_dump('session_kill.rules_id_seq', '');
"#,
    name = "rules_table",
    requires = [check_rule, rules_changed]
);
