//! `session_kill.blockers()`: the sessions that hold up others in the lock manager, with
//! everyone they hold up, from one pass over it (see `lock_graph.rs`).

use crate::args::{database_oid, interval};
use crate::backends::{self, Backend};
use crate::gucs;
use crate::lock_graph;
use crate::sqltypes::Name;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use std::collections::HashMap;

/// One row per session that holds a lock, or queues ahead for one, while another session waits
/// for it (all databases when `db` is NULL). `blocked_pids` are the sessions it holds up
/// directly, `all_blocked_pids` those it holds up directly or through others; `longest_wait` is
/// how long the longest-waiting of those has waited. `lock` and `mode` name the lock on which it
/// holds up the longest-waiting session it blocks directly; `granted` says whether it holds that
/// lock or only queues ahead for it. Details of sessions the caller may not see (as in
/// `pg_stat_activity`) are NULL.
#[pg_extern(volatile, parallel_restricted)]
#[allow(clippy::type_complexity)]
fn blockers(
    db: default!(Option<Name>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(datname, Option<Name>),
        name!(usename, Option<Name>),
        name!(application_name, Option<String>),
        name!(state, Option<String>),
        name!(lock, String),
        name!(relation, Option<String>),
        name!(mode, String),
        name!(granted, bool),
        name!(blocked_pids, Vec<i32>),
        name!(all_blocked_pids, Vec<i32>),
        name!(longest_wait, Interval),
        name!(protected, Option<String>),
    ),
> {
    crate::args::require_current_catalog();
    let scope = db.map(|name| database_oid(&name.0));
    let found = lock_graph::blockers(&backends::locks());
    let backends: HashMap<i32, Backend> =
        backends::snapshot().into_iter().map(|b| (b.session.pid, b)).collect();
    let protections = gucs::protections(false);
    let now = backends::now();
    let rows: Vec<_> = found
        .into_iter()
        .filter_map(|blocker| {
            let backend = backends.get(&blocker.pid)?;
            if scope.is_some_and(|oid| backend.session.database_oid != oid) {
                return None;
            }
            let s = &backend.session;
            let shown = backend.visible;
            Some((
                blocker.pid,
                backend.datname.clone().map(Name),
                s.role.clone().map(Name),
                Some(s.application.clone()),
                s.state.filter(|_| shown).map(|st| st.label().to_owned()),
                backends::lock_description(&blocker.tag),
                backends::locked_relation(&blocker.tag),
                backends::lock_mode_name(&blocker.tag, blocker.mode),
                blocker.holds,
                blocker.blocked,
                blocker.all_blocked,
                interval((now - blocker.waiting_since).max(0)),
                protections.protection(s).map(|p| p.label().to_owned()),
            ))
        })
        .collect();
    TableIterator::new(rows)
}
