//! [`BigLock`]: a lock to hand to the call_rcu thread (QEMU's big QEMU lock, the BQL) that
//! knows which thread holds it, so that [`drain_call_rcu`](crate::drain_call_rcu) can
//! release it while it waits instead of deadlocking.
//!
//! QEMU's call_rcu thread takes the BQL around each batch of callbacks, and QEMU's
//! `drain_call_rcu()` drops the BQL around its wait (`bql_unlock(); wait; bql_lock()`):
//! otherwise a vCPU or the main loop draining with the BQL held would wait for callbacks
//! that wait for the BQL. A `std::sync::Mutex` cannot do that (nobody can tell who holds
//! it, and only its guard can release it). A `BigLock` guards no data of its own — like the
//! BQL, it serializes code; what it protects lives in `Sync` types — so releasing it behind
//! its holder's back breaks no borrow, only the holder's assumption that nothing changes
//! across the call, exactly as in QEMU.

use crate::primitive::{lock, wait, Condvar, Mutex};
use std::marker::PhantomData;

#[cfg(loom)]
use loom::thread::{current, ThreadId};
#[cfg(not(loom))]
use std::thread::{current, ThreadId};

/// A data-less mutex that knows its holder, meant to be handed to the call_rcu thread with
/// [`set_call_rcu_lock`](crate::set_call_rcu_lock) (the VMM's big lock).
///
/// The contract, once handed:
/// - The call_rcu thread holds it while it runs each batch of callbacks: callbacks are
///   serialized with every other holder.
/// - [`drain_call_rcu`](crate::drain_call_rcu) on a thread that holds it releases it while
///   it waits and takes it again before returning (QEMU's drain_call_rcu with the BQL):
///   callbacks, and any other thread, may take it meanwhile, so whatever it protects may
///   have changed when the drain returns.
/// - It is not recursive: locking it again on the thread that holds it panics (it would
///   deadlock), as does a callback that tries to take it (the call_rcu thread holds it).
///
/// ```
/// use std::sync::Arc;
/// let bql = Arc::new(rcu::BigLock::new());
/// rcu::set_call_rcu_lock(Some(bql.clone()));
/// let held = bql.lock();
/// rcu::call_rcu(|| {}); // runs with `bql` held, once we release it
/// rcu::drain_call_rcu(); // releases `bql` while it waits, then takes it again
/// assert!(bql.is_held_by_current_thread());
/// drop(held);
/// rcu::set_call_rcu_lock(None);
/// ```
pub struct BigLock {
    /// The holder, if any.
    holder: Mutex<Option<ThreadId>>,
    /// Signalled when the lock is released.
    released: Condvar,
}

impl Default for BigLock {
    fn default() -> Self {
        BigLock::new()
    }
}

impl BigLock {
    crate::primitive::const_fn! {
        /// An unlocked lock.
        pub fn new() -> BigLock {
            BigLock { holder: Mutex::new(None), released: Condvar::new() }
        }
    }

    /// Takes the lock, waiting for its holder to release it.
    ///
    /// # Panics
    /// If the calling thread holds it already (it would wait for itself).
    pub fn lock(&self) -> BigLockGuard<'_> {
        self.acquire();
        BigLockGuard {
            lock: self,
            _not_send: PhantomData,
        }
    }

    /// Takes the lock if nobody holds it.
    pub fn try_lock(&self) -> Option<BigLockGuard<'_>> {
        let mut holder = lock(&self.holder);
        if holder.is_some() {
            return None;
        }
        *holder = Some(current().id());
        Some(BigLockGuard {
            lock: self,
            _not_send: PhantomData,
        })
    }

    /// True if the calling thread holds the lock (QEMU's `bql_locked()`).
    pub fn is_held_by_current_thread(&self) -> bool {
        *lock(&self.holder) == Some(current().id())
    }

    fn acquire(&self) {
        let me = current().id();
        let mut holder = lock(&self.holder);
        loop {
            match *holder {
                None => break,
                Some(h) if h == me => {
                    drop(holder);
                    panic!(
                        "rcu::BigLock locked again by the thread that holds it (from a \
                         call_rcu callback, the call_rcu thread holds it); it would deadlock"
                    );
                }
                Some(_) => holder = wait(&self.released, holder),
            }
        }
        *holder = Some(me);
    }

    /// Releases the lock, which the calling thread holds.
    fn release(&self) {
        let mut holder = lock(&self.holder);
        assert_eq!(
            *holder,
            Some(current().id()),
            "rcu::BigLock released by a thread that does not hold it"
        );
        *holder = None;
        drop(holder);
        self.released.notify_one();
    }

    /// Runs `f` with the lock released, then takes it again (also when `f` panics). The
    /// calling thread must hold it.
    fn released_while<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Retake<'a>(&'a BigLock);
        impl Drop for Retake<'_> {
            fn drop(&mut self) {
                self.0.acquire();
            }
        }
        self.release();
        let _retake = Retake(self);
        f()
    }
}

impl crate::call_rcu::BatchLock for BigLock {
    fn hold_while(&self, batch: &mut dyn FnMut()) {
        let _held = self.lock();
        batch();
    }

    fn held_by_current_thread(&self) -> bool {
        self.is_held_by_current_thread()
    }

    fn release_while(&self, wait: &mut dyn FnMut()) -> bool {
        self.released_while(wait);
        true
    }
}

/// A held [`BigLock`]; dropping it releases the lock. It belongs to the thread that took
/// the lock (`!Send`).
#[must_use = "the lock is released when the guard is dropped"]
pub struct BigLockGuard<'a> {
    lock: &'a BigLock,
    _not_send: PhantomData<*const ()>,
}

impl BigLockGuard<'_> {
    /// Runs `f` with the lock released and takes it again afterwards (QEMU's
    /// `bql_unlock(); f(); bql_lock();`), also if `f` panics.
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.lock.released_while(f)
    }
}

impl Drop for BigLockGuard<'_> {
    fn drop(&mut self) {
        self.lock.release();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn knows_its_holder_and_releases_around_unlocked() {
        let l = Arc::new(BigLock::new());
        assert!(!l.is_held_by_current_thread());
        let mut g = l.lock();
        assert!(l.is_held_by_current_thread());
        assert!(l.try_lock().is_none());
        let other = l.clone();
        let taken_meanwhile = g.unlocked(move || {
            std::thread::spawn(move || other.try_lock().is_some())
                .join()
                .unwrap()
        });
        assert!(taken_meanwhile, "unlocked() did not release the lock");
        assert!(
            l.is_held_by_current_thread(),
            "unlocked() did not take it back"
        );
        let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.lock()));
        assert!(again.is_err(), "a recursive lock must panic, not deadlock");
        drop(g);
        assert!(!l.is_held_by_current_thread());
        assert!(l.try_lock().is_some());
    }
}
