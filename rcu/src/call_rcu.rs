//! Deferred reclamation: [`call_rcu`], [`drain_call_rcu`] and the call_rcu thread.
//!
//! Callbacks queue up; one thread, started on first use, takes them in batches, waits for
//! one grace period per batch and runs the batch.
//!
//! Batching policy: a batch closes when enough callbacks are pending, when the oldest has
//! waited [`BATCH_WINDOW`], or at once when someone drains. A grace period costs one
//! membarrier (an IPI to every busy CPU, ~16 µs on these hosts), so [`BATCH_SIZE`] (32)
//! callbacks share it for under a microsecond each; the 10 ms window bounds how long freed
//! memory lingers (QEMU waits up to 50 ms for 30 callbacks; memory hot-unplug wants it
//! back sooner). Under a sustained stream of updates a fixed 32 would still mean a grace
//! period, and an IPI to every reader's CPU, every few tens of microseconds; so the
//! threshold doubles (up to [`MAX_BATCH_SIZE`]) each time a batch fills before its window
//! ends, and halves back towards 32 each time the window ends first. Memory held stays
//! bounded by one window's worth of callbacks either way.
//!
//! Faults: a drain waits for the thread, so the thread must never stop serving silently.
//! A panicking callback is caught and the batch goes on; a panic in the handed lock's hold
//! ([`BatchLock`]) is caught around the whole hold, reported on stderr, and the callbacks
//! it did not run are run without the lock; should the thread ever end anyway, it marks
//! itself stopped and hands queued work to a new thread. The one fault it cannot serve
//! through — no grace period (a failed membarrier, or a callback that leaked a read guard
//! on this thread) — aborts the process with a message rather than run callbacks early or
//! hang. Draining while holding the handed lock releases it around the wait (see
//! [`drain_call_rcu`] and [`BigLock`](crate::BigLock)).

use crate::callback::Callback;
use crate::event::Event;
use crate::grace::synchronize;
use crate::primitive::{lock, wait, AtomicBool, AtomicUsize, Condvar, Instant, Mutex};
use crate::reader::assert_outside_read_section;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::Duration;

/// Callbacks that close a batch at once when updates are rare.
pub const BATCH_SIZE: usize = 32;
/// The largest batch threshold a sustained stream of callbacks can raise it to.
pub const MAX_BATCH_SIZE: usize = 4096;
/// The longest a callback waits for its batch to fill.
pub const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// A lock the call_rcu thread holds while it runs each batch of callbacks, as QEMU's
/// call_rcu thread holds the big QEMU lock: callbacks then run serialized with the code
/// that holds the same lock. [`BigLock`](crate::BigLock) is the crate's own; it is what a
/// VMM hands over (see there for the contract).
///
/// A thread that holds the handed lock and calls [`drain_call_rcu`] would wait for
/// callbacks that wait for the lock. So `drain_call_rcu` asks the lock whether the calling
/// thread holds it and, if so, has it released around the wait
/// ([`release_while`](Self::release_while)); a lock that cannot be released that way makes
/// the drain panic instead of deadlocking. An implementation must therefore answer
/// [`held_by_current_thread`](Self::held_by_current_thread) truthfully.
///
/// A panic in [`hold_while`](Self::hold_while) (a poisoned mutex inside it, say) does not
/// stop the call_rcu thread: it is reported on stderr and the callbacks of the batch that
/// the hold did not run are run without the lock.
pub trait BatchLock: Send + Sync + 'static {
    /// Runs `batch` with the lock held.
    fn hold_while(&self, batch: &mut dyn FnMut());

    /// True if the calling thread holds the lock.
    fn held_by_current_thread(&self) -> bool;

    /// Called on a thread that holds the lock: releases it, runs `wait`, and takes it again
    /// before returning true. Returns false, without running `wait`, if the lock cannot be
    /// released that way (the default); [`drain_call_rcu`] then panics rather than
    /// deadlock.
    fn release_while(&self, wait: &mut dyn FnMut()) -> bool {
        let _ = wait;
        false
    }
}

/// The queue the call_rcu thread serves.
pub(crate) struct CallRcuQueue {
    queue: Mutex<Vec<Callback>>,
    /// Set when work arrives that the thread may be sleeping through.
    ready: Event,
    started: AtomicBool,
    /// Callers inside `drain_call_rcu`: while non-zero, batches close at once.
    draining: AtomicUsize,
    /// The current batch threshold (see the module doc), written by the thread only.
    threshold: AtomicUsize,
    batch_lock: Mutex<Option<Arc<dyn BatchLock>>>,
    stats: Stats,
    #[cfg(loom)]
    shutdown: AtomicBool,
}

struct Stats {
    queued: AtomicUsize,
    run: AtomicUsize,
    batches: AtomicUsize,
}

impl CallRcuQueue {
    crate::primitive::const_fn! {
        pub(crate) fn new() -> CallRcuQueue {
            CallRcuQueue {
                queue: Mutex::new(Vec::new()),
                ready: Event::new(),
                started: AtomicBool::new(false),
                draining: AtomicUsize::new(0),
                threshold: AtomicUsize::new(BATCH_SIZE),
                batch_lock: Mutex::new(None),
                stats: Stats {
                    queued: AtomicUsize::new(0),
                    run: AtomicUsize::new(0),
                    batches: AtomicUsize::new(0),
                },
                #[cfg(loom)]
                shutdown: AtomicBool::new(false),
            }
        }
    }
}

fn queue() -> &'static CallRcuQueue {
    &crate::domain::domain().calls
}

/// Runs `f` on the call_rcu thread after a grace period: after every read-side critical
/// section that was running when `call_rcu` was called has ended.
///
/// Callbacks may call `call_rcu` themselves. Callbacks still queued when the process exits
/// are not run (the thread does not hold up exit).
pub fn call_rcu(f: impl FnOnce() + Send + 'static) {
    let q = queue();
    let pending = {
        let mut v = lock(&q.queue);
        v.push(Callback::new(f));
        // Written only under the queue lock: no read-modify-write needed.
        let queued = &q.stats.queued;
        queued.store(queued.load(Relaxed) + 1, Relaxed);
        v.len()
    };
    // After queueing: a thread that is exiting clears `started` before it looks at the
    // queue one last time (under its lock), so either it sees this callback or we see
    // `started` cleared and start a new thread.
    ensure_thread_started(q);
    // The thread sleeps untimed only on an empty queue, and timed until a batch fills.
    if pending == 1 || pending == q.threshold.load(Relaxed) {
        q.ready.set();
    }
}

/// Waits until every callback queued (by any thread) before this call has run.
///
/// On a thread that holds the lock handed to the call_rcu thread ([`set_call_rcu_lock`]),
/// the lock is released while this waits and taken again before it returns (QEMU's
/// `drain_call_rcu()` does the same with the BQL): callbacks need it to run.
///
/// # Panics
/// Inside a read-side critical section, or from a callback on the call_rcu thread: both
/// would wait for themselves. Likewise on a thread holding a handed [`BatchLock`] that
/// cannot be released around the wait ([`BatchLock::release_while`]).
pub fn drain_call_rcu() {
    assert_outside_read_section("rcu::drain_call_rcu()");
    assert!(
        !ON_CALL_RCU_THREAD.with(|c| c.get()),
        "rcu::drain_call_rcu() called from a call_rcu callback; it would wait for itself"
    );
    let q = queue();
    let handed = lock(&q.batch_lock).clone();
    match handed {
        Some(held) if held.held_by_current_thread() => {
            let mut drained = false;
            let released = held.release_while(&mut || {
                wait_for_drain(q);
                drained = true;
            });
            assert!(
                released && drained,
                "rcu::drain_call_rcu() called while holding the lock handed to the call_rcu \
                 thread (rcu::set_call_rcu_lock), which cannot be released around the wait: \
                 it would deadlock (hand an rcu::BigLock, or drain without the lock)"
            );
        }
        _ => wait_for_drain(q),
    }
}

/// Queues a marker callback and waits until it has run, closing batches at once meanwhile.
fn wait_for_drain(q: &'static CallRcuQueue) {
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    let signal = Arc::clone(&done);
    q.draining.fetch_add(1, AcqRel);
    call_rcu(move || {
        *lock(&signal.0) = true;
        signal.1.notify_all();
    });
    q.ready.set();
    let mut finished = lock(&done.0);
    while !*finished {
        finished = wait(&done.1, finished);
    }
    drop(finished);
    q.draining.fetch_sub(1, AcqRel);
}

/// Makes the call_rcu thread hold `lock` while it runs each batch (replacing any earlier
/// one); `None` runs batches with no lock. Normally an [`rcu::BigLock`](crate::BigLock).
///
/// Set it while no thread holds the new lock and none drains: a drain that began before
/// the change does not know to release a lock handed to the thread after it.
pub fn set_call_rcu_lock(lock_to_hold: Option<Arc<dyn BatchLock>>) {
    *lock(&queue().batch_lock) = lock_to_hold;
}

/// Counters of the call_rcu machinery.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallRcuStats {
    /// Callbacks queued so far.
    pub queued: usize,
    /// Callbacks run so far.
    pub run: usize,
    /// Batches (one grace period each) processed so far.
    pub batches: usize,
}

/// The call_rcu counters (for tests, torture runs and benchmarks).
pub fn call_rcu_stats() -> CallRcuStats {
    let s = &queue().stats;
    CallRcuStats {
        queued: s.queued.load(Relaxed),
        run: s.run.load(Relaxed),
        batches: s.batches.load(Relaxed),
    }
}

crate::primitive::rcu_thread_local! {
    static ON_CALL_RCU_THREAD: std::cell::Cell<bool> = std::cell::Cell::new(false);
}

fn ensure_thread_started(q: &'static CallRcuQueue) {
    if q.started.load(Acquire) || q.started.swap(true, AcqRel) {
        return;
    }
    // If the thread cannot be spawned, the next call_rcu tries again.
    let unstarted = MarkStoppedOnDrop(q);
    crate::primitive::thread::spawn_named("call_rcu", move || {
        ON_CALL_RCU_THREAD.with(|c| c.set(true));
        call_rcu_thread(q)
    });
    std::mem::forget(unstarted);
}

/// Clears `started` when dropped.
struct MarkStoppedOnDrop(&'static CallRcuQueue);

impl Drop for MarkStoppedOnDrop {
    fn drop(&mut self) {
        self.0.started.store(false, Release);
    }
}

/// Dropped when the call_rcu thread ends, however it ends: marks it stopped, then starts a
/// new one if callbacks are waiting (a drain may be waiting for them), so a thread that
/// dies never leaves later drains hanging.
struct ThreadExit(&'static CallRcuQueue);

impl Drop for ThreadExit {
    fn drop(&mut self) {
        let q = self.0;
        q.started.store(false, Release);
        #[cfg(loom)]
        if q.shutdown.load(Acquire) {
            return;
        }
        if std::thread::panicking() {
            report(format_args!(
                "the call_rcu thread is exiting on a panic; starting a new one"
            ));
        }
        if !lock(&q.queue).is_empty() {
            ensure_thread_started(q);
        }
    }
}

fn call_rcu_thread(q: &'static CallRcuQueue) {
    let _exit = ThreadExit(q);
    loop {
        if !wait_for_work(q) {
            return;
        }
        wait_for_batch(q);
        let batch = take_batch_through_grace_period(q);
        run_batch(q, batch);
    }
}

/// Waits for the batch's grace period; aborts the process if that fails. The batch must
/// not run without one (its memory may still be read), and the ways `synchronize` fails
/// here cannot heal: a membarrier that stopped working, or a callback that left this
/// thread inside a read section (a leaked guard), which every later grace period, on any
/// thread, would wait for forever.
fn grace_period_for_batch() {
    if let Err(panic) = catch_unwind(synchronize) {
        report(format_args!(
            "the call_rcu thread cannot wait for a grace period ({}); {} aborting \
             rather than running callbacks early or hanging every drain",
            panic_message(&*panic),
            if crate::reader::in_read_section() {
                "a call_rcu callback left a read-side critical section open (a leaked \
                 ReadGuard);"
            } else {
                ""
            }
        ));
        std::process::abort();
    }
}

/// Reports a fault of the call_rcu machinery on stderr (not through `log`, which may have
/// no logger). Never panics: `eprintln!` would, on a closed stderr, and take the thread
/// down with it.
fn report(what: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "rcu: {what}");
}

/// A panic's message, for reports.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "a panic with a non-string payload"
    }
}

/// Drops a panic payload; a payload whose own drop panics is leaked instead.
fn drop_panic(panic: Box<dyn std::any::Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(|| drop(panic))) {
        std::mem::forget(again);
    }
}

/// Sleeps until a callback is queued; false if the thread must stop (loom models only).
fn wait_for_work(q: &CallRcuQueue) -> bool {
    loop {
        q.ready.reset();
        #[cfg(loom)]
        if q.shutdown.load(Acquire) {
            return false;
        }
        if !lock(&q.queue).is_empty() {
            return true;
        }
        q.ready.wait();
    }
}

/// Lets a batch fill up to the threshold for at most BATCH_WINDOW, unless someone drains,
/// and adapts the threshold to how the batch closed.
fn wait_for_batch(q: &CallRcuQueue) {
    let deadline = Instant::now() + BATCH_WINDOW;
    let threshold = q.threshold.load(Relaxed);
    let filled = loop {
        q.ready.reset();
        if q.draining.load(Acquire) > 0 {
            return;
        }
        if lock(&q.queue).len() >= threshold {
            break true;
        }
        let left = match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => left,
            _ => break false,
        };
        if !q.ready.wait_timeout(left) && cfg!(loom) {
            break false;
        }
    };
    let next = if filled {
        (threshold * 2).min(MAX_BATCH_SIZE)
    } else {
        (threshold / 2).max(BATCH_SIZE)
    };
    q.threshold.store(next, Relaxed);
}

/// Runs a batch whose grace period has passed, holding the handed lock if there is one.
///
/// Every callback of the batch runs exactly once, whatever panics: each callback under its
/// own `catch_unwind`, and the lock's hold under another. If the hold panics (before, after
/// or without running the batch) or returns without running all of it, the panic is
/// reported on stderr and the callbacks it did not run are run without the lock, so drains
/// complete and memory is freed.
fn run_batch(q: &CallRcuQueue, batch: Vec<Callback>) {
    let mut callbacks = batch.into_iter();
    let held = lock(&q.batch_lock).clone();
    if let Some(l) = held {
        let mut run_held = || run_callbacks(q, &mut callbacks);
        let hold = catch_unwind(AssertUnwindSafe(|| l.hold_while(&mut run_held)));
        let left = callbacks.len();
        match hold {
            Err(panic) => {
                report(format_args!(
                    "the lock handed to the call_rcu thread panicked while holding a batch \
                     ({}); the call_rcu thread goes on, running the batch's {left} remaining \
                     callback(s) without the lock",
                    panic_message(&*panic)
                ));
                drop_panic(panic);
            }
            Ok(()) if left > 0 => report(format_args!(
                "the lock handed to the call_rcu thread returned without running its batch; \
                 running its {left} callback(s) without the lock"
            )),
            Ok(()) => {}
        }
    }
    run_callbacks(q, &mut callbacks);
    q.stats.batches.fetch_add(1, Relaxed);
}

/// Runs callbacks until `callbacks` is empty; a callback that panics is reported and the
/// others still run.
fn run_callbacks(q: &CallRcuQueue, callbacks: &mut std::vec::IntoIter<Callback>) {
    for f in callbacks.by_ref() {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| f.call())) {
            log::error!("rcu: a call_rcu callback panicked; the call_rcu thread goes on");
            drop_panic(panic);
        }
        // Written only by this thread.
        q.stats.run.store(q.stats.run.load(Relaxed) + 1, Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A thread that ends (however it ends) hands its queue to a new thread: a private
    /// queue, so no other test's callbacks or lock are involved.
    #[test]
    fn an_exiting_call_rcu_thread_starts_a_successor_when_work_is_queued() {
        let q: &'static CallRcuQueue = Box::leak(Box::new(CallRcuQueue::new()));
        // As if a thread were serving it, about to exit with a callback queued.
        q.started.store(true, Release);
        let (ran, done) = mpsc::channel();
        lock(&q.queue).push(Callback::new(move || ran.send(()).unwrap()));
        drop(ThreadExit(q));
        let waited = if cfg!(miri) { 600 } else { 20 };
        done.recv_timeout(Duration::from_secs(waited))
            .expect("no successor thread ran the queued callback");
        assert!(q.started.load(Acquire));
    }
}

/// Ends a loom model's use of RCU: stops the call_rcu thread (callbacks still queued are
/// not run: drain first) and waits for it to exit, unregisters the calling thread, and
/// waits until every exiting reader thread's destructor has unregistered it.
///
/// Loom drops its lazy statics, the RCU domain among them, when the model's closure
/// returns, and only then the main thread's thread-locals; and its `join` returns before
/// the joined thread's thread-locals are dropped. So a model must call this last, from its
/// main thread, once every other thread it spawned has been joined.
#[cfg(loom)]
pub fn shutdown_call_rcu_thread() {
    let q = queue();
    q.shutdown.store(true, Release);
    q.ready.set();
    crate::primitive::thread::join_spawned();
    crate::reader::unregister_all_threads();
}

// Fork support (see fork.rs). A batch waiting for its grace period is parked where a fork
// finds it, so that the child, whose call_rcu thread did not follow, still runs it.

/// Takes the queued callbacks as a batch and returns them after a grace period.
#[cfg(not(loom))]
fn take_batch_through_grace_period(q: &CallRcuQueue) -> Vec<Callback> {
    {
        // Parked under the queue lock: a fork finds the batch in one place or the other.
        let mut queued = lock(&q.queue);
        *lock(&IN_GRACE_PERIOD) = std::mem::take(&mut *queued);
    }
    grace_period_for_batch();
    std::mem::take(&mut *lock(&IN_GRACE_PERIOD))
}

#[cfg(loom)]
fn take_batch_through_grace_period(q: &CallRcuQueue) -> Vec<Callback> {
    let batch = std::mem::take(&mut *lock(&q.queue));
    grace_period_for_batch();
    batch
}

/// The batch the call_rcu thread holds while it waits for the batch's grace period.
#[cfg(not(loom))]
static IN_GRACE_PERIOD: Mutex<Vec<Callback>> = Mutex::new(Vec::new());

/// The call_rcu locks, held across a fork (lock order: queue, then the parked batch, then
/// the batch lock; nothing else of the crate is taken while holding any of them).
#[cfg(not(loom))]
pub(crate) struct ForkLocks {
    queue: crate::primitive::MutexGuard<'static, Vec<Callback>>,
    parked: crate::primitive::MutexGuard<'static, Vec<Callback>>,
    batch_lock: crate::primitive::MutexGuard<'static, Option<Arc<dyn BatchLock>>>,
}

/// Takes the call_rcu locks before a fork.
#[cfg(not(loom))]
pub(crate) fn lock_for_fork() -> ForkLocks {
    let q = queue();
    let queue = lock(&q.queue);
    let parked = lock(&IN_GRACE_PERIOD);
    let batch_lock = lock(&q.batch_lock);
    ForkLocks {
        queue,
        parked,
        batch_lock,
    }
}

/// In the child of a fork: the call_rcu thread did not follow (unless the fork came from a
/// callback on it), so the next `call_rcu` or `drain_call_rcu` starts a new one, which runs
/// the callbacks pending at the fork, the parked batch first; the drainers did not follow
/// either. Releases the locks.
#[cfg(not(loom))]
pub(crate) fn after_fork_in_child(mut held: ForkLocks) {
    let q = queue();
    let parked = std::mem::take(&mut *held.parked);
    if !parked.is_empty() {
        held.queue.splice(0..0, parked);
    }
    q.draining.store(0, Relaxed);
    if !ON_CALL_RCU_THREAD.with(|c| c.get()) {
        q.started.store(false, Release);
    }
    drop(held.batch_lock);
    drop(held.parked);
    drop(held.queue);
}
