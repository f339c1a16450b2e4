//! Tests of the rcu crate's public contract: guards, grace periods, call_rcu, RcuCell and
//! RcuArray. Each concurrency property is checked by a flag the other side sets just before
//! the event in question, so a broken implementation fails the assertion rather than a timer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

/// A value whose drop is observable.
struct Tracked {
    value: u64,
    drops: Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, SeqCst);
    }
}

#[test]
fn guards_nest_and_report_the_section() {
    assert!(!rcu::in_read_section());
    let outer = rcu::read_lock();
    {
        let _inner = rcu::read_lock();
        assert!(rcu::in_read_section());
    }
    assert!(
        rcu::in_read_section(),
        "dropping the inner guard ended the outer section"
    );
    drop(outer);
    assert!(!rcu::in_read_section());
}

#[test]
#[should_panic(expected = "inside an RCU read-side critical section")]
fn synchronize_inside_a_section_panics() {
    let _g = rcu::read_lock();
    rcu::synchronize();
}

#[test]
#[should_panic(expected = "inside an RCU read-side critical section")]
fn drain_inside_a_section_panics() {
    let _g = rcu::read_lock();
    rcu::drain_call_rcu();
}

#[test]
fn synchronize_waits_for_a_section_that_began_before_it() {
    for _ in 0..200 {
        let released = Arc::new(AtomicBool::new(false));
        let start = Arc::new(Barrier::new(2));
        let reader = {
            let (released, start) = (released.clone(), start.clone());
            std::thread::spawn(move || {
                let g = rcu::read_lock();
                start.wait();
                for _ in 0..1000 {
                    std::hint::spin_loop();
                }
                released.store(true, SeqCst);
                drop(g);
            })
        };
        start.wait(); // the reader is inside its section now
        rcu::synchronize();
        assert!(
            released.load(SeqCst),
            "synchronize returned while a reader was still inside"
        );
        reader.join().unwrap();
    }
}

#[test]
fn callers_arriving_during_a_grace_period_share_the_next_one() {
    // A reader holds the first grace period open while seven more callers queue up.
    let reader_in = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let reader = {
        let (reader_in, release) = (reader_in.clone(), release.clone());
        std::thread::spawn(move || {
            let g = rcu::read_lock();
            reader_in.wait();
            release.wait();
            drop(g);
        })
    };
    reader_in.wait();
    let before = rcu::grace_periods_completed();
    let callers: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(rcu::synchronize))
        .collect();
    // One caller leads the grace period the reader blocks; the others wait for the next.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while rcu::synchronize_waiters() < 7 {
        assert!(
            std::time::Instant::now() < deadline,
            "callers never queued up"
        );
        std::thread::yield_now();
    }
    release.wait();
    for c in callers {
        c.join().unwrap();
    }
    reader.join().unwrap();
    let gps = rcu::grace_periods_completed() - before;
    assert_eq!(
        gps, 2,
        "8 callers needed {gps} grace periods, not one each and one shared"
    );
}

#[test]
fn threads_register_on_first_use_and_unregister_at_exit() {
    let inside = Arc::new(Barrier::new(2));
    let leave = Arc::new(Barrier::new(2));
    let t = {
        let (inside, leave) = (inside.clone(), leave.clone());
        std::thread::spawn(move || {
            drop(rcu::read_lock());
            inside.wait();
            leave.wait();
        })
    };
    inside.wait();
    let during = rcu::registered_readers();
    leave.wait();
    t.join().unwrap();
    let after = rcu::registered_readers();
    assert!(during >= 1);
    assert_eq!(after, during - 1, "the exited thread is still registered");
    rcu::synchronize(); // and grace periods do not wait for it
}

#[test]
fn store_drops_the_old_value_only_after_a_grace_period() {
    let drops = Arc::new(AtomicUsize::new(0));
    let cell = Arc::new(rcu::RcuCell::new(Tracked {
        value: 1,
        drops: drops.clone(),
    }));
    let g = rcu::read_lock();
    let seen = cell.load(&g);
    cell.store(Tracked {
        value: 2,
        drops: drops.clone(),
    });
    // The reader's section is still open: the old value must be alive.
    assert_eq!(seen.value, 1);
    assert_eq!(drops.load(SeqCst), 0);
    assert_eq!(cell.load(&g).value, 2);
    drop(g);
    rcu::drain_call_rcu();
    assert_eq!(drops.load(SeqCst), 1);
}

#[test]
fn replace_hands_back_the_old_value_after_synchronize() {
    let drops = Arc::new(AtomicUsize::new(0));
    let cell = rcu::RcuCell::new(Tracked {
        value: 7,
        drops: drops.clone(),
    });
    let retired = cell.replace(Tracked {
        value: 8,
        drops: drops.clone(),
    });
    let old = retired.synchronize();
    assert_eq!(old.value, 7);
    assert_eq!(drops.load(SeqCst), 0);
    drop(old);
    assert_eq!(drops.load(SeqCst), 1);
    let many: Vec<_> = (0..4)
        .map(|i| {
            cell.replace(Tracked {
                value: i,
                drops: drops.clone(),
            })
        })
        .collect();
    let values: Vec<u64> = rcu::Retired::synchronize_all(many)
        .iter()
        .map(|t| t.value)
        .collect();
    assert_eq!(values, vec![8, 0, 1, 2]);
}

#[test]
fn a_dropped_retired_value_goes_through_call_rcu() {
    let drops = Arc::new(AtomicUsize::new(0));
    let cell = rcu::RcuCell::new(Tracked {
        value: 1,
        drops: drops.clone(),
    });
    drop(cell.replace(Tracked {
        value: 2,
        drops: drops.clone(),
    }));
    drop(cell);
    rcu::drain_call_rcu();
    assert_eq!(drops.load(SeqCst), 2);
}

#[test]
fn a_reference_outlives_its_cell_until_the_section_ends() {
    let drops = Arc::new(AtomicUsize::new(0));
    let cell = rcu::RcuCell::new(Tracked {
        value: 3,
        drops: drops.clone(),
    });
    let g = rcu::read_lock();
    let r = cell.load(&g);
    drop(cell);
    assert_eq!(r.value, 3);
    assert_eq!(drops.load(SeqCst), 0);
    drop(g);
    rcu::drain_call_rcu();
    assert_eq!(drops.load(SeqCst), 1);
}

#[test]
fn call_rcu_runs_after_sections_running_when_it_was_queued() {
    for _ in 0..50 {
        let released = Arc::new(AtomicBool::new(false));
        let ran_early = Arc::new(AtomicBool::new(false));
        let start = Arc::new(Barrier::new(2));
        let reader = {
            let (released, start) = (released.clone(), start.clone());
            std::thread::spawn(move || {
                let g = rcu::read_lock();
                start.wait();
                start.wait();
                released.store(true, SeqCst);
                drop(g);
            })
        };
        start.wait();
        {
            let (released, ran_early) = (released.clone(), ran_early.clone());
            rcu::call_rcu(move || {
                if !released.load(SeqCst) {
                    ran_early.store(true, SeqCst);
                }
            });
        }
        start.wait();
        rcu::drain_call_rcu();
        assert!(
            !ran_early.load(SeqCst),
            "a callback ran while an older reader was inside"
        );
        reader.join().unwrap();
    }
}

#[test]
fn callbacks_may_queue_callbacks_and_drain_waits_for_earlier_ones() {
    let count = Arc::new(AtomicUsize::new(0));
    for _ in 0..100 {
        let count = count.clone();
        rcu::call_rcu(move || {
            count.fetch_add(1, SeqCst);
            let inner = count.clone();
            rcu::call_rcu(move || {
                inner.fetch_add(1, SeqCst);
            });
        });
    }
    rcu::drain_call_rcu();
    assert!(count.load(SeqCst) >= 100);
    rcu::drain_call_rcu(); // the nested ones were queued before this drain
    assert_eq!(count.load(SeqCst), 200);
    let stats = rcu::call_rcu_stats();
    assert!(stats.run >= 200 && stats.batches >= 1, "{stats:?}");
}

#[test]
fn drain_from_a_callback_panics_and_the_thread_survives() {
    let refused = Arc::new(AtomicBool::new(false));
    {
        let refused = refused.clone();
        rcu::call_rcu(move || {
            let r = std::panic::catch_unwind(rcu::drain_call_rcu);
            refused.store(r.is_err(), SeqCst);
        });
    }
    rcu::drain_call_rcu();
    assert!(refused.load(SeqCst));
    rcu::call_rcu(|| panic!("a callback that panics"));
    rcu::drain_call_rcu(); // the call_rcu thread is still serving
}

#[test]
fn batches_run_with_the_handed_lock_held() {
    let bql = Arc::new(rcu::BigLock::new());
    rcu::set_call_rcu_lock(Some(bql.clone()));
    let held = Arc::new(AtomicBool::new(false));
    {
        let (bql, held) = (bql.clone(), held.clone());
        rcu::call_rcu(move || held.store(bql.try_lock().is_none(), SeqCst));
    }
    rcu::drain_call_rcu();
    rcu::set_call_rcu_lock(None);
    assert!(held.load(SeqCst), "the callback ran without the lock held");
    // And while we hold it, callbacks wait.
    let guard = bql.lock();
    rcu::set_call_rcu_lock(Some(bql.clone()));
    let ran = Arc::new(AtomicBool::new(false));
    let drainer = {
        let ran = ran.clone();
        rcu::call_rcu(move || ran.store(true, SeqCst));
        std::thread::spawn(rcu::drain_call_rcu)
    };
    assert!(!ran.load(SeqCst));
    drop(guard);
    drainer.join().unwrap();
    assert!(ran.load(SeqCst));
    rcu::set_call_rcu_lock(None);
}

#[test]
fn rcu_array_grows_without_losing_elements_under_readers() {
    let array = Arc::new(rcu::RcuArray::new(vec![Arc::new(AtomicUsize::new(0))]));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (array, stop) = (array.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut increments = 0;
            loop {
                let g = rcu::read_lock();
                let a = array.load(&g);
                for x in a {
                    x.fetch_add(1, SeqCst);
                }
                increments += a.len();
                drop(g);
                if stop.load(SeqCst) {
                    return increments;
                }
            }
        })
    };
    for n in 2..=64 {
        assert_eq!(array.grow_with(n, |_| Arc::new(AtomicUsize::new(0))), n);
    }
    assert_eq!(array.grow_with(10, |_| unreachable!("never shrinks")), 64);
    stop.store(true, SeqCst);
    let increments = reader.join().unwrap();
    let g = rcu::read_lock();
    let a = array.load(&g);
    assert_eq!(a.len(), 64);
    // Every increment, including those made through copies replaced meanwhile, is seen
    // through the current one: a grow that rebuilt elements instead of sharing them fails.
    let total: usize = a.iter().map(|x| x.load(SeqCst)).sum();
    assert_eq!(total, increments);
}

/// A thread-local whose destructor reads under RCU after the thread's own registration has
/// been torn down (destructors run in reverse order of registration).
struct ReadsAtExit {
    cell: Arc<rcu::RcuCell<u64>>,
    seen: Arc<AtomicUsize>,
}

impl Drop for ReadsAtExit {
    fn drop(&mut self) {
        let g = rcu::read_lock();
        let v = *self.cell.load(&g);
        self.seen.store(v as usize, SeqCst);
    }
}

thread_local! {
    static READS_AT_EXIT: std::cell::RefCell<Option<ReadsAtExit>> = const { std::cell::RefCell::new(None) };
}

#[test]
fn a_read_section_in_a_late_thread_local_destructor_leaves_no_registration_behind() {
    let cell = Arc::new(rcu::RcuCell::new(42u64));
    let seen = Arc::new(AtomicUsize::new(0));
    let before = rcu::registered_readers();
    let t = {
        let (cell, seen) = (cell.clone(), seen.clone());
        std::thread::spawn(move || {
            // Initialized first, so destroyed after the rcu registration.
            READS_AT_EXIT.with(|r| *r.borrow_mut() = Some(ReadsAtExit { cell, seen }));
            drop(rcu::read_lock());
        })
    };
    t.join().unwrap();
    assert_eq!(
        seen.load(SeqCst),
        42,
        "the destructor did not run its read section"
    );
    assert_eq!(
        rcu::registered_readers(),
        before,
        "a registration outlived its thread"
    );
    cell.store(43);
    rcu::synchronize();
    rcu::drain_call_rcu();
}

#[test]
fn nesting_counts_to_its_limit_then_refuses_clearly() {
    // 65534 levels work and end cleanly.
    let guards: Vec<rcu::ReadGuard> = (0..65534).map(|_| rcu::read_lock()).collect();
    assert!(rcu::in_read_section());
    let deeper = std::panic::catch_unwind(rcu::read_lock);
    let message = deeper
        .err()
        .and_then(|p| p.downcast_ref::<String>().cloned())
        .expect("one level more must panic");
    assert!(message.contains("nested more than 65534 deep"), "{message}");
    drop(guards);
    assert!(!rcu::in_read_section());
    rcu::synchronize(); // the thread is quiescent again, so this returns
}
