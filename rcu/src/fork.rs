//! `fork` in a process that uses RCU, handled as QEMU does, with `pthread_atfork` hooks.
//!
//! Only the thread that calls `fork` exists in the child. Without help the child would
//! list the parent's reader threads (some inside sections that never end there), believe a
//! grace period led by a parent thread is still running, and believe it has a call_rcu
//! thread: its `synchronize` and `drain_call_rcu` would hang. And a lock of ours held by
//! another thread at the moment of the fork would stay locked in the child forever.
//!
//! - prepare (in the parent, before the fork): take the crate's locks, in the crate's one
//!   order — grace-period election (`sync`), then the registry, then the call_rcu locks
//!   (queue, parked batch, batch lock). No code of the crate holds one of them while taking
//!   another, so this order cannot deadlock with it. Holding them means no thread is midway
//!   through changing what they protect when the address space is copied.
//! - parent (after the fork): release them.
//! - child: drop every registry entry but the forking thread's own; reset the grace-period
//!   election (no leader, no waiters: those were other threads; the counters stay, so
//!   grace-period numbers keep increasing); mark the call_rcu thread as not started (unless
//!   the fork came from a callback on it), so that the next `call_rcu` or `drain_call_rcu`
//!   starts one; keep the pending callbacks, including the batch the parent's call_rcu
//!   thread was holding through a grace period, which run in the child after a grace
//!   period of the child's; then release the locks.
//!
//! The hooks are installed lazily, the first time anything reaches the RCU domain (see
//! [`domain()`](crate::domain::domain)): before that there is no state to fix up. The
//! first use may race in two threads; the loser goes on without waiting for the winner's
//! `pthread_atfork` (a `Once` would instead be left "running" in a child forked meanwhile).
//!
//! The locks are std mutexes whose guards are kept, between prepare and parent/child, in
//! [`HELD`]; in the child the same (forking) thread releases them.

use crate::call_rcu::{self, ForkLocks};
use crate::domain::{domain, SlotPtr, SyncState};
use crate::primitive::{lock, MutexGuard};
use std::cell::UnsafeCell;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};

const NOT_INSTALLED: u8 = 0;
const INSTALLING: u8 = 1;
const INSTALLED: u8 = 2;

static HANDLERS: AtomicU8 = AtomicU8::new(NOT_INSTALLED);

/// Installs the fork hooks, once per process (a fork child inherits them).
#[inline(always)]
pub(crate) fn install_handlers() {
    if HANDLERS.load(Acquire) != INSTALLED {
        install_cold();
    }
}

#[cold]
#[inline(never)]
fn install_cold() {
    if HANDLERS
        .compare_exchange(NOT_INSTALLED, INSTALLING, AcqRel, Acquire)
        .is_err()
    {
        return;
    }
    // SAFETY: the three handlers are `extern "C" fn()` with no preconditions, and live for
    // the whole process.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc == 0 {
        HANDLERS.store(INSTALLED, Release);
    } else {
        // Out of memory: try again on the next use.
        log::error!(
            "rcu: pthread_atfork failed ({}); a fork child could not use RCU",
            std::io::Error::from_raw_os_error(rc)
        );
        HANDLERS.store(NOT_INSTALLED, Release);
    }
}

/// The locks `prepare` took, for `parent` or `child` to release.
struct Held {
    sync: MutexGuard<'static, SyncState>,
    registry: MutexGuard<'static, Vec<SlotPtr>>,
    calls: ForkLocks,
}

struct HeldSlot(UnsafeCell<Option<Held>>);

// SAFETY: the cell is only touched by a thread holding the `sync` lock: `prepare` fills it
// right after taking that lock, and `parent` or `child` (the same thread, or its copy in
// the child) empties it before releasing the lock. So two threads never touch it at once,
// and the guards inside are released by the thread that took them.
unsafe impl Sync for HeldSlot {}

static HELD: HeldSlot = HeldSlot(UnsafeCell::new(None));

extern "C" fn prepare() {
    let d = domain();
    let sync = lock(&d.sync);
    let registry = lock(&d.registry);
    let calls = call_rcu::lock_for_fork();
    let held = Held {
        sync,
        registry,
        calls,
    };
    // SAFETY: this thread holds `sync` (inside `held`): see HeldSlot.
    unsafe { *HELD.0.get() = Some(held) };
}

/// Takes the guards `prepare` stored.
///
/// # Safety
/// Only from `parent` or `child`, in the thread that ran `prepare` (or its copy).
unsafe fn take_held() -> Option<Held> {
    // SAFETY: the caller runs after `prepare` in the thread holding `sync`: see HeldSlot.
    unsafe { (*HELD.0.get()).take() }
}

extern "C" fn parent() {
    // SAFETY: called by fork in the parent, in the thread that ran `prepare`.
    drop(unsafe { take_held() });
}

extern "C" fn child() {
    // SAFETY: called by fork in the child, in the copy of the thread that ran `prepare`.
    let Some(held) = (unsafe { take_held() }) else {
        return;
    };
    let Held {
        mut sync,
        mut registry,
        calls,
    } = held;
    sync.running = false;
    sync.waiters = 0;
    crate::reader::after_fork_in_child(&mut registry);
    call_rcu::after_fork_in_child(calls);
    drop(registry);
    drop(sync);
}
