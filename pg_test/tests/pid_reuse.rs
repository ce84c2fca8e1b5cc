//! The attack of a login that reuses an admitted login's PID, in a test binary of its own: the PID
//! is reused on purpose, through /proc/sys/kernel/ns_last_pid, and any fork by a test running
//! beside it (cargo runs test binaries one after another) could take the PID first.

use session_kill_pg_test::*;
use std::thread;
use std::time::Duration;

/// Item 2: the admissions a drain remembers never lead it to signal another process that reused
/// an admitted login's PID.
#[test]
fn the_drain_never_signals_a_process_that_reused_an_admitted_pid() {
    let s = server();
    let drained = s.fresh_db("t_attack_pid_drained");
    let other = s.fresh_db("t_attack_pid_other");
    for _ in 0..20 {
        let pid = Session::idle(s.connect(&drained, APP)).pid;
        s.wait_until_gone(pid);
        // Set in the connecting thread, so that the postmaster's next fork gets the PID.
        let login = slow_login_after(s, &other, APP, 3, move || {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap()
        });
        thread::sleep(Duration::from_millis(1000));
        let reused =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("postgres"));
        if !reused {
            let _ = login.join();
            continue; // another process took the PID first: try again
        }
        s.admin()
            .query_one(
                &format!("SELECT * FROM session_kill.drain_database('{drained}', timeout => '5s')"),
                &[],
            )
            .unwrap();
        assert_eq!(
            login.join().unwrap(),
            Ok(()),
            "the login to another database that reused PID {pid} was signalled"
        );
        s.admin().execute("SELECT session_kill.undrain_database($1)", &[&drained]).unwrap();
        return;
    }
    panic!("could not get a login to reuse a PID in 20 attempts");
}
