//! Raising errors in PostgreSQL's message style: SQLSTATE, lowercase message without a trailing
//! period, and a hint written as a sentence.

use crate::policy::InputError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

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
