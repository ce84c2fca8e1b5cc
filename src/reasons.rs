//! Why session_kill ended a session, told to its client. PostgreSQL says only "terminating
//! connection due to administrator command" (57P01) or "canceling statement due to user request"
//! (57014). Right before it signals a backend, session_kill leaves the reason in a shared slot
//! keyed by the backend's PID and start time; the backend's `emit_log_hook` finds it as it
//! reports the interrupt, and adds it as the message's DETAIL, for its client and its log line.
//!
//! A reason reaches only the backend it was meant for, for the signal it was meant for: another
//! process that reuses the PID has another start time, a cancel's reason never decorates a
//! termination, and a reason that waited longer than `MAX_AGE` (a cancel that found the session
//! idle, so never interrupted anything) is dropped, so a later signal from someone else carries
//! none.

use crate::backends;
use crate::fixed::FixedText;
use crate::policy::Micros;
use crate::shmem;
use crate::signal::Signal;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::ffi::{CStr, CString};

pub const REASON_SLOTS: usize = 1024;
pub const MAX_AGE: Micros = 2_000_000;
pub type ReasonText = FixedText<256>;

/// Every detail starts with this, so a client can tell who ended it.
pub const PREFIX: &str = "session_kill: ";

#[derive(Debug, Clone, Copy, PartialEq)]
struct Reason {
    pid: i32,
    started: Micros,
    signal: Signal,
    at: Micros,
    text: ReasonText,
}

/// The slots, in shared memory.
#[derive(Clone, Copy)]
pub struct ReasonTable {
    slots: [Option<Reason>; REASON_SLOTS],
}

impl Default for ReasonTable {
    fn default() -> Self {
        ReasonTable { slots: [None; REASON_SLOTS] }
    }
}

impl ReasonTable {
    /// Leaves `text` for the backend `(pid, started)`: in its own slot if it has one, else in a
    /// free or stale one, else in the oldest.
    pub fn attach(&mut self, pid: i32, started: Micros, signal: Signal, text: &str, now: Micros) {
        let reason = Reason { pid, started, signal, at: now, text: ReasonText::new(text) };
        let index = self
            .slots
            .iter()
            .position(|s| s.is_some_and(|r| r.pid == pid && r.started == started))
            .or_else(|| self.slots.iter().position(|s| s.is_none_or(|r| now - r.at > MAX_AGE)))
            .unwrap_or_else(|| {
                (0..REASON_SLOTS).min_by_key(|i| self.slots[*i].map_or(Micros::MIN, |r| r.at)).unwrap_or(0)
            });
        self.slots[index] = Some(reason);
    }

    /// Takes the reason left for this backend and this signal, if it is fresh.
    pub fn take(&mut self, pid: i32, started: Micros, signal: Signal, now: Micros) -> Option<ReasonText> {
        let slot = self.slots.iter_mut().find(|s| s.is_some_and(|r| r.pid == pid && r.started == started))?;
        let reason = slot.take()?;
        (reason.signal == signal && now - reason.at <= MAX_AGE).then_some(reason.text)
    }

    /// Withdraws a reason whose signal could not be sent.
    pub fn withdraw(&mut self, pid: i32, started: Micros) {
        for slot in &mut self.slots {
            if slot.is_some_and(|r| r.pid == pid && r.started == started) {
                *slot = None;
            }
        }
    }
}

static mut PREVIOUS_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

/// From `_PG_init` when preloaded: every backend then reports its own interrupt with the reason.
pub fn install_hook() {
    // SAFETY: _PG_init runs once per process before any message is emitted; the previous hook
    // is kept and called.
    unsafe {
        PREVIOUS_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(add_reason);
    }
}

/// The interrupt a message reports, by its SQLSTATE and PostgreSQL's untranslated text.
fn interrupt_of(sqlerrcode: i32, message_id: &CStr) -> Option<Signal> {
    let code = |c: PgSqlErrorCode| c as isize as i32;
    match (sqlerrcode, message_id.to_bytes()) {
        (c, b"terminating connection due to administrator command")
            if c == code(PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN) =>
        {
            Some(Signal::Terminate)
        }
        (c, b"canceling statement due to user request")
            if c == code(PgSqlErrorCode::ERRCODE_QUERY_CANCELED) =>
        {
            Some(Signal::Cancel)
        }
        _ => None,
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn add_reason(edata: *mut pg_sys::ErrorData) {
    // SAFETY: PostgreSQL passes the error being reported, in its error memory context, before it
    // goes to the client and the log. Only a backend with a PGPROC (never the postmaster) looks
    // at shared memory, and only for the two interrupt messages, which are raised while it holds
    // no lightweight lock.
    unsafe {
        let e = &mut *edata;
        if !pg_sys::MyProc.is_null() && e.detail.is_null() && !e.message_id.is_null() {
            if let Some(signal) = interrupt_of(e.sqlerrcode, CStr::from_ptr(e.message_id)) {
                let (pid, started) = backends::own_key();
                if let Some(text) = shmem::take_reason(pid, started, signal, backends::now()) {
                    let text = CString::new(text.as_str()).unwrap_or_default();
                    e.detail = pg_sys::pstrdup(text.as_ptr());
                }
            }
        }
        if let Some(previous) = PREVIOUS_EMIT_LOG_HOOK {
            previous(edata);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Micros = 1_000_000_000;

    #[test]
    fn a_reason_reaches_its_backend_once() {
        let mut t = ReasonTable::default();
        t.attach(10, 5, Signal::Terminate, "session_kill: drained", NOW);
        assert_eq!(
            t.take(10, 5, Signal::Terminate, NOW + 1).map(|r| r.as_str().to_owned()).as_deref(),
            Some("session_kill: drained")
        );
        assert_eq!(t.take(10, 5, Signal::Terminate, NOW + 2), None);
    }

    #[test]
    fn another_process_with_the_same_pid_gets_nothing() {
        let mut t = ReasonTable::default();
        t.attach(10, 5, Signal::Terminate, "x", NOW);
        assert_eq!(t.take(10, 6, Signal::Terminate, NOW), None);
    }

    #[test]
    fn a_cancel_reason_never_decorates_a_termination_nor_a_late_signal() {
        let mut t = ReasonTable::default();
        t.attach(10, 5, Signal::Cancel, "x", NOW);
        assert_eq!(t.take(10, 5, Signal::Terminate, NOW), None);
        t.attach(10, 5, Signal::Cancel, "x", NOW);
        assert_eq!(t.take(10, 5, Signal::Cancel, NOW + MAX_AGE + 1), None);
    }

    #[test]
    fn the_latest_reason_for_a_backend_wins_and_a_withdrawn_one_is_gone() {
        let mut t = ReasonTable::default();
        t.attach(10, 5, Signal::Cancel, "first", NOW);
        t.attach(10, 5, Signal::Terminate, "second", NOW + 1);
        assert_eq!(t.take(10, 5, Signal::Terminate, NOW + 2).unwrap().as_str(), "second");
        t.attach(11, 5, Signal::Terminate, "x", NOW);
        t.withdraw(11, 5);
        assert_eq!(t.take(11, 5, Signal::Terminate, NOW), None);
    }

    #[test]
    fn a_full_table_reuses_stale_slots_then_the_oldest() {
        let mut t = ReasonTable::default();
        for pid in 0..REASON_SLOTS as i32 {
            t.attach(pid, 1, Signal::Terminate, "x", NOW + Micros::from(pid));
        }
        t.attach(9999, 1, Signal::Terminate, "new", NOW + 5000);
        assert_eq!(t.take(0, 1, Signal::Terminate, NOW + 5000), None, "the oldest made room");
        assert!(t.take(9999, 1, Signal::Terminate, NOW + 5000).is_some());
        assert!(t.take(1, 1, Signal::Terminate, NOW + 5000).is_some());
    }
}
