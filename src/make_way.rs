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
/// The worker looks for a requester's lock wait at most this often: any role may set the
/// setting, and 1 ms would have the worker look at every process every millisecond. A request
/// below it may be served up to this much late.
pub const LOOK_FLOOR: Micros = 100_000;

/// How often the worker looks for the lock wait of a session that asked to make way after `after`.
pub fn look_every(after: Micros) -> Micros {
    after.max(LOOK_FLOOR)
}

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
    /// How often the worker looks for lock waits until its next read of the table, by what it
    /// read last (None: it does not look). A request it looks for often enough needs no wake-up.
    watched_every: Option<Micros>,
}

impl Default for MakeWayTable {
    fn default() -> Self {
        MakeWayTable { slots: [None; MAKE_WAY_SLOTS], watched_every: None }
    }
}

/// What recording a request asks of the backend that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Every slot is taken: the request has no effect.
    Full,
    /// The worker does not look for lock waits often enough for this request until woken.
    WakeWorker,
    /// Recorded, or removed; the worker needs no wake-up.
    Done,
}

impl MakeWayTable {
    /// Records (or, with `after` 0, removes) a session's request.
    pub fn set(&mut self, request: Request) -> Recorded {
        let own = self.slots.iter().position(|s| s.is_some_and(|r| r.pid == request.pid));
        if request.after <= 0 {
            if let Some(i) = own {
                self.slots[i] = None;
            }
            return Recorded::Done;
        }
        let Some(i) = own.or_else(|| self.slots.iter().position(Option::is_none)) else {
            return Recorded::Full;
        };
        self.slots[i] = Some(request);
        if self.watched_every.is_none_or(|every| look_every(request.after) < every) {
            Recorded::WakeWorker
        } else {
            Recorded::Done
        }
    }

    /// The worker's read: every request, and how often it must look for lock waits until its
    /// next read (None: no request) to find each one's wait by `look_every(after)`.
    pub fn watch(&mut self) -> (Vec<Request>, Option<Micros>) {
        let requests = self.requests();
        self.watched_every = requests.iter().map(|r| look_every(r.after)).min();
        (requests, self.watched_every)
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
    let recorded = shmem::set_make_way(request);
    PUBLISHED.set(recorded != Recorded::Full && request.after > 0);
    match recorded {
        Recorded::Full => warning!(
            "session_kill.make_way_after has no effect in this session: {MAKE_WAY_SLOTS} sessions already use it"
        ),
        Recorded::WakeWorker => crate::signal::wake_worker(),
        Recorded::Done => {}
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
        assert_ne!(t.set(request(1, 3_000_000)), Recorded::Full);
        assert_ne!(t.set(request(1, 5_000_000)), Recorded::Full);
        assert_eq!(t.requests(), vec![request(1, 5_000_000)]);
        assert_eq!(t.set(request(1, 0)), Recorded::Done);
        assert!(t.requests().is_empty());
    }

    #[test]
    fn an_exit_removes_only_that_backend_and_a_full_table_says_so() {
        let mut t = MakeWayTable::default();
        for pid in 0..MAKE_WAY_SLOTS as i32 {
            assert_ne!(t.set(request(pid, 1)), Recorded::Full);
        }
        assert_eq!(t.set(request(-1, 1)), Recorded::Full);
        t.remove(5, 999);
        assert_eq!(t.requests().len(), MAKE_WAY_SLOTS, "another backend with that PID");
        t.remove(5, 100);
        assert_ne!(t.set(request(-1, 1)), Recorded::Full);
    }

    #[test]
    fn a_request_wakes_the_worker_only_when_it_does_not_look_often_enough() {
        let mut t = MakeWayTable::default();
        assert_eq!(t.set(request(1, 3_000_000)), Recorded::WakeWorker, "the worker looks for nothing yet");
        assert_eq!(t.set(request(2, 3_000_000)), Recorded::WakeWorker, "it has not read the first one yet");
        assert_eq!(t.watch(), (vec![request(1, 3_000_000), request(2, 3_000_000)], Some(3_000_000)));
        assert_eq!(t.set(request(1, 3_000_000)), Recorded::Done, "the same again");
        assert_eq!(t.set(request(1, 0)), Recorded::Done, "a withdrawal");
        assert_eq!(t.set(request(1, 5_000_000)), Recorded::Done, "looked for every 3 s already");
        assert_eq!(t.set(request(1, 2_000_000)), Recorded::WakeWorker, "sooner than it looks");
        t.watch();
        assert_eq!(t.set(request(3, 2_000_000)), Recorded::Done);
    }

    #[test]
    fn no_request_makes_the_worker_look_more_often_than_the_floor() {
        let mut t = MakeWayTable::default();
        assert_eq!(t.set(request(1, 1_000)), Recorded::WakeWorker);
        t.watch();
        for after in [1, 1_000, 50_000, LOOK_FLOOR] {
            assert_eq!(
                t.set(request(1, after)),
                Recorded::Done,
                "{after} µs is looked for every {LOOK_FLOOR} µs"
            );
        }
        assert_eq!(look_every(1), LOOK_FLOOR);
        assert_eq!(look_every(3_000_000), 3_000_000);
    }

    #[test]
    fn once_every_request_is_gone_the_next_wakes_the_worker() {
        let mut t = MakeWayTable::default();
        t.set(request(1, 1_000_000));
        t.watch();
        t.set(request(1, 0));
        assert_eq!(t.set(request(2, 1_000_000)), Recorded::Done, "the worker still looks every second");
        t.set(request(2, 0));
        assert_eq!(t.watch(), (vec![], None), "no request: the worker stops looking");
        assert_eq!(t.set(request(2, 1_000_000)), Recorded::WakeWorker, "the worker stopped looking");
    }
}
