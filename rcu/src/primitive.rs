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
    pub(crate) fn spawn_named(_name: &str, f: impl FnOnce() + Send + 'static) {
        loom::thread::spawn(f);
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
