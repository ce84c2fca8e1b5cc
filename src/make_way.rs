//! `session_kill.make_way_after`: a session that sets it asks the worker to end the sessions that
//! hold up its lock requests once it has waited that long, with its own rights. So a migration
//! runs `SET session_kill.make_way_after = '3s'; ALTER TABLE ...` and goes through, without a
//! `lock_timeout` and retry loop and without ending anyone it could not end itself.
//!
//! The worker cannot read another backend's settings, so each backend publishes its own: when the
//! setting changes (`SET`, `RESET`, the end of a `SET LOCAL`, role and database defaults) and at
//! login, the backend records its PID, start time, role and the setting in a shared table, and it
//! removes the record as it exits. The table here is plain Rust; `publish` is the backend's side.

use crate::backends;
use crate::policy::Micros;
use crate::shmem;
use pgrx::prelude::*;
use std::cell::Cell;

pub const MAKE_WAY_SLOTS: usize = 1024;

/// One session's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub pid: i32,
    pub started: Micros,
    pub after: Micros,
    /// The role whose rights it acts with: the current user when the setting was made.
    pub role: u32,
}

#[derive(Clone, Copy)]
pub struct MakeWayTable {
    slots: [Option<Request>; MAKE_WAY_SLOTS],
}

impl Default for MakeWayTable {
    fn default() -> Self {
        MakeWayTable { slots: [None; MAKE_WAY_SLOTS] }
    }
}

impl MakeWayTable {
    /// Records (or, with `after` 0, removes) a session's request; false when the table is full.
    pub fn set(&mut self, request: Request) -> bool {
        let own = self.slots.iter().position(|s| s.is_some_and(|r| r.pid == request.pid));
        if request.after <= 0 {
            if let Some(i) = own {
                self.slots[i] = None;
            }
            return true;
        }
        match own.or_else(|| self.slots.iter().position(Option::is_none)) {
            Some(i) => {
                self.slots[i] = Some(request);
                true
            }
            None => false,
        }
    }

    /// The backend `(pid, started)` is exiting.
    pub fn remove(&mut self, pid: i32, started: Micros) {
        for slot in &mut self.slots {
            if slot.is_some_and(|r| r.pid == pid && r.started == started) {
                *slot = None;
            }
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.slots.iter().flatten().copied().collect()
    }
}

thread_local! {
    static EXIT_CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// This backend has a request in the table: only then does turning it off touch the table
    /// (a pooler's `DISCARD ALL` resets the setting on every checkout).
    static PUBLISHED: Cell<bool> = const { Cell::new(false) };
}

/// This backend's side: records its current setting, as `role`.
pub fn publish(after_ms: i32, role: pg_sys::Oid) {
    // SAFETY: MyProc is set once the backend has a PGPROC; the postmaster and processes still
    // starting have none and publish nothing (their settings are published at login).
    if !shmem::preloaded() || unsafe { pg_sys::MyProc.is_null() } {
        return;
    }
    if after_ms <= 0 && !PUBLISHED.get() {
        return;
    }
    let (pid, started) = backends::own_key();
    let request = Request { pid, started, after: i64::from(after_ms) * 1000, role: role.to_u32() };
    if request.after > 0 && !EXIT_CALLBACK_REGISTERED.get() {
        // SAFETY: runs at any exit of this backend, while shared memory is still attached.
        unsafe { pg_sys::before_shmem_exit(Some(forget), pg_sys::Datum::from(0)) };
        EXIT_CALLBACK_REGISTERED.set(true);
    }
    let published = shmem::set_make_way(request);
    PUBLISHED.set(published && request.after > 0);
    if !published {
        warning!(
            "session_kill.make_way_after has no effect in this session: {MAKE_WAY_SLOTS} sessions already use it"
        );
    } else if request.after > 0 {
        // The worker sleeps until its next deadline; this request may bring one forward.
        crate::signal::wake_worker();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn forget(_code: i32, _arg: pg_sys::Datum) {
    let (pid, started) = backends::own_key();
    shmem::forget_make_way(pid, started);
}

/// The setting's assign hook: publishes each new value, with the current user's rights.
#[pg_guard]
pub unsafe extern "C-unwind" fn assign(newval: i32, _extra: *mut std::ffi::c_void) {
    // SAFETY: GetUserId is valid in a backend with a PGPROC (checked in publish first).
    if unsafe { !pg_sys::MyProc.is_null() } {
        publish(newval, unsafe { pg_sys::GetUserId() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pid: i32, after: Micros) -> Request {
        Request { pid, started: 100, after, role: 10 }
    }

    #[test]
    fn a_session_has_one_request_and_zero_withdraws_it() {
        let mut t = MakeWayTable::default();
        assert!(t.set(request(1, 3_000_000)));
        assert!(t.set(request(1, 5_000_000)));
        assert_eq!(t.requests(), vec![request(1, 5_000_000)]);
        assert!(t.set(request(1, 0)));
        assert!(t.requests().is_empty());
    }

    #[test]
    fn an_exit_removes_only_that_backend_and_a_full_table_says_so() {
        let mut t = MakeWayTable::default();
        for pid in 0..MAKE_WAY_SLOTS as i32 {
            assert!(t.set(request(pid, 1)));
        }
        assert!(!t.set(request(-1, 1)), "full");
        t.remove(5, 999);
        assert_eq!(t.requests().len(), MAKE_WAY_SLOTS, "another backend with that PID");
        t.remove(5, 100);
        assert!(t.set(request(-1, 1)));
    }
}
