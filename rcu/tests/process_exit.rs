//! RCU must never hold up process exit: a program that returns from `main` with call_rcu
//! callbacks queued and readers running exits at once, and a reader thread that exits while
//! a grace period waits for it releases that grace period. Each scenario runs in a child
//! process (`rcu-exit-probe`), bounded by a timeout, so a hang fails the test instead of
//! hanging it.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Far beyond what either scenario needs (milliseconds); only a hang gets near it.
const TIMEOUT: Duration = Duration::from_secs(20);

struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the probe, killing it (and failing) if it has not exited within TIMEOUT.
fn run_probe(scenario: &str) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rcu-exit-probe"))
        .arg(scenario)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("rcu-exit-probe {scenario} did not exit within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Outcome {
        status,
        stdout,
        stderr,
    }
}

#[test]
fn returning_from_main_with_pending_callbacks_exits_zero() {
    let out = run_probe("pending-callbacks");
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    // The callbacks that could run did run, chained ones included...
    assert!(
        out.stdout.contains("probe: 1100 callbacks ran"),
        "{}",
        out.stdout
    );
    // ...and main really returned with work still queued.
    let pending: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("probe: returning from main with "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pending count in:\n{}", out.stdout));
    assert!(pending >= 5000, "only {pending} callbacks pending at exit");
}

#[test]
fn reader_thread_exiting_during_a_grace_period_releases_it() {
    let out = run_probe("thread-exit");
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    for leaked in ["false", "true"] {
        let line =
            format!("probe: grace period ended after the reader exited (guard leaked: {leaked})");
        assert!(
            out.stdout.contains(&line),
            "missing `{line}` in:\n{}",
            out.stdout
        );
    }
}

#[test]
fn probe_refuses_an_unknown_scenario() {
    let out = run_probe("no-such-scenario");
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("no-such-scenario"), "{}", out.stderr);
}
