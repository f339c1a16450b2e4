//! The read side: [`read_lock`] and [`ReadGuard`], and the per-thread registration behind
//! them.
//!
//! Each thread's published word ([`ReaderSlot`]) lives in its own thread-local storage, so
//! a section touches no memory but that thread-local and the global counter: entering the
//! outermost section copies `gp_ctr | 1` into the word, nesting adds and subtracts 1,
//! leaving the outermost stores 0 and checks whether a grace period waits for it. A thread
//! registers on its first section (a pointer to its slot in the domain's registry).
//!
//! # The end of a thread
//!
//! A thread unregisters once, at the very end of its exit, from the destructor of a
//! pthread key (`at_thread_exit`). glibc runs pthread key destructors after every
//! `thread_local!` destructor (`__call_tls_dtors`, then `__nptl_deallocate_tsd`; std relies
//! on the same order for its own cleanup), so by then every guard that any Rust
//! thread-local held has been dropped, and every section that a thread-local destructor
//! opened has ended — unless a guard was leaked. The slot itself lives in const,
//! destructor-less thread-local storage, valid until the thread's descriptor is freed, after
//! all key destructors. Unregistering earlier, from a thread-local destructor of our own
//! (as this module once did), cannot work: destructors run in reverse order of first use,
//! so a thread-local first used before the thread's first section is destroyed after ours,
//! and a guard it holds would then be in a section the registry no longer sees (its
//! reference dangles) and corrupt the nesting depth when it drops.
//!
//! A thread that reaches that final destructor still inside a section leaked a guard
//! (`mem::forget`, `Box::leak`, a cycle): references read under it may be alive anywhere,
//! as `&'static` even. Two ways keep them valid: keep the slot in the registry forever,
//! owned by the registry (every later grace period, hence every `synchronize`, every
//! `call_rcu` reclamation and every `drain_call_rcu`, then waits forever, and memory piles
//! up: a silent hang far from the bug), or stop the process. We abort, with a message on
//! stderr naming the thread: the failure shows where it happens, nothing waits forever,
//! and no safe program observes freed memory or leaves an entry for a dead thread.
//!
//! A section can also *start* after the final destructor ran (from another pthread key's
//! destructor). It registers again, re-arms the key (so a later round of destructors
//! still catches a leak) and is marked [`TRANSIENT`]: it unregisters when it ends.
//!
//! The fast path is unchanged by all this: the key is set on the registration's cold path.
//! Under loom, whose threads are not pthreads, a loom thread-local's destructor stands in
//! for the key (loom runs no destructors of its own after it).

use crate::barrier::{barrier_mode, reader_barrier, BarrierMode};
use crate::domain::{
    domain, gp_ctr, in_section, ReaderSlot, SlotPtr, FENCES, IDLE_SLOW, NEST_MASK, TRANSIENT,
    WAITING,
};
use crate::primitive::lock;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

/// The thread's reader state: its published slot, whether it is registered (its barrier
/// mode is the slot's FENCES flag) and whether its final unregistration has run.
/// Const-initialized and without a destructor, so access compiles to a plain
/// thread-pointer-relative address and the memory stays valid through every thread-local
/// and pthread key destructor of the thread.
struct ReaderLocal {
    slot: ReaderSlot,
    registered: Cell<bool>,
    /// [`at_thread_exit`] has run: a section that starts now is [`TRANSIENT`].
    exited: Cell<bool>,
}

impl ReaderLocal {
    crate::primitive::const_fn! {
        fn new() -> ReaderLocal {
            ReaderLocal {
                slot: ReaderSlot::new(),
                registered: Cell::new(false),
                exited: Cell::new(false),
            }
        }
    }
}

/// The thread's final unregistration, once nothing of the thread can still be inside a
/// section but through a leaked guard (see the module doc). Aborts the process if it is.
fn at_thread_exit(r: &ReaderLocal) {
    r.exited.set(true);
    if in_section(r.slot.ctr.load(Relaxed)) {
        exited_inside_a_section(
            "inside an RCU read-side critical section (a ReadGuard was leaked)",
        );
    }
    if crate::qsbr::online_on_this_thread() {
        exited_inside_a_section("with an online QsbrReader (it was leaked)");
    }
    unregister(r);
}

/// The final unregistration found the thread inside a section: say so, and abort.
#[cold]
#[inline(never)]
fn exited_inside_a_section(how: &str) -> ! {
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: the buffer is writable for its whole length, which is passed; glibc
    // NUL-terminates what it writes there on success.
    let named =
        unsafe { libc::pthread_getname_np(libc::pthread_self(), name.as_mut_ptr(), name.len()) }
            == 0;
    let name = if named {
        // SAFETY: NUL-terminated by pthread_getname_np on success (checked above).
        unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    } else {
        String::from("?")
    };
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let message = format!(
        "rcu: thread '{name}' (tid {tid}) exited {how}; references read under it would \
         dangle, and every later grace period would wait for it forever — aborting\n"
    );
    // Straight to fd 2: std's stderr may already be torn down for this thread.
    let mut rest = message.as_bytes();
    while !rest.is_empty() {
        // SAFETY: writes from a live buffer, of its length, to fd 2.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            break;
        }
        rest = &rest[n as usize..];
    }
    std::process::abort();
}

/// The pthread key whose destructor runs [`at_thread_exit`] (see the module doc).
#[cfg(not(loom))]
mod exit_key {
    use super::ReaderLocal;
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering::{AcqRel, Acquire};

    /// The key plus one; 0 until it is created.
    static KEY: AtomicU64 = AtomicU64::new(0);

    /// The key, created on first use.
    fn key() -> libc::pthread_key_t {
        match KEY.load(Acquire) {
            0 => create(),
            k => (k - 1) as libc::pthread_key_t,
        }
    }

    /// Creates the key; of two threads racing, one's key wins and the other's is deleted.
    /// (No `Once`: a fork while another thread runs one leaves it running in the child.)
    #[cold]
    fn create() -> libc::pthread_key_t {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-pointer and the destructor has the signature pthread
        // key destructors need.
        let rc = unsafe { libc::pthread_key_create(&mut key, Some(destructor)) };
        if rc != 0 {
            panic!(
                "rcu: cannot create the thread-exit key: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        match KEY.compare_exchange(0, u64::from(key) + 1, AcqRel, Acquire) {
            Ok(_) => key,
            Err(won) => {
                // SAFETY: our own key, never published nor given a value.
                unsafe { libc::pthread_key_delete(key) };
                (won - 1) as libc::pthread_key_t
            }
        }
    }

    /// Makes the calling thread's exit run [`super::at_thread_exit`] on `r`, its own state.
    pub(super) fn arm(r: &ReaderLocal) {
        let key = key();
        // SAFETY: a key created above; the value is only ever handed back to `destructor`,
        // on this thread.
        let rc = unsafe { libc::pthread_setspecific(key, (r as *const ReaderLocal).cast()) };
        if rc != 0 {
            panic!(
                "rcu: cannot arm the thread-exit key: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
    }

    unsafe extern "C" fn destructor(p: *mut libc::c_void) {
        // SAFETY: `p` is what `arm` stored on this thread: its own ReaderLocal, which lives
        // in const thread-local storage without a destructor, freed only with the thread's
        // descriptor, after every key destructor.
        let r = unsafe { &*p.cast::<ReaderLocal>() };
        super::at_thread_exit(r);
    }
}

/// Loom's stand-in for the pthread key (see the module doc): runs [`at_thread_exit`] when
/// the loom thread's thread-locals are dropped. It points at the thread's [`ReaderLocal`],
/// a leaked box under loom.
#[cfg(loom)]
struct Registration {
    local: Cell<*const ReaderLocal>,
}

#[cfg(loom)]
impl Drop for Registration {
    fn drop(&mut self) {
        // A failed loom model drops its thread-locals outside the model, while unwinding:
        // touching loom state then would abort the test run and hide the failure.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: the pointer is null or the thread's own ReaderLocal, a leaked box.
        if let Some(local) = unsafe { self.local.replace(std::ptr::null()).as_ref() } {
            at_thread_exit(local);
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

#[cfg(loom)]
loom::thread_local! {
    static REGISTRATION: Registration = Registration { local: Cell::new(std::ptr::null()) };
}

/// Arranges [`at_thread_exit`] for the calling thread; false if it can no longer run after
/// the section now starting (the thread is past it), which must then be [`TRANSIENT`].
fn arm_exit(r: &ReaderLocal) -> bool {
    #[cfg(not(loom))]
    {
        // Re-armed even after the exit ran: a later round of key destructors then still
        // catches a guard leaked from here.
        exit_key::arm(r);
        !r.exited.get()
    }
    #[cfg(loom)]
    {
        REGISTRATION.try_with(|reg| reg.local.set(r)).is_ok() && !r.exited.get()
    }
}

/// Makes the calling thread's exit run [`at_thread_exit`], which also catches a leaked
/// online [`QsbrReader`](crate::QsbrReader) (qsbr.rs registers through this).
#[cfg(not(loom))]
pub(crate) fn arm_thread_exit() {
    with_local(|r| {
        arm_exit(r);
    });
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

/// Proof that the current thread is inside an RCU read-side critical section: a
/// [`read_lock`] section, or the span between two quiescent states of an online
/// [`QsbrReader`](crate::QsbrReader), which lends `&ReadGuard`s tied to itself.
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

impl ReadGuard {
    /// A guard no `read_lock` opened, for an online QSBR reader to lend (qsbr.rs), which
    /// keeps it for its own lifetime and never drops it (its drop would end a section).
    pub(crate) fn unopened() -> std::mem::ManuallyDrop<ReadGuard> {
        std::mem::ManuallyDrop::new(ReadGuard {
            _not_send: PhantomData,
        })
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

/// True if the current thread is inside a read-side critical section opened by
/// [`read_lock`] (an online [`QsbrReader`](crate::QsbrReader) does not count here, though
/// `synchronize` refuses to wait on its thread too).
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
    assert!(
        !crate::qsbr::online_on_this_thread(),
        "{what} called on a thread whose QsbrReader is online; it would wait forever for \
         that reader's next quiescent state: use QsbrReader::synchronize, or call it inside \
         QsbrReader::offline_scope"
    );
}

#[cold]
#[inline(never)]
fn register_current_thread(r: &ReaderLocal) {
    // Arrange the final unregistration first. If the thread is already past it, the
    // registration lasts only until the end of this section.
    if !arm_exit(r) {
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

/// Removes the thread from the registry. Only ever called outside a section (at the end
/// of a transient one, or from [`at_thread_exit`], which aborts inside one): a guard alive
/// across it would end a section the registry no longer sees, and subtract from IDLE_SLOW.
fn unregister(r: &ReaderLocal) {
    debug_assert!(!in_section(r.slot.ctr.load(Relaxed)));
    if !r.registered.get() {
        return;
    }
    let me = SlotPtr(&r.slot);
    let mut registry = lock(&domain().registry);
    registry.retain(|s| *s != me);
    // Park the word for the next lock's slow path (which registers again), and wake a
    // grace period that marked us WAITING meanwhile, so that it rescans without us.
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

/// In the child of a fork (see fork.rs), with the registry lock held: of the parent's
/// threads only the forking one (this one) exists, so the registry keeps its slots alone
/// (its own, and those of its QSBR readers).
/// The others' slots are copies no thread will ever update. A grace period of the parent
/// may have marked this slot WAITING; none waits for it in the child.
#[cfg(not(loom))]
pub(crate) fn after_fork_in_child(registry: &mut Vec<SlotPtr>) {
    let own = with_local(|r| {
        r.registered.get().then(|| {
            r.slot.flags.fetch_and(!WAITING, Relaxed);
            SlotPtr(&r.slot)
        })
    });
    // SAFETY: the registry lock is held and every `s` is registered.
    registry.retain(|s| Some(*s) == own || unsafe { crate::qsbr::keep_after_fork(*s) });
}
