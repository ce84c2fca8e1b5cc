//! The drain gates: which databases refuse new connections, and which logins were admitted
//! recently. Plain Rust with fixed-size arrays so the whole table can live in shared memory
//! (`drain.rs` puts it behind an LWLock); no pgrx types, covered by plain `#[test]`s.
//!
//! Gates are keyed by database name, because that is all a login has when it is checked, and
//! because a drained database that is dropped and re-created under the same name (a migration)
//! should stay closed until someone reopens it.

use crate::policy::Micros;

/// How many databases can be closed at once.
pub const MAX_GATES: usize = 64;
/// How many admitted logins are remembered. Each backend forgets its own admission when it exits,
/// so every remembered one names a live process, never another that reused its PID; when more
/// are connected, the oldest (long since started up) make room.
pub const RECENT_ADMISSIONS: usize = 1024;
/// A name as stored in shared memory: PostgreSQL's NAMEDATALEN, 63 bytes plus a NUL.
pub type DbName = crate::fixed::FixedText<64>;

/// One closed database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    pub datname: DbName,
    pub since: Micros,
    /// OID of the role that closed it.
    pub closed_by: u32,
    pub refused: u64,
    /// When it reopens by itself; 0 = only by undrain.
    pub reopen_at: Micros,
    pub allow_superusers: bool,
}

impl Gate {
    fn expired(&self, now: Micros) -> bool {
        self.reopen_at != 0 && now >= self.reopen_at
    }
}

/// A login the gate let in, as it was at authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub pid: i32,
    /// The backend's start time: with the PID, it names one process.
    pub started: Micros,
    pub datname: DbName,
    /// OID of the login's role.
    pub role: u32,
    pub superuser: bool,
}

/// What the authentication hook does with a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let in, remembered in this slot of the admissions ring until it exits.
    Admit(usize),
    Refuse(Gate),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateError {
    Full,
}

/// Every gate plus a ring of recent admissions.
#[derive(Clone, Copy)]
pub struct GateTable {
    gates: [Option<Gate>; MAX_GATES],
    recent: [Option<Admission>; RECENT_ADMISSIONS],
    next_recent: usize,
    /// Logins admitted since the server started.
    admissions: u64,
}

impl Default for GateTable {
    fn default() -> Self {
        GateTable {
            gates: [None; MAX_GATES],
            recent: [None; RECENT_ADMISSIONS],
            next_recent: 0,
            admissions: 0,
        }
    }
}

impl GateTable {
    /// Closes `datname`. Closing a closed gate updates its options but keeps its history.
    pub fn close(&mut self, gate: Gate, now: Micros) -> Result<Gate, GateError> {
        self.expire(now);
        if let Some(existing) = self.gates.iter_mut().flatten().find(|g| g.datname == gate.datname) {
            existing.reopen_at = gate.reopen_at;
            existing.allow_superusers = gate.allow_superusers;
            return Ok(*existing);
        }
        let slot = self.gates.iter_mut().find(|g| g.is_none()).ok_or(GateError::Full)?;
        *slot = Some(gate);
        Ok(gate)
    }

    /// Reopens `datname`; returns the gate it removed, if it was closed.
    pub fn open(&mut self, datname: &DbName, now: Micros) -> Option<Gate> {
        self.expire(now);
        let slot = self.gates.iter_mut().find(|g| g.is_some_and(|g| g.datname == *datname))?;
        slot.take()
    }

    pub fn find(&self, datname: &DbName, now: Micros) -> Option<Gate> {
        self.gates.iter().flatten().find(|g| g.datname == *datname && !g.expired(now)).copied()
    }

    /// The closed gates, oldest first.
    pub fn list(&self, now: Micros) -> Vec<Gate> {
        let mut gates: Vec<Gate> = self.gates.iter().flatten().filter(|g| !g.expired(now)).copied().collect();
        gates.sort_by_key(|g| g.since);
        gates
    }

    /// Decides on a login that passed authentication, counting refusals and remembering
    /// admissions.
    pub fn admit(&mut self, login: Admission, now: Micros) -> Verdict {
        self.expire(now);
        if let Some(gate) = self.gates.iter_mut().flatten().find(|g| g.datname == login.datname) {
            if !(gate.allow_superusers && login.superuser) {
                gate.refused += 1;
                return Verdict::Refuse(*gate);
            }
        }
        let free = (0..RECENT_ADMISSIONS)
            .map(|i| (self.next_recent + i) % RECENT_ADMISSIONS)
            .find(|&i| self.recent[i].is_none())
            .unwrap_or(self.next_recent);
        self.recent[free] = Some(login);
        self.next_recent = (free + 1) % RECENT_ADMISSIONS;
        self.admissions += 1;
        Verdict::Admit(free)
    }

    /// The backend `(pid, started)`, admitted into `slot`, is exiting: forget its admission,
    /// unless the ring has given that slot to another login since. Only the one slot is read,
    /// so an exit touches no other page of the table.
    pub fn exited(&mut self, slot: usize, pid: i32, started: Micros) {
        if let Some(admission) = self.recent.get_mut(slot) {
            if admission.is_some_and(|a| a.pid == pid && a.started == started) {
                *admission = None;
            }
        }
    }

    /// Is this login still remembered (and so still alive)?
    pub fn remembers(&self, login: &Admission) -> bool {
        self.recent.iter().flatten().any(|a| a == login)
    }

    pub fn admissions(&self) -> u64 {
        self.admissions
    }

    /// Live logins admitted to `datname`: some may still be starting up and not yet visible as
    /// sessions of it when a drain begins.
    pub fn admitted_to(&self, datname: &DbName) -> Vec<Admission> {
        self.recent.iter().flatten().filter(|a| a.datname == *datname).copied().collect()
    }

    fn expire(&mut self, now: Micros) {
        for slot in &mut self.gates {
            if slot.is_some_and(|g| g.expired(now)) {
                *slot = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(name: &str, since: Micros) -> Gate {
        Gate {
            datname: DbName::new(name),
            since,
            closed_by: 10,
            refused: 0,
            reopen_at: 0,
            allow_superusers: false,
        }
    }

    fn login(pid: i32, db: &str, superuser: bool) -> Admission {
        Admission { pid, started: 1000 + i64::from(pid), datname: DbName::new(db), role: 10, superuser }
    }

    fn admitted(verdict: Verdict) -> usize {
        match verdict {
            Verdict::Admit(slot) => slot,
            Verdict::Refuse(_) => panic!("refused"),
        }
    }

    #[test]
    fn an_exit_whose_slot_the_ring_gave_to_another_login_forgets_nothing() {
        let mut t = GateTable::default();
        let slot = admitted(t.admit(login(1, "shop", false), 1));
        for pid in 2..=RECENT_ADMISSIONS as i32 {
            t.admit(login(pid, "shop", false), 1);
        }
        let newest = login(5000, "shop", false);
        assert_eq!(admitted(t.admit(newest, 1)), slot, "the ring was full: the oldest slot is reused");
        t.exited(slot, 1, login(1, "shop", false).started);
        assert!(t.remembers(&newest), "login 1's exit leaves the login now in its slot alone");
        t.exited(slot, 5000, newest.started);
        assert!(!t.remembers(&newest));
    }

    fn pids(admissions: Vec<Admission>) -> Vec<i32> {
        admissions.iter().map(|a| a.pid).collect()
    }

    #[test]
    fn a_closed_database_refuses_and_counts_others_are_untouched() {
        let mut t = GateTable::default();
        t.close(gate("shop", 100), 100).unwrap();
        assert!(matches!(t.admit(login(1, "shop", false), 200), Verdict::Refuse(g) if g.refused == 1));
        assert!(matches!(t.admit(login(2, "shop", true), 200), Verdict::Refuse(g) if g.refused == 2));
        assert!(matches!(t.admit(login(3, "postgres", false), 200), Verdict::Admit(_)));
        assert_eq!(t.find(&DbName::new("shop"), 300).unwrap().refused, 2);
        assert_eq!(pids(t.admitted_to(&DbName::new("postgres"))), vec![3]);
        assert_eq!(t.admissions(), 1, "refused logins are not admissions");
        assert!(t.admitted_to(&DbName::new("shop")).is_empty());
    }

    #[test]
    fn superusers_pass_only_when_allowed() {
        let mut t = GateTable::default();
        t.close(Gate { allow_superusers: true, ..gate("shop", 1) }, 1).unwrap();
        assert!(matches!(t.admit(login(1, "shop", true), 2), Verdict::Admit(_)));
        assert!(matches!(t.admit(login(2, "shop", false), 2), Verdict::Refuse(_)));
    }

    #[test]
    fn reopening_and_expiry() {
        let mut t = GateTable::default();
        t.close(Gate { reopen_at: 50, ..gate("shop", 10) }, 10).unwrap();
        assert!(matches!(t.admit(login(1, "shop", false), 49), Verdict::Refuse(_)));
        assert!(matches!(t.admit(login(2, "shop", false), 50), Verdict::Admit(_)), "reopened by itself");
        assert!(t.list(50).is_empty());
        t.close(gate("shop", 60), 60).unwrap();
        assert!(t.open(&DbName::new("shop"), 70).is_some());
        assert!(t.open(&DbName::new("shop"), 70).is_none(), "already open");
        assert!(matches!(t.admit(login(3, "shop", false), 80), Verdict::Admit(_)));
    }

    #[test]
    fn closing_again_keeps_history_and_updates_options() {
        let mut t = GateTable::default();
        t.close(gate("shop", 10), 10).unwrap();
        t.admit(login(1, "shop", false), 11);
        let again = t.close(Gate { allow_superusers: true, ..gate("shop", 20) }, 20).unwrap();
        assert_eq!((again.since, again.refused, again.allow_superusers), (10, 1, true));
        assert_eq!(t.list(30).len(), 1);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = GateTable::default();
        for i in 0..MAX_GATES {
            t.close(gate(&format!("db{i}"), 1), 1).unwrap();
        }
        assert_eq!(t.close(gate("one_more", 1), 1), Err(GateError::Full));
        assert_eq!(t.list(2).len(), MAX_GATES);
    }

    #[test]
    fn admissions_ring_forgets_the_oldest() {
        let mut t = GateTable::default();
        for pid in 0..(RECENT_ADMISSIONS as i32 + 10) {
            t.admit(login(pid, "shop", false), 1);
        }
        let pids = pids(t.admitted_to(&DbName::new("shop")));
        assert_eq!(pids.len(), RECENT_ADMISSIONS);
        assert!(!pids.contains(&9) && pids.contains(&10) && pids.contains(&(RECENT_ADMISSIONS as i32 + 9)));
    }

    #[test]
    fn an_exited_login_is_forgotten_so_a_reused_pid_is_never_taken_for_it() {
        let mut t = GateTable::default();
        let first = login(42, "shop", false);
        let slot = admitted(t.admit(first, 1));
        assert!(t.remembers(&first));
        t.exited(slot, 42, first.started + 1);
        assert!(t.remembers(&first), "another process with the same PID exiting changes nothing");
        t.exited(slot, 42, first.started);
        assert!(!t.remembers(&first) && t.admitted_to(&DbName::new("shop")).is_empty());
        let reused = Admission { started: 9999, ..login(42, "postgres", false) };
        t.admit(reused, 2);
        assert!(t.admitted_to(&DbName::new("shop")).is_empty(), "the new PID 42 is not a login to shop");
        let mut first_of_many = 0;
        for pid in 0..RECENT_ADMISSIONS as i32 - 1 {
            let slot = admitted(t.admit(login(1000 + pid, "shop", false), 3));
            if pid == 0 {
                first_of_many = slot;
            }
        }
        t.exited(first_of_many, 1000, 1000 + 1000);
        t.admit(login(7, "shop", false), 4);
        assert!(t.remembers(&reused), "a slot freed by an exit is used before the oldest admission");
    }

    #[test]
    fn names_truncate_like_postgres() {
        let long = "x".repeat(70);
        assert_eq!(DbName::new(&long).as_str().len(), 63);
        let accented = format!("{}é", "a".repeat(62));
        assert_eq!(DbName::new(&accented).as_str(), "a".repeat(62), "never splits a character");
        assert_eq!(DbName::new("shop"), DbName::new("shop"));
        assert_ne!(DbName::new("shop"), DbName::new("Shop"));
    }
}
