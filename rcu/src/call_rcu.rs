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
/// call_rcu thread holds the iothread lock: callbacks then run serialized with the code
/// that holds the same lock.
pub trait BatchLock: Send + Sync + 'static {
    /// Runs `batch` with the lock held.
    fn hold_while(&self, batch: &mut dyn FnMut());
}

impl<T: Send + 'static> BatchLock for std::sync::Mutex<T> {
    fn hold_while(&self, batch: &mut dyn FnMut()) {
        let _held = self.lock().unwrap_or_else(|e| e.into_inner());
        batch();
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
    ensure_thread_started(q);
    let pending = {
        let mut v = lock(&q.queue);
        v.push(Callback::new(f));
        // Written only under the queue lock: no read-modify-write needed.
        let queued = &q.stats.queued;
        queued.store(queued.load(Relaxed) + 1, Relaxed);
        v.len()
    };
    // The thread sleeps untimed only on an empty queue, and timed until a batch fills.
    if pending == 1 || pending == q.threshold.load(Relaxed) {
        q.ready.set();
    }
}

/// Waits until every callback queued (by any thread) before this call has run.
///
/// # Panics
/// Inside a read-side critical section, or from a callback on the call_rcu thread: both
/// would wait for themselves.
pub fn drain_call_rcu() {
    assert_outside_read_section("rcu::drain_call_rcu()");
    assert!(
        !ON_CALL_RCU_THREAD.with(|c| c.get()),
        "rcu::drain_call_rcu() called from a call_rcu callback; it would wait for itself"
    );
    let q = queue();
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
/// one); `None` runs batches with no lock.
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
    crate::primitive::thread::spawn_named("call_rcu", move || {
        ON_CALL_RCU_THREAD.with(|c| c.set(true));
        call_rcu_thread(q)
    });
}

fn call_rcu_thread(q: &'static CallRcuQueue) {
    loop {
        if !wait_for_work(q) {
            return;
        }
        wait_for_batch(q);
        let batch = take_batch_through_grace_period(q);
        run_batch(q, batch);
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

fn run_batch(q: &CallRcuQueue, batch: Vec<Callback>) {
    let mut callbacks = batch.into_iter();
    let mut run_all = || {
        for f in callbacks.by_ref() {
            if catch_unwind(AssertUnwindSafe(|| f.call())).is_err() {
                log::error!("rcu: a call_rcu callback panicked; the call_rcu thread goes on");
            }
            // Written only by this thread.
            q.stats.run.store(q.stats.run.load(Relaxed) + 1, Release);
        }
    };
    let held = lock(&q.batch_lock).clone();
    match held {
        Some(l) => l.hold_while(&mut run_all),
        None => run_all(),
    }
    q.stats.batches.fetch_add(1, Relaxed);
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
    synchronize();
    std::mem::take(&mut *lock(&IN_GRACE_PERIOD))
}

#[cfg(loom)]
fn take_batch_through_grace_period(q: &CallRcuQueue) -> Vec<Callback> {
    let batch = std::mem::take(&mut *lock(&q.queue));
    synchronize();
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
