//! RCU must never hold up process exit: a program that returns from `main` with call_rcu
//! callbacks queued and readers running exits at once, and a reader thread that leaves its
//! section and exits while a grace period waits for it releases that grace period. Each scenario runs in a child
//! process (`rcu-exit-probe`), bounded by a timeout, so a hang fails the test instead of
//! hanging it.

mod common;

use common::{run_with_timeout, Outcome};
use std::process::Command;
use std::time::Duration;

/// Far beyond what either scenario needs (milliseconds); only a hang gets near it.
const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the probe, killing it (and failing) if it has not exited within TIMEOUT.
fn run_probe(scenario: &str) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rcu-exit-probe"));
    cmd.arg(scenario);
    run_with_timeout(cmd, TIMEOUT)
}

#[test]
fn returning_from_main_with_pending_callbacks_exits_zero() {
    let out = run_probe("pending-callbacks");
    assert!(out.status.success(), "{}", out.dump());
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
    assert!(out.status.success(), "{}", out.dump());
    // A thread that exits with its guard leaked aborts instead (tests/lifecycle.rs).
    let line = "probe: grace period ended after the reader exited";
    assert!(
        out.stdout.contains(line),
        "missing `{line}` in:\n{}",
        out.stdout
    );
}

#[test]
fn probe_refuses_an_unknown_scenario() {
    let out = run_probe("no-such-scenario");
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("no-such-scenario"), "{}", out.stderr);
}
