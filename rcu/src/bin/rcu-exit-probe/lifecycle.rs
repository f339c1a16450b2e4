//! The lifecycle scenarios of `rcu-exit-probe` (run by `rcu/tests/lifecycle.rs`): read
//! sections that meet thread exit and thread-local destructors, and `fork`.
//!
//! Each scenario returns `Err(reason)` when the library misbehaved in a way the process
//! survived; the two that leak a guard in an exiting thread must never return at all (the
//! library aborts the process while the thread exits).

use rcu::{RcuCell, ReadGuard};
use std::cell::RefCell;
use std::hint::black_box;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a scenario checks that something does *not* happen (a grace period ending
/// while a section is open). Only a correct library passes however slow the machine is.
const MUST_WAIT: Duration = Duration::from_millis(200);

/// How long a scenario waits for something that must happen (milliseconds are enough);
/// only a hang gets near it.
const MUST_HAPPEN: Duration = Duration::from_secs(10);

/// A value whose reclamation is observable without touching its (then freed) memory.
struct Tracked {
    value: u64,
    freed: &'static AtomicBool,
}

impl Tracked {
    fn new(value: u64, freed: &'static AtomicBool) -> Tracked {
        Tracked { value, freed }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.freed.store(true, SeqCst);
    }
}

/// Runs `f` on a helper thread and waits up to MUST_HAPPEN for it: `Err` if it hangs.
fn bounded(what: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(MUST_HAPPEN) {
        Ok(()) => Ok(()),
        Err(RecvTimeoutError::Timeout) => Err(format!("{what} hung")),
        Err(RecvTimeoutError::Disconnected) => Err(format!("{what} panicked")),
    }
}

/// A reader thread reads a value under a guard it leaks, returns the reference and exits.
/// Safe code then holds a reference whose section is still open: the library must abort
/// the process as the thread exits (with a message saying why), because going on means
/// either freeing the value under the reference or no grace period ever ending again.
pub fn leaked_guard_exit() -> Result<(), String> {
    static FREED: AtomicBool = AtomicBool::new(false);
    let cell: &'static RcuCell<Tracked> =
        Box::leak(Box::new(RcuCell::new(Tracked::new(7, &FREED))));
    let reader = std::thread::Builder::new()
        .name("leaky-reader".into())
        .spawn(move || {
            let guard: &'static ReadGuard = Box::leak(Box::new(rcu::read_lock()));
            cell.load(guard)
        })
        .map_err(|e| format!("cannot spawn the reader: {e}"))?;
    let seen: &'static Tracked = reader
        .join()
        .map_err(|_| "the reader thread panicked".to_string())?;
    // Still here: the thread exited with its section open and the process went on.
    cell.store(Tracked::new(8, &FREED));
    let reclaimed = bounded(
        "drain_call_rcu after the leaky reader exited",
        rcu::drain_call_rcu,
    );
    if FREED.load(SeqCst) {
        return Err(
            "a thread exited inside a read section and the value read under it was freed \
             while still referenced (use after free)"
                .into(),
        );
    }
    reclaimed?;
    Err(format!(
        "a thread exited inside a read section and the process went on (value {})",
        seen.value
    ))
}

/// Leaks a guard from a thread-local destructor.
struct LeaksAtExit;

impl Drop for LeaksAtExit {
    fn drop(&mut self) {
        std::mem::forget(rcu::read_lock());
    }
}

thread_local! {
    static LEAKS_AT_EXIT: RefCell<Option<LeaksAtExit>> = const { RefCell::new(None) };
}

/// A thread-local destructor that runs late in the thread's exit (after everything the
/// thread touched later, rcu's own registration included) opens a section and leaks its
/// guard. The library must abort as the thread ends: going on leaves the registry with an
/// entry for a dead thread's storage, which the next grace period reads.
pub fn late_tls_leak() -> Result<(), String> {
    let before = rcu::registered_readers();
    std::thread::Builder::new()
        .name("late-leaker".into())
        .spawn(|| {
            // Initialized first, so destroyed last.
            LEAKS_AT_EXIT.with(|l| *l.borrow_mut() = Some(LeaksAtExit));
            drop(rcu::read_lock());
        })
        .map_err(|e| format!("cannot spawn the thread: {e}"))?
        .join()
        .map_err(|_| "the thread panicked".to_string())?;
    let after = rcu::registered_readers();
    if after != before {
        return Err(format!(
            "a registration outlived its thread ({before} registered before, {after} after): \
             the registry points at a dead thread's storage"
        ));
    }
    Err("a thread exited inside a read section and the process went on".into())
}

/// Shared between the `guard-in-tls` thread's destructors and the main thread.
struct GuardInTls {
    cell: RcuCell<Tracked>,
    /// The old value was replaced (the writer is about to wait for a grace period).
    replaced: AtomicBool,
    /// The writer's `synchronize` returned.
    synchronized: AtomicBool,
    /// The held guard is about to be dropped (set just before the drop).
    guard_dropped: AtomicBool,
    /// What went wrong, as seen from inside the destructors (they must not panic).
    errors: Mutex<Vec<String>>,
}

impl GuardInTls {
    fn error(&self, e: String) {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }
}

static OLD_FREED: AtomicBool = AtomicBool::new(false);
static NEW_FREED: AtomicBool = AtomicBool::new(false);

/// Holds a guard opened by the thread's body until the thread's thread-locals are
/// destroyed, and checks from its destructor that the section is still honoured.
struct HeldAtExit {
    guard: Option<ReadGuard>,
    shared: Arc<GuardInTls>,
    in_destructor: mpsc::Sender<()>,
}

impl Drop for HeldAtExit {
    fn drop(&mut self) {
        let s = &*self.shared;
        if let Some(guard) = &self.guard {
            let seen: &Tracked = s.cell.load(guard);
            let _ = self.in_destructor.send(());
            // Let the writer replace the value and start its grace period...
            let start = Instant::now();
            while !s.replaced.load(SeqCst) && start.elapsed() < MUST_HAPPEN {
                std::thread::sleep(Duration::from_millis(1));
            }
            // ...which must not end while this section is open.
            std::thread::sleep(MUST_WAIT);
            if s.synchronized.load(SeqCst) {
                s.error("synchronize returned while a thread-local destructor held a guard".into());
            }
            if OLD_FREED.load(SeqCst) {
                s.error("the value read under a guard held by a thread-local was freed".into());
            } else if seen.value != 1 {
                s.error(format!(
                    "the value read under the guard changed to {}",
                    seen.value
                ));
            }
        } else {
            s.error("no guard to hold".into());
        }
        // Flagged just before the drop: a grace period that ends only after the drop (as
        // it must) always sees the flag; setting it after would race with that ending.
        s.guard_dropped.store(true, SeqCst);
        drop(self.guard.take());
    }
}

/// Opens a read section from the last thread-local destructor of its thread.
struct ReadsLast {
    shared: Arc<GuardInTls>,
}

impl Drop for ReadsLast {
    fn drop(&mut self) {
        let s = &*self.shared;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let g = rcu::read_lock();
            let inside = rcu::in_read_section();
            let v = s.cell.load(&g).value;
            drop(g);
            (inside, v, rcu::in_read_section())
        }));
        match outcome {
            Ok((true, 2, false)) => {}
            Ok(other) => s.error(format!(
                "a later section in a thread-local destructor misbehaved \
                 (inside, value, inside after) = {other:?}"
            )),
            Err(p) => {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                s.error(format!(
                    "read_lock after the held guard's drop panicked (nesting depth corrupted?): \
                     {why}"
                ));
            }
        }
    }
}

thread_local! {
    static HELD_AT_EXIT: RefCell<Option<HeldAtExit>> = const { RefCell::new(None) };
    static READS_LAST: RefCell<Option<ReadsLast>> = const { RefCell::new(None) };
}

/// A thread opens a section and hands its guard to a thread-local that is destroyed after
/// everything else the thread touched (rcu's registration included). From that destructor:
/// a writer replaces the value and waits for a grace period, which must not end until the
/// guard drops, and the value read under the guard must stay intact. A later destructor
/// then opens another section, which must work (no corrupted nesting depth).
pub fn guard_in_tls() -> Result<(), String> {
    let shared = Arc::new(GuardInTls {
        cell: RcuCell::new(Tracked::new(1, &OLD_FREED)),
        replaced: AtomicBool::new(false),
        synchronized: AtomicBool::new(false),
        guard_dropped: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
    });
    let before = rcu::registered_readers();
    let (in_dtor_tx, in_dtor_rx) = mpsc::channel();
    let thread = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("tls-holder".into())
            .spawn(move || {
                // Destroyed in reverse order of first use: READS_LAST last, HELD_AT_EXIT
                // just before it, after everything the body touches later.
                let last = ReadsLast {
                    shared: Arc::clone(&shared),
                };
                READS_LAST.with(|r| *r.borrow_mut() = Some(last));
                HELD_AT_EXIT.with(|h| {
                    let mut h = h.borrow_mut();
                    *h = Some(HeldAtExit {
                        guard: None,
                        shared,
                        in_destructor: in_dtor_tx,
                    });
                    if let Some(h) = h.as_mut() {
                        h.guard = Some(rcu::read_lock());
                    }
                });
            })
            .map_err(|e| format!("cannot spawn the thread: {e}"))?
    };
    in_dtor_rx
        .recv_timeout(MUST_HAPPEN)
        .map_err(|_| "the holding destructor never ran".to_string())?;
    let writer = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            let old = shared.cell.replace(Tracked::new(2, &NEW_FREED));
            shared.replaced.store(true, SeqCst);
            let old = old.synchronize();
            shared.synchronized.store(true, SeqCst);
            if !shared.guard_dropped.load(SeqCst) {
                shared.error("synchronize returned before the held guard was dropped".into());
            }
            drop(old);
        })
    };
    thread
        .join()
        .map_err(|_| "the holding thread panicked".to_string())?;
    bounded("the writer's grace period", move || {
        let _ = writer.join();
    })?;
    let errors = std::mem::take(&mut *shared.errors.lock().unwrap_or_else(|e| e.into_inner()));
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let after = rcu::registered_readers();
    if after != before {
        return Err(format!(
            "{before} threads registered before, {after} after the holding thread exited"
        ));
    }
    bounded(
        "synchronize after the holding thread exited",
        rcu::synchronize,
    )?;
    println!("probe: a guard dropped by a late thread-local destructor held its grace period");
    Ok(())
}

/// Reads under RCU from a thread-local destructor and records the value.
struct ReadsAtExit {
    cell: Arc<RcuCell<u64>>,
    seen: Arc<AtomicU64>,
}

impl Drop for ReadsAtExit {
    fn drop(&mut self) {
        let g = rcu::read_lock();
        self.seen.store(*self.cell.load(&g), SeqCst);
    }
}

thread_local! {
    static READS_AT_EXIT: RefCell<Option<ReadsAtExit>> = const { RefCell::new(None) };
}

/// Argument of the pthread key destructor below.
struct KeyReader {
    cell: Arc<RcuCell<u64>>,
    seen: Arc<AtomicU64>,
}

unsafe extern "C" fn key_destructor(p: *mut libc::c_void) {
    // SAFETY: the pointer is the Box leaked by `late_tls_section` for this key, handed to
    // exactly one destructor call (glibc clears the value before calling).
    let reader = unsafe { Box::from_raw(p.cast::<KeyReader>()) };
    let g = rcu::read_lock();
    reader.seen.store(*reader.cell.load(&g), SeqCst);
}

/// Sections that *start* during thread exit: from a Rust thread-local destructor, in a
/// thread that had registered before and in one that had not; and from a pthread key
/// destructor created after rcu's own (so it runs after the thread's final RCU
/// unregistration). Each reads the right value, and no registration outlives its thread.
pub fn late_tls_section() -> Result<(), String> {
    let cell = Arc::new(RcuCell::new(42u64));
    // rcu's own thread-exit machinery is set up by the first registration.
    drop(rcu::read_lock());
    let before = rcu::registered_readers();
    for registered_first in [true, false] {
        let seen = Arc::new(AtomicU64::new(0));
        let (c, s) = (Arc::clone(&cell), Arc::clone(&seen));
        std::thread::spawn(move || {
            READS_AT_EXIT.with(|r| *r.borrow_mut() = Some(ReadsAtExit { cell: c, seen: s }));
            if registered_first {
                drop(rcu::read_lock());
            }
        })
        .join()
        .map_err(|_| "the thread panicked".to_string())?;
        if seen.load(SeqCst) != 42 {
            return Err(format!(
                "a section in a thread-local destructor read {} (registered first: \
                 {registered_first})",
                seen.load(SeqCst)
            ));
        }
        let after = rcu::registered_readers();
        if after != before {
            return Err(format!(
                "{after} threads registered after a section in a thread-local destructor, \
                 {before} before (registered first: {registered_first})"
            ));
        }
    }

    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; the destructor has the required signature.
    let rc = unsafe { libc::pthread_key_create(&mut key, Some(key_destructor)) };
    if rc != 0 {
        return Err(format!("pthread_key_create failed: {rc}"));
    }
    let seen = Arc::new(AtomicU64::new(0));
    let reader = KeyReader {
        cell: Arc::clone(&cell),
        seen: Arc::clone(&seen),
    };
    let reader = Box::into_raw(Box::new(reader)) as usize;
    std::thread::spawn(move || {
        drop(rcu::read_lock());
        // SAFETY: a key created above; the value is the leaked box, freed by the key's
        // destructor when this thread exits.
        unsafe { libc::pthread_setspecific(key, reader as *const libc::c_void) };
    })
    .join()
    .map_err(|_| "the thread panicked".to_string())?;
    if seen.load(SeqCst) != 42 {
        return Err(format!(
            "a section in a pthread key destructor read {}",
            seen.load(SeqCst)
        ));
    }
    let after = rcu::registered_readers();
    if after != before {
        return Err(format!(
            "{after} threads registered after a section in a pthread key destructor, \
             {before} before"
        ));
    }
    cell.store(43);
    bounded("synchronize after the late sections", rcu::synchronize)?;
    bounded(
        "drain_call_rcu after the late sections",
        rcu::drain_call_rcu,
    )?;
    println!("probe: sections started in thread-exit destructors work and leave nothing behind");
    Ok(())
}

/// Callbacks queued before a fork that have run (in whichever process looks).
static RAN_BEFORE_FORK: AtomicU64 = AtomicU64::new(0);
/// Callbacks queued in the fork child that have run.
static RAN_IN_CHILD: AtomicU64 = AtomicU64::new(0);

/// Writes `msg` to stderr without std's locks (another thread may have held one at fork).
fn raw_eprint(msg: &str) {
    let mut rest = msg.as_bytes();
    while !rest.is_empty() {
        // SAFETY: writes from a live buffer of the given length to fd 2.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// What the fork child checks: the parent's other threads did not follow, so its registry
/// holds only the forking thread; its own grace periods end; call_rcu starts a thread that
/// runs the callbacks still pending at the fork and new ones, and drains.
fn child_checks(pending_at_fork: u64) -> Result<(), String> {
    rcu::synchronize();
    rcu::call_rcu(|| {
        RAN_IN_CHILD.fetch_add(1, SeqCst);
    });
    rcu::drain_call_rcu();
    if RAN_IN_CHILD.load(SeqCst) != 1 {
        return Err("child: drain_call_rcu returned before the child's callback ran".into());
    }
    let ran = RAN_BEFORE_FORK.load(SeqCst);
    if ran != pending_at_fork {
        return Err(format!(
            "child: {ran} of the {pending_at_fork} callbacks pending at the fork ran"
        ));
    }
    {
        let g = rcu::read_lock();
        black_box(&g);
    }
    rcu::synchronize();
    let readers = rcu::registered_readers();
    if readers != 1 {
        return Err(format!(
            "child: {readers} registered readers, expected 1 (itself)"
        ));
    }
    Ok(())
}

/// Forks; the child runs `child_checks` and exits 0 or 3; the parent waits for it with a
/// time limit, killing it if it hangs.
fn fork_and_check(pending_at_fork: u64) -> Result<(), String> {
    // SAFETY: fork has no memory-safety preconditions; the child only runs RCU (whose
    // fork handlers make it usable there, which is what is tested) and plain code, writes
    // with raw write(2), and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork failed: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let code = match catch_unwind(|| child_checks(pending_at_fork)) {
            Ok(Ok(())) => 0,
            Ok(Err(why)) => {
                raw_eprint(&format!("rcu-exit-probe: {why}\n"));
                3
            }
            Err(_) => {
                raw_eprint("rcu-exit-probe: child: panicked\n");
                3
            }
        };
        // SAFETY: ends the child at once, without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                return Ok(());
            }
            return Err(format!("the fork child failed (wait status {status:#x})"));
        }
        if r < 0 {
            return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
        }
        if start.elapsed() > MUST_HAPPEN {
            // SAFETY: signals our own child, which has not been reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(format!(
                "the fork child hung (synchronize or drain_call_rcu) for {MUST_HAPPEN:?}"
            ));
        }
        // Polling the child's exit, not standing in for synchronization.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Fork after RCU has been used (a registered thread, a started call_rcu thread): the
/// child's synchronize, call_rcu and drain_call_rcu work.
pub fn fork_idle() -> Result<(), String> {
    drop(rcu::read_lock());
    rcu::call_rcu(|| {});
    rcu::drain_call_rcu();
    fork_and_check(0)?;
    println!("probe: fork child ran synchronize, call_rcu and drain_call_rcu");
    Ok(())
}

/// Fork while the parent has a busy reader thread, a reader inside a section, a grace
/// period waiting for it (led by the call_rcu thread, with another caller queued behind),
/// and callbacks pending: the child, which has none of those threads, still completes its
/// grace periods and runs the pending callbacks. The parent carries on as before.
pub fn fork_busy() -> Result<(), String> {
    const PENDING: u64 = 100;
    drop(rcu::read_lock());
    let cell = Arc::new(RcuCell::new(0u64));
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (cell, stop) = (Arc::clone(&cell), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                let g = rcu::read_lock();
                black_box(cell.load(&g));
            }
        })
    };
    let (inside_tx, inside_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let g = rcu::read_lock();
        let _ = inside_tx.send(());
        let _ = release_rx.recv();
        drop(g);
    });
    inside_rx
        .recv()
        .map_err(|_| "the holding reader died".to_string())?;
    for _ in 0..PENDING {
        rcu::call_rcu(|| {
            RAN_BEFORE_FORK.fetch_add(1, SeqCst);
        });
    }
    // A second grace-period caller queues behind the call_rcu thread's grace period.
    let waiter = std::thread::spawn(rcu::synchronize);
    let start = Instant::now();
    while rcu::synchronize_waiters() == 0 {
        if start.elapsed() > MUST_HAPPEN {
            return Err("no synchronize caller ever waited".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Give the call_rcu thread time to close its batch (BATCH_WINDOW is 10 ms) and wait
    // for the holding reader with it; the child must run the batch either way.
    std::thread::sleep(Duration::from_millis(50));
    let ran = RAN_BEFORE_FORK.load(SeqCst);
    if ran != 0 {
        return Err(format!(
            "{ran} callbacks ran while a reader blocked grace periods"
        ));
    }
    fork_and_check(PENDING)?;
    let _ = release_tx.send(());
    holder
        .join()
        .map_err(|_| "the holding reader panicked".to_string())?;
    bounded("the parent's queued synchronize", move || {
        let _ = waiter.join();
    })?;
    bounded("the parent's drain_call_rcu", rcu::drain_call_rcu)?;
    stop.store(true, SeqCst);
    busy.join()
        .map_err(|_| "the busy reader panicked".to_string())?;
    let ran = RAN_BEFORE_FORK.load(SeqCst);
    if ran != PENDING {
        return Err(format!("the parent ran {ran} of its {PENDING} callbacks"));
    }
    println!("probe: fork child completed grace periods and ran the pending callbacks");
    Ok(())
}
