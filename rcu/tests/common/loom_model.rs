//! What the loom models (loom.rs, loom_qsbr.rs) share: the runner with a preemption
//! bound, and the payload whose reads and "free" loom checks for causality (freeing
//! overwrites it with [`FREED`]; a reader that could still see it reports a causality
//! violation, and readers assert they saw an intact value).

use loom::cell::UnsafeCell;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// The value a payload holds once "freed".
pub const FREED: u64 = 0xdead;
/// The value before the writer's replacement.
pub const OLD: u64 = 1;
/// The value the writer puts in.
pub const NEW: u64 = 2;

/// Runs `f` under loom with a preemption bound (`LOOM_MAX_PREEMPTIONS` overrides it for
/// deeper runs), so each file stays fast, and prints how many executions loom explored
/// (`--nocapture` shows it).
pub fn check(name: &str, preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
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

/// Memory whose every read and write loom checks for causality.
pub struct Payload {
    value: UnsafeCell<u64>,
}

// SAFETY: every access goes through loom's UnsafeCell, which reports any two accesses not
// ordered by happens-before (one of them a write) as a data race: sharing is what the
// models test.
unsafe impl Sync for Payload {}

impl Payload {
    /// A payload holding `value`.
    pub fn new(value: u64) -> Arc<Payload> {
        Arc::new(Payload {
            value: UnsafeCell::new(value),
        })
    }

    /// Reads the payload, as a reader inside a section does.
    pub fn read(&self) -> u64 {
        // SAFETY: loom checks that this read is ordered with every write ("free").
        self.value.with(|p| unsafe { *p })
    }

    /// "Frees" the payload: poisons it, as reclamation would.
    pub fn free(&self) {
        // SAFETY: loom checks that this write is ordered after every read.
        self.value.with_mut(|p| unsafe { *p = FREED })
    }
}

/// Asserts a reader saw an intact value, never a freed one.
pub fn assert_intact(seen: u64, allowed: &[u64]) {
    assert!(
        allowed.contains(&seen),
        "reader saw {seen:#x}, expected one of {allowed:?} (0xdead = freed)"
    );
}

/// Ends a model: runs every queued callback and stops the call_rcu thread, so that the
/// model can end (loom waits for every thread it started).
pub fn drain_and_shutdown() {
    rcu::drain_call_rcu();
    rcu::shutdown_call_rcu_thread();
}
