//! Faults around the call_rcu thread: a lock handed to it that panics, is poisoned, or does
//! not run its batch; callbacks that panic with a payload whose drop panics, or leak a
//! read guard; and draining while holding the handed lock. Each must leave the thread
//! serving (every drain completes, every callback runs), or abort loudly, or panic
//! clearly — never hang.
//!
//! The handed lock and the call_rcu thread are process-wide, and the failure mode of a
//! regression is a hang: so every scenario runs in a child process (this very test binary,
//! running only that test, told so by an environment variable), bounded by a timeout.

mod common;

use common::{run_with_timeout, Outcome};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Set in a child to the name of the scenario it runs.
const CHILD: &str = "RCU_CALL_RCU_FAULTS_CHILD";

/// Far beyond what any scenario needs (milliseconds); only a hang gets near it.
const TIMEOUT: Duration = Duration::from_secs(20);

/// In the parent: runs test `name` alone in a child process and returns what it did. In
/// that child: runs `scenario` and returns None (the test then passes if it did not panic).
fn isolated(name: &str, scenario: impl FnOnce()) -> Option<Outcome> {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        scenario();
        return None;
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name);
    Some(run_with_timeout(cmd, TIMEOUT))
}

/// Asserts that the child's test passed and printed `report` on stderr.
fn assert_passed_reporting(out: &Outcome, report: &str) {
    assert!(out.status.success(), "{}", out.dump());
    assert!(
        out.stderr.contains(report),
        "no `{report}` in:\n{}",
        out.dump()
    );
}

/// Queues `n` callbacks counted in `ran`, and an RcuCell store and drop whose two values'
/// drops are counted in `freed`; drains; checks all of it happened.
fn queue_and_drain(n: usize, ran: &Arc<AtomicUsize>, freed: &Arc<AtomicUsize>) {
    let before = (ran.load(SeqCst), freed.load(SeqCst));
    for _ in 0..n {
        let ran = ran.clone();
        rcu::call_rcu(move || {
            ran.fetch_add(1, SeqCst);
        });
    }
    let cell = rcu::RcuCell::new(Freed(freed.clone()));
    cell.store(Freed(freed.clone()));
    drop(cell);
    rcu::drain_call_rcu();
    assert_eq!(ran.load(SeqCst), before.0 + n, "callbacks did not all run");
    assert_eq!(freed.load(SeqCst), before.1 + 2, "RcuCell values leaked");
}

/// Counts its drops.
struct Freed(Arc<AtomicUsize>);

impl Drop for Freed {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// A handed lock with a fault: what `hold_while` does around (or instead of) the batch.
#[derive(Clone, Copy)]
enum Fault {
    /// Its inner mutex is poisoned and it unwraps the lock result: it panics every time,
    /// before running the batch.
    Poisoned,
    /// It runs the batch, then panics.
    PanicsAfter,
    /// It returns without running the batch.
    SkipsBatch,
}

struct FaultyLock {
    fault: Fault,
    inner: Mutex<()>,
}

impl FaultyLock {
    fn new(fault: Fault) -> Arc<FaultyLock> {
        let lock = Arc::new(FaultyLock {
            fault,
            inner: Mutex::new(()),
        });
        if let Fault::Poisoned = fault {
            let l = lock.clone();
            let _ = std::thread::spawn(move || {
                let _held = l.inner.lock().unwrap();
                panic!("poisoning the batch lock's mutex on purpose");
            })
            .join();
            assert!(lock.inner.is_poisoned());
        }
        lock
    }
}

impl rcu::BatchLock for FaultyLock {
    fn hold_while(&self, batch: &mut dyn FnMut()) {
        match self.fault {
            Fault::Poisoned => {
                let _held = self.inner.lock().unwrap();
                batch();
            }
            Fault::PanicsAfter => {
                batch();
                panic!("the batch lock panics after its batch");
            }
            Fault::SkipsBatch => {}
        }
    }

    fn held_by_current_thread(&self) -> bool {
        false
    }
}

/// Hands `fault`'s lock to the call_rcu thread and drains three times: each drain must
/// complete, with every callback run and every stored value freed.
fn serve_through(fault: Fault) {
    rcu::set_call_rcu_lock(Some(FaultyLock::new(fault)));
    let (ran, freed) = (Arc::default(), Arc::default());
    for _ in 0..3 {
        queue_and_drain(50, &ran, &freed);
    }
}

#[test]
fn a_poisoned_batch_lock_leaves_the_call_rcu_thread_serving() {
    let Some(out) = isolated(
        "a_poisoned_batch_lock_leaves_the_call_rcu_thread_serving",
        || serve_through(Fault::Poisoned),
    ) else {
        return;
    };
    assert_passed_reporting(
        &out,
        "rcu: the lock handed to the call_rcu thread panicked while holding a batch",
    );
}

#[test]
fn a_batch_lock_panicking_after_its_batch_leaves_the_thread_serving() {
    let Some(out) = isolated(
        "a_batch_lock_panicking_after_its_batch_leaves_the_thread_serving",
        || serve_through(Fault::PanicsAfter),
    ) else {
        return;
    };
    assert_passed_reporting(&out, "the batch lock panics after its batch");
}

#[test]
fn a_batch_lock_that_skips_its_batch_still_gets_it_run() {
    let Some(out) = isolated(
        "a_batch_lock_that_skips_its_batch_still_gets_it_run",
        || serve_through(Fault::SkipsBatch),
    ) else {
        return;
    };
    assert_passed_reporting(
        &out,
        "rcu: the lock handed to the call_rcu thread returned without running its batch",
    );
}

/// A panic payload whose drop panics too.
struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("a panic payload that panics when dropped");
    }
}

#[test]
fn a_callback_panic_whose_payload_panics_on_drop_leaves_the_thread_serving() {
    let Some(out) = isolated(
        "a_callback_panic_whose_payload_panics_on_drop_leaves_the_thread_serving",
        || {
            let (ran, freed) = (Arc::default(), Arc::default());
            for _ in 0..3 {
                rcu::call_rcu(|| std::panic::panic_any(PanicsOnDrop));
                queue_and_drain(10, &ran, &freed);
            }
        },
    ) else {
        return;
    };
    assert!(out.status.success(), "{}", out.dump());
}

#[test]
fn a_callback_leaking_a_read_guard_aborts_loudly() {
    let Some(out) = isolated("a_callback_leaking_a_read_guard_aborts_loudly", || {
        rcu::call_rcu(|| std::mem::forget(rcu::read_lock()));
        rcu::drain_call_rcu();
        // No grace period can end now; the next batch's must not hang silently.
        rcu::call_rcu(|| {});
        rcu::drain_call_rcu();
        unreachable!("a grace period ended with a read section open forever");
    }) else {
        return;
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{}", out.dump());
    assert!(
        out.stderr
            .contains("left a read-side critical section open"),
        "{}",
        out.dump()
    );
}

#[test]
fn draining_while_holding_the_handed_big_lock_releases_it_around_the_wait() {
    let Some(out) = isolated(
        "draining_while_holding_the_handed_big_lock_releases_it_around_the_wait",
        || {
            let bql = Arc::new(rcu::BigLock::new());
            rcu::set_call_rcu_lock(Some(bql.clone()));
            let under_lock = Arc::new(AtomicUsize::new(0));
            let (ran, freed) = (Arc::default(), Arc::default());
            let held = bql.lock();
            for _ in 0..3 {
                let (lock, under_lock) = (bql.clone(), under_lock.clone());
                rcu::call_rcu(move || {
                    if lock.is_held_by_current_thread() {
                        under_lock.fetch_add(1, SeqCst);
                    }
                });
                // The drain releases the lock while it waits...
                queue_and_drain(5, &ran, &freed);
                // ...and takes it back before it returns.
                assert!(bql.is_held_by_current_thread());
            }
            assert_eq!(under_lock.load(SeqCst), 3, "callbacks ran without the lock");
            drop(held);
            // The guard's own release-around, for waits other than a drain.
            let mut held = bql.lock();
            held.unlocked(|| assert!(bql.try_lock().is_some()));
            assert!(bql.is_held_by_current_thread());
        },
    ) else {
        return;
    };
    assert!(out.status.success(), "{}", out.dump());
}

/// A handed lock that knows its holder but cannot be released by anyone but its guard.
struct PlainLock {
    holder: Mutex<Option<std::thread::ThreadId>>,
}

impl rcu::BatchLock for PlainLock {
    fn hold_while(&self, batch: &mut dyn FnMut()) {
        loop {
            let mut h = self.holder.lock().unwrap();
            if h.is_none() {
                *h = Some(std::thread::current().id());
                break;
            }
            drop(h);
            std::thread::yield_now();
        }
        batch();
        *self.holder.lock().unwrap() = None;
    }

    fn held_by_current_thread(&self) -> bool {
        *self.holder.lock().unwrap() == Some(std::thread::current().id())
    }
}

#[test]
fn draining_while_holding_a_handed_lock_that_cannot_release_panics_clearly() {
    let Some(out) = isolated(
        "draining_while_holding_a_handed_lock_that_cannot_release_panics_clearly",
        || {
            let lock = Arc::new(PlainLock {
                holder: Mutex::new(Some(std::thread::current().id())),
            });
            rcu::set_call_rcu_lock(Some(lock.clone()));
            rcu::call_rcu(|| {});
            let refused = std::panic::catch_unwind(rcu::drain_call_rcu);
            let panic = refused.expect_err("draining while holding the lock must panic");
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            assert!(message.contains("cannot be released"), "{message}");
            // Released, the queued callback runs and drains complete again.
            *lock.holder.lock().unwrap() = None;
            rcu::drain_call_rcu();
        },
    ) else {
        return;
    };
    assert!(out.status.success(), "{}", out.dump());
}
