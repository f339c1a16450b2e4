//! Grace periods: [`synchronize`].
//!
//! The algorithm is liburcu's and QEMU's, with a 64-bit counter bumped once per grace
//! period. What differs is the barrier budget, since each membarrier costs an IPI (about
//! 16 µs on a nested hypervisor with a busy reader on the other CPU):
//!
//! 1. Under the registry lock, bump `gp_ctr` (release) and snapshot the registered slots.
//! 2. Reset the wake-up event and mark every slot `waiting` (release).
//! 3. One global barrier (membarrier). After it, each reader either published its old
//!    snapshot where we can see it, or its later loads see our unlink (and the new
//!    counter, and `waiting`): the store-buffering pair with the reader's compiler barrier.
//!    liburcu and QEMU issue a second barrier here, before step 2; bumping the counter
//!    with release ordering before the barrier makes one enough, because a reader that
//!    reads the new counter (acquire) also reads everything the writer did before it.
//! 4. Drop the slots that are outside a section or began theirs at the new counter. Spin
//!    briefly on the rest, then sleep on the event: a reader leaving an old section sees
//!    `waiting` and sets it. Rechecks need no further barrier — the reader's release store
//!    of 0, then its event set, happen before our acquire of the event.
//!
//! Concurrent callers share grace periods: a caller needs one grace period that *starts*
//! after it arrived. If one is running, it waits for that one's successor, which serves
//! every caller that queued meanwhile.

use crate::barrier::global_barrier;
use crate::domain::{domain, Domain, ReaderSlot, GP_STEP};
use crate::primitive::{lock, thread::spin_loop, wait};
use crate::reader::assert_outside_read_section;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;

/// Rechecks of pending readers before sleeping on the event: readers' sections are
/// usually short, and a futex sleep-and-wake costs more than a few hundred loads.
const SPINS_BEFORE_SLEEP: u32 = if cfg!(loom) { 0 } else { 200 };

/// Waits until every read-side critical section that began before this call has ended.
///
/// # Panics
/// If called inside a read-side critical section: that section could never end first.
pub fn synchronize() {
    assert_outside_read_section("rcu::synchronize()");
    let d = domain();
    let mut s = lock(&d.sync);
    let needed = s.started + 1;
    loop {
        if s.completed >= needed {
            return;
        }
        if !s.running {
            s.running = true;
            s.started += 1;
            let number = s.started;
            drop(s);
            let finish = FinishOnUnwind(d);
            run_grace_period(d);
            std::mem::forget(finish);
            s = lock(&d.sync);
            s.completed = number;
            s.running = false;
            d.sync_done.notify_all();
            continue;
        }
        s = wait(&d.sync_done, s);
    }
}

/// Number of grace periods completed so far by this process (for tests and statistics).
pub fn grace_periods_completed() -> u64 {
    lock(&domain().sync).completed
}

/// If a grace period panics (a failed membarrier), let other callers elect a new leader
/// instead of waiting forever for this one.
struct FinishOnUnwind(&'static Domain);

impl Drop for FinishOnUnwind {
    fn drop(&mut self) {
        let mut s = lock(&self.0.sync);
        s.running = false;
        self.0.sync_done.notify_all();
    }
}

/// True if the slot is inside a section that began before the counter reached `gp`.
#[inline]
fn holds_old_section(slot: &ReaderSlot, gp: u64) -> bool {
    let v = slot.ctr.load(Acquire);
    v != 0 && v != gp
}

fn run_grace_period(d: &Domain) {
    let (gp, slots) = {
        let registry = lock(&d.registry);
        let gp = d.gp_ctr.0.load(Relaxed) + GP_STEP;
        d.gp_ctr.0.store(gp, Release);
        (gp, registry.clone())
    };
    if slots.is_empty() {
        // No reader exists; a thread registering later takes the registry lock after us
        // and so sees everything we did before.
        return;
    }
    d.gp_event.0.reset();
    for slot in &slots {
        slot.waiting.store(true, Release);
    }
    global_barrier();
    let mut pending: Vec<Arc<ReaderSlot>> = Vec::new();
    for slot in slots {
        if holds_old_section(&slot, gp) {
            pending.push(slot);
        } else {
            slot.waiting.store(false, Relaxed);
        }
    }
    let mut spins = 0;
    while !pending.is_empty() {
        if spins < SPINS_BEFORE_SLEEP {
            spins += 1;
            spin_loop();
        } else {
            d.gp_event.0.wait();
            d.gp_event.0.reset();
        }
        pending.retain(|slot| holds_old_section(slot, gp));
    }
}
