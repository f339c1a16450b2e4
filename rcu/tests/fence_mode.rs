//! The fallback path: readers and writers with real fences instead of membarrier. Every test
//! here fixes the mode first (this file is its own test binary, so its own process).

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

fn fences() {
    rcu::set_barrier_mode(rcu::BarrierMode::Fences).expect("fence mode must be settable first");
    assert_eq!(rcu::barrier_mode(), rcu::BarrierMode::Fences);
}

#[test]
fn the_mode_cannot_change_once_fixed() {
    fences();
    let err = rcu::set_barrier_mode(rcu::BarrierMode::Membarrier).unwrap_err();
    assert_eq!(err.0, rcu::BarrierMode::Fences);
}

#[test]
fn synchronize_waits_for_readers_with_fences() {
    fences();
    for _ in 0..200 {
        let released = Arc::new(AtomicBool::new(false));
        let start = Arc::new(Barrier::new(2));
        let reader = {
            let (released, start) = (released.clone(), start.clone());
            std::thread::spawn(move || {
                let g = rcu::read_lock();
                start.wait();
                released.store(true, SeqCst);
                drop(g);
            })
        };
        start.wait();
        rcu::synchronize();
        assert!(released.load(SeqCst));
        reader.join().unwrap();
    }
}

#[test]
fn cell_replace_and_free_with_fences() {
    fences();
    let cell = Arc::new(rcu::RcuCell::new(vec![0u64; 8]));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (cell, stop) = (cell.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            loop {
                let g = rcu::read_lock();
                let v = cell.load(&g);
                // Every published vector is uniform; a freed one would not be.
                assert!(v.iter().all(|x| *x == v[0]));
                reads += 1;
                drop(g);
                if stop.load(SeqCst) {
                    return reads;
                }
            }
        })
    };
    for i in 1..2000u64 {
        cell.store(vec![i; 8]);
    }
    stop.store(true, SeqCst);
    assert!(reader.join().unwrap() > 0);
    rcu::drain_call_rcu();
}
