//! Benchmark (not a test): what session_kill costs on every login. Prints a Markdown section.
//!
//! Logins: `pgbench -C -S` (a new connection for every read-only transaction, over the Unix
//! socket) against three clusters of the same installation, running side by side: one without
//! `shared_preload_libraries`; one with session_kill preloaded and no gate closed; one preloaded
//! with 64 gates closed (as many as the gate table holds, every one on another database, so each
//! login checks them all and is still admitted). Short runs alternate between them, in an order
//! that rotates every round, so a change in the machine's load hits all three alike.

use session_kill_pg_test::stats::{
    clock_ticks_per_second, load_average, max, median, min, server_version, settle,
};
use session_kill_pg_test::Server;
use std::thread;
use std::time::Duration;

/// Measured rounds per set-up (`SESSION_KILL_BENCH_ROUNDS` overrides it for a quick trial).
fn rounds() -> usize {
    std::env::var("SESSION_KILL_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30)
}
const RUN_SECS: u32 = 3;
const WARM_UP_SECS: u32 = 2;
const CLIENTS: u32 = 2;
const GATES: usize = 64;

#[derive(Clone, Copy, PartialEq)]
enum SetUp {
    NotLoaded,
    Preloaded,
    GatesClosed,
}

impl SetUp {
    const ALL: [SetUp; 3] = [SetUp::NotLoaded, SetUp::Preloaded, SetUp::GatesClosed];

    fn name(self) -> String {
        match self {
            SetUp::NotLoaded => "without session_kill (`shared_preload_libraries = ''`)".to_owned(),
            SetUp::Preloaded => "`shared_preload_libraries = 'session_kill'`, no gate closed".to_owned(),
            SetUp::GatesClosed => format!("preloaded, {GATES} gates closed (other databases drained)"),
        }
    }
}

fn main() {
    let conf = ["max_connections = 200", "shared_buffers = '128MB'", "autovacuum = off"];
    let servers: Vec<Server> = SetUp::ALL.iter().map(|setup| prepare(Server::start(&conf), *setup)).collect();
    let version = server_version(&servers[0]);
    let load_start = load_average();
    for server in &servers {
        pgbench(server, WARM_UP_SECS);
    }

    let mut runs: Vec<Vec<Run>> = SetUp::ALL.iter().map(|_| Vec::new()).collect();
    // Round r runs the set-ups rotated by r, so none is always first after another.
    for round in 0..rounds() {
        for i in 0..SetUp::ALL.len() {
            let k = (i + round) % SetUp::ALL.len();
            runs[k].push(pgbench(&servers[k], RUN_SECS));
        }
    }
    let load_end = load_average();

    println!("### The cost on every login ({version})\n");
    println!(
        "`pgbench -n -C -S -c {CLIENTS} -j {CLIENTS} -T {RUN_SECS}` over the Unix socket (a new connection for every \
         read-only transaction; scale 1), in {} interleaved rounds per set-up, against three clusters of the same \
         installation running side by side (autovacuum off; each warmed up for {WARM_UP_SECS} s first); the \
         set-ups' order rotates every round. *Connections/s* is pgbench's tps, which with `-C` counts the connection and its authentication: \
         wall-clock, so it moves with whatever else runs on the machine. *Server CPU per connection* is the CPU \
         time of the backends that served the run (the postmaster's reaped children: `cutime + cstime` in \
         `/proc/<postmaster>/stat`, in clock ticks) divided by the connections pgbench made: what each login costs \
         the server, which other load on the machine barely moves. The overhead is against the median without \
         session_kill; *paired* is the median over rounds of each round's change against the run without \
         session_kill in the same round.\n",
        rounds()
    );
    println!("| set-up | metric | median | min | max | overhead (medians) | overhead (paired) | rounds |");
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for (k, setup) in SetUp::ALL.iter().enumerate() {
        for (metric, of, worse_when_higher) in [
            ("connections/s", (|r: &Run| r.tps) as fn(&Run) -> f64, false),
            ("server CPU per connection, µs", |r: &Run| r.cpu_per_connection_us, true),
        ] {
            let v: Vec<f64> = runs[k].iter().map(of).collect();
            let base: Vec<f64> = runs[0].iter().map(of).collect();
            let change =
                |x: f64, b: f64| if worse_when_higher { (x - b) / b * 100.0 } else { (b - x) / b * 100.0 };
            let (overhead, paired) = if k == 0 {
                ("—".to_owned(), "—".to_owned())
            } else {
                let paired: Vec<f64> = v.iter().zip(&base).map(|(x, b)| change(*x, *b)).collect();
                (format!("{:.1} %", change(median(&v), median(&base))), format!("{:.1} %", median(&paired)))
            };
            let all = v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
            println!(
                "| {} | {metric} | {:.0} | {:.0} | {:.0} | {overhead} | {paired} | {all} |",
                setup.name(),
                median(&v),
                min(&v),
                max(&v)
            );
        }
    }
    println!(
        "\nA positive overhead means fewer connections per second, or more CPU per connection, with session_kill. \
         Target: ≤ 2 %.\n"
    );

    println!(
        "\nLoad average (1, 5, 15 min) at the start: {load_start}; at the end: {load_end}. Other engineers' builds share these {} cores.\n",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
}

/// Puts a fresh server into `setup`: the pgbench database; no preload, or 64 gates closed.
fn prepare(server: Server, setup: SetUp) -> Server {
    let mut admin = server.admin();
    admin.batch_execute("CREATE DATABASE bench").unwrap();
    let out = server.client_program("pgbench").args(["-i", "-q", "-s", "1", "bench"]).output().unwrap();
    assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    match setup {
        SetUp::NotLoaded => {
            admin.batch_execute("ALTER SYSTEM RESET shared_preload_libraries").unwrap();
            server.pg_ctl(&["-w", "-m", "fast", "restart", "-l", server.log_path().to_str().unwrap()]);
            let mut admin = server.admin();
            let loaded: String = admin.query_one("SHOW shared_preload_libraries", &[]).unwrap().get(0);
            assert_eq!(loaded, "", "no library preloaded");
        }
        SetUp::Preloaded => {}
        SetUp::GatesClosed => {
            for i in 0..GATES {
                admin.batch_execute(&format!("CREATE DATABASE closed_{i:02}")).unwrap();
                admin
                    .batch_execute(&format!("SELECT FROM session_kill.drain_database('closed_{i:02}')"))
                    .unwrap();
            }
            let closed: i64 =
                admin.query_one("SELECT count(*) FROM session_kill.drains()", &[]).unwrap().get(0);
            assert_eq!(closed, GATES as i64, "every gate closed");
            // The drains' audit rows are written by a sync worker, a child of the postmaster
            // whose CPU would count as the connections' if it ran during a run.
            settle(&server);
        }
    }
    server
}

struct Run {
    tps: f64,
    cpu_per_connection_us: f64,
}

/// One pgbench run: connections per second, and the server's CPU per connection.
fn pgbench(server: &Server, secs: u32) -> Run {
    let clients = CLIENTS.to_string();
    let reaped_before = reaped_cpu_ticks(server);
    let out = server
        .client_program("pgbench")
        .args(["-n", "-C", "-S", "-c", &clients, "-j", &clients, "-T", &secs.to_string(), "bench"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench: {text}{}", String::from_utf8_lossy(&out.stderr));
    // The last connections' backends may still be exiting.
    thread::sleep(Duration::from_millis(300));
    let ticks = reaped_cpu_ticks(server) - reaped_before;
    let number = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split(['/', ' ']).find(|w| !w.is_empty()))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no \"{prefix}\" in pgbench's output: {text}"))
    };
    let connections = number("number of transactions actually processed: ");
    Run {
        tps: number("tps = "),
        cpu_per_connection_us: ticks as f64 / clock_ticks_per_second() * 1e6 / connections,
    }
}

/// CPU time (user + system, in clock ticks) of the postmaster's children that have exited and
/// been waited for: every backend that served a connection and is gone.
fn reaped_cpu_ticks(server: &Server) -> u64 {
    let pid = std::fs::read_to_string(server.datadir.join("postmaster.pid")).unwrap();
    let pid = pid.lines().next().unwrap().trim();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[13].parse::<u64>().unwrap() + fields[14].parse::<u64>().unwrap()
}
