//! Signalling one backend, with PostgreSQL's own permission rules, and waiting on the process
//! array. All the unsafe calls about other backends' processes live here.

use crate::policy::Micros;
use crate::{reasons, shmem};
use pgrx::pg_sys;
use std::time::{Duration, Instant};

/// The two signals PostgreSQL's own functions send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: cancel the running query (`pg_cancel_backend`).
    Cancel,
    /// SIGTERM: end the session (`pg_terminate_backend`).
    Terminate,
}

/// A superuser role, or no role at all: PostgreSQL protects both alike from non-superusers.
pub fn is_superuser_role(role: pg_sys::Oid) -> bool {
    // SAFETY: superuser_arg is a syscache lookup, valid inside a transaction.
    role == pg_sys::InvalidOid || unsafe { pg_sys::superuser_arg(role) }
}

/// `pg_signal_backend`'s rule from signalfuncs.c: a superuser target needs a superuser caller;
/// otherwise the caller needs the privileges of the target's role or of `pg_signal_backend`.
pub fn may_signal_role(role: pg_sys::Oid) -> bool {
    // SAFETY: privilege checks on the current user, valid inside a transaction.
    unsafe {
        let me = pg_sys::GetUserId();
        if is_superuser_role(role) {
            return pg_sys::superuser();
        }
        pg_sys::has_privs_of_role(me, role)
            || pg_sys::has_privs_of_role(me, pg_sys::Oid::from(pg_sys::ROLE_PG_SIGNAL_BACKEND))
    }
}

/// `may_signal_role` for another caller: could `caller` signal a backend of the role `target`?
pub fn may_signal_role_as(caller: pg_sys::Oid, target: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(target) else { return false };
    // SAFETY: catalog lookups and privilege checks by OID, valid inside a transaction.
    unsafe {
        let target = pg_sys::get_role_oid(name.as_ptr(), true);
        if target == pg_sys::InvalidOid {
            return false;
        }
        if is_superuser_role(target) {
            return pg_sys::superuser_arg(caller);
        }
        pg_sys::has_privs_of_role(caller, target)
            || pg_sys::has_privs_of_role(caller, pg_sys::Oid::from(pg_sys::ROLE_PG_SIGNAL_BACKEND))
    }
}

/// `pg_stat_activity`'s visibility rule: the target's role privileges or `pg_read_all_stats`.
pub fn may_see_role(role: pg_sys::Oid) -> bool {
    // SAFETY: privilege checks on the current user, valid inside a transaction.
    unsafe {
        let me = pg_sys::GetUserId();
        pg_sys::has_privs_of_role(me, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_ALL_STATS))
            || pg_sys::has_privs_of_role(me, role)
    }
}

/// Is this PID a backend in the process array? A backend leaves it when it exits, freeing its
/// connection slot (what `DROP DATABASE` and `max_connections` count), and enters it before
/// authentication, so this also sees logins still starting up.
pub fn in_process_array(pid: i32) -> bool {
    // SAFETY: BackendPidGetProc takes ProcArrayLock and returns NULL when no backend has the PID.
    unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

/// Why a signal was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalError {
    /// No backend with this PID any more.
    Gone,
    /// The caller lost the right to signal it (e.g. a role change since the snapshot).
    PermissionDenied,
    /// kill(2) failed with this errno.
    Os(i32),
}

/// Sends `signal` to the backend `pid`, re-checking PostgreSQL's permission rule against the
/// live process array, exactly as `pg_cancel_backend` / `pg_terminate_backend` do.
pub fn send(pid: i32, signal: Signal) -> Result<(), SignalError> {
    // SAFETY: the PGPROC pointer is only read for its role while the backend is known to exist;
    // kill(2) on the backend's process group is what signalfuncs.c does on platforms with setsid.
    unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        if proc.is_null() {
            return Err(SignalError::Gone);
        }
        if !may_signal_role((*proc).roleId) {
            return Err(SignalError::PermissionDenied);
        }
        let sig = match signal {
            Signal::Cancel => libc::SIGINT,
            Signal::Terminate => libc::SIGTERM,
        };
        if libc::kill(-pid, sig) == 0 {
            Ok(())
        } else {
            let errno = *libc::__errno_location();
            Err(if errno == libc::ESRCH { SignalError::Gone } else { SignalError::Os(errno) })
        }
    }
}

/// `send`, telling the backend's client why: the detail of the message it gets (see
/// `reasons.rs`). `started` is the backend's start time, so no other process takes the reason.
pub fn send_telling(pid: i32, started: Micros, signal: Signal, why: &str) -> Result<(), SignalError> {
    shmem::attach_reason(pid, started, signal, &format!("{}{why}", reasons::PREFIX));
    let sent = send(pid, signal);
    if sent.is_err() {
        shmem::withdraw_reason(pid, started);
    }
    sent
}

/// Exits take about a millisecond each here; polling faster only burns CPU.
const POLL_INTERVAL_MS: std::ffi::c_long = 1;

/// Polls `done` every millisecond until it returns true or `timeout` passes, sleeping on the
/// latch so the caller stays cancellable. Returns whether `done` became true.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        // SAFETY: waiting on our own latch; WL_EXIT_ON_PM_DEATH exits if the postmaster dies.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                POLL_INTERVAL_MS,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
}

/// Sets the worker's latch so it scans now (a login under connection pressure, a rules change,
/// an audit entry waiting).
pub fn wake_worker() {
    let pid = crate::shmem::worker_pid();
    if pid == 0 {
        return;
    }
    crate::shmem::count_wake_request();
    // SAFETY: BackendPidGetProc returns a live PGPROC or NULL; setting its latch is what
    // PostgreSQL itself does to wake another process.
    unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        if !proc.is_null() {
            pg_sys::SetLatch(&raw mut (*proc).procLatch);
        }
    }
}
