//! Grace periods: [`synchronize`].
//!
//! The algorithm is liburcu's and QEMU's, with a 64-bit counter bumped once per grace
//! period. What differs is the barrier budget, since each membarrier costs an IPI (about
//! 16 µs on a nested hypervisor with a busy reader on the other CPU):
//!
//! 1. Under the registry lock (held throughout, but for sleeps), bump `gp_ctr` (release).
//! 2. Reset the wake-up event and mark every registered slot `WAITING` (release).
//! 3. One global barrier (membarrier). After it, each reader either published its old
//!    snapshot where we can see it, or its later loads see our unlink (and the new
//!    counter, and `waiting`): the store-buffering pair with the reader's compiler barrier.
//!    liburcu and QEMU issue a second barrier here, before step 2; bumping the counter
//!    with release ordering before the barrier makes one enough, because a reader that
//!    reads the new counter (acquire) also reads everything the writer did before it.
//! 4. Scan the slots: a slot is done once it is outside a section or began its section
//!    at the new counter, and a done slot is never scanned again in this grace period
//!    (liburcu's quiescent-readers list). Spin briefly while some are not, then sleep on
//!    the event (with the registry lock dropped): a reader leaving an old section sees
//!    `WAITING` and sets it. Rescans need no further barrier — the reader's release store
//!    of 0, then its event set, happen before our acquire of the event. A rescan skips
//!    threads that exited meanwhile (gone from the registry), and threads that registered
//!    meanwhile read the new counter, so they are never waited for.
//!
//! Quiescent-state readers (qsbr.rs) share all of this: their slots hold `gp | 1` while
//! online (as a section begun at their last quiescent state) and 0 offline, so the same
//! scan waits for an online reader until it reports a quiescent state after the bump, and
//! drops one found offline or quiescent for good.
//!
//! Concurrent callers share grace periods: a caller needs one grace period that *starts*
//! after it arrived. If one is running, it waits for that one's successor, which serves
//! every caller that queued meanwhile.

use crate::barrier::global_barrier;
use crate::domain::{domain, gp_ctr, in_section, Domain, SlotPtr, GP_STEP, NEST_MASK, WAITING};
use crate::primitive::{lock, thread::spin_loop, wait};
use crate::reader::assert_outside_read_section;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

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
        s.waiters += 1;
        s = wait(&d.sync_done, s);
        s.waiters -= 1;
    }
}

/// Number of grace periods completed so far by this process (for tests and statistics).
pub fn grace_periods_completed() -> u64 {
    lock(&domain().sync).completed
}

/// Number of `synchronize` callers waiting for a grace period another caller leads (for
/// tests and diagnostics).
pub fn synchronize_waiters() -> usize {
    lock(&domain().sync).waiters
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
///
/// # Safety
/// The caller holds the registry lock and `slot` is in the registry.
#[inline]
unsafe fn holds_old_section(slot: SlotPtr, gp: u64) -> bool {
    // SAFETY: a registered slot stays valid while the registry lock is held (domain.rs).
    let v = unsafe { &*slot.0 }.ctr.load(Acquire);
    in_section(v) && v & !NEST_MASK != gp
}

#[cfg_attr(loom, allow(clippy::absurd_extreme_comparisons))]
fn run_grace_period(d: &Domain) {
    let mut registry = lock(&d.registry);
    let gp = gp_ctr().load(Relaxed) + GP_STEP;
    gp_ctr().store(gp, Release);
    if registry.is_empty() {
        // No reader exists; a thread registering later takes the registry lock after us
        // and so sees everything we did before.
        return;
    }
    d.gp_event.0.reset();
    for &slot in registry.iter() {
        // SAFETY: registered, under the registry lock.
        unsafe { &*slot.0 }.flags.fetch_or(WAITING, Release);
    }
    global_barrier();
    // The readers still in old sections. A reader found outside once is never looked at
    // again in this grace period: after the barrier its later sections cannot see what
    // preceded it, even one that stores a counter it loaded before our bump (its word
    // then *looks* old, but its WAITING flag is already cleared, and waiting for it would
    // be a wait for a wake-up that never comes).
    let mut pending: Vec<SlotPtr> = Vec::new();
    for &slot in registry.iter() {
        // SAFETY: registered, under the registry lock.
        if unsafe { holds_old_section(slot, gp) } {
            pending.push(slot);
        } else {
            // SAFETY: as above. Spares a quiescent reader a needless wake-up.
            unsafe { &*slot.0 }.flags.fetch_and(!WAITING, Relaxed);
        }
    }
    let mut spins = 0;
    loop {
        // SAFETY: each slot is checked for membership under the registry lock before it is
        // read (a thread that unregistered while we slept is gone from the registry).
        pending.retain(|&slot| registry.contains(&slot) && unsafe { holds_old_section(slot, gp) });
        if pending.is_empty() {
            return;
        }
        if spins < SPINS_BEFORE_SLEEP {
            spins += 1;
            spin_loop();
        } else {
            drop(registry);
            d.gp_event.0.wait();
            d.gp_event.0.reset();
            registry = lock(&d.registry);
        }
    }
}
