//! Loom models of the rcu crate: the very same algorithm, run under the loom model checker
//! (`RUSTFLAGS="--cfg loom" cargo test -p rcu --release --test loom`), which explores
//! thread interleavings and weak-memory outcomes and checks every access to a
//! [`loom::cell::UnsafeCell`] for causality.
//!
//! Each model puts a payload behind an RCU pointer; a reader reads it through a loom
//! `UnsafeCell`, and "freeing" it means overwriting it with [`FREED`] through the same cell.
//! If reclamation could overlap a read section that may still see the payload, loom reports
//! a causal violation (a data race) on the cell; the readers also assert that they saw an
//! intact old or new value, never the poison.
//!
//! The models were checked against deliberately broken algorithms (each then reverted):
//! grace periods that return at once fail every model; dropping the reader's entry fence,
//! or making its exit store relaxed, fails every model with a causality violation;
//! dropping the writer's or the reader's exit fence, or the reader's wake-up, fails every
//! model with a deadlock (a lost wake-up); ignoring nesting fails the nesting model;
//! running callbacks before their grace period, or a drain that does not wait, fails the
//! call_rcu and list models; letting a late `synchronize` caller be released by the grace
//! period already running when it arrived fails the shared-grace-period model (only it); a
//! thread that never unregisters fails the thread-exit model; a fence-mode unlock that
//! does not send the next lock back to the fencing path fails the later-section model;
//! freeing a list node at unlink, or publishing a node with a relaxed store, fails the
//! list models. A grace-period scan that, having found one reader still in an old
//! section, waits for that one only (and returns once it has left) passes every model with
//! a single pending reader, and fails both two-reader models (5 and 6) with a causality
//! violation. Loom runs in fence mode only (it knows no membarrier): the membarrier
//! pairing is tested on the real machine by `writer_barrier.rs`.
//!
//! Every model ends by dropping what it queued, draining call_rcu and stopping the call_rcu
//! thread ([`rcu::shutdown_call_rcu_thread`]), so loom sees every thread terminate.
//! Without `--cfg loom` this file compiles to nothing.
#![cfg(loom)]

#[path = "common/loom_model.rs"]
mod loom_model;

use loom::sync::atomic::AtomicUsize;
use loom::thread;
use loom_model::{assert_intact, check, drain_and_shutdown, Payload, NEW, OLD};
use rcu::{RcuCell, RcuList};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;

/// Preemption bounds (`LOOM_MAX_PREEMPTIONS` overrides them for deeper runs): 3 for the
/// small models; 2 for those that also run the call_rcu thread, whose state space at 3
/// takes minutes (about 900k executions each).
const PREEMPTIONS_SMALL: usize = 3;
const PREEMPTIONS_CALL_RCU: usize = 2;
const PREEMPTIONS_TWO_READERS: usize = 2;

/// An RCU-managed object whose drop (run by reclamation) frees its payload and counts.
struct Freeing {
    payload: Arc<Payload>,
    freed: Arc<AtomicUsize>,
}

impl Drop for Freeing {
    fn drop(&mut self) {
        self.payload.free();
        self.freed.fetch_add(1, Relaxed);
    }
}

/// Model 1: a reader that began before `synchronize` never sees its object freed.
///
/// The reader runs on the main thread (registered for the whole model); the writer
/// replaces the value, waits through `Retired::synchronize` and frees the old payload.
#[test]
fn reader_before_synchronize_never_sees_free() {
    check(
        "reader_before_synchronize_never_sees_free",
        PREEMPTIONS_SMALL,
        || {
            let old = Payload::new(OLD);
            let cell = Arc::new(RcuCell::new(Arc::clone(&old)));
            let writer = {
                let cell = Arc::clone(&cell);
                thread::spawn(move || {
                    let retired = cell.replace(Payload::new(NEW));
                    let back = retired.synchronize();
                    back.free();
                })
            };
            {
                let guard = rcu::read_lock();
                let seen = cell.load(&guard).read();
                assert_intact(seen, &[OLD, NEW]);
            }
            writer.join().unwrap();
            drop(cell);
            drain_and_shutdown();
        },
    );
}

/// Model 1b: concurrent `synchronize` callers share grace periods, but a caller that
/// arrives while another's grace period runs is not released by that one: it needs a
/// grace period that started after it did. Thread A calls `synchronize` for nothing in
/// particular; the writer replaces a value the reader may hold and frees it after its own
/// `synchronize`, which may find A's grace period running.
#[test]
fn a_shared_grace_period_never_ends_early_for_a_late_caller() {
    check(
        "a_shared_grace_period_never_ends_early_for_a_late_caller",
        PREEMPTIONS_CALL_RCU,
        || {
            let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
            let other = thread::spawn(rcu::synchronize);
            let writer = {
                let cell = Arc::clone(&cell);
                thread::spawn(move || cell.replace(Payload::new(NEW)).synchronize().free())
            };
            {
                let guard = rcu::read_lock();
                assert_intact(cell.load(&guard).read(), &[OLD, NEW]);
            }
            other.join().unwrap();
            writer.join().unwrap();
            drop(cell);
            drain_and_shutdown();
        },
    );
}

/// Model 1c: a reader's later sections are protected like its first. The first section
/// registers the thread; the second is an ordinary section of a registered thread (in the
/// fence mode loom runs, one that must fence again after the first one's unlock).
#[test]
fn a_later_section_is_protected_like_the_first() {
    check(
        "a_later_section_is_protected_like_the_first",
        PREEMPTIONS_SMALL,
        || {
            let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
            drop(rcu::read_lock()); // registers; the next section takes the fast path
            let writer = {
                let cell = Arc::clone(&cell);
                thread::spawn(move || cell.replace(Payload::new(NEW)).synchronize().free())
            };
            {
                let guard = rcu::read_lock();
                assert_intact(cell.load(&guard).read(), &[OLD, NEW]);
            }
            writer.join().unwrap();
            drop(cell);
            drain_and_shutdown();
        },
    );
}

/// Model 2: dropping an inner guard does not end the outer section; the writer's
/// synchronize still waits for the outer one.
#[test]
fn inner_guard_does_not_end_outer_section() {
    check(
        "inner_guard_does_not_end_outer_section",
        PREEMPTIONS_SMALL,
        || {
            let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
            let writer = {
                let cell = Arc::clone(&cell);
                thread::spawn(move || {
                    cell.replace(Payload::new(NEW)).synchronize().free();
                })
            };
            {
                let outer = rcu::read_lock();
                let early = cell.load(&outer);
                {
                    let inner = rcu::read_lock();
                    assert_intact(cell.load(&inner).read(), &[OLD, NEW]);
                }
                assert!(rcu::in_read_section());
                // Loaded before the inner section ended; read after it ended.
                assert_intact(early.read(), &[OLD, NEW]);
            }
            writer.join().unwrap();
            drop(cell);
            drain_and_shutdown();
        },
    );
}

/// Model 3: a reader thread enters and leaves a section and exits (its thread-local
/// destructor unregisters it) while the main thread runs a grace period: synchronize
/// returns (loom reports a deadlock otherwise) and the reader never sees the free.
#[test]
fn thread_exit_during_grace_period() {
    check("thread_exit_during_grace_period", PREEMPTIONS_SMALL, || {
        let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
        let reader = {
            let cell = Arc::clone(&cell);
            thread::spawn(move || {
                let guard = rcu::read_lock();
                assert_intact(cell.load(&guard).read(), &[OLD, NEW]);
                drop(guard);
                // The thread exits here: Registration's destructor unregisters it.
            })
        };
        cell.replace(Payload::new(NEW)).synchronize().free();
        reader.join().unwrap();
        // Loom's join returns before the thread's thread-locals drop: wait for the
        // destructor to unregister it (a thread that never did would spin here until loom
        // reports the model exceeded its branch limit).
        while rcu::registered_readers() != 0 {
            thread::yield_now();
        }
        drop(cell);
        drain_and_shutdown();
    });
}

/// Model 4: a call_rcu callback runs only after the sections running when it was queued
/// have ended, and drain_call_rcu returns only after every earlier callback ran.
#[test]
fn call_rcu_after_readers_and_drain() {
    check(
        "call_rcu_after_readers_and_drain",
        PREEMPTIONS_CALL_RCU,
        || {
            let freed = Arc::new(AtomicUsize::new(0));
            let old = Freeing {
                payload: Payload::new(OLD),
                freed: Arc::clone(&freed),
            };
            let cell = Arc::new(RcuCell::new(old));
            let reader = {
                let cell = Arc::clone(&cell);
                thread::spawn(move || {
                    let guard = rcu::read_lock();
                    let payload = &cell.load(&guard).payload;
                    let seen = payload.read();
                    assert_intact(seen, &[OLD, NEW]);
                    // Linger in the section: a scheduling point at which loom runs the other
                    // threads (the call_rcu thread among them) while the section is open.
                    thread::yield_now();
                    assert_eq!(payload.read(), seen, "a payload changed under a reader");
                })
            };
            // store() hands the old value to call_rcu, whose drop frees the payload.
            cell.store(Freeing {
                payload: Payload::new(NEW),
                freed: Arc::clone(&freed),
            });
            let ran = Arc::new(AtomicUsize::new(0));
            {
                let ran = Arc::clone(&ran);
                rcu::call_rcu(move || {
                    ran.fetch_add(1, Relaxed);
                });
            }
            rcu::drain_call_rcu();
            // Relaxed loads: only drain's happens-before makes the counts visible.
            assert_eq!(freed.load(Relaxed), 1, "drain returned before the free ran");
            assert_eq!(ran.load(Relaxed), 1, "drain returned before a callback ran");
            reader.join().unwrap();
            drop(cell);
            drain_and_shutdown();
            assert_eq!(
                freed.load(Relaxed),
                2,
                "the cell's last value was never freed"
            );
        },
    );
}

/// RcuList: a reader walks the list while a writer removes the middle element, which is
/// reclaimed through call_rcu; the reader never reads a freed node's payload, and sees the
/// elements that stayed in the list.
#[test]
fn list_walk_during_removal() {
    check("list_walk_during_removal", PREEMPTIONS_CALL_RCU, || {
        let freed = Arc::new(AtomicUsize::new(0));
        let list = Arc::new(RcuList::new());
        {
            let mut w = list.lock();
            for v in [1, 2, 3] {
                w.push_back(Freeing {
                    payload: Payload::new(v),
                    freed: Arc::clone(&freed),
                });
            }
        }
        let reader = {
            let list = Arc::clone(&list);
            thread::spawn(move || {
                let guard = rcu::read_lock();
                let entries: Vec<_> = list.iter(&guard).collect();
                let seen: Vec<u64> = entries.iter().map(|e| e.payload.read()).collect();
                assert!(
                    seen == [1, 2, 3] || seen == [1, 3],
                    "reader walked {seen:?} (0xdead = freed)"
                );
                // Linger in the section (see model 4), then use the entries again.
                thread::yield_now();
                let again: Vec<u64> = entries.iter().map(|e| e.payload.read()).collect();
                assert_eq!(again, seen, "a node changed under a reader");
            })
        };
        assert!(list.lock().remove_first(|f| f.payload.read() == 2));
        reader.join().unwrap();
        drop(list);
        drain_and_shutdown();
        assert_eq!(freed.load(Relaxed), 3, "a node was never reclaimed");
    });
}

/// RcuList: a reader walking while a writer inserts at the head sees the new element
/// fully built (its payload written before the node was published), or not at all.
#[test]
fn list_walk_during_insertion() {
    check("list_walk_during_insertion", PREEMPTIONS_CALL_RCU, || {
        let freed = Arc::new(AtomicUsize::new(0));
        let list = Arc::new(RcuList::new());
        list.lock().push_back(Freeing {
            payload: Payload::new(OLD),
            freed: Arc::clone(&freed),
        });
        let reader = {
            let list = Arc::clone(&list);
            thread::spawn(move || {
                let guard = rcu::read_lock();
                let seen: Vec<u64> = list.iter(&guard).map(|e| e.payload.read()).collect();
                assert!(
                    seen == [OLD] || seen == [NEW, OLD],
                    "reader walked {seen:?}"
                );
            })
        };
        list.lock().push_front(Freeing {
            payload: Payload::new(NEW),
            freed: Arc::clone(&freed),
        });
        reader.join().unwrap();
        drop(list);
        drain_and_shutdown();
        assert_eq!(freed.load(Relaxed), 2, "a node was never reclaimed");
    });
}

/// A reader for the two-reader models: enters a section, tells the writer (`entered`),
/// reads the value, and either leaves at once or lingers (a scheduling point) and reads
/// it again; `nested` reads through an inner section first, so the outer one must keep
/// protecting the value after the inner one ends.
fn pending_reader(
    cell: &Arc<RcuCell<Arc<Payload>>>,
    entered: &Arc<AtomicUsize>,
    linger: bool,
    nested: bool,
) -> thread::JoinHandle<()> {
    let (cell, entered) = (Arc::clone(cell), Arc::clone(entered));
    thread::spawn(move || {
        let guard = rcu::read_lock();
        entered.fetch_add(1, Release);
        let payload = if nested {
            let inner = rcu::read_lock();
            let p = Arc::clone(cell.load(&inner));
            drop(inner);
            p
        } else {
            Arc::clone(cell.load(&guard))
        };
        let seen = payload.read();
        assert_intact(seen, &[OLD, NEW]);
        if linger {
            thread::yield_now();
            assert_eq!(payload.read(), seen, "a payload changed under a reader");
        }
        drop(guard);
    })
}

/// The writer of the two-reader models, on the main thread: once both readers are inside
/// their sections, replace the value, synchronize and free the old one. The cell is leaked
/// rather than dropped (its drop would queue a callback), so these models need no call_rcu
/// thread, which keeps three threads' interleavings affordable.
fn replace_after_both_entered(cell: Arc<RcuCell<Arc<Payload>>>, entered: &AtomicUsize) {
    while entered.load(Acquire) < 2 {
        thread::yield_now();
    }
    cell.replace(Payload::new(NEW)).synchronize().free();
    std::mem::forget(cell);
}

/// Model 5: two readers are inside sections when the grace period starts; one leaves at
/// once, the other lingers. The grace period must wait for both, in whichever order they
/// registered and leave (a scan that, having found one waiting reader, waits for that one
/// only, frees under the other).
#[test]
fn two_pending_readers_one_leaving_early() {
    check(
        "two_pending_readers_one_leaving_early",
        PREEMPTIONS_TWO_READERS,
        || {
            let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
            let entered = Arc::new(AtomicUsize::new(0));
            let early = pending_reader(&cell, &entered, false, false);
            let late = pending_reader(&cell, &entered, true, false);
            replace_after_both_entered(cell, &entered);
            early.join().unwrap();
            late.join().unwrap();
            rcu::shutdown_call_rcu_thread();
        },
    );
}

/// Model 6: two pending readers, one of them nested: it loads the value under an inner
/// guard, drops that guard, lingers and reads the value again under the outer one. The
/// grace period must wait for the outer section, and for the other reader too.
#[test]
fn two_pending_readers_one_nested() {
    check(
        "two_pending_readers_one_nested",
        PREEMPTIONS_TWO_READERS,
        || {
            let cell = Arc::new(RcuCell::new(Payload::new(OLD)));
            let entered = Arc::new(AtomicUsize::new(0));
            let plain = pending_reader(&cell, &entered, false, false);
            let nested = pending_reader(&cell, &entered, true, true);
            replace_after_both_entered(cell, &entered);
            plain.join().unwrap();
            nested.join().unwrap();
            rcu::shutdown_call_rcu_thread();
        },
    );
}
