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

/// What the worker uses of the CPU, and how many scans it makes, over `window`: once the
/// settings just reloaded are in force, earlier audit writes are done and the worker has settled
/// into its new schedule (2 s).
pub fn worker_cpu(server: &crate::Server, window: std::time::Duration) -> (CpuUse, u64) {
    settle(server);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let row = server.probe_one("SELECT pid, scans FROM session_kill.worker", &[]);
    let (pid, before): (i32, i64) = (row.get(0), row.get(1));
    let used = cpu_share(pid, || std::thread::sleep(window));
    let after: i64 = server.probe_one("SELECT scans FROM session_kill.worker", &[]).get(0);
    (used, (after - before) as u64)
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// What one process used of the CPU over a window.
pub struct CpuUse {
    /// Share of one core from utime + stime in /proc/<pid>/stat (clock ticks).
    pub ticks: f64,
    /// Share of one core from /proc/<pid>/schedstat (nanoseconds on CPU, not tick-sampled).
    pub exact: f64,
    /// Nanoseconds on CPU in the window.
    pub nanos: u64,
    /// Times the process was put on a CPU in the window (schedstat): its wake-ups, for a process
    /// that sleeps between short bursts.
    pub runs: u64,
}

/// The numeric fields of /proc/<pid>/stat after the command name, from `state` (index 0) on:
/// minflt is 7, cminflt 8, utime 11, stime 12, cutime 13, cstime 14 (see proc(5)).
pub fn proc_stat(pid: i32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')').unwrap().1.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect()
}

/// What process `pid` used of the CPU while `during` ran.
pub fn cpu_share(pid: i32, during: impl FnOnce()) -> CpuUse {
    let ticks = || -> u64 {
        let fields = proc_stat(pid);
        fields[11] + fields[12]
    };
    // "time on CPU (ns)  time waiting to run (ns)  times run"
    let schedstat = || -> (u64, u64) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).unwrap();
        let fields: Vec<u64> = stat.split_whitespace().map(|f| f.parse().unwrap()).collect();
        (fields[0], fields[2])
    };
    let (t0, (n0, r0), start) = (ticks(), schedstat(), std::time::Instant::now());
    during();
    let (t1, (n1, r1)) = (ticks(), schedstat());
    let secs = start.elapsed().as_secs_f64();
    CpuUse {
        ticks: (t1 - t0) as f64 / clock_ticks_per_second() / secs * 100.0,
        exact: (n1 - n0) as f64 / 1e9 / secs * 100.0,
        nanos: n1 - n0,
        runs: r1 - r0,
    }
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// The nearest-rank percentile `p` (0 < p ≤ 1) of `v`; NaN for no values.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((s.len() as f64 * p).ceil() as usize).clamp(1, s.len().max(1));
    s.get(rank - 1).copied().unwrap_or(f64::NAN)
}

/// A control group that counts, in nanoseconds, the CPU time of the processes put in it and of
/// all they fork afterwards, whether they still run or have exited: cgroup v1's `cpuacct.usage`
/// or cgroup v2's `usage_usec`. Needs root. Dropping it moves its processes back out and
/// removes it.
pub struct CpuGroup {
    dir: std::path::PathBuf,
    v1: bool,
}

impl CpuGroup {
    pub fn new(name: &str) -> CpuGroup {
        let v1_root = std::path::Path::new("/sys/fs/cgroup/cpuacct");
        let v2_root = std::path::Path::new("/sys/fs/cgroup");
        let (root, v1) = if v1_root.join("cpuacct.usage").exists() {
            (v1_root, true)
        } else if v2_root.join("cgroup.controllers").exists() {
            (v2_root, false)
        } else {
            panic!("neither cgroup v1's cpuacct nor cgroup v2 is mounted under /sys/fs/cgroup")
        };
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| {
            panic!("cannot create the control group {} (run as root): {e}", dir.display())
        });
        CpuGroup { dir, v1 }
    }

    /// Moves `pid` into the group; the processes it forks from now on start in it.
    pub fn adopt(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("cannot move {pid} into {}: {e}", self.dir.display()));
    }

    /// CPU time used in the group since it was made, in nanoseconds.
    pub fn used_ns(&self) -> u64 {
        if self.v1 {
            let usage = std::fs::read_to_string(self.dir.join("cpuacct.usage")).unwrap();
            usage.trim().parse().unwrap()
        } else {
            let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap();
            let usec = stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).unwrap();
            usec.trim().parse::<u64>().unwrap() * 1000
        }
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        let parent = self.dir.parent().unwrap().join("cgroup.procs");
        for pid in std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default().lines() {
            let _ = std::fs::write(&parent, pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
