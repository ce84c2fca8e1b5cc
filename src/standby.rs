//! What the replay-lag limit reads on a hot standby: the startup process's wait (from its PGPROC,
//! as `pg_stat_activity` does), the replay position, and the snapshots (`backend_xmin`) of client
//! sessions. The decisions are in `replay.rs`.

use crate::replay::{self, Conflict, Look};
use pgrx::pg_sys;

/// A look at the startup process with this PID; `None` if it is gone (the server was promoted).
pub fn look_at_startup(pid: i32, now: i64) -> Option<Look> {
    // SAFETY: AuxiliaryPidGetProc returns the PGPROC of a live auxiliary process, in shared
    // memory for the life of the server, or NULL. The fields are read once each, without locks,
    // as pg_stat_get_activity reads wait_event_info: a torn view only shifts one look.
    unsafe {
        let proc = pg_sys::AuxiliaryPidGetProc(pid);
        if proc.is_null() {
            return None;
        }
        let wait_event_info = std::ptr::read_volatile(&raw const (*proc).wait_event_info);
        let waits_for_lock = !std::ptr::read_volatile(&raw const (*proc).waitLock).is_null();
        let wait_start = std::ptr::read_volatile(&raw const (*proc).waitStart.value) as i64;
        let conflict = replay::conflict_of(
            wait_event_info,
            pg_sys::WaitEventIPC::WAIT_EVENT_RECOVERY_CONFLICT_SNAPSHOT,
            pg_sys::WaitEventIPC::WAIT_EVENT_RECOVERY_CONFLICT_TABLESPACE,
        )
        .or(waits_for_lock.then_some(Conflict::Lock));
        Some(Look {
            now,
            conflict,
            wait_start: if waits_for_lock { wait_start } else { 0 },
            replayed: pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut()),
        })
    }
}

/// The `backend_xmin` of the regular backend with this PID, if it has one.
pub fn xmin(pid: i32) -> Option<u32> {
    // SAFETY: BackendPidGetProc returns a live PGPROC or NULL; xmin is a 32-bit field its owner
    // writes whole (pg_stat_get_activity reads it the same way).
    let xmin = unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        if proc.is_null() {
            return None;
        }
        std::ptr::read_volatile(&raw const (*proc).xmin)
    };
    let xmin = u32::from(xmin);
    (xmin != 0).then_some(xmin)
}

/// The next transaction ID (on a standby, as replay has advanced it), cut to 32 bits.
pub fn next_xid() -> u32 {
    // SAFETY: reads the shared counter under XidGenLock.
    unsafe { pg_sys::ReadNextFullTransactionId().value as u32 }
}
