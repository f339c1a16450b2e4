//! A one-shot wake-up event on a futex, QEMU's `QemuEvent`: `set` is cheap when nobody
//! waits (one load, no syscall), `wait` sleeps in the kernel rather than spinning.
//!
//! States: `SET`; `FREE` (reset, nobody asleep); `BUSY` (reset, a waiter may be asleep, so
//! `set` must issue a futex wake). `reset` only turns `SET` into `FREE` (an `or` leaves
//! `BUSY` alone); the usual pattern is `reset(); check condition; wait()`, with the party
//! that changes the condition calling `set()` afterwards.

use crate::primitive::{fence, AtomicU32};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
use std::time::Duration;

const SET: u32 = 0;
const FREE: u32 = 1;
const BUSY: u32 = u32::MAX;

/// A futex-backed event.
pub(crate) struct Event {
    value: AtomicU32,
    #[cfg(loom)]
    emulated: loom_futex::Futex,
}

impl Event {
    crate::primitive::const_fn! {
        /// A new event in the `FREE` (not set) state.
        pub(crate) fn new() -> Event {
            Event {
                value: AtomicU32::new(FREE),
                #[cfg(loom)]
                emulated: loom_futex::Futex::new(),
            }
        }
    }

    /// Sets the event, waking every waiter.
    ///
    /// The leading fence orders the caller's earlier stores (a reader's `ctr = 0`) before
    /// the check of the event's state, pairing with the fence in [`Event::reset`]: either
    /// the resetter sees those stores, or this call sees the reset and wakes it.
    pub(crate) fn set(&self) {
        fence(SeqCst);
        if self.value.load(Relaxed) != SET && self.value.swap(SET, AcqRel) == BUSY {
            self.wake_all();
        }
    }

    /// Clears the event if it is set.
    pub(crate) fn reset(&self) {
        if self.value.load(Acquire) == SET {
            self.value.fetch_or(FREE, AcqRel);
        }
        fence(SeqCst);
    }

    /// Sleeps until the event is set.
    pub(crate) fn wait(&self) {
        self.wait_inner(None);
    }

    /// Sleeps until the event is set or `timeout` passes; true if the event is set.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_inner(Some(timeout))
    }

    fn wait_inner(&self, timeout: Option<Duration>) -> bool {
        let mut value = self.value.load(Acquire);
        if value == SET {
            return true;
        }
        if value == FREE {
            match self.value.compare_exchange(FREE, BUSY, Acquire, Acquire) {
                Ok(_) => value = BUSY,
                Err(now) => value = now,
            }
            if value == SET {
                return true;
            }
        }
        debug_assert_eq!(value, BUSY);
        let deadline = timeout.map(|t| crate::primitive::Instant::now() + t);
        loop {
            let left = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(crate::primitive::Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return self.value.load(Acquire) == SET,
                },
            };
            self.futex_wait(BUSY, left);
            if self.value.load(Acquire) == SET {
                return true;
            }
            if cfg!(loom) && timeout.is_some() {
                // Loom has no clock: a timed wait counts as timed out once woken or not.
                return false;
            }
        }
    }

    #[cfg(not(loom))]
    fn futex_wait(&self, expected: u32, timeout: Option<Duration>) {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: the futex word is a live, aligned u32 owned by `self`; FUTEX_WAIT only
        // reads it and sleeps while it equals `expected`; `ts_ptr` is null or points to a
        // timespec that outlives the call. EINTR, EAGAIN and ETIMEDOUT are handled by the
        // caller, which rechecks the state.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.value.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                expected,
                ts_ptr,
            );
        }
    }

    #[cfg(not(loom))]
    fn wake_all(&self) {
        // SAFETY: FUTEX_WAKE on a live, aligned u32 owned by `self`; it touches no memory.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.value.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            );
        }
    }

    #[cfg(loom)]
    fn futex_wait(&self, expected: u32, timeout: Option<Duration>) {
        self.emulated.wait(&self.value, expected, timeout.is_some());
    }

    #[cfg(loom)]
    fn wake_all(&self) {
        self.emulated.wake_all();
    }
}

/// Under loom a futex is modelled by a mutex and a condition variable with the kernel's
/// contract: `wait` sleeps only if the word still holds the expected value.
#[cfg(loom)]
mod loom_futex {
    use crate::primitive::{lock, wait, AtomicU32, Condvar, Mutex};
    use std::sync::atomic::Ordering::SeqCst;

    pub(crate) struct Futex {
        lock: Mutex<()>,
        cv: Condvar,
    }

    impl Futex {
        pub(crate) fn new() -> Futex {
            Futex {
                lock: Mutex::new(()),
                cv: Condvar::new(),
            }
        }

        pub(crate) fn wait(&self, word: &AtomicU32, expected: u32, timed: bool) {
            let g = lock(&self.lock);
            if word.load(SeqCst) == expected && !timed {
                drop(wait(&self.cv, g));
            }
        }

        pub(crate) fn wake_all(&self) {
            let _g = lock(&self.lock);
            self.cv.notify_all();
        }
    }
}
