//! Runs the `rcutorture` binary briefly in each barrier mode and each phase, and checks its
//! verdict, its summary line and the barrier mode it reports; also that it refuses bad
//! arguments and that it reports FAIL when grace periods are skipped.

mod common;

use common::{run_with_timeout, Outcome};
use std::process::Command;
use std::time::Duration;

/// A run asks for about a second; this only catches a hang.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The summary line, `rcutorture: PASS ...` or `rcutorture: FAIL ...`, and its numbers.
trait Summary {
    fn summary(&self) -> &str;
    fn summary_number(&self, key: &str) -> u64;
}

impl Summary for Outcome {
    fn summary(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }

    fn summary_number(&self, key: &str) -> u64 {
        let s = self.summary();
        let at = s
            .find(key)
            .unwrap_or_else(|| panic!("no `{key}` in summary `{s}`"));
        s[at + key.len()..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after `{key}` in `{s}`"))
    }
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rcutorture"));
    cmd.args(args).env_remove("RCU_NO_MEMBARRIER");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_with_timeout(cmd, TIMEOUT)
}

/// The mode the library picks here with no override: membarrier where the kernel offers
/// private expedited membarrier.
fn default_mode() -> &'static str {
    const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    // SAFETY: membarrier(2) with CMD_QUERY takes two integers and touches no user memory.
    let supported = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) };
    if supported >= 0 && supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0 {
        "membarrier"
    } else {
        "fences"
    }
}

/// Asserts a passing run in `mode`, with a clean stress phase when `stress` ran.
fn assert_pass(out: &Outcome, mode: &str) {
    assert!(out.status.success(), "{}", out.dump());
    let summary = out.summary();
    assert!(summary.starts_with("rcutorture: PASS "), "{}", out.dump());
    assert!(
        summary.contains(&format!(" mode={mode} ")),
        "asked for {mode}: {}",
        out.dump()
    );
    assert!(
        out.stdout
            .lines()
            .next()
            .is_some_and(|l| l.contains(&format!("barrier mode: {mode} "))),
        "{}",
        out.dump()
    );
    assert_eq!(out.summary_number("mberror="), 0, "{}", out.dump());
    assert_eq!(out.summary_number("ages>=2:"), 0, "{}", out.dump());
    assert!(out.summary_number("reads=") > 0, "{}", out.dump());
    assert!(out.summary_number("updates=") > 0, "{}", out.dump());
}

const SHORT: &[&str] = &["--seconds", "1.2", "--readers", "2", "--updaters", "2"];

#[test]
fn all_phases_pass_with_default_barriers() {
    let out = run(SHORT, &[]);
    assert_pass(&out, default_mode());
    for phase in ["rperf:", "uperf:", "perf:", "stress:", "list:"] {
        assert!(
            out.stdout.contains(phase),
            "no {phase} output\n{}",
            out.dump()
        );
    }
}

#[test]
fn all_phases_pass_without_membarrier() {
    let out = run(SHORT, &[("RCU_NO_MEMBARRIER", "1")]);
    assert_pass(&out, "fences");
}

#[test]
fn all_phases_pass_with_fences_flag() {
    let mut args = SHORT.to_vec();
    args.push("--fences");
    let out = run(&args, &[]);
    assert_pass(&out, "fences");
}

#[test]
fn list_phase_reclaims_every_removed_node() {
    let out = run(
        &[
            "--mode",
            "list",
            "--seconds",
            "1",
            "--readers",
            "3",
            "--updaters",
            "2",
        ],
        &[],
    );
    assert_pass(&out, default_mode());
    let removed = out.summary_number("removed=");
    let reclaimed = out.summary_number("reclaimed=");
    assert!(removed > 0, "{}", out.dump());
    assert_eq!(removed, reclaimed, "{}", out.dump());
    assert!(!out.stdout.contains("stress:"), "{}", out.dump());
}

#[test]
fn skipped_grace_periods_are_reported_as_failure() {
    let out = run(
        &[
            "--mode",
            "stress",
            "--seconds",
            "1",
            "--inject-missing-sync",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.dump());
    assert!(
        out.summary().starts_with("rcutorture: FAIL "),
        "{}",
        out.dump()
    );
    assert!(out.summary_number("ages>=2:") > 0, "{}", out.dump());
}

#[test]
fn bad_arguments_are_refused() {
    let cases: &[(&[&str], &str)] = &[
        (&["--readers", "0"], "0"),
        (&["--updaters", "0"], "0"),
        (&["--readers", "many"], "many"),
        (&["--seconds", "0"], "0"),
        (&["--seconds", "-1"], "-1"),
        (&["--seconds", "soon"], "soon"),
        (&["--mode", "bogus"], "bogus"),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (args, bad) in cases {
        let out = run(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.dump());
        assert!(out.stderr.contains(bad), "{args:?}: {}", out.dump());
        assert!(
            !out.stdout.contains("rcutorture: PASS"),
            "{args:?}: {}",
            out.dump()
        );
    }
}
