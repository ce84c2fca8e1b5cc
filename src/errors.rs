//! Raising errors in PostgreSQL's message style: SQLSTATE, lowercase message without a trailing
//! period, and a hint written as a sentence; and catching them in background workers.

use crate::policy::InputError;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use std::panic::AssertUnwindSafe;

/// Raises ERROR and never returns.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: impl Into<String>) -> ! {
    ErrorReport::new(code, message.into(), "").set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// A required argument was NULL.
pub fn null_argument(name: &str, hint: &str) -> ! {
    raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, format!("{name} must not be null"), hint)
}

/// Unwraps a parsed argument or raises its error as invalid_parameter_value.
pub fn or_raise<T>(result: Result<T, InputError>) -> T {
    result.unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.message, e.hint))
}

/// `text` as a SQL string literal (`'it''s'`), for hints a user may copy and paste.
pub fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Runs `body` in a transaction of its own; an ERROR inside aborts that transaction and comes
/// back as its message.
pub fn in_transaction<R>(body: impl FnOnce() -> R) -> Result<R, String> {
    PgTryBuilder::new(AssertUnwindSafe(|| Ok(BackgroundWorker::transaction(AssertUnwindSafe(body)))))
        .catch_others(|caught| {
            // SAFETY: the failed body left its transaction open; abort it before going on.
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(match caught {
                CaughtError::PostgresError(e) | CaughtError::ErrorReport(e) => e.message().to_owned(),
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_owned(),
            })
        })
        .execute()
}
