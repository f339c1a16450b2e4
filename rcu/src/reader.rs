//! The read side: [`read_lock`] and [`ReadGuard`], and the per-thread registration behind
//! them.
//!
//! Each thread's published word ([`ReaderSlot`]) lives in its own thread-local storage, so
//! a section touches no memory but that thread-local and the global counter: entering the
//! outermost section copies `gp_ctr | 1` into the word, nesting adds and subtracts 1,
//! leaving the outermost stores 0 and checks whether a grace period waits for it. A thread
//! registers on its first section (a pointer to its slot in the domain's registry) and
//! unregisters from a thread-local destructor when it exits, before its thread-local
//! storage goes away.

use crate::barrier::{barrier_mode, reader_barrier, BarrierMode};
use crate::domain::{
    domain, gp_ctr, in_section, ReaderSlot, SlotPtr, FENCES, IDLE_SLOW, NEST_MASK, TRANSIENT,
    WAITING,
};
use crate::primitive::{lock, rcu_thread_local};
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

/// The thread's reader state: its published slot and whether it is registered (its barrier
/// mode is the slot's FENCES flag). Const-initialized
/// and without a destructor, so access compiles to a plain thread-pointer-relative address
/// and the memory stays valid through every thread-local destructor of the thread.
struct ReaderLocal {
    slot: ReaderSlot,
    registered: Cell<bool>,
}

impl ReaderLocal {
    crate::primitive::const_fn! {
        fn new() -> ReaderLocal {
            ReaderLocal { slot: ReaderSlot::new(), registered: Cell::new(false) }
        }
    }
}

/// Unregisters the thread when its thread-locals are destroyed at exit. It points at the
/// thread's [`ReaderLocal`], which outlives every thread-local destructor (see there).
struct Registration {
    local: Cell<*const ReaderLocal>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // A failed loom model drops its thread-locals outside the model, while unwinding:
        // touching loom state then would abort the test run and hide the failure.
        #[cfg(loom)]
        if std::thread::panicking() {
            return;
        }
        // SAFETY: the pointer is null or the thread's own ReaderLocal, still valid here.
        if let Some(local) = unsafe { self.local.replace(std::ptr::null()).as_ref() } {
            unregister(local);
        }
    }
}

#[cfg(not(loom))]
std::thread_local! {
    static READER: ReaderLocal = const { ReaderLocal::new() };
}

// Loom drops its thread-locals in an order of its own, and a registered slot must outlive
// them all: under loom each thread's reader state is a leaked box instead.
#[cfg(loom)]
loom::thread_local! {
    static READER: Cell<*const ReaderLocal> = Cell::new(std::ptr::null());
}

rcu_thread_local! {
    static REGISTRATION: Registration = Registration { local: Cell::new(std::ptr::null()) };
}

/// Runs `f` on the calling thread's reader state.
#[cfg(not(loom))]
#[inline(always)]
fn with_local<R>(f: impl FnOnce(&ReaderLocal) -> R) -> R {
    READER.with(f)
}

#[cfg(loom)]
fn with_local<R>(f: impl FnOnce(&ReaderLocal) -> R) -> R {
    READER.with(|p| {
        if p.get().is_null() {
            p.set(Box::leak(Box::new(ReaderLocal::new())));
        }
        // SAFETY: a leaked box, never freed.
        f(unsafe { &*p.get() })
    })
}

/// Like [`with_local`], but None once the thread-local is gone (loom only).
fn try_with_local<R>(f: impl FnOnce(&ReaderLocal) -> R) -> Option<R> {
    #[cfg(not(loom))]
    return READER.try_with(f).ok();
    #[cfg(loom)]
    return READER
        .try_with(|p| p.get())
        .ok()
        .filter(|p| !p.is_null())
        // SAFETY: a leaked box, never freed.
        .map(|p| f(unsafe { &*p }));
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
    with_local(|r| {
        let c = r.slot.ctr.load(Relaxed);
        let depth = c & NEST_MASK;
        if depth == 0 {
            let gp = gp_ctr().load(Acquire);
            r.slot.ctr.store(gp | 1, Relaxed);
            reader_barrier(false);
        } else if depth >= NEST_MASK - 1 {
            // IDLE_SLOW (unregistered, or fence mode), or nested too deep.
            lock_cold(r, c);
        } else {
            r.slot.ctr.store(c + 1, Relaxed);
        }
    });
    ReadGuard {
        _not_send: PhantomData,
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        with_local(|r| {
            let c = r.slot.ctr.load(Relaxed);
            if c & NEST_MASK == 1 {
                r.slot.ctr.store(0, Release);
                reader_barrier(false);
                // In fence mode the FENCES bit sends every outermost unlock to the slow
                // path, whose read-modify-write orders this store before WAITING is read.
                if r.slot.flags.load(Acquire) != 0 {
                    outermost_unlock_slow(r);
                }
            } else {
                r.slot.ctr.store(c - 1, Relaxed);
            }
        });
    }
}

/// The outermost lock of an unregistered thread, or of any thread in fence mode (both
/// park their word at IDLE_SLOW when outside); or a nesting too deep to count.
#[cold]
#[inline(never)]
fn lock_cold(r: &ReaderLocal, c: u64) {
    if c != IDLE_SLOW {
        nested_too_deep();
    }
    if !r.registered.get() {
        register_current_thread(r);
    }
    let gp = gp_ctr().load(Acquire);
    r.slot.ctr.store(gp | 1, Relaxed);
    reader_barrier(r.slot.flags.load(Relaxed) & FENCES != 0);
}

#[cold]
#[inline(never)]
fn nested_too_deep() -> ! {
    panic!("rcu: read sections nested more than {} deep", NEST_MASK - 1);
}

/// A grace period waits for this reader, the thread must unregister now, or it runs in
/// fence mode.
///
/// In fence mode this read-modify-write is the reader's barrier: the grace period's
/// `fetch_or(WAITING)` on the same word either comes first (we see WAITING and wake it) or
/// reads from ours, and then the fence that follows it in the grace period makes our
/// `ctr = 0` visible to its scan.
#[cold]
#[inline(never)]
fn outermost_unlock_slow(r: &ReaderLocal) {
    let flags = r.slot.flags.fetch_and(!WAITING, AcqRel);
    if flags & WAITING != 0 {
        domain().gp_event.0.set();
    }
    if flags & TRANSIENT != 0 {
        unregister(r);
    } else if flags & FENCES != 0 {
        // Outside still, for grace periods; the next lock takes the slow path and fences.
        r.slot.ctr.store(IDLE_SLOW, Relaxed);
    }
}

/// True if the current thread is inside a read-side critical section.
pub fn in_read_section() -> bool {
    try_with_local(|r| in_section(r.slot.ctr.load(Relaxed))).unwrap_or(false)
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
fn register_current_thread(r: &ReaderLocal) {
    // Arrange unregistration at exit first. If the thread is already running its
    // thread-local destructors that is impossible, and the registration lasts only until
    // the end of this section.
    let at_exit = REGISTRATION.try_with(|reg| reg.local.set(r)).is_ok();
    if !at_exit {
        r.slot.flags.fetch_or(TRANSIENT, Relaxed);
    }
    if barrier_mode() == BarrierMode::Fences {
        r.slot.flags.fetch_or(FENCES, Relaxed);
    }
    lock(&domain().registry).push(SlotPtr(&r.slot));
    r.registered.set(true);
    #[cfg(loom)]
    domain().loom_registrations.fetch_add(1, Relaxed);
}

fn unregister(r: &ReaderLocal) {
    if !r.registered.get() {
        return;
    }
    let me = SlotPtr(&r.slot);
    let mut registry = lock(&domain().registry);
    registry.retain(|s| *s != me);
    // A grace period may be waiting for this thread (one exiting inside a section it
    // leaked): make it quiescent and wake the grace period before leaving for good. The
    // next lock, if any, registers again.
    r.slot.ctr.store(IDLE_SLOW, Release);
    if r.slot.flags.swap(0, AcqRel) & WAITING != 0 {
        domain().gp_event.0.set();
    }
    r.registered.set(false);
    drop(registry);
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
    let mine = REGISTRATION.try_with(|reg| reg.local.replace(std::ptr::null()));
    // SAFETY: null or this thread's leaked ReaderLocal.
    if let Some(local) = mine.ok().and_then(|p| unsafe { p.as_ref() }) {
        unregister(local);
    }
    while domain().loom_registrations.load(Acquire) != 0 {
        loom::thread::yield_now();
    }
}

/// Number of threads currently registered as readers (for tests and diagnostics).
pub fn registered_readers() -> usize {
    lock(&domain().registry).len()
}
