//! `session_kill.horizon()`: who holds back the xmin horizon (and so vacuum), the oldest holder
//! of each kind, including what session_kill cannot end. Backends come from the backend status
//! array and their PGPROCs (`backends.rs`); prepared transactions and replication slots from
//! PostgreSQL's own `pg_prepared_xacts` and `pg_replication_slots`, which take the locks their
//! shared state needs.

use crate::args::interval;
use crate::backends::{self, Backend};
use crate::gucs;
use crate::policy::{escape, BackendKind, Micros, Session};
use crate::shmem;
use crate::sqltypes::Name;
use crate::xmin_hold::Xmin;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

/// One holder of the horizon.
struct Holder {
    kind: &'static str,
    pid: Option<i32>,
    name: Option<String>,
    datname: Option<String>,
    xmin: Xmin,
    held_for: Option<Micros>,
    can_end: bool,
    detail: String,
}

/// One row per kind of holder that holds back the horizon now, naming its oldest holder, oldest
/// first: `session` (client sessions, by the older of `backend_xmin` and `backend_xid`; the
/// caller's own session is left out), `prepared transaction`, `replication slot` (its `xmin`,
/// from a standby's `hot_standby_feedback`), `replication slot (catalog)` (its `catalog_xmin`,
/// which holds back vacuum of the system catalogs only), `walsender` (feedback of a standby
/// without a slot) and `other backend` (autovacuum, background workers). `held_for` is how
/// long the holder has held it where that can be known (NULL for slots and walsenders);
/// `can_end` says whether session_kill may end the holder. A session's details follow
/// `pg_stat_activity`'s visibility rules.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
fn horizon() -> TableIterator<
    'static,
    (
        name!(kind, String),
        name!(pid, Option<i32>),
        name!(name, Option<String>),
        name!(datname, Option<Name>),
        name!(xmin, pg_sys::TransactionId),
        name!(xmin_age, i32),
        name!(held_for, Option<Interval>),
        name!(can_end, bool),
        name!(detail, String),
    ),
> {
    crate::args::require_current_catalog();
    let now = backends::now();
    let next = backends::next_xid();
    let mut holders: Vec<Holder> = Vec::new();
    let sightings = shmem::sightings();
    let protections = gucs::protections(false);
    for mut b in backends::snapshot() {
        if b.session.is_own {
            continue;
        }
        b.session.xmin_since = sightings.held_since(&b.session);
        if let Some(h) = backend_holder(&b, next, now, &protections) {
            holders.push(h);
        }
    }
    holders.extend(prepared_transactions(next, now));
    holders.extend(replication_slots(next));
    holders.sort_by_key(|h| std::cmp::Reverse(h.xmin.age));
    let mut seen = Vec::new();
    holders.retain(|h| {
        let first = !seen.contains(&h.kind);
        seen.push(h.kind);
        first
    });
    TableIterator::new(holders.into_iter().map(|h| {
        (
            h.kind.to_owned(),
            h.pid,
            h.name,
            h.datname.map(Name),
            pg_sys::TransactionId::from(h.xmin.xid),
            h.xmin.age.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
            h.held_for.map(interval),
            h.can_end,
            h.detail,
        )
    }))
}

/// A backend that holds back the horizon by its xmin or its transaction ID, whichever is older.
fn backend_holder(
    b: &Backend,
    next: u32,
    now: Micros,
    protections: &crate::policy::Protections,
) -> Option<Holder> {
    let s = &b.session;
    let by_xid = Xmin::read(b.xid, next);
    let (xmin, what) = match (s.xmin, by_xid) {
        (Some(snapshot), Some(xid)) if xid.age > snapshot.age => (xid, "transaction ID"),
        (Some(snapshot), _) => (snapshot, "snapshot"),
        (None, Some(xid)) => (xid, "transaction ID"),
        (None, None) => return None,
    };
    let shown = b.visible;
    let held_for = match what {
        // An ID is assigned at the transaction's first write: at most as old as the transaction.
        "transaction ID" => s.xact_age(now),
        _ => s.xmin_held_for(now),
    }
    .filter(|_| shown);
    let kind = match s.kind {
        BackendKind::Client => "session",
        BackendKind::Replication | BackendKind::LogicalReplication => "walsender",
        _ => "other backend",
    };
    let mut detail = match (kind, what) {
        ("walsender", _) => format!(
            "hot_standby_feedback of standby \"{}\" without a replication slot",
            escape(&s.application)
        ),
        ("other backend", _) => format!("{} of {}", what, b.backend_type),
        (_, "snapshot") => "snapshot (backend_xmin)".to_owned(),
        _ => "transaction ID (backend_xid)".to_owned(),
    };
    if kind == "session" && shown {
        let state = s.state.map_or("starting", |st| st.label());
        detail.push_str(&format!(", {state}, application \"{}\"", escape(&s.application)));
    }
    // What the worker and kill_sessions may end: an unprotected client session, whoever asks.
    let protection = protections.protection(&Session { caller_may_signal: true, ..s.clone() });
    if let Some(p) = protection.filter(|_| kind == "session") {
        detail.push_str(&format!(", protected: {}", p.label()));
    }
    Some(Holder {
        kind,
        pid: Some(s.pid),
        name: s.role.clone(),
        datname: b.datname.clone(),
        xmin,
        held_for,
        can_end: kind == "session" && protection.is_none(),
        detail,
    })
}

fn prepared_transactions(next: u32, now: Micros) -> Vec<Holder> {
    let query = "SELECT transaction, gid, prepared, owner::pg_catalog.text, database::pg_catalog.text
                   FROM pg_catalog.pg_prepared_xacts";
    Spi::connect(|client| {
        let mut found = Vec::new();
        for row in client.select(query, None, &[])? {
            let Some(xid) = row.get::<pg_sys::TransactionId>(1)? else { continue };
            let Some(xmin) = Xmin::read(xid.into_inner(), next) else { continue };
            let gid = row.get::<String>(2)?.unwrap_or_default();
            let prepared = row.get::<TimestampWithTimeZone>(3)?.map(TimestampWithTimeZone::into_inner);
            let owner = row.get::<String>(4)?.unwrap_or_default();
            found.push(Holder {
                kind: "prepared transaction",
                pid: None,
                name: Some(gid.clone()),
                datname: row.get::<String>(5)?,
                xmin,
                held_for: prepared.map(|at| (now - at).max(0)),
                can_end: false,
                detail: format!(
                    "prepared by {}; ends with COMMIT PREPARED or ROLLBACK PREPARED '{}'",
                    escape(&owner),
                    escape(&gid.replace('\'', "''"))
                ),
            });
        }
        Ok::<_, pgrx::spi::SpiError>(found)
    })
    .unwrap_or_else(|e| error!("could not read pg_prepared_xacts: {e}"))
}

fn replication_slots(next: u32) -> Vec<Holder> {
    let query = "SELECT slot_name::pg_catalog.text, slot_type, database::pg_catalog.text, active_pid,
                        xmin, catalog_xmin
                   FROM pg_catalog.pg_replication_slots";
    Spi::connect(|client| {
        let mut found = Vec::new();
        for row in client.select(query, None, &[])? {
            let name = row.get::<String>(1)?.unwrap_or_default();
            let slot_type = row.get::<String>(2)?.unwrap_or_default();
            let datname = row.get::<String>(3)?;
            let active_pid = row.get::<i32>(4)?;
            let activity = match active_pid {
                Some(pid) => format!("active (pid {pid})"),
                None => "inactive".to_owned(),
            };
            let held = [
                (row.get::<pg_sys::TransactionId>(5)?, "replication slot", "xmin"),
                (row.get::<pg_sys::TransactionId>(6)?, "replication slot (catalog)", "catalog_xmin"),
            ];
            for (xid, kind, column) in held {
                let Some(xmin) = xid.and_then(|x| Xmin::read(x.into_inner(), next)) else { continue };
                found.push(Holder {
                    kind,
                    pid: active_pid,
                    name: Some(name.clone()),
                    datname: datname.clone(),
                    xmin,
                    held_for: None,
                    can_end: false,
                    detail: format!(
                        "{column} of {slot_type} slot, {activity}; pg_drop_replication_slot('{}') removes an unused slot",
                        escape(&name.replace('\'', "''"))
                    ),
                });
            }
        }
        Ok::<_, pgrx::spi::SpiError>(found)
    })
    .unwrap_or_else(|e| error!("could not read pg_replication_slots: {e}"))
}
