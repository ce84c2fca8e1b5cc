//! What callers pass to the SQL functions, checked and converted: required arguments, names that
//! must exist, durations, bounded text, and timestamps and intervals on the way back to SQL.

use crate::errors::{null_argument, or_raise, raise};
use crate::policy::Micros;
use crate::sqltypes::Text;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::borrow::Cow;
use std::ffi::CString;
use std::time::Duration;

/// Only a superuser may lift the superuser protection.
pub(crate) fn superuser_choice(include_superusers: Option<bool>) -> bool {
    let include =
        include_superusers.unwrap_or_else(|| null_argument("include_superusers", "Pass true or false."));
    // SAFETY: superuser() checks the current user, valid inside a transaction.
    if include && !unsafe { pg_sys::superuser() } {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to include superuser sessions",
            "Only superusers can act on superuser sessions.",
        );
    }
    include
}

/// The OID of an existing database, or an error that says how to list them.
pub(crate) fn database_oid(name: &str) -> u32 {
    let c_name = CString::new(name).unwrap_or_default();
    // SAFETY: catalog lookup with missing_ok = true.
    let oid = unsafe { pg_sys::get_database_oid(c_name.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_CATALOG_NAME,
            format!("database \"{name}\" does not exist"),
            "List the databases with \\l in psql, or SELECT datname FROM pg_database.",
        );
    }
    oid.to_u32()
}

/// The name of an existing role, or an error that says how to list them.
pub(crate) fn existing_role(name: String) -> String {
    let c_name = CString::new(name.as_str()).unwrap_or_default();
    // SAFETY: catalog lookup with missing_ok = true.
    if unsafe { pg_sys::get_role_oid(c_name.as_ptr(), true) } == pg_sys::InvalidOid {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("role \"{name}\" does not exist"),
            "List the roles with \\du in psql, or SELECT rolname FROM pg_roles.",
        );
    }
    name
}

/// `text` as UTF-8 once it is known to be at most `max` bytes long. The hint defaults to
/// saying the limit.
pub(crate) fn bounded<'a>(what: &str, text: Text<'a>, max: usize, hint: &str) -> Cow<'a, str> {
    if text.len() > max {
        let hint = if hint.is_empty() { format!("Give at most {max} bytes.") } else { hint.to_owned() };
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("{what} is too long"), hint);
    }
    text.to_str()
}

pub(crate) fn duration_arg(name: &str, value: Option<Interval>) -> Micros {
    let value = value.unwrap_or_else(|| {
        null_argument(name, &format!("Pass a duration such as '5s', or '0' for none, as {name}."))
    });
    or_raise(crate::policy::non_negative(name, value.as_micros()))
}

/// An interval in microseconds as PostgreSQL compares intervals (30-day months, 24-hour days),
/// saturated to 64 bits: the one conversion for rules' timeouts, on write and on load.
pub(crate) fn interval_micros(value: Interval) -> Micros {
    value.as_micros().clamp(i128::from(Micros::MIN), i128::from(Micros::MAX)) as Micros
}

pub(crate) fn duration(micros: Micros) -> Duration {
    Duration::from_micros(micros.max(0) as u64)
}

pub(crate) fn timestamp(micros: Micros) -> Option<TimestampWithTimeZone> {
    (micros != 0).then(|| TimestampWithTimeZone::try_from(micros).ok()).flatten()
}

pub(crate) fn interval(micros: Micros) -> Interval {
    Interval::from_micros(micros).justify_hours()
}

/// The extension's objects in this database must be the version this library was built for: an
/// older catalog (before `ALTER EXTENSION session_kill UPDATE`) has other signatures and columns.
pub(crate) fn require_current_catalog() {
    // A read-only query: on a hot standby a writing one cannot even start.
    let installed = Spi::connect(|client| {
        client
            .select(
                "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'session_kill'",
                Some(1),
                &[],
            )?
            .first()
            .get_one::<String>()
    })
    .ok()
    .flatten();
    let library = env!("CARGO_PKG_VERSION");
    if let Some(installed) = installed.filter(|v| v != library) {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("the session_kill library is version {library}, but the extension in this database is version {installed}"),
            "Run ALTER EXTENSION session_kill UPDATE in this database.",
        );
    }
}
