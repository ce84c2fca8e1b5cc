//! Benchmark (not a test): what session_kill costs on every login. Prints a Markdown section.
//!
//! Logins: `pgbench -C -S` (a new connection for every read-only transaction, over the Unix
//! socket) against four clusters of the same installation, running side by side: one without
//! `shared_preload_libraries`; one with session_kill preloaded and no gate closed; one preloaded
//! with 64 gates closed (as many as the gate table holds, every one on another database, so each
//! login checks them all and is still admitted); and, as the floor, one preloading an empty C
//! library, which shows what preloading any library costs. Each
//! round runs against all four at the same time, one client each, so a change in the machine's
//! speed hits all four alike.
//!
//! Each cluster's postmaster is put in a control group of its own, which counts in nanoseconds the
//! CPU time of the postmaster and of every backend it forks.
//!
//! Wall-clock and CPU figures move with whatever else runs on the machine, so two counts that do
//! not are taken as well: the minor page faults of the backends that served the runs, and, with
//! each cluster restarted under valgrind's callgrind, the instructions each backend ran.

use session_kill_pg_test::stats::{
    load_average, max, median, min, proc_stat, server_version, settle, CpuGroup,
};
use session_kill_pg_test::{run_checked, wait_for_described, Server};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

/// Measured rounds per set-up (`SESSION_KILL_BENCH_ROUNDS` overrides it for a quick trial).
fn rounds() -> usize {
    std::env::var("SESSION_KILL_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30)
}
const RUN_SECS: u32 = 3;
const WARM_UP_SECS: u32 = 1;
const CLIENTS: u32 = 1;
const GATES: usize = 64;
/// Logins traced by callgrind per set-up.
const TRACED_LOGINS: usize = 12;

#[derive(Clone, Copy, PartialEq)]
enum SetUp {
    NotLoaded,
    Preloaded,
    GatesClosed,
    EmptyLibrary,
}

/// The empty library: all a library needs to be preloaded, and nothing else.
const EMPTY_LIBRARY: &str = "session_kill_bench_empty";
const EMPTY_LIBRARY_SOURCE: &str =
    "#include \"postgres.h\"\n#include \"fmgr.h\"\nPG_MODULE_MAGIC;\nvoid _PG_init(void);\nvoid _PG_init(void) {}\n";

impl SetUp {
    const ALL: [SetUp; 4] = [SetUp::NotLoaded, SetUp::Preloaded, SetUp::GatesClosed, SetUp::EmptyLibrary];

    fn name(self) -> String {
        match self {
            SetUp::NotLoaded => "without session_kill (`shared_preload_libraries = ''`)".to_owned(),
            SetUp::Preloaded => "`shared_preload_libraries = 'session_kill'`, no gate closed".to_owned(),
            SetUp::GatesClosed => format!("preloaded, {GATES} gates closed (other databases drained)"),
            SetUp::EmptyLibrary => format!(
                "an empty C library preloaded instead (`{EMPTY_LIBRARY}`: `PG_MODULE_MAGIC` and an empty `_PG_init`)"
            ),
        }
    }

    fn runs_the_worker(self) -> bool {
        matches!(self, SetUp::Preloaded | SetUp::GatesClosed)
    }
}

fn main() {
    let conf = ["max_connections = 200", "shared_buffers = '128MB'", "autovacuum = off"];
    let servers: Vec<Server> = SetUp::ALL.iter().map(|setup| prepare(Server::start(&conf), *setup)).collect();
    // Declared after the servers, so dropped before them: while their processes still run.
    let groups: Vec<CpuGroup> = (0..servers.len())
        .map(|k| CpuGroup::new(&format!("session_kill_bench_login_{}_{k}", std::process::id())))
        .collect();
    let version = server_version(&servers[0]);
    let load_start = load_average();
    let mut runs: Vec<Vec<Run>> = SetUp::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds() {
        // With one set-up on all four clusters, the postmaster restarted first (up longest when
        // the runs start) spent 5-8 % more CPU per connection than the others in one-off runs:
        // each set-up takes its turn at each place, in the restarts and in starting pgbench.
        let order: Vec<usize> = (0..servers.len()).map(|i| (i + round) % servers.len()).collect();
        for &k in &order {
            let (server, setup, group) = (&servers[k], SetUp::ALL[k], &groups[k]);
            // Each start lays out the postmaster's address space anew (ASLR), which moves the
            // page faults of every backend it forks: a restart per round averages that out.
            server.pg_ctl(&["-w", "-m", "fast", "restart", "-l", server.log_path().to_str().unwrap()]);
            group.adopt(server.postmaster_pid());
            if setup.runs_the_worker() {
                // The worker starts a sync at start-up: a child of the postmaster whose CPU would
                // count as the connections' if it exited during the run.
                wait_for_described(Duration::from_secs(30), "the worker's first sync", || {
                    server
                        .probe_one("SELECT rules_loaded_at IS NOT NULL FROM session_kill.worker", &[])
                        .get(0)
                });
                settle(server);
            }
        }
        all_at_once(&servers, &groups, &order, WARM_UP_SECS);
        for (k, run) in all_at_once(&servers, &groups, &order, RUN_SECS).into_iter().enumerate() {
            runs[k].push(run);
        }
    }
    let load_end = load_average();

    println!("### The cost on every login ({version})\n");
    println!(
        "`pgbench -n -C -S -c {CLIENTS} -j {CLIENTS} -T {RUN_SECS}` over the Unix socket (a new connection for every \
         read-only transaction; scale 1), {} rounds, against four clusters of the same installation (autovacuum \
         off), all four at the same time in each round, so that the machine's speed, which drifts by ±25 % \
         over minutes here, is the same for all four within a round. Before each round every postmaster is \
         restarted, in an order that rotates from round to round, as does the order in which the four pgbench \
         runs start (in one-off runs with one set-up on all four clusters, the postmaster restarted first, up \
         longest when the runs start, spent 5–8 % more CPU per connection than the others); then, once the \
         worker's start-up sync is done, all four are warmed up for {WARM_UP_SECS} s. Every start lays out the \
         address space anew (ASLR), which moved the page faults per connection by up to 45 between two starts \
         of one set-up. *Connections/s* is pgbench's tps, which with `-C` counts the connection and its authentication: \
         wall-clock. *Server CPU per connection* is the CPU \
         time of the postmaster and of every process it forked during the run (a control group of its own per \
         cluster, counted in nanoseconds: each fork, login, query and exit, and any work of session_kill's worker \
         then) divided by the connections pgbench made: what each login costs the server. The overhead is against the median without \
         session_kill; *paired* is the median over rounds of each round's change against the run without \
         session_kill in the same round. The empty library is the floor: what preloading any library \
         costs, whatever it does.\n",
        rounds()
    );
    println!("| set-up | metric | median | min | max | overhead (medians) | overhead (paired) | rounds |");
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for (k, setup) in SetUp::ALL.iter().enumerate() {
        for (metric, of, worse_when_higher) in [
            ("connections/s", (|r: &Run| r.tps) as fn(&Run) -> f64, false),
            ("server CPU per connection, µs", |r: &Run| r.cpu_per_connection_us, true),
            ("minor page faults per connection", |r: &Run| r.faults_per_connection, true),
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

    let counted: Vec<Instructions> = servers.iter().map(instructions).collect();
    println!("#### Instructions per login (callgrind)\n");
    println!(
        "Each cluster restarted under `valgrind --tool=callgrind` and sent {TRACED_LOGINS} logins \
         (`pgbench -n -C -S -c 1 -t {TRACED_LOGINS}`); medians over its backends of the instructions counted \
         inclusively in PostgreSQL's functions: `PostgresMain` (all a backend runs once it has read the startup \
         packet: authentication, session start-up, the query, exit), `ClientAuthentication` (where the gate's \
         hook runs) and `shmem_exit` (where a backend forgets its admission). Exact counts, which the machine's \
         load does not move; the kernel's part (fork, page faults, exit) is not in them, which is what the page \
         faults above show.\n"
    );
    println!("| set-up | `PostgresMain` | change | `ClientAuthentication` | `shmem_exit` | backends |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (setup, c) in SetUp::ALL.iter().zip(&counted) {
        let change = (c.backend - counted[0].backend) / counted[0].backend * 100.0;
        println!(
            "| {} | {:.0} | {change:+.2} % | {:.0} | {:.0} | {} |",
            setup.name(),
            c.backend,
            c.authentication,
            c.exit,
            c.backends
        );
    }
    println!();
    std::fs::remove_file(empty_library_path(&servers[0])).unwrap();
}

/// Puts a fresh server into `setup`: the pgbench database; no preload, or 64 gates closed.
fn prepare(server: Server, setup: SetUp) -> Server {
    let mut admin = server.admin();
    admin.batch_execute("CREATE DATABASE bench").unwrap();
    let out = server.client_program("pgbench").args(["-i", "-q", "-s", "1", "bench"]).output().unwrap();
    assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    match setup {
        SetUp::NotLoaded => preload_instead(&server, ""),
        SetUp::Preloaded => {}
        SetUp::EmptyLibrary => {
            install_empty_library(&server);
            preload_instead(&server, EMPTY_LIBRARY);
        }
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

/// Restarts `server` with `libraries` preloaded instead of session_kill ("": none).
fn preload_instead(server: &Server, libraries: &str) {
    // ALTER SYSTEM SET to '' would write the list "" (one library with an empty name).
    let statement = match libraries {
        "" => "ALTER SYSTEM RESET shared_preload_libraries".to_owned(),
        _ => format!("ALTER SYSTEM SET shared_preload_libraries = '{libraries}'"),
    };
    server.admin().batch_execute(&statement).unwrap();
    server.pg_ctl(&["-w", "-m", "fast", "restart", "-l", server.log_path().to_str().unwrap()]);
    let loaded: String = server.admin().query_one("SHOW shared_preload_libraries", &[]).unwrap().get(0);
    assert_eq!(loaded, libraries, "preloaded instead of session_kill");
}

fn pg_config(server: &Server, option: &str) -> String {
    let out = run_checked(Command::new(server.bindir.join("pg_config")).arg(option));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn empty_library_path(server: &Server) -> String {
    format!("{}/{EMPTY_LIBRARY}.so", pg_config(server, "--pkglibdir"))
}

/// Builds the empty library into the installation's library directory (removed at the end).
fn install_empty_library(server: &Server) {
    let source = server.datadir.with_extension("empty.c");
    std::fs::write(&source, EMPTY_LIBRARY_SOURCE).unwrap();
    run_checked(
        Command::new("cc")
            .args(["-O2", "-fPIC", "-shared", "-I"])
            .arg(pg_config(server, "--includedir-server"))
            .arg(&source)
            .args(["-o", &empty_library_path(server)]),
    );
}

struct Run {
    tps: f64,
    cpu_per_connection_us: f64,
    faults_per_connection: f64,
}

/// A pgbench run against every server at the same time, started in `order`: whatever else slows
/// the machine down slows all of them alike. The runs come back in the servers' order.
fn all_at_once(servers: &[Server], groups: &[CpuGroup], order: &[usize], secs: u32) -> Vec<Run> {
    thread::scope(|scope| {
        let mut runs: Vec<_> =
            order.iter().map(|&k| (k, scope.spawn(move || pgbench(&servers[k], &groups[k], secs)))).collect();
        runs.sort_by_key(|(k, _)| *k);
        runs.into_iter().map(|(_, run)| run.join().unwrap()).collect()
    })
}

/// One pgbench run: connections per second, and the server's CPU per connection.
fn pgbench(server: &Server, group: &CpuGroup, secs: u32) -> Run {
    let clients = CLIENTS.to_string();
    let (faults_before, cpu_before) = (reaped_faults(server), group.used_ns());
    let out = server
        .client_program("pgbench")
        .args(["-n", "-C", "-S", "-c", &clients, "-j", &clients, "-T", &secs.to_string(), "bench"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench: {text}{}", String::from_utf8_lossy(&out.stderr));
    // The last connections' backends may still be exiting.
    thread::sleep(Duration::from_millis(300));
    let (faults_after, cpu_after) = (reaped_faults(server), group.used_ns());
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
        cpu_per_connection_us: (cpu_after - cpu_before) as f64 / 1e3 / connections,
        faults_per_connection: (faults_after - faults_before) as f64 / connections,
    }
}

/// The minor page faults of the postmaster's children that have exited and been waited for:
/// every backend that served a connection and is gone.
fn reaped_faults(server: &Server) -> u64 {
    proc_stat(server.postmaster_pid())[8]
}

/// Medians over a set-up's traced backends.
struct Instructions {
    backend: f64,
    authentication: f64,
    exit: f64,
    backends: usize,
}

/// Restarts `server` under callgrind, makes `TRACED_LOGINS` logins, stops it (callgrind writes
/// each process's counts as it exits) and reads the backends' counts.
fn instructions(server: &Server) -> Instructions {
    let traces = server.datadir.join("callgrind");
    std::fs::create_dir_all(&traces).unwrap();
    let wrapper = server.datadir.join("postgres-under-callgrind");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec valgrind --tool=callgrind -q --callgrind-out-file={}/callgrind.%p {} \"$@\"\n",
            traces.display(),
            server.bindir.join("postgres").display()
        ),
    )
    .unwrap();
    run_checked(Command::new("chmod").arg("755").arg(&wrapper));
    run_checked(Command::new("chown").arg("postgres:").arg(&traces));
    let log = server.log_path();
    server.pg_ctl(&["-w", "-m", "fast", "stop"]);
    server.pg_ctl(&[
        "-w",
        "-t",
        "600",
        "-p",
        wrapper.to_str().unwrap(),
        "-l",
        log.to_str().unwrap(),
        "start",
    ]);
    let logins = TRACED_LOGINS.to_string();
    let out = server
        .client_program("pgbench")
        .args(["-n", "-C", "-S", "-c", "1", "-t", &logins, "bench"])
        .output()
        .unwrap();
    assert!(out.status.success(), "pgbench under callgrind: {}", String::from_utf8_lossy(&out.stderr));
    server.pg_ctl(&["-w", "-t", "600", "-m", "fast", "stop"]);
    // The postmaster removes its PID file before callgrind has written its own trace.
    wait_for_described(Duration::from_secs(60), "every traced process has exited", || {
        !Command::new("pgrep").arg("-f").arg(&traces).output().unwrap().status.success()
    });

    let (mut backend, mut authentication, mut exit) = (Vec::new(), Vec::new(), Vec::new());
    for trace in std::fs::read_dir(&traces).unwrap() {
        let counts = annotate(&trace.unwrap().path());
        // Only backends run PostgresMain; the postmaster and the other processes do not.
        if let Some(main) = counts("PostgresMain") {
            backend.push(main);
            authentication.push(counts("ClientAuthentication").unwrap_or(0.0));
            exit.push(counts("shmem_exit").unwrap_or(0.0));
        }
    }
    assert!(backend.len() >= TRACED_LOGINS, "{} traced backends for {TRACED_LOGINS} logins", backend.len());
    Instructions {
        backend: median(&backend),
        authentication: median(&authentication),
        exit: median(&exit),
        backends: backend.len(),
    }
}

/// A callgrind trace's inclusive instruction counts, by function name.
fn annotate(trace: &Path) -> impl Fn(&str) -> Option<f64> {
    let out = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=100"])
        .arg(trace)
        .output()
        .unwrap();
    assert!(out.status.success(), "callgrind_annotate: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "  3,286,349 ( 6.48%)  ???:PostgresMain [/usr/lib/postgresql/15/bin/postgres]"
    move |function: &str| {
        text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            let count = words.next()?.replace(',', "").parse::<f64>().ok()?;
            words.any(|w| w.rsplit_once(':').is_some_and(|(_, name)| name == function)).then_some(count)
        })
    }
}
