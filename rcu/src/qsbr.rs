//! Quiescent-state readers ([`QsbrReader`]): liburcu's qsbr flavour, QEMU's "rcu: report
//! quiescent states", sharing grace periods with [`read_lock`](crate::read_lock) readers.
//!
//! # The idea
//!
//! A thread that runs a loop (a vCPU handling exits, an event loop) is between two units
//! of work many times a second, and at those points it holds no RCU-protected reference.
//! Instead of marking each read section, it says so: "I am quiescent" (a *quiescent
//! state*). Everything it reads between two quiescent states is protected as if one long
//! section covered it, so a read costs nothing at all: no load, no store, no barrier. A
//! thread that is about to block for long (KVM_RUN, a wait on a condvar) goes *offline*,
//! and no grace period waits for it until it comes back *online*.
//!
//! In Rust the reader is a value, [`QsbrReader`], and reads borrow it: `&reader` is the
//! proof that RCU APIs ask for (it dereferences to a [`ReadGuard`]). Reporting a quiescent
//! state, going offline and waiting for a grace period take the reader mutably, so the
//! compiler refuses any reference read through it that is still alive across them — the
//! rule liburcu-qsbr leaves to the programmer.
//!
//! # The published word
//!
//! Each reader has a heap slot in the domain's registry, like a `read_lock` thread's, with
//! the same encoding, so the grace period's scan is the very same test for both: an online
//! reader publishes `gp | 1` (as if inside a section begun at counter `gp`: its last
//! quiescent state), an offline one 0. A grace period that bumped the counter to `G` waits
//! until every slot is 0 or `G | 1`, i.e. until every online QSBR reader reported a
//! quiescent state after seeing `G` (liburcu-qsbr: `ctr == gp_ctr` or 0).
//!
//! # Barriers (writer: bump `gp_ctr` (release), mark slots `WAITING`, global barrier, scan)
//!
//! - **Quiescent state**: load `gp_ctr` (acquire); if it is what we published, return
//!   (the fast path: one load and a compare). Otherwise store `gp | 1` with *release*: the
//!   grace period that reads it (acquire) then happens after every read the thread did
//!   before, so it cannot free what they saw. No full barrier is needed for the data: the
//!   store publishes the counter we *loaded*, with acquire, from the writer's release bump,
//!   so our later reads see everything the writer unlinked before that bump; and while we
//!   still publish an older counter, the grace period keeps waiting. (liburcu-qsbr fences
//!   on both sides because its writer has no membarrier.)
//! - **Offline**: store 0 with release (as above: what we read happens before the free).
//! - **Online**: load `gp_ctr`, store `gp | 1`, then the reader's barrier (a compiler
//!   barrier under membarrier, a full fence otherwise), exactly as the outermost
//!   `read_lock`: store-buffering against the writer's unlink and scan, which the writer's
//!   global barrier closes (either its scan sees our word, or our reads see its unlink).
//! - **Wake-up**: a grace period that finds us pending sleeps; whoever changes the word
//!   must then set its event. After storing, the reader checks its `WAITING` mark
//!   (store-buffering again with the writer's mark-then-barrier-then-scan: a compiler
//!   barrier under membarrier, a read-modify-write of the flags in fence mode, as the
//!   `read_lock` unlock does). A quiescent state that finds `WAITING` clears it (acquire),
//!   which makes the counter of the grace period that set it visible: if the counter moved
//!   past what we published, we publish again before waking, so we never wake a grace
//!   period while still pending for it, with our mark gone. (A pending reader whose mark
//!   is gone for another reason is re-marked by the grace period before it sleeps: see
//!   grace.rs.)
//! - **Registration** and **unregistration** take the registry lock, which the grace
//!   period holds while it bumps, marks and scans: no barrier beyond the lock.
//!
//! # Rules
//!
//! - A reader that is online and never reports a quiescent state blocks every grace
//!   period, hence `synchronize`, `call_rcu` reclamation and `drain_call_rcu`, for as long
//!   as it does so. Report one after each unit of work; go offline around anything that
//!   blocks.
//! - [`synchronize`](crate::synchronize) and [`drain_call_rcu`](crate::drain_call_rcu) on a
//!   thread with an online reader panic (they would wait for this very thread's next
//!   quiescent state); [`QsbrReader::synchronize`] goes offline around the wait, as
//!   liburcu-qsbr's `synchronize_rcu` does, and its `&mut self` proves nothing read through
//!   the reader is still held.
//! - A reader is neither `Send` nor `Sync`: it describes its thread. Dropping it
//!   unregisters it. A thread that ends with an online reader leaked (`mem::forget`,
//!   `Box::leak`) aborts the process, like one that ends inside a `read_lock` section
//!   (see reader.rs): what it read could still be referenced anywhere.
//! - Readers may be combined with `read_lock` on the same thread; each protects its own
//!   references.

use crate::barrier::{barrier_mode, reader_barrier, BarrierMode};
use crate::domain::{domain, gp_ctr, ReaderSlot, SlotPtr, QSBR, WAITING};
use crate::primitive::{lock, AtomicU32, AtomicU64};
use crate::reader::ReadGuard;
use std::cell::Cell;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::compiler_fence;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

/// A QSBR reader's registry slot: the shared [`ReaderSlot`] first (the registry points at
/// it), then the identity of the owning thread, which the fork child needs.
#[repr(C)]
pub(crate) struct QsbrSlot {
    slot: ReaderSlot,
    /// The address of the owner thread's [`ONLINE`] counter.
    owner: usize,
}

crate::primitive::rcu_thread_local! {
    /// How many of this thread's QSBR readers are online; its address identifies the
    /// thread (the same in a fork child, for the forking thread).
    static ONLINE: Cell<u32> = Cell::new(0);
}

fn this_thread() -> usize {
    ONLINE.with(|c| c as *const Cell<u32> as usize)
}

fn count_online(delta: i32) {
    // `try_with`: a reader dropped by a thread-local destructor after ours is gone.
    let _ = ONLINE.try_with(|c| c.set(c.get().wrapping_add_signed(delta)));
}

/// True if the calling thread has a QSBR reader online (see reader.rs: waiting for a
/// grace period then would wait for this very thread).
pub(crate) fn online_on_this_thread() -> bool {
    ONLINE.try_with(|c| c.get() != 0).unwrap_or(false)
}

/// In a fork child, with the registry lock held: true if `s` is a QSBR slot of the
/// calling (forking) thread, which the child keeps; clears its `WAITING` mark, since no
/// grace period of the parent runs in the child.
///
/// # Safety
/// The caller holds the registry lock and `s` is in the registry.
#[cfg(not(loom))]
pub(crate) unsafe fn keep_after_fork(s: SlotPtr) -> bool {
    // SAFETY: a registered slot is valid under the registry lock (domain.rs).
    let slot = unsafe { &*s.0 };
    if slot.flags.load(Relaxed) & QSBR == 0 {
        return false;
    }
    // SAFETY: a slot flagged QSBR is the first field of a repr(C) QsbrSlot (`register`).
    let owner = unsafe { &*s.0.cast::<QsbrSlot>() }.owner;
    let mine = owner == this_thread();
    if mine {
        slot.flags.fetch_and(!WAITING, Relaxed);
    }
    mine
}

/// A quiescent-state-based reader: the calling thread, registered for as long as this
/// value lives, whose reads cost nothing and are protected until it reports a quiescent
/// state or goes offline.
///
/// Rules: an online reader that never reports a quiescent state blocks every grace period
/// (`synchronize`, call_rcu reclamation) for as long as it does not, so report one after
/// each unit of work and go offline around anything that blocks.
/// [`synchronize`](crate::synchronize) and [`drain_call_rcu`](crate::drain_call_rcu) panic
/// on a thread with an online reader; [`QsbrReader::synchronize`] goes offline around the
/// wait. A thread that ends with an online reader leaked aborts the process. Grace periods
/// are shared with [`read_lock`](crate::read_lock) readers, on this thread too.
///
/// ```
/// use rcu::{QsbrReader, RcuCell};
/// let ports = RcuCell::new(vec![0x3f8u16, 0x60]);
/// let mut reader = QsbrReader::register();
/// for _exit in 0..3 {
///     // Blocking work (KVM_RUN) runs offline: no grace period waits for it.
///     reader.offline_scope(|| std::thread::yield_now());
///     // Handling the exit: reads borrow the reader, at no cost.
///     assert!(ports.load(&reader).contains(&0x3f8));
///     // Done with this unit of work: nothing read above is used past this point.
///     reader.quiescent_state();
/// }
/// ```
///
/// A reference read through the reader cannot be kept across a quiescent state:
///
/// ```compile_fail,E0502
/// let cell = rcu::RcuCell::new(1);
/// let mut reader = rcu::QsbrReader::register();
/// let v = cell.load(&reader);
/// reader.quiescent_state(); // error: `reader` is borrowed by `v`
/// assert_eq!(*v, 1);
/// ```
///
/// nor across going offline:
///
/// ```compile_fail,E0502
/// let cell = rcu::RcuCell::new(1);
/// let mut reader = rcu::QsbrReader::register();
/// let v = cell.load(&reader);
/// reader.offline_scope(|| ()); // error: `reader` is borrowed by `v`
/// assert_eq!(*v, 1);
/// ```
///
/// nor across a grace period the reader waits for:
///
/// ```compile_fail,E0502
/// let cell = rcu::RcuCell::new(1);
/// let mut reader = rcu::QsbrReader::register();
/// let v = cell.load(&reader);
/// reader.synchronize(); // error: `reader` is borrowed by `v`
/// assert_eq!(*v, 1);
/// ```
///
/// nor across the offline state:
///
/// ```compile_fail,E0505
/// let cell = rcu::RcuCell::new(1);
/// let reader = rcu::QsbrReader::register();
/// let v = cell.load(&reader);
/// let offline = reader.offline(); // error: cannot move out of `reader`, it is borrowed
/// assert_eq!(*v, 1);
/// drop(offline);
/// ```
///
/// A list walk is no different:
///
/// ```compile_fail,E0502
/// let list = rcu::RcuList::new();
/// list.lock().push_back(1);
/// let mut reader = rcu::QsbrReader::register();
/// let first = list.iter(&reader).next().unwrap();
/// reader.quiescent_state(); // error: `reader` is borrowed by `first`
/// assert_eq!(*first, 1);
/// ```
///
/// And a reader belongs to its thread:
///
/// ```compile_fail,E0277
/// let reader = rcu::QsbrReader::register();
/// std::thread::spawn(move || drop(reader)); // error: `*mut ()` cannot be sent
/// ```
#[must_use = "the thread is a reader only while the QsbrReader lives"]
pub struct QsbrReader {
    slot: NonNull<QsbrSlot>,
    /// What the slot holds as far as this thread knows: `gp | 1` online, 0 offline (only
    /// this thread writes it, under `&mut self`).
    word: u64,
    /// Fence mode (see barrier.rs), fixed when registering.
    fences: bool,
    /// The proof lent to readers (`&reader`): a zero-sized guard no `read_lock` opened,
    /// never dropped.
    proof: ManuallyDrop<ReadGuard>,
    _not_send: PhantomData<*mut ()>,
}

impl QsbrReader {
    /// Registers the calling thread as a quiescent-state reader, online.
    pub fn register() -> QsbrReader {
        let fences = barrier_mode() == BarrierMode::Fences;
        let slot = Box::new(QsbrSlot {
            slot: ReaderSlot {
                ctr: AtomicU64::new(0),
                flags: AtomicU32::new(QSBR),
            },
            owner: this_thread(),
        });
        let slot = NonNull::from(Box::leak(slot));
        // A leaked online reader must not outlive its thread unnoticed (reader.rs).
        #[cfg(not(loom))]
        crate::reader::arm_thread_exit();
        // SAFETY: just allocated; freed only by `drop`.
        let shared = unsafe { slot.as_ref() };
        let word = {
            let mut registry = lock(&domain().registry);
            // Under the registry lock, which the grace-period leader holds while it bumps
            // the counter and scans: we read the latest counter, and a grace period that
            // starts later sees our word. The lock orders everything; no barrier needed.
            let word = gp_ctr().load(Acquire) | 1;
            shared.slot.ctr.store(word, Relaxed);
            registry.push(SlotPtr(&shared.slot));
            word
        };
        count_online(1);
        QsbrReader {
            slot,
            word,
            fences,
            proof: ReadGuard::unopened(),
            _not_send: PhantomData,
        }
    }

    /// The proof RCU reads ask for (also what `&reader` dereferences to): what is read
    /// under it stays valid until the reader's next quiescent state or offline period.
    #[inline(always)]
    pub fn read(&self) -> &ReadGuard {
        &self.proof
    }

    /// Reports a quiescent state: nothing read through this reader before is used after.
    /// Costs a load and a compare unless a grace period started since the last report.
    #[inline]
    pub fn quiescent_state(&mut self) {
        let word = gp_ctr().load(Acquire) | 1;
        if word != self.word {
            self.publish(word);
        }
    }

    /// Runs `f` offline (a blocking call: KVM_RUN, a wait): no grace period waits for the
    /// thread meanwhile. Back online when `f` returns or unwinds. `f` cannot read through
    /// this reader (it is borrowed mutably), which is what makes this sound.
    #[inline]
    pub fn offline_scope<R>(&mut self, f: impl FnOnce() -> R) -> R {
        /// Brings the reader back online, also if `f` panics.
        struct Online<'a>(&'a mut QsbrReader);
        impl Drop for Online<'_> {
            #[inline]
            fn drop(&mut self) {
                self.0.go_online();
            }
        }
        self.go_offline();
        let _online = Online(self);
        f()
    }

    /// Goes offline for an unbounded time: the reader can no longer read until
    /// [`QsbrOffline::online`] gives it back.
    pub fn offline(mut self) -> QsbrOffline {
        self.go_offline();
        QsbrOffline(self)
    }

    /// Waits for a grace period, offline meanwhile (liburcu-qsbr's `synchronize_rcu`):
    /// [`crate::synchronize`] itself panics on a thread with an online reader.
    ///
    /// # Panics
    /// Inside a `read_lock` section (see [`crate::synchronize`]).
    pub fn synchronize(&mut self) {
        self.offline_scope(crate::synchronize);
    }

    #[inline(always)]
    fn slot(&self) -> &ReaderSlot {
        // SAFETY: allocated in `register`, freed only in `drop`.
        &unsafe { self.slot.as_ref() }.slot
    }

    /// Publishes `word` (a newer `gp | 1`), then wakes a grace period that waits for us
    /// (see the module doc: never while still pending for it).
    #[inline(never)]
    fn publish(&mut self, mut word: u64) {
        let mut wake = false;
        loop {
            self.slot().ctr.store(word, Release);
            if !self.take_waiting() {
                break;
            }
            wake = true;
            // The WAITING we cleared (acquire) came after its grace period's bump.
            let now = gp_ctr().load(Acquire) | 1;
            if now == word {
                break;
            }
            word = now;
        }
        self.word = word;
        if wake {
            domain().gp_event.0.set();
        }
    }

    /// After a store to the word: clears and returns this slot's WAITING mark, ordered
    /// after the store (see the module doc).
    #[inline(always)]
    fn take_waiting(&self) -> bool {
        let flags = &self.slot().flags;
        if !self.fences {
            // Under membarrier the grace period's barrier pairs with this compiler
            // barrier: either its scan sees our store, or we see its mark.
            compiler_fence(SeqCst);
            if flags.load(Relaxed) & WAITING == 0 {
                return false;
            }
        }
        // In fence mode, a read-modify-write of the word the grace period marks with its
        // own read-modify-write: one of the two reads the other (see reader.rs).
        flags.fetch_and(!WAITING, AcqRel) & WAITING != 0
    }

    fn go_offline(&mut self) {
        self.slot().ctr.store(0, Release);
        self.word = 0;
        count_online(-1);
        if self.take_waiting() {
            domain().gp_event.0.set();
        }
    }

    fn go_online(&mut self) {
        let word = gp_ctr().load(Acquire) | 1;
        self.slot().ctr.store(word, Relaxed);
        reader_barrier(self.fences);
        self.word = word;
        count_online(1);
    }
}

impl std::ops::Deref for QsbrReader {
    type Target = ReadGuard;
    #[inline(always)]
    fn deref(&self) -> &ReadGuard {
        &self.proof
    }
}

impl AsRef<ReadGuard> for QsbrReader {
    #[inline(always)]
    fn as_ref(&self) -> &ReadGuard {
        &self.proof
    }
}

impl Drop for QsbrReader {
    fn drop(&mut self) {
        if self.word != 0 {
            count_online(-1);
        }
        let me = SlotPtr(self.slot());
        {
            let mut registry = lock(&domain().registry);
            registry.retain(|s| *s != me);
            // Under the registry lock, as the grace period marks and scans: it either
            // rescans without us or left its mark, and then waits for this wake-up.
            if self.slot().flags.swap(QSBR, AcqRel) & WAITING != 0 {
                domain().gp_event.0.set();
            }
        }
        // SAFETY: from Box::leak in `register`; out of the registry, so no grace period
        // can reach it any more (they dereference slots only under the registry lock).
        drop(unsafe { Box::from_raw(self.slot.as_ptr()) });
    }
}

impl std::fmt::Debug for QsbrReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QsbrReader")
            .field("word", &self.word)
            .finish()
    }
}

/// A [`QsbrReader`] gone offline for an unbounded time ([`QsbrReader::offline`]): still
/// registered, never waited for, and unable to read until [`online`](Self::online).
/// Dropping it unregisters the thread.
#[must_use = "dropping an offline reader unregisters it"]
#[derive(Debug)]
pub struct QsbrOffline(QsbrReader);

impl QsbrOffline {
    /// Back online: reads are possible again, and protected from now on.
    pub fn online(mut self) -> QsbrReader {
        self.0.go_online();
        self.0
    }
}
