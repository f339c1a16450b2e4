//! The process-wide RCU state: the grace-period counter, the registry of reader threads,
//! the grace-period wake-up event and the call_rcu queue. One instance, [`domain()`].
//!
//! Locking, once for the whole crate:
//! - `gp_ctr` is written only by the grace-period leader, while it holds `registry`;
//!   readers load it with no lock.
//! - `registry` (pointers to the registered threads' slots) is taken by thread
//!   registration and unregistration, and by the leader while it bumps `gp_ctr` and scans
//!   the slots; the leader drops it before it sleeps. A slot is dereferenced only under
//!   this lock: its thread cannot finish exiting meanwhile, because unregistering takes it.
//! - `sync` elects one grace-period leader at a time and lets concurrent `synchronize()`
//!   callers share its grace period.
//! - the call_rcu queue has its own lock; callbacks never run under it.

use crate::call_rcu::CallRcuQueue;
use crate::event::Event;
use crate::primitive::{AtomicU32, AtomicU64, Condvar, Mutex};

/// A reader's published word holds the grace-period counter in its high bits and its
/// nesting depth in the low 16 (liburcu's layout): entering the outermost section stores
/// `gp_ctr | 1`, nested sections add and subtract 1, leaving stores 0. So 0 means
/// "outside", and one word serves both the thread and the grace periods. The counter
/// moves in steps of 2^16 and has 48 bits: wrapping would take 2^48 grace periods during
/// one preempted read section (nine years at a million per second), so one bump per grace
/// period suffices (32-bit liburcu needs a two-phase flip instead).
pub(crate) const NEST_MASK: u64 = (1 << 16) - 1;
/// A published word whose nesting bits are all ones: outside any section, like 0, but the
/// thread's next `read_lock` must take the slow path (it is not registered yet, or it runs
/// in fence mode). The fast path then needs no other test than the nesting depth.
pub(crate) const IDLE_SLOW: u64 = NEST_MASK;
pub(crate) const GP_STEP: u64 = 1 << 16;

/// Whether a published word says its thread is inside a read section.
#[inline(always)]
pub(crate) fn in_section(word: u64) -> bool {
    let depth = word & NEST_MASK;
    depth != 0 && depth != IDLE_SLOW
}

/// `ReaderSlot::flags`: a grace period waits for this reader; it must set the grace-period
/// event when its section ends.
pub(crate) const WAITING: u32 = 1;
/// `ReaderSlot::flags`: the thread registered too late to unregister at exit (its
/// thread-local destructors were already running); it unregisters when its section ends.
pub(crate) const TRANSIENT: u32 = 2;

/// `ReaderSlot::flags`: the thread runs in fence mode; its outermost unlock takes the slow
/// path, whose read-modify-write of the flags orders it (so the fast path tests one word
/// for every rare case).
pub(crate) const FENCES: u32 = 4;

/// `ReaderSlot::flags`: the slot belongs to a [`QsbrReader`](crate::QsbrReader) (qsbr.rs):
/// its word is `gp | 1` online, 0 offline, scanned like a section's; never cleared.
pub(crate) const QSBR: u32 = 8;

/// Keeps hot, independently written fields on separate cache lines.
#[repr(align(128))]
pub(crate) struct CacheAligned<T>(pub(crate) T);

/// One reader thread's published state, read by grace periods. It lives in the thread's
/// own thread-local storage; the registry points at it while the thread is registered.
pub(crate) struct ReaderSlot {
    /// 0 or [`IDLE_SLOW`] outside a section; otherwise the section's `gp_ctr | depth`
    /// (see [`NEST_MASK`]).
    pub(crate) ctr: AtomicU64,
    /// [`WAITING`], [`TRANSIENT`] and [`FENCES`].
    pub(crate) flags: AtomicU32,
}

impl ReaderSlot {
    crate::primitive::const_fn! {
        pub(crate) fn new() -> ReaderSlot {
            ReaderSlot { ctr: AtomicU64::new(IDLE_SLOW), flags: AtomicU32::new(0) }
        }
    }
}

/// A registered reader, as the registry holds it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotPtr(pub(crate) *const ReaderSlot);

// SAFETY: the pointer is only dereferenced under the registry lock, while the thread that
// owns the slot is registered, i.e. has not finished exiting (see reader.rs).
unsafe impl Send for SlotPtr {}

/// Grace-period election state: GPs are numbered; one leader runs at a time.
pub(crate) struct SyncState {
    pub(crate) started: u64,
    pub(crate) completed: u64,
    pub(crate) running: bool,
    /// Callers waiting for another caller's grace period.
    pub(crate) waiters: usize,
}

/// All the state of the RCU implementation.
pub(crate) struct Domain {
    pub(crate) registry: Mutex<Vec<SlotPtr>>,
    pub(crate) gp_event: CacheAligned<Event>,
    pub(crate) sync: Mutex<SyncState>,
    pub(crate) sync_done: Condvar,
    pub(crate) calls: CallRcuQueue,
    /// Registered threads whose unregistration has not finished (loom only, see
    /// `reader::unregister_all_threads`).
    #[cfg(loom)]
    pub(crate) loom_registrations: crate::primitive::AtomicUsize,
}

impl Domain {
    crate::primitive::const_fn! {
        pub(crate) fn new() -> Domain {
            Domain {
                registry: Mutex::new(Vec::new()),
                gp_event: CacheAligned(Event::new()),
                sync: Mutex::new(SyncState { started: 0, completed: 0, running: false, waiters: 0 }),
                sync_done: Condvar::new(),
                calls: CallRcuQueue::new(),
                #[cfg(loom)]
                loom_registrations: crate::primitive::AtomicUsize::new(0),
            }
        }
    }
}

crate::primitive::rcu_global! {
    static DOMAIN: Domain = Domain::new();
}

crate::primitive::rcu_global! {
    static GP_CTR: CacheAligned<AtomicU64> = CacheAligned(AtomicU64::new(GP_STEP));
}

/// The global grace-period counter: written only by the grace-period leader, under the
/// registry lock; read by readers with no lock.
#[inline(always)]
pub(crate) fn gp_ctr() -> &'static AtomicU64 {
    &GP_CTR.0
}

/// The process-wide RCU domain. Whatever reaches it installs the fork hooks first (see
/// fork.rs); the read-side fast path never does (it uses [`gp_ctr`] only).
#[inline(always)]
pub(crate) fn domain() -> &'static Domain {
    #[cfg(not(loom))]
    crate::fork::install_handlers();
    &DOMAIN
}
