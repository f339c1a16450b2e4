//! Runs `rcutorture --qsbr` (readers are quiescent-state readers reporting every N reads)
//! briefly in each barrier mode, and checks its verdict and counts; also that skipped grace
//! periods are caught with QSBR readers too. The memb-reader runs are in torture.rs.

mod common;

use common::{run_with_timeout, Outcome};
use std::process::Command;
use std::time::Duration;

/// A run asks for about a second; this only catches a hang.
const TIMEOUT: Duration = Duration::from_secs(60);

fn run(args: &[&str], envs: &[(&str, &str)]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rcutorture"));
    cmd.arg("--qsbr").args(args).env_remove("RCU_NO_MEMBARRIER");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_with_timeout(cmd, TIMEOUT)
}

/// The number after `key` in the summary (last) line.
fn summary_number(out: &Outcome, key: &str) -> u64 {
    let s = out.stdout.lines().last().unwrap_or("");
    let at = s
        .find(key)
        .unwrap_or_else(|| panic!("no `{key}` in summary `{s}`"));
    s[at + key.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after `{key}` in `{s}`"))
}

fn assert_pass(out: &Outcome) {
    assert!(out.status.success(), "{}", out.dump());
    let summary = out.stdout.lines().last().unwrap_or("");
    assert!(summary.starts_with("rcutorture: PASS "), "{}", out.dump());
    assert!(summary.ends_with(" readers=qsbr"), "{}", out.dump());
    assert!(
        out.stdout
            .lines()
            .next()
            .is_some_and(|l| l.contains("(qsbr)")),
        "{}",
        out.dump()
    );
    assert_eq!(summary_number(out, "mberror="), 0, "{}", out.dump());
    assert_eq!(summary_number(out, "ages>=2:"), 0, "{}", out.dump());
    assert!(summary_number(out, "reads=") > 0, "{}", out.dump());
    assert!(summary_number(out, "updates=") > 0, "{}", out.dump());
}

const SHORT: &[&str] = &["--seconds", "1.2", "--readers", "2", "--updaters", "2"];

#[test]
fn all_phases_pass_with_qsbr_readers() {
    let out = run(SHORT, &[]);
    assert_pass(&out);
    for phase in ["rperf:", "uperf:", "perf:", "stress:", "list:"] {
        assert!(out.stdout.contains(phase), "no {phase}\n{}", out.dump());
    }
    let removed = summary_number(&out, "removed=");
    assert_eq!(
        removed,
        summary_number(&out, "reclaimed="),
        "{}",
        out.dump()
    );
}

#[test]
fn qsbr_stress_passes_with_fences_and_a_quiescent_state_every_read() {
    let mut args = SHORT.to_vec();
    args.extend(["--mode", "stress", "--qs-every", "1"]);
    let out = run(&args, &[("RCU_NO_MEMBARRIER", "1")]);
    assert_pass(&out);
    assert!(out.stdout.contains("mode=fences"), "{}", out.dump());
}

#[test]
fn qsbr_stress_passes_with_rare_quiescent_states() {
    let mut args = SHORT.to_vec();
    args.extend(["--mode", "stress", "--qs-every", "5000"]);
    assert_pass(&run(&args, &[]));
}

#[test]
fn skipped_grace_periods_are_caught_with_qsbr_readers() {
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
    assert!(summary_number(&out, "ages>=2:") > 0, "{}", out.dump());
}

#[test]
fn a_zero_quiescent_state_period_is_refused() {
    let out = run(&["--qs-every", "0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", out.dump());
}
