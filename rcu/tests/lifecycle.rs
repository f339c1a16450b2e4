//! Read sections against the ends of a thread's life and against `fork` (issue 10, rcu
//! points 1, 2 and 6). Each scenario runs in a child process (`rcu-exit-probe`), bounded by
//! a timeout: some must abort the process, some would hang it if broken, and all of them
//! look at process-wide state (the registry of readers, the call_rcu thread).
//!
//! - A thread that exits with a read section open (a leaked guard, from its body or from a
//!   late thread-local destructor) aborts the process with a message saying so: neither a
//!   silent use-after-free nor a registry entry pointing at a dead thread's storage.
//! - A guard held by a thread-local that is destroyed late in the thread's exit keeps its
//!   section: a grace period started meanwhile waits for it, the value read under it stays
//!   valid, and a section after it works (the nesting depth is intact).
//! - Sections that start in thread-exit destructors work and leave no registration behind.
//! - After `fork`, the child's synchronize, call_rcu and drain_call_rcu complete, and the
//!   callbacks pending at the fork run there, even when the parent had readers inside
//!   sections and a grace period in progress.

mod common;

use common::{run_with_timeout, Outcome};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

/// Far beyond what any scenario needs (the probe bounds its own waits at 10 s); only a
/// hang gets near it.
const TIMEOUT: Duration = Duration::from_secs(40);

/// The start of the library's message for a thread that ends inside a section.
const LEAK_MESSAGE: &str = "exited inside an RCU read-side critical section";

fn run_probe(scenario: &str) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rcu-exit-probe"));
    cmd.arg(scenario);
    run_with_timeout(cmd, TIMEOUT)
}

/// The probe must have been aborted by the library, naming the thread.
fn assert_aborted_for_leak(out: &Outcome, thread: &str) {
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "expected an abort; {}",
        out.dump()
    );
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains(LEAK_MESSAGE))
        .unwrap_or_else(|| panic!("no `{LEAK_MESSAGE}` message; {}", out.dump()));
    assert!(
        line.starts_with("rcu: thread ") && line.contains(thread) && line.contains("leaked"),
        "unclear message: {line}"
    );
}

#[test]
fn a_thread_exiting_with_a_leaked_guard_aborts_with_a_clear_message() {
    let out = run_probe("leaked-guard-exit");
    assert_aborted_for_leak(&out, "leaky-reader");
}

#[test]
fn a_guard_leaked_in_a_late_thread_local_destructor_aborts_with_a_clear_message() {
    let out = run_probe("late-tls-leak");
    assert_aborted_for_leak(&out, "late-leaker");
}

#[test]
fn a_guard_held_by_a_late_thread_local_keeps_its_section_and_the_depth_intact() {
    let out = run_probe("guard-in-tls");
    assert!(out.status.success(), "{}", out.dump());
    assert!(
        out.stdout
            .contains("probe: a guard dropped by a late thread-local destructor held its"),
        "{}",
        out.dump()
    );
}

#[test]
fn sections_starting_in_thread_exit_destructors_work_and_unregister() {
    let out = run_probe("late-tls-section");
    assert!(out.status.success(), "{}", out.dump());
    assert!(
        out.stdout
            .contains("probe: sections started in thread-exit destructors work"),
        "{}",
        out.dump()
    );
}

#[test]
fn a_fork_child_completes_grace_periods_and_drains() {
    let out = run_probe("fork-idle");
    assert!(out.status.success(), "{}", out.dump());
    assert!(
        out.stdout.contains("probe: fork child ran synchronize"),
        "{}",
        out.dump()
    );
}

#[test]
fn a_fork_amid_readers_and_pending_callbacks_leaves_a_working_child() {
    let out = run_probe("fork-busy");
    assert!(out.status.success(), "{}", out.dump());
    assert!(
        out.stdout
            .contains("probe: fork child completed grace periods and ran the pending"),
        "{}",
        out.dump()
    );
}
