//! The process-wide RCU state: the grace-period counter, the registry of reader threads,
//! the grace-period wake-up event and the call_rcu queue. One instance, [`domain()`].
//!
//! Locking, once for the whole crate:
//! - `gp_ctr` is written only by the grace-period leader, while it holds `registry`;
//!   readers load it with no lock.
//! - `registry` (the list of reader slots) is taken by thread registration and
//!   unregistration and briefly by the leader to bump `gp_ctr` and snapshot the slots; the
//!   leader never holds it while waiting for readers.
//! - `sync` elects one grace-period leader at a time and lets concurrent `synchronize()`
//!   callers share its grace period.
//! - the call_rcu queue has its own lock; callbacks never run under it.

use crate::call_rcu::CallRcuQueue;
use crate::event::Event;
use crate::primitive::{AtomicBool, AtomicU64, Condvar, Mutex};
use std::sync::Arc;

/// Bit 0 of a snapshot marks "inside a section"; the counter moves in steps of 2, so a
/// snapshot is never 0 and 0 means "outside". 64 bits never wrap, so one bump per grace
/// period suffices (32-bit liburcu needs a two-phase flip instead).
pub(crate) const GP_ONLINE: u64 = 1;
pub(crate) const GP_STEP: u64 = 2;

/// Keeps hot, independently written fields on separate cache lines.
#[repr(align(128))]
pub(crate) struct CacheAligned<T>(pub(crate) T);

/// One reader thread's published state, read by grace periods.
#[repr(align(128))]
pub(crate) struct ReaderSlot {
    /// 0 outside a section; otherwise the `gp_ctr` value seen when the section began.
    pub(crate) ctr: AtomicU64,
    /// Set by a grace period that waits for this reader; the reader clears it and sets
    /// the grace-period event when its section ends.
    pub(crate) waiting: AtomicBool,
    /// Whether this reader uses real fences (fixed at registration, see `barrier`).
    pub(crate) fences: bool,
}

impl ReaderSlot {
    pub(crate) fn new(fences: bool) -> ReaderSlot {
        ReaderSlot {
            ctr: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            fences,
        }
    }
}

/// Grace-period election state: GPs are numbered; one leader runs at a time.
#[derive(Default)]
pub(crate) struct SyncState {
    pub(crate) started: u64,
    pub(crate) completed: u64,
    pub(crate) running: bool,
}

/// All the state of the RCU implementation.
pub(crate) struct Domain {
    pub(crate) gp_ctr: CacheAligned<AtomicU64>,
    pub(crate) registry: Mutex<Vec<Arc<ReaderSlot>>>,
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
                gp_ctr: CacheAligned(AtomicU64::new(GP_ONLINE)),
                registry: Mutex::new(Vec::new()),
                gp_event: CacheAligned(Event::new()),
                sync: Mutex::new(SyncState { started: 0, completed: 0, running: false }),
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

/// The process-wide RCU domain.
#[inline(always)]
pub(crate) fn domain() -> &'static Domain {
    &DOMAIN
}
