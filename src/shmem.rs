//! Everything session_kill keeps in shared memory (only when preloaded): the drain gates and the
//! action counters, plus the check that SQL functions needing them make.

use crate::counters::{Counters, Source, WorkerStatus};
use crate::errors::raise;
use crate::gate::GateTable;
use crate::policy::Micros;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock, PgSqlErrorCode};
use std::sync::atomic::{AtomicBool, Ordering};

// SAFETY: both tables are plain Copy data without pointers.
unsafe impl PGRXSharedMemory for GateTable {}
// SAFETY: as above.
unsafe impl PGRXSharedMemory for Counters {}

// SAFETY: the names are unique to this extension.
pub static GATES: PgLwLock<GateTable> = unsafe { PgLwLock::new(c"session_kill_gates") };
// SAFETY: as above.
static COUNTERS: PgLwLock<Counters> = unsafe { PgLwLock::new(c"session_kill_counters") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// From `_PG_init` while `shared_preload_libraries` is being processed.
pub fn init() {
    pg_shmem_init!(GATES = GateTable::default());
    pg_shmem_init!(COUNTERS = Counters::default());
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

pub fn require_preloaded() {
    if !preloaded() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "session_kill must be loaded via shared_preload_libraries",
            "Add session_kill to shared_preload_libraries in postgresql.conf and restart the server.",
        );
    }
}

/// Counts one action; a no-op when not preloaded (kill_sessions works without shared memory).
pub fn count(source: Source, reason: &str, outcome: &str) {
    if preloaded() {
        COUNTERS.exclusive().add(source, reason, outcome);
    }
}

/// The worker reports each scan.
pub fn worker_scanned(pid: i32, at: Micros, next: Option<Micros>) {
    let mut counters = COUNTERS.exclusive();
    let scans = counters.worker.scans + 1;
    counters.worker = WorkerStatus { pid, last_scan: at, next_scan: next.unwrap_or(0), scans };
}

pub fn counts() -> (Vec<crate::counters::Count>, WorkerStatus) {
    let counters = COUNTERS.share();
    (counters.rows(), counters.worker)
}
