//! [`RcuCell`]: an RCU-protected pointer (QEMU's `qatomic_rcu_read` / `qatomic_rcu_set`).

use crate::call_rcu::call_rcu;
use crate::grace::synchronize;
use crate::primitive::AtomicPtr;
use crate::reader::ReadGuard;
use std::fmt;
use std::sync::atomic::Ordering::{AcqRel, Acquire};

/// A value that readers load with no lock and writers replace whole.
///
/// Readers call [`load`](RcuCell::load) under a [`ReadGuard`] and get a reference that
/// lives as long as the guard. Writers [`store`](RcuCell::store) a new value; the old one is
/// dropped on the call_rcu thread after a grace period, when no reader can still hold it.
/// Writers that must act on the old value themselves [`replace`](RcuCell::replace) it.
///
/// Concurrent writers are allowed (each swap is atomic); a read-modify-write needs the
/// caller's own writer lock.
pub struct RcuCell<T: Send + Sync + 'static> {
    ptr: AtomicPtr<T>,
}

// SAFETY: readers on any thread get `&T` (needs `T: Sync`); writers move values in from
// any thread and the old ones are dropped on the call_rcu thread (needs `T: Send`).
unsafe impl<T: Send + Sync + 'static> Send for RcuCell<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync + 'static> Sync for RcuCell<T> {}

impl<T: Send + Sync + 'static> RcuCell<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> RcuCell<T> {
        RcuCell {
            ptr: AtomicPtr::new(Box::into_raw(Box::new(value))),
        }
    }

    /// The current value, valid for as long as the read section `guard` proves.
    #[inline]
    pub fn load<'g>(&self, _guard: &'g ReadGuard) -> &'g T {
        // SAFETY: the pointer came from Box::into_raw and is never null. A value is freed
        // only through call_rcu after it was swapped out (store, replace, drop), i.e.
        // after a grace period that began after this load could have seen it; the guard
        // keeps this section, hence the grace period, from ending before `'g` does.
        unsafe { &*self.ptr.load(Acquire) }
    }

    /// Publishes `value`; the old value is dropped after a grace period (through
    /// [`call_rcu`], so [`drain_call_rcu`](crate::drain_call_rcu) waits for it too).
    pub fn store(&self, value: T) {
        let old = self.swap_in(value);
        drop_after_grace_period(old);
    }

    /// Publishes `value` and hands back the old one, which readers may still hold: the
    /// caller gets at it only through [`Retired::synchronize`] (or lets it drop, which
    /// defers to call_rcu).
    pub fn replace(&self, value: T) -> Retired<T> {
        Retired {
            ptr: self.swap_in(value),
        }
    }

    fn swap_in(&self, value: T) -> *mut T {
        self.ptr.swap(Box::into_raw(Box::new(value)), AcqRel)
    }
}

fn drop_after_grace_period<T: Send + 'static>(old: *mut T) {
    let old = SendPtr(old);
    call_rcu(move || {
        let old = old;
        // SAFETY: `old` came from Box::into_raw, was unpublished before call_rcu was
        // called, and the grace period has ended: no reader can still reference it.
        drop(unsafe { Box::from_raw(old.0) });
    });
}

/// A raw pointer moved to the call_rcu thread with the value it owns.
struct SendPtr<T>(*mut T);
// SAFETY: SendPtr transfers ownership of a boxed `T: Send`.
unsafe impl<T: Send> Send for SendPtr<T> {}

impl<T: Send + Sync + 'static> Drop for RcuCell<T> {
    fn drop(&mut self) {
        // A reader may still hold a reference loaded before the cell went away (its
        // lifetime follows the guard, not the cell), so even the last value waits.
        drop_after_grace_period(self.ptr.load(Acquire));
    }
}

impl<T: Send + Sync + fmt::Debug + 'static> fmt::Debug for RcuCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = crate::read_lock();
        f.debug_tuple("RcuCell").field(self.load(&g)).finish()
    }
}

/// A value unpublished from an [`RcuCell`] that readers may still hold.
///
/// [`synchronize`](Retired::synchronize) waits for a grace period and returns it; dropping
/// a `Retired` defers its drop to the call_rcu thread instead.
#[must_use = "dropping a Retired defers its value's drop to call_rcu"]
pub struct Retired<T: Send + 'static> {
    ptr: *mut T,
}

// SAFETY: a Retired owns its boxed value, and hands out no shared access until it is
// unique; moving it moves the `T`.
unsafe impl<T: Send + 'static> Send for Retired<T> {}

impl<T: Send + 'static> Retired<T> {
    /// Waits for a grace period, then returns the value, now exclusively the caller's.
    ///
    /// # Panics
    /// Inside a read-side critical section (see [`synchronize`]).
    pub fn synchronize(self) -> T {
        synchronize();
        self.into_value()
    }

    /// Waits for one grace period for all of `retired` and returns their values.
    pub fn synchronize_all(retired: impl IntoIterator<Item = Retired<T>>) -> Vec<T> {
        let retired: Vec<Retired<T>> = retired.into_iter().collect();
        synchronize();
        retired.into_iter().map(Retired::into_value).collect()
    }

    fn into_value(self) -> T {
        let ptr = self.ptr;
        std::mem::forget(self);
        // SAFETY: `ptr` came from Box::into_raw and was unpublished before the grace
        // period the caller just waited for; nobody else owns it.
        *unsafe { Box::from_raw(ptr) }
    }
}

impl<T: Send + 'static> Drop for Retired<T> {
    fn drop(&mut self) {
        drop_after_grace_period(self.ptr);
    }
}
