//! Loom models of quiescent-state readers ([`rcu::QsbrReader`]), in the style of loom.rs
//! (`RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom cargo test -p rcu --release --test
//! loom_qsbr`): a payload behind an RCU pointer is read through a loom `UnsafeCell`, and
//! "freeing" it overwrites it with [`FREED`]; if reclamation could overlap a read that may
//! still see the payload, loom reports a causality violation, and readers also assert they
//! saw an intact value. A grace period that could wait forever shows as a loom deadlock.
//!
//! The models were checked against deliberately broken algorithms (each then reverted;
//! the list is in the closing report of the change and in each model's doc):
//! - a quiescent state whose store is relaxed instead of release fails the
//!   `online_reader_keeps_old_value_until_quiescent_state` model (causality);
//! - going offline without storing 0 fails `offline_reader_does_not_block` (deadlock);
//! - coming online without the reader's barrier fails
//!   `reader_coming_online_during_a_grace_period` (causality);
//! - a grace-period scan that skips QSBR slots fails the online and mixed models;
//! - a quiescent state that does not check its WAITING mark (no wake-up) fails
//!   `quiescent_states_wake_the_grace_period` (the writer sleeps forever);
//! - a grace period that sleeps without re-marking pending readers whose WAITING mark is
//!   gone (grace.rs step 5) fails the mixed model (deadlock: the `read_lock` reader began
//!   its section with a counter loaded before the bump, after the first scan had found it
//!   outside and cleared its mark).
//!
//! Without `--cfg loom` this file compiles to nothing.
#![cfg(loom)]

#[path = "common/loom_model.rs"]
mod loom_model;

use loom::sync::atomic::AtomicBool;
use loom::sync::Notify;
use loom::thread;
use loom_model::{assert_intact, check, drain_and_shutdown, Payload, NEW, OLD};
use rcu::{QsbrReader, RcuCell};
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::Arc;

/// Preemption bounds (`LOOM_MAX_PREEMPTIONS` overrides them): 3 for two threads, 2 for the
/// three-thread mixed model.
const PREEMPTIONS_SMALL: usize = 3;
const PREEMPTIONS_MIXED: usize = 2;

/// Replaces the cell's payload with NEW, waits for a grace period and frees the old one.
fn replace_synchronize_free(cell: &RcuCell<Arc<Payload>>) {
    cell.replace(Payload::new(NEW)).synchronize().free();
}

/// An online reader that read the old value keeps it, across the writer's whole
/// `synchronize`, until its quiescent state; what it reads after is intact too.
///
/// Catches: a relaxed quiescent-state store (causality: the free is not ordered after
/// the reads), a scan that skips QSBR slots (causality), a quiescent state that does not
/// look for its WAITING mark (deadlock: the sleeping grace period is never woken).
#[test]
fn online_reader_keeps_old_value_until_quiescent_state() {
    check(
        "online_reader_keeps_old_value_until_quiescent_state",
        PREEMPTIONS_SMALL,
        || {
            let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
            let mut r = QsbrReader::register();
            let writer = {
                let cell = Arc::clone(&cell);
                thread::spawn(move || replace_synchronize_free(&cell))
            };
            let payload = cell.load(&r);
            let seen = payload.read();
            assert_intact(seen, &[OLD, NEW]);
            // Linger between quiescent states: the writer may run its grace period now.
            thread::yield_now();
            assert_eq!(
                payload.read(),
                seen,
                "a payload changed under an online reader"
            );
            r.quiescent_state();
            assert_intact(cell.load(&r).read(), &[OLD, NEW]);
            r.quiescent_state();
            drop(r);
            writer.join().unwrap();
            drop(cell);
            drain_and_shutdown();
        },
    );
}

/// A reader that stays online, reporting quiescent states until the writer's grace
/// period is over, wakes that grace period (nothing else would: it never goes offline nor
/// unregisters meanwhile); afterwards it reads the new value.
///
/// Catches: a quiescent state that does not look for its WAITING mark (the writer sleeps
/// forever while the reader spins: loom's branch limit).
#[test]
fn quiescent_states_wake_the_grace_period() {
    check(
        "quiescent_states_wake_the_grace_period",
        PREEMPTIONS_SMALL,
        || {
            let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
            let done = Arc::new(AtomicBool::new(false));
            let mut r = QsbrReader::register();
            let writer = {
                let (cell, done) = (Arc::clone(&cell), Arc::clone(&done));
                thread::spawn(move || {
                    replace_synchronize_free(&cell);
                    done.store(true, Release);
                })
            };
            assert_intact(cell.load(&r).read(), &[OLD, NEW]);
            while !done.load(Acquire) {
                r.quiescent_state();
                thread::yield_now();
            }
            assert_eq!(cell.load(&r).read(), NEW, "after the grace period");
            drop(r);
            writer.join().unwrap();
            drop(cell);
            drain_and_shutdown();
        },
    );
}

/// A reader that is offline (blocked, as in KVM_RUN) is not waited for: the writer's
/// grace period ends while the reader waits for it to end. Back online, the reader sees
/// the new value.
///
/// Catches: going offline without storing 0 (deadlock).
#[test]
fn offline_reader_does_not_block() {
    check("offline_reader_does_not_block", PREEMPTIONS_SMALL, || {
        let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
        let synced = Arc::new(Notify::new());
        let reader = {
            let (cell, synced) = (Arc::clone(&cell), Arc::clone(&synced));
            thread::spawn(move || {
                let mut r = QsbrReader::register();
                assert_intact(cell.load(&r).read(), &[OLD, NEW]);
                r.offline_scope(|| synced.wait());
                assert_eq!(cell.load(&r).read(), NEW, "online after the grace period");
            })
        };
        replace_synchronize_free(&cell);
        synced.notify();
        reader.join().unwrap();
        drop(cell);
        drain_and_shutdown();
    });
}

/// A reader comes back online while the writer's grace period runs, and reads: either
/// the grace period waits for it, or it reads the new value.
///
/// Catches: coming online without the reader's barrier (causality: the scan misses the
/// online word while the reader still reads the old payload).
#[test]
fn reader_coming_online_during_a_grace_period() {
    check(
        "reader_coming_online_during_a_grace_period",
        PREEMPTIONS_SMALL,
        || {
            let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
            let off = QsbrReader::register().offline();
            let writer = {
                let cell = Arc::clone(&cell);
                thread::spawn(move || replace_synchronize_free(&cell))
            };
            let mut r = off.online();
            assert_intact(cell.load(&r).read(), &[OLD, NEW]);
            r.quiescent_state();
            drop(r);
            writer.join().unwrap();
            drop(cell);
            drain_and_shutdown();
        },
    );
}

/// A QSBR reader (main thread) and a `read_lock` reader share the writer's grace period:
/// neither sees its payload freed.
///
/// Catches: a scan that skips QSBR slots (causality).
#[test]
fn mixed_qsbr_and_read_lock_readers() {
    check(
        "mixed_qsbr_and_read_lock_readers",
        PREEMPTIONS_MIXED,
        || {
            let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
            let mut r = QsbrReader::register();
            let memb = {
                let cell = Arc::clone(&cell);
                thread::spawn(move || {
                    let guard = rcu::read_lock();
                    assert_intact(cell.load(&guard).read(), &[OLD, NEW]);
                })
            };
            let writer = {
                let cell = Arc::clone(&cell);
                thread::spawn(move || replace_synchronize_free(&cell))
            };
            let payload = cell.load(&r);
            let seen = payload.read();
            assert_intact(seen, &[OLD, NEW]);
            thread::yield_now();
            assert_eq!(
                payload.read(),
                seen,
                "a payload changed under an online reader"
            );
            r.quiescent_state();
            drop(r);
            memb.join().unwrap();
            writer.join().unwrap();
            drop(cell);
            drain_and_shutdown();
        },
    );
}
