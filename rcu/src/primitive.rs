//! One switch between `std` and `loom` for every synchronization primitive the crate uses,
//! so the very same algorithm runs in production and under the loom model checker
//! (`RUSTFLAGS="--cfg loom"`), as crossbeam-epoch does.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize,
};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use frozen_clock::Instant;
#[cfg(not(loom))]
pub(crate) use std::time::Instant;

/// Loom has no clock, and a model must behave the same in every execution: reading the
/// real clock would let a slow execution take another branch ("is the model fully
/// deterministic?"). Under loom time stands still, so a deadline never passes by itself;
/// timed waits count as timed out instead (see `event`).
#[cfg(loom)]
mod frozen_clock {
    use std::time::Duration;

    /// A point in frozen time: the offset from the one instant `now()` ever returns.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub(crate) struct Instant(Duration);

    impl Instant {
        /// Always the same instant.
        pub(crate) fn now() -> Instant {
            Instant(Duration::ZERO)
        }

        /// As `std::time::Instant::checked_duration_since`.
        pub(crate) fn checked_duration_since(&self, earlier: Instant) -> Option<Duration> {
            self.0.checked_sub(earlier.0)
        }
    }

    impl std::ops::Add<Duration> for Instant {
        type Output = Instant;
        fn add(self, d: Duration) -> Instant {
            Instant(self.0 + d)
        }
    }
}

/// Threads: named std threads in production, loom's modelled threads under loom.
pub(crate) mod thread {
    #[cfg(not(loom))]
    pub(crate) fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(f)
            .unwrap_or_else(|e| panic!("rcu: cannot spawn the {name} thread: {e}"));
    }

    #[cfg(loom)]
    loom::lazy_static! {
        /// Threads the crate spawned in this model execution, joined by [`join_spawned`].
        static ref SPAWNED: std::sync::Mutex<Vec<loom::thread::JoinHandle<()>>> =
            std::sync::Mutex::new(Vec::new());
    }

    #[cfg(loom)]
    pub(crate) fn spawn_named(_name: &str, f: impl FnOnce() + Send + 'static) {
        let handle = loom::thread::spawn(f);
        super::std_lock(&SPAWNED).push(handle);
    }

    /// Joins every thread the crate spawned (loom only): loom drops the model's lazy
    /// statics, the RCU domain among them, when the model's closure returns, so a crate
    /// thread still running then would use freed state.
    #[cfg(loom)]
    pub(crate) fn join_spawned() {
        let handles = std::mem::take(&mut *super::std_lock(&SPAWNED));
        for h in handles {
            if let Err(panic) = h.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }

    #[cfg(not(loom))]
    pub(crate) use std::hint::spin_loop;

    #[cfg(loom)]
    pub(crate) use loom::hint::spin_loop;
}

/// Locks a mutex, ignoring poisoning: every critical section in this crate leaves its data
/// consistent before anything that could panic runs, so a poisoned lock holds valid data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks a plain std mutex for loom-only bookkeeping that loom need not model.
#[cfg(loom)]
fn std_lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on a condition variable, ignoring poisoning (see [`lock`]).
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

/// Declares a `const fn` in production and a plain `fn` under loom, whose types have no
/// const constructors.
macro_rules! const_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident() -> $ret:ty $body:block) => {
        $(#[$m])* #[cfg(not(loom))] $vis const fn $name() -> $ret $body
        $(#[$m])* #[cfg(loom)] $vis fn $name() -> $ret $body
    };
}
pub(crate) use const_fn;

/// Declares a thread-local: const-initialized in production (no lazy-init check on the
/// read-side fast path), loom's modelled thread-local under loom.
macro_rules! rcu_thread_local {
    ($(#[$m:meta])* static $name:ident: $t:ty = $init:expr;) => {
        #[cfg(not(loom))]
        std::thread_local! { $(#[$m])* static $name: $t = const { $init }; }
        #[cfg(loom)]
        loom::thread_local! { $(#[$m])* static $name: $t = $init; }
    };
}
pub(crate) use rcu_thread_local;

/// Declares the crate's one global: a plain static in production, a loom lazy static
/// (fresh for every model execution) under loom.
macro_rules! rcu_global {
    (static $name:ident: $t:ty = $init:expr;) => {
        #[cfg(not(loom))]
        static $name: $t = $init;
        #[cfg(loom)]
        loom::lazy_static! { static ref $name: $t = $init; }
    };
}
pub(crate) use rcu_global;
