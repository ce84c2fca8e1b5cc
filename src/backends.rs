//! A snapshot of every backend, read directly from the server's backend status array in shared
//! memory (what `pg_stat_activity` is built from), without running SQL.
//!
//! The server caches that array per transaction; every read here clears the cache first so
//! re-reads inside one call (re-checks, waits) see live data.

use crate::lock_graph::{LockEntry, LockTag, MAX_MODE};
use crate::policy::{BackendKind, Micros, Session, State, Xmin};
use crate::signal;
use pgrx::pg_sys;
use std::collections::HashMap;
use std::ffi::{c_char, CStr};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{fence, Ordering};

/// One backend: the facts the policy decides on, plus what `sessions()` displays.
#[derive(Debug, Clone)]
pub struct Backend {
    pub session: Session,
    pub datname: Option<String>,
    pub backend_type: String,
    pub query: Option<String>,
    /// The caller may see this backend's details, by `pg_stat_activity`'s rule.
    pub visible: bool,
    /// Its transaction ID (`backend_xid`), 0 when none is assigned.
    pub xid: u32,
}

/// A status entry with the transaction IDs read from the backend's PGPROC, as
/// `pg_stat_activity` pairs them.
struct Entry {
    status: pg_sys::PgBackendStatus,
    xid: u32,
    xmin: u32,
}

/// Every backend right now.
pub fn snapshot() -> Vec<Backend> {
    let mut roles = RoleCache::default();
    let next = next_xid();
    raw_entries().iter().map(|entry| describe(entry, next, &mut roles)).collect()
}

/// Every live backend's session facts right now, by PID.
pub fn sessions() -> HashMap<i32, Session> {
    let mut roles = RoleCache::default();
    let next = next_xid();
    raw_entries().iter().map(|e| (e.status.st_procpid, session_of(e, next, &mut roles))).collect()
}

/// The backend with this PID right now, read from its own live entry in shared memory (not the
/// cached snapshot): what a re-check just before signalling needs, at O(1) per session.
pub fn live_session(pid: i32) -> Option<Session> {
    let entry = live_entry(pid, false)?;
    (entry.status.st_procpid == pid).then(|| session_of(&entry, next_xid(), &mut RoleCache::default()))
}

/// Like `live_session`, with the database name and the query: what an audit entry records.
pub fn live_backend(pid: i32) -> Option<Backend> {
    let entry = live_entry(pid, true)?;
    (entry.status.st_procpid == pid).then(|| describe(&entry, next_xid(), &mut RoleCache::default()))
}

/// The next transaction ID to be assigned (32 bits), what ages are counted from.
pub fn next_xid() -> u32 {
    // SAFETY: ReadNextFullTransactionId reads the shared counter under XidGenLock; it works on
    // primaries and hot standbys alike.
    unsafe { pg_sys::ReadNextFullTransactionId() }.value as u32
}

/// Copies one backend's shared status entry with the server's read protocol: retry until the
/// entry's change counter is even and unchanged around the copy. Strings are copied inside the
/// protocol too (the query only `with_query`); the returned entry's string pointers point at
/// those copies (palloc'd). The transaction IDs are read from its PGPROC right after, as
/// `pgstat_read_current_status` does.
fn live_entry(pid: i32, with_query: bool) -> Option<Entry> {
    // SAFETY: the status array is one contiguous PgBackendStatus[] in shared memory indexed by
    // proc number (PG 17+) or backend id - 1 (PG 15/16), and MyBEEntry is our own element of it,
    // so `MyBEEntry - my_index + index` is the target's element. The target may exit meanwhile:
    // its slot then holds another PID (or 0), which the caller rejects.
    unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        if proc.is_null() || pg_sys::MyBEEntry.is_null() {
            return None;
        }
        // Regular backends own the first MaxBackends slots; a backend still starting up may have
        // no backend id yet (PG 15/16), and then has no entry to read.
        let index = status_index_of(proc);
        if !(0..pg_sys::MaxBackends as isize).contains(&index) {
            return None;
        }
        let shared = pg_sys::MyBEEntry.offset(index - own_status_index());
        loop {
            let before = std::ptr::read_volatile(&(*shared).st_changecount);
            fence(Ordering::Acquire);
            let mut entry = std::ptr::read_volatile(shared);
            entry.st_appname = palloc_copy(entry.st_appname, pg_sys::NAMEDATALEN as usize);
            entry.st_activity_raw = if with_query {
                palloc_copy(entry.st_activity_raw, pg_sys::pgstat_track_activity_query_size as usize)
            } else {
                std::ptr::null_mut()
            };
            fence(Ordering::Acquire);
            let after = std::ptr::read_volatile(&(*shared).st_changecount);
            if before == after && before % 2 == 0 {
                // Aligned 32-bit fields that their backend alone sets (PostgreSQL's own readers
                // of a PGPROC's xmin read it without a lock too); a PGPROC stays in place when its
                // backend exits, so a stale read is of an ID, never of freed memory.
                let xid = std::ptr::read_volatile(&(*proc).xid).into_inner();
                let xmin = std::ptr::read_volatile(&(*proc).xmin).into_inner();
                return Some(Entry { status: entry, xid, xmin });
            }
            pgrx::check_for_interrupts!();
        }
    }
}

#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe fn status_index_of(proc: *const pg_sys::PGPROC) -> isize {
    // SAFETY: proc is a live PGPROC of a regular backend.
    unsafe { (*proc).backendId as isize - 1 }
}

#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe fn own_status_index() -> isize {
    // SAFETY: MyBackendId is set for every regular backend.
    unsafe { pg_sys::MyBackendId as isize - 1 }
}

#[cfg(not(any(feature = "pg15", feature = "pg16")))]
unsafe fn status_index_of(proc: *const pg_sys::PGPROC) -> isize {
    // SAFETY: proc points into ProcGlobal->allProcs (GetNumberFromPGProc).
    unsafe { proc.offset_from((*pg_sys::ProcGlobal).allProcs) }
}

#[cfg(not(any(feature = "pg15", feature = "pg16")))]
unsafe fn own_status_index() -> isize {
    // SAFETY: MyProcNumber is set for every backend with a PGPROC.
    unsafe { pg_sys::MyProcNumber as isize }
}

/// Copies a NUL-terminated string of at most `max` bytes (the buffer size) into palloc'd memory.
unsafe fn palloc_copy(src: *const c_char, max: usize) -> *mut c_char {
    if src.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `src` points at a shared buffer of `max` bytes; pnstrdup stops at NUL or `max`.
    unsafe { pg_sys::pnstrdup(src, max - 1) }
}

/// The server is a hot standby (or otherwise in recovery): nothing can be written.
pub fn in_recovery() -> bool {
    // SAFETY: reads shared recovery state; callable from any backend.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// The PID of the startup process, which replays WAL on a standby; `None` outside recovery.
pub fn startup_pid() -> Option<i32> {
    raw_entries()
        .iter()
        .find(|e| e.status.st_backendType == pg_sys::BackendType::B_STARTUP)
        .map(|e| e.status.st_procpid)
}

/// This backend: its PID and start time, which together never name another process.
pub fn own_key() -> (i32, Micros) {
    // SAFETY: both are set when the process starts.
    unsafe { (pg_sys::MyProcPid, pg_sys::MyStartTimestamp) }
}

/// The current wall-clock time as a PostgreSQL timestamp.
pub fn now() -> Micros {
    // SAFETY: GetCurrentTimestamp only reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Copies of the live status entries, with the transaction IDs the server read beside each.
/// Strings inside point into the transaction-local snapshot, which stays valid until the next
/// clear, i.e. until the next call here.
fn raw_entries() -> Vec<Entry> {
    // SAFETY: clearing and rebuilding the local snapshot is what pg_stat_get_activity does
    // between transactions; the entries are plain copies we only read.
    unsafe {
        pg_sys::pgstat_clear_backend_activity_snapshot();
        let count = pg_sys::pgstat_fetch_stat_numbackends();
        (1..=count)
            .filter_map(|i| local_entry(i).as_ref())
            .map(|local| Entry {
                status: local.backendStatus,
                xid: local.backend_xid.into_inner(),
                xmin: local.backend_xmin.into_inner(),
            })
            .filter(|e| e.status.st_procpid > 0)
            .collect()
    }
}

#[cfg(feature = "pg15")]
unsafe fn local_entry(index: i32) -> *mut pg_sys::LocalPgBackendStatus {
    // SAFETY: 1-based index below pgstat_fetch_stat_numbackends().
    unsafe { pg_sys::pgstat_fetch_stat_local_beentry(index) }
}

#[cfg(not(feature = "pg15"))]
unsafe fn local_entry(index: i32) -> *mut pg_sys::LocalPgBackendStatus {
    // SAFETY: 1-based index below pgstat_fetch_stat_numbackends().
    unsafe { pg_sys::pgstat_get_local_beentry_by_index(index) }
}

/// What the caller's privileges say about each role, looked up once per read.
#[derive(Default)]
struct RoleCache(HashMap<pg_sys::Oid, RoleFacts>);

#[derive(Clone)]
struct RoleFacts {
    name: Option<String>,
    is_superuser: bool,
    may_signal: bool,
    may_see: bool,
}

impl RoleCache {
    fn get(&mut self, role: pg_sys::Oid) -> RoleFacts {
        self.0
            .entry(role)
            .or_insert_with(|| RoleFacts {
                name: role_name(role),
                is_superuser: signal::is_superuser_role(role),
                may_signal: signal::may_signal_role(role),
                may_see: signal::may_see_role(role),
            })
            .clone()
    }
}

fn session_of(entry: &Entry, next_xid: u32, roles: &mut RoleCache) -> Session {
    let e = &entry.status;
    // SAFETY: MyProcPid is set for the life of the backend.
    let my_pid = unsafe { pg_sys::MyProcPid };
    let role = roles.get(e.st_userid);
    Session {
        pid: e.st_procpid,
        backend_start: e.st_proc_start_timestamp,
        kind: kind_of(e.st_backendType, e.st_databaseid),
        database_oid: e.st_databaseid.to_u32(),
        role: role.name,
        application: c_string(e.st_appname).unwrap_or_default(),
        client: client_address(&e.st_clientaddr),
        state: state_of(e.st_state),
        state_change: e.st_state_start_timestamp,
        xact_start: e.st_xact_start_timestamp,
        query_start: e.st_activity_start_timestamp,
        is_own: e.st_procpid == my_pid,
        is_superuser: role.is_superuser,
        caller_may_signal: role.may_signal,
        blocking_since: 0,
        replay_held_since: 0,
        xmin: Xmin::read(entry.xmin, next_xid),
        xmin_since: 0,
    }
}

fn describe(entry: &Entry, next_xid: u32, roles: &mut RoleCache) -> Backend {
    let e = &entry.status;
    let session = session_of(entry, next_xid, roles);
    let datname = (e.st_databaseid != pg_sys::InvalidOid).then(|| database_name(e.st_databaseid)).flatten();
    Backend {
        datname,
        backend_type: backend_type_name(e),
        query: clipped_query(e.st_activity_raw),
        visible: roles.get(e.st_userid).may_see,
        xid: entry.xid,
        session,
    }
}

/// The name of a database; `None` if it no longer exists. Needs a transaction.
pub fn database_name(oid: pg_sys::Oid) -> Option<String> {
    // SAFETY: a lookup in the shared catalog pg_database; NULL when missing.
    c_string(unsafe { pg_sys::get_database_name(oid) })
}

fn kind_of(t: pg_sys::BackendType::Type, database: pg_sys::Oid) -> BackendKind {
    use pg_sys::BackendType::*;
    match t {
        B_BACKEND => BackendKind::Client,
        B_AUTOVAC_LAUNCHER | B_AUTOVAC_WORKER => BackendKind::Autovacuum,
        B_WAL_SENDER if database != pg_sys::InvalidOid => BackendKind::LogicalReplication,
        B_WAL_SENDER | B_WAL_RECEIVER => BackendKind::Replication,
        B_BG_WORKER => BackendKind::BackgroundWorker,
        _ => BackendKind::System,
    }
}

fn state_of(s: pg_sys::BackendState::Type) -> Option<State> {
    use pg_sys::BackendState::*;
    match s {
        STATE_RUNNING => Some(State::Active),
        STATE_IDLE => Some(State::Idle),
        STATE_IDLEINTRANSACTION => Some(State::IdleInTransaction),
        STATE_IDLEINTRANSACTION_ABORTED => Some(State::IdleInTransactionAborted),
        STATE_FASTPATH => Some(State::FastpathFunctionCall),
        STATE_DISABLED => Some(State::Disabled),
        _ => None,
    }
}

/// `pg_stat_activity.backend_type`: background workers show their own type.
fn backend_type_name(e: &pg_sys::PgBackendStatus) -> String {
    // SAFETY: both functions return static or NULL strings.
    unsafe {
        if e.st_backendType == pg_sys::BackendType::B_BG_WORKER {
            if let Some(name) = c_string(pg_sys::GetBackgroundWorkerTypeByPid(e.st_procpid)) {
                return name;
            }
        }
        c_string(pg_sys::GetBackendTypeDesc(e.st_backendType)).unwrap_or_default()
    }
}

pub(crate) fn role_name(role: pg_sys::Oid) -> Option<String> {
    if role == pg_sys::InvalidOid {
        return None;
    }
    // SAFETY: syscache lookup with noerr = true returns NULL for a dropped role.
    c_string(unsafe { pg_sys::GetUserNameFromId(role, true) })
}

fn clipped_query(raw: *const std::ffi::c_char) -> Option<String> {
    if raw.is_null() {
        return None;
    }
    // SAFETY: pgstat_clip_activity copies the raw (possibly cut mid-character) text into a
    // palloc'd, valid, NUL-terminated string.
    c_string(unsafe { pg_sys::pgstat_clip_activity(raw) })
}

fn client_address(addr: &pg_sys::SockAddr) -> Option<IpAddr> {
    let storage = &addr.addr;
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4 = unsafe { &*(storage as *const pg_sys::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6 = unsafe { &*(storage as *const pg_sys::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

pub(crate) fn c_string(p: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: callers pass NULL or a NUL-terminated string that outlives this call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Every process's interest in every lock, from one pass over the lock manager (what `pg_locks`
/// is built from). Members of a parallel query's lock group appear as their leader; a wait whose
/// start is not yet recorded counts as starting now.
pub fn locks() -> Vec<LockEntry> {
    let now = now();
    // SAFETY: GetLockStatusData copies the lock manager's state under its partition locks into
    // palloc'd memory: `nelements` entries at `locks`.
    let data = unsafe { &*pg_sys::GetLockStatusData() };
    let instances = if data.nelements > 0 {
        // SAFETY: see above; the copy lives until the end of the call.
        unsafe { std::slice::from_raw_parts(data.locks, data.nelements as usize) }
    } else {
        &[]
    };
    instances
        .iter()
        .map(|i| {
            let t = i.locktag;
            LockEntry {
                pid: if i.leaderPid != 0 { i.leaderPid } else { i.pid },
                tag: (
                    [t.locktag_field1, t.locktag_field2, t.locktag_field3],
                    t.locktag_field4,
                    t.locktag_type,
                    t.locktag_lockmethodid,
                ),
                held: (i.holdMask & 0xffff) as u16,
                waiting: (i.waitLockMode > 0 && i.waitLockMode <= i32::from(MAX_MODE))
                    .then_some((i.waitLockMode as u8, if i.waitStart == 0 { now } else { i.waitStart })),
            }
        })
        .collect()
}

/// Whether some process waits for a heavyweight lock right now: one look at each PGPROC's
/// `waitLock`, without the lock manager's locks. A wait that begins during the look may be
/// missed; the worker looks again before such a wait could have lasted any blocking limit.
pub fn any_lock_wait() -> bool {
    // SAFETY: ProcGlobal->allProcs is an array of allProcCount PGPROCs in shared memory for the
    // life of the server; waitLock is a pointer that its owner writes whole, read here only for
    // being NULL or not.
    unsafe {
        let global = &*pg_sys::ProcGlobal;
        (0..global.allProcCount as usize)
            .any(|i| !std::ptr::read_volatile(&raw const (*global.allProcs.add(i)).waitLock).is_null())
    }
}

/// For each session where a chain of lock waits begins (it holds up others and waits for no lock
/// itself), when the longest wait it causes began.
pub fn lock_chain_starts() -> HashMap<i32, Micros> {
    crate::lock_graph::chain_starts(&locks())
}

fn locktag(tag: &LockTag) -> pg_sys::LOCKTAG {
    let ([field1, field2, field3], field4, kind, method) = *tag;
    pg_sys::LOCKTAG {
        locktag_field1: field1,
        locktag_field2: field2,
        locktag_field3: field3,
        locktag_field4: field4,
        locktag_type: kind,
        locktag_lockmethodid: method,
    }
}

/// PostgreSQL's own words for a lock, as in its lock-wait messages: "relation 16384 of database
/// 5", "transaction 812", "advisory lock [5,1,2,1]".
pub fn lock_description(tag: &LockTag) -> String {
    let tag = locktag(tag);
    // SAFETY: a fresh StringInfo in the current memory context, filled by DescribeLockTag.
    unsafe {
        let buf = pg_sys::makeStringInfo();
        pg_sys::DescribeLockTag(buf, &tag);
        c_string((*buf).data).unwrap_or_default()
    }
}

/// The mode's name, e.g. "AccessExclusiveLock".
pub fn lock_mode_name(tag: &LockTag, mode: u8) -> String {
    // SAFETY: GetLockmodeName returns a static string for a valid method and mode.
    c_string(unsafe { pg_sys::GetLockmodeName(tag.3 as pg_sys::LOCKMETHODID, i32::from(mode)) })
        .unwrap_or_default()
}

/// The schema-qualified, quoted name of the relation a lock is on, when the relation belongs to
/// the current database (relations of other databases cannot be looked up from here).
pub fn locked_relation(tag: &LockTag) -> Option<String> {
    use pg_sys::LockTagType::*;
    let ([database, relation, _], _, kind, _) = *tag;
    let on_relation = [LOCKTAG_RELATION, LOCKTAG_RELATION_EXTEND, LOCKTAG_PAGE, LOCKTAG_TUPLE]
        .iter()
        .any(|k| *k as u8 == kind);
    // SAFETY: MyDatabaseId is set once connected to a database.
    if !on_relation || database != unsafe { pg_sys::MyDatabaseId }.to_u32() {
        return None;
    }
    let oid = pg_sys::Oid::from(relation);
    // SAFETY: syscache lookups; each returns NULL when the relation or schema is gone.
    unsafe {
        let name = pg_sys::get_rel_name(oid);
        let schema = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(oid));
        if name.is_null() || schema.is_null() {
            return None;
        }
        c_string(pg_sys::quote_qualified_identifier(schema, name))
    }
}
