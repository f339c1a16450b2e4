//! The read side: [`read_lock`] and [`ReadGuard`], and the per-thread registration behind
//! them.
//!
//! A thread registers on its first `read_lock` (a slot in the domain's registry) and
//! unregisters when it exits (a thread-local destructor). Entering the outermost section
//! copies the global grace-period counter into the thread's slot; leaving it stores 0.
//! Nested sections only count depth in a thread-local.

use crate::barrier::{barrier_mode, reader_barrier, BarrierMode};
use crate::domain::{domain, ReaderSlot};
use crate::primitive::rcu_thread_local;
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;

/// Thread-local reader state touched on every `read_lock`; no destructor, so access never
/// checks for initialization or teardown.
struct ReaderLocal {
    depth: Cell<u32>,
    slot: Cell<*const ReaderSlot>,
}

impl ReaderLocal {
    crate::primitive::const_fn! {
        fn new() -> ReaderLocal {
            ReaderLocal { depth: Cell::new(0), slot: Cell::new(std::ptr::null()) }
        }
    }
}

/// Owns the thread's registry slot; its destructor unregisters the thread at exit.
struct Registration {
    slot: RefCell<Option<Arc<ReaderSlot>>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // A failed loom model drops its thread-locals outside the model, while unwinding:
        // touching loom state then would abort the test run and hide the failure.
        #[cfg(loom)]
        if std::thread::panicking() {
            return;
        }
        if let Some(slot) = self.slot.borrow_mut().take() {
            let _ = READER.try_with(|r| r.slot.set(std::ptr::null()));
            unregister(&slot);
        }
    }
}

rcu_thread_local! {
    static READER: ReaderLocal = ReaderLocal::new();
}

rcu_thread_local! {
    static REGISTRATION: Registration = Registration { slot: RefCell::new(None) };
}

/// Proof that the current thread is inside an RCU read-side critical section.
///
/// References obtained under a guard (from [`RcuCell::load`](crate::RcuCell::load),
/// [`RcuList::iter`](crate::RcuList::iter), ...) borrow it, so they cannot outlive the
/// section. Guards nest, and are neither `Send` nor `Sync`: a section belongs to a thread.
#[must_use = "the read-side critical section ends when the guard is dropped"]
pub struct ReadGuard {
    _not_send: PhantomData<*mut ()>,
}

/// Enters a read-side critical section, registering the thread on first use.
///
/// The outermost `read_lock` costs a load of the global counter, a store to the thread's
/// slot and a compiler barrier (or a fence where membarrier is unavailable); nested calls
/// only count.
#[inline]
pub fn read_lock() -> ReadGuard {
    READER.with(|r| {
        let depth = r.depth.get();
        if depth == 0 {
            let mut slot = r.slot.get();
            if slot.is_null() {
                slot = register_current_thread(r);
            }
            // SAFETY: a non-null slot pointer stays valid while the thread is registered:
            // the Arc in REGISTRATION (or, once that is gone, the registry) owns it.
            let slot = unsafe { &*slot };
            let ctr = domain().gp_ctr.0.load(Acquire);
            slot.ctr.store(ctr, Relaxed);
            reader_barrier(slot.fences);
        }
        r.depth.set(
            depth
                .checked_add(1)
                .expect("rcu: read sections nested 2^32 deep"),
        );
    });
    ReadGuard {
        _not_send: PhantomData,
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        READER.with(|r| {
            let depth = r.depth.get() - 1;
            r.depth.set(depth);
            if depth == 0 {
                // SAFETY: the thread registered when it entered this section; see read_lock.
                let slot = unsafe { &*r.slot.get() };
                slot.ctr.store(0, Release);
                reader_barrier(slot.fences);
                if slot.waiting.load(Acquire) {
                    slot.waiting.store(false, Relaxed);
                    domain().gp_event.0.set();
                }
            }
        });
    }
}

/// True if the current thread is inside a read-side critical section.
pub fn in_read_section() -> bool {
    READER.try_with(|r| r.depth.get() > 0).unwrap_or(false)
}

/// Panics if the current thread is inside a read-side critical section: `what` would
/// wait for a grace period that cannot end before this very section does.
pub(crate) fn assert_outside_read_section(what: &str) {
    assert!(
        !in_read_section(),
        "{what} called inside an RCU read-side critical section (a ReadGuard is alive on \
         this thread); it would wait for itself forever"
    );
}

#[cold]
#[inline(never)]
fn register_current_thread(r: &ReaderLocal) -> *const ReaderSlot {
    let fences = barrier_mode() == BarrierMode::Fences;
    let slot = Arc::new(ReaderSlot::new(fences));
    crate::primitive::lock(&domain().registry).push(Arc::clone(&slot));
    let raw = Arc::as_ptr(&slot);
    r.slot.set(raw);
    // If the thread is already tearing down its thread-locals, the slot simply stays in the
    // registry, idle (ctr 0), which grace periods skip.
    let _ = REGISTRATION.try_with(|reg| *reg.slot.borrow_mut() = Some(slot));
    #[cfg(loom)]
    if REGISTRATION
        .try_with(|reg| reg.slot.borrow().is_some())
        .unwrap_or(false)
    {
        domain().loom_registrations.fetch_add(1, Relaxed);
    }
    raw
}

fn unregister(slot: &Arc<ReaderSlot>) {
    crate::primitive::lock(&domain().registry).retain(|s| !Arc::ptr_eq(s, slot));
    // A thread cannot exit inside a section it still uses; make it quiescent and wake a
    // grace period that might be waiting for it (it holds its own Arc to the slot).
    slot.ctr.store(0, Release);
    if slot.waiting.swap(false, Acquire) {
        domain().gp_event.0.set();
    }
    // Loom joins a thread before its thread-locals are dropped: this count tells
    // `shutdown_call_rcu_thread` when every exiting thread is done with the domain.
    #[cfg(loom)]
    domain().loom_registrations.fetch_sub(1, Release);
}

/// Unregisters the calling thread now rather than at its exit, then waits until every
/// other registered thread has unregistered (loom only, see `shutdown_call_rcu_thread`:
/// the main thread's thread-locals are dropped after the model's RCU domain, and loom's
/// `join` returns before the joined thread's thread-locals are dropped).
#[cfg(loom)]
pub(crate) fn unregister_all_threads() {
    assert_outside_read_section("rcu::shutdown_call_rcu_thread()");
    let slot = REGISTRATION.try_with(|reg| reg.slot.borrow_mut().take());
    if let Ok(Some(slot)) = slot {
        let _ = READER.try_with(|r| r.slot.set(std::ptr::null()));
        unregister(&slot);
    }
    while domain().loom_registrations.load(Acquire) != 0 {
        loom::thread::yield_now();
    }
}

/// Number of threads currently registered as readers (for tests and diagnostics).
pub fn registered_readers() -> usize {
    crate::primitive::lock(&domain().registry).len()
}
