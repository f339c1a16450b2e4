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
//!    at the new counter. Spin briefly while some are not, then sleep on the event (with
//!    the registry lock dropped): a reader leaving an old section sees `WAITING` and sets
//!    it. Rescans need no further barrier — the reader's release store of 0, then its
//!    event set, happen before our acquire of the event. A rescan walks the registry as it
//!    is then: threads that exited are gone, and threads that registered meanwhile read
//!    the new counter, so they are never waited for.
//! 5. Before sleeping, re-mark `WAITING` on every pending slot whose mark is gone, and if
//!    any was, issue the barrier again and rescan instead of sleeping. A mark goes when
//!    the first scan found the slot quiescent (sparing it a wake-up) or the reader took
//!    it; but a reader whose section (or QSBR online period) starts with a counter loaded
//!    before our bump can publish that old counter *after* the first scan read its 0: it
//!    is then pending with no mark, and its end would not wake us. liburcu re-arms its
//!    futex before every sleep for the same reason. It costs a barrier only in that race.
//!
//! Quiescent-state readers (qsbr.rs) share all of this: their slots hold `gp | 1` while
//! online (as a section begun at their last quiescent state) and 0 offline, so the same
//! scan waits for an online reader until it reports a quiescent state after the bump.
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
    let mut first_scan = true;
    let mut spins = 0;
    loop {
        // Before sleeping, every pending slot must carry its mark (step 5). The first
        // scan follows the marking and its barrier: nothing to check yet.
        let sleeping_next = spins >= SPINS_BEFORE_SLEEP && !first_scan;
        let mut pending = false;
        let mut remarked = false;
        for &slot in registry.iter() {
            // SAFETY: registered, under the registry lock.
            let flags = &unsafe { &*slot.0 }.flags;
            // SAFETY: as above.
            if unsafe { holds_old_section(slot, gp) } {
                pending = true;
                if sleeping_next && flags.load(Relaxed) & WAITING == 0 {
                    flags.fetch_or(WAITING, Release);
                    remarked = true;
                }
            } else if first_scan {
                // Spares a quiescent reader a needless wake-up.
                flags.fetch_and(!WAITING, Relaxed);
            }
        }
        first_scan = false;
        if !pending {
            return;
        }
        if spins < SPINS_BEFORE_SLEEP {
            spins += 1;
            spin_loop();
        } else if remarked {
            // Step 5: the marks must be visible before the rescan, as before the first
            // (and a slot re-marked on a stale view may be quiescent already).
            global_barrier();
        } else {
            drop(registry);
            d.gp_event.0.wait();
            d.gp_event.0.reset();
            registry = lock(&d.registry);
        }
    }
}
