//! Loom model of the grace period's reader scan when a registered reader enters a section
//! with a counter it loaded *before* the grace period bumped it
//! (`RUSTFLAGS="--cfg loom" cargo test -p rcu --release --test loom_gp_scan`).
//!
//! Such a reader is outside when the grace period first scans it, so the scan clears its
//! `WAITING` flag; its word then looks like an old section. A scan that looked at it
//! again would wait for a wake-up it never sends: the grace period sleeps forever once
//! another pending reader (here the main thread) has woken it once. This deadlock was seen
//! in rcutorture (one updater asleep leading a grace period, everything else queued behind
//! it) and is what this model catches: with the scan rechecking readers it already found
//! outside, loom reports the deadlock; with liburcu's rule (a reader found outside is done
//! for this grace period) it passes.
//!
//! Without `--cfg loom` this file compiles to nothing.
#![cfg(loom)]

use loom::thread;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Runs `f` under loom with a preemption bound, printing how many executions it explored.
fn check(name: &str, preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(preemptions);
    }
    let executions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&executions);
    builder.check(move || {
        counted.fetch_add(1, Relaxed);
        f();
    });
    eprintln!(
        "loom model {name}: {} executions, preemption bound {:?}",
        executions.load(Relaxed),
        builder.preemption_bound
    );
}

/// Two readers pending in different ways while one grace period runs: the main thread in
/// a section that began before it, a second registered reader entering a section as it
/// starts. The grace period must end (no lost wake-up) whichever way they interleave.
#[test]
fn a_reader_entering_with_a_stale_counter_never_hangs_the_grace_period() {
    check(
        "a_reader_entering_with_a_stale_counter_never_hangs_the_grace_period",
        2,
        || {
            let outer = rcu::read_lock(); // registers main; pending for the grace period
            let second = thread::spawn(|| {
                drop(rcu::read_lock()); // registers
                let g = rcu::read_lock(); // races with the grace period's bump and scan
                drop(g);
            });
            let writer = thread::spawn(rcu::synchronize);
            drop(outer);
            second.join().unwrap();
            writer.join().unwrap();
            rcu::drain_call_rcu();
            rcu::shutdown_call_rcu_thread();
        },
    );
}
