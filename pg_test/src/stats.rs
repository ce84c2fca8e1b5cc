//! Small helpers shared by the benchmark programs.

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// "a, b, c" with each value rounded to whole milliseconds.
pub fn rounds(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ")
}

/// The server's version line, e.g. "postgres (PostgreSQL) 18.6".
pub fn server_version(server: &crate::Server) -> String {
    let out = server.client_program("postgres").arg("--version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `count` idle client sessions of `db` as `user`.
pub fn open_idle(server: &crate::Server, db: &str, user: &str, count: usize) -> Vec<postgres::Client> {
    (0..count)
        .map(|_| {
            let mut c = server.connect(db, user);
            c.simple_query("SELECT 1").unwrap();
            c
        })
        .collect()
}

/// Waits until the audit entries of earlier rounds are written (none queued, no sync worker
/// running), so each round measures its own work only.
pub fn settle(server: &crate::Server) {
    crate::wait_for(std::time::Duration::from_secs(30), || {
        server
            .admin()
            .query_one(
                "SELECT (SELECT audit_queued FROM session_kill.worker) = 0
                    AND NOT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'session_kill sync')",
                &[],
            )
            .unwrap()
            .get(0)
    });
}
