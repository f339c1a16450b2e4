//! [`RamList`]: one VM's guest RAM blocks on an RCU list, QEMU's `ram_list` after its
//! conversion to RCU — sorted biggest block first, with an MRU block for fast lookups, a
//! version counter, and dirty bitmaps grown as blocks arrive.
//!
//! # Concurrency rules
//!
//! Written once, here, for every function of this crate that touches the list.
//!
//! - **Readers** take [`rcu::read_lock`] and nothing else. Every `&RamBlock` and host
//!   pointer they get borrows the guard and is valid until it drops: the block's memory
//!   stays mapped meanwhile even if a writer frees the block. Lookups try the thread's
//!   MRU block first (see `mru.rs` for why a per-thread entry tagged with the version is
//!   safe), then binary-search the sorted address table, republished by every change.
//! - **Writers** (`alloc*`, `free`) hold the list's writer lock ([`RamList::lock`], our
//!   stand-in for QEMU's big lock). It serializes writers with each other, never with
//!   readers, and a writer never waits for readers: `free` unlinks the block at once and
//!   hands its unmapping to `call_rcu`.
//! - **Publication**: a new block is fully built — memory mapped, dirty bitmaps grown and
//!   the block marked dirty for every client — before one release store links it; the
//!   version is bumped after every link and unlink.
//! - **Reclamation** of a freed block: mark it removed, reserve its ram_addr span, republish
//!   the address table without it, bump the version (retiring every thread's MRU entry),
//!   then unlink it, which hands the node to `call_rcu`; after a grace period the list's
//!   count is dropped, and the last count frees the block, whose `Drop` unmaps its memory
//!   (never under a reader), clears the span's dirty bits for every client and only then
//!   gives the span back to `find_ram_offset`. So a reader (or a [`RamBlockRef`](crate::RamBlockRef)) that
//!   still holds a freed block reads and takes dirty bits that are that block's alone: no
//!   new block is placed on its span until it is gone, and a new block placed there later
//!   starts with only its own (all set) bits.
//! - **Counted references** ([`RamBlockRef`](crate::RamBlockRef)) are taken under a guard and keep a block —
//!   and its mapping — past the section, even after a free; the last drop reclaims it
//!   through `call_rcu`. Migration's `last_seen_block` is one.
//! - **Long walks** that span several read sections compare [`RamList::version`] between
//!   them and restart when it changed.
//! - **Downgrade**: a writer may take a read guard while holding the writer lock, drop the
//!   writer lock and keep reading under the guard.

use crate::block::{
    check_guest_addr, check_id, check_size, HostMemory, RamBlock, RamBlockOptions, ReclaimNotifier,
};
use crate::dirty::DirtyMemory;
use crate::offsets::{find_ram_offset, last_ram_offset};
use crate::table::AddrTable;
use crate::RamError;
use rcu::{ListWriter, RcuCell, RcuList};
use std::os::fd::BorrowedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

/// How many `drain_call_rcu` rounds a free's reclamation takes at most: the list count's
/// drop (which unmaps, when it is the last count), a counted reference's deferred free, and
/// spares.
const RECLAIM_STEPS: usize = 4;

/// State shared by the list and its blocks, which outlive it on the call_rcu thread.
pub(crate) struct Shared {
    /// Blocks freed and not yet unmapped.
    pending: AtomicUsize,
    notifier: Mutex<Option<ReclaimNotifier>>,
    /// The dirty bitmaps of the list's ram_addr space: a reclaimed block clears its span.
    pub(crate) dirty: DirtyMemory,
    /// `(offset, len)` of freed blocks not reclaimed yet: no new block may be placed there.
    reserved: Mutex<Vec<(u64, u64)>>,
}

impl Shared {
    /// Runs the reclaim notifier, if any, on a block about to be unmapped.
    pub(crate) fn before_unmap(&self, block: &RamBlock) {
        let notify = self
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(notify) = notify {
            if catch_unwind(AssertUnwindSafe(|| notify(block))).is_err() {
                log::error!("ramlist: the reclaim notifier panicked on {:?}", block.id());
            }
        }
    }

    /// Counts a freed block's memory as gone: clears its span's dirty bits, then gives the
    /// span back (in that order, so a block placed there later never sees a stale bit).
    pub(crate) fn after_unmap(&self, block: &RamBlock) {
        if block.is_removed() {
            self.dirty.clear_all(block.offset(), block.len());
            let mut reserved = self.reserved();
            if let Some(i) = reserved
                .iter()
                .position(|&span| span == (block.offset(), block.len()))
            {
                reserved.swap_remove(i);
            }
            drop(reserved);
            self.pending.fetch_sub(1, Release);
        }
    }

    fn reserved(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The guest RAM blocks of one VM: shared by every thread (`Sync`), read without locks,
/// changed by one writer at a time (see the module's concurrency rules).
pub struct RamList {
    pub(crate) blocks: RcuList<RamBlock>,
    /// Sorted spans of the linked blocks, republished by every link and unlink.
    pub(crate) table: RcuCell<AddrTable>,
    pub(crate) shared: Arc<Shared>,
    /// Unique per list and never reused: tags MRU entries.
    pub(crate) id: u64,
    version: AtomicU64,
    total: AtomicU64,
}

static NEXT_LIST_ID: AtomicU64 = AtomicU64::new(1);

impl Default for RamList {
    fn default() -> Self {
        RamList::new()
    }
}

impl RamList {
    /// An empty list.
    pub fn new() -> RamList {
        RamList {
            blocks: RcuList::new(),
            table: RcuCell::new(AddrTable::empty()),
            shared: Arc::new(Shared {
                pending: AtomicUsize::new(0),
                notifier: Mutex::new(None),
                dirty: DirtyMemory::new(),
                reserved: Mutex::new(Vec::new()),
            }),
            id: NEXT_LIST_ID.fetch_add(1, Relaxed),
            version: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    /// Takes the writer lock: for several changes in a row, or for the downgrade idiom.
    pub fn lock(&self) -> RamListWriter<'_> {
        RamListWriter {
            list: self,
            writer: self.blocks.lock(),
        }
    }

    /// Maps an anonymous private block of `size` bytes, links it at the smallest gap of
    /// the ram_addr space that fits and returns its offset there.
    pub fn alloc(&self, id: &str, size: u64) -> Result<u64, RamError> {
        self.lock().alloc(id, size)
    }

    /// [`alloc`](Self::alloc) with flags and a guest-physical placement.
    pub fn alloc_with(&self, id: &str, size: u64, opts: RamBlockOptions) -> Result<u64, RamError> {
        self.lock().alloc_with(id, size, opts)
    }

    /// A block over `size` bytes of the caller's file from `offset`, mapped shared
    /// (memory another process can map too, e.g. a memfd for local migration).
    pub fn alloc_from_fd(
        &self,
        id: &str,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        opts: RamBlockOptions,
    ) -> Result<u64, RamError> {
        self.lock().alloc_from_fd(id, size, fd, offset, opts)
    }

    /// A block over `size` bytes of the caller's file from `offset`, mapped private (copy
    /// on write): see [`RamListWriter::alloc_private_from_fd_before_link`].
    pub fn alloc_private_from_fd(
        &self,
        id: &str,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        opts: RamBlockOptions,
    ) -> Result<u64, RamError> {
        self.lock()
            .alloc_private_from_fd_before_link(id, size, fd, offset, opts, no_hook)
    }

    /// A block over the caller's memory (QEMU's `qemu_ram_alloc_from_ptr`); it is never
    /// unmapped by the list.
    ///
    /// # Safety
    /// `host..host + size` must stay mapped read-write, and not be used by anything that
    /// assumes exclusive access, until the block is reclaimed: after [`free`](Self::free)
    /// and a [`drain_reclaim`](Self::drain_reclaim) that reports nothing pending (or after
    /// the list is dropped, every [`RamBlockRef`](crate::RamBlockRef)(crate::RamBlockRef) to the block is
    /// dropped too — a reference outlives the list — and `rcu::drain_call_rcu` ran thrice;
    /// a [reclaim notifier](Self::set_reclaim_notifier) tells for sure).
    pub unsafe fn alloc_from_ptr(
        &self,
        id: &str,
        size: u64,
        host: *mut u8,
        opts: RamBlockOptions,
    ) -> Result<u64, RamError> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.lock().alloc_from_ptr(id, size, host, opts) }
    }

    /// Unlinks the block named `id` at once; its memory is unmapped after readers (and
    /// counted references) are gone.
    pub fn free(&self, id: &str) -> Result<(), RamError> {
        self.lock().free(id)
    }

    /// Bumped by every change to the list: a walker that dropped its guard restarts when
    /// it sees a new value.
    pub fn version(&self) -> u64 {
        self.version.load(Acquire)
    }

    /// Bytes of RAM in all linked blocks.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Acquire)
    }

    /// Number of linked blocks (a snapshot).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True if no block is linked (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// One past the highest ram_addr any block occupies: what dirty bitmaps must cover.
    pub fn last_ram_offset(&self) -> u64 {
        let guard = rcu::read_lock();
        let spans: Vec<(u64, u64)> = self
            .blocks
            .iter(&guard)
            .map(|b| (b.offset(), b.len()))
            .collect();
        last_ram_offset(&spans)
    }

    /// The dirty bitmaps of this list's ram_addr space.
    pub fn dirty(&self) -> &DirtyMemory {
        &self.shared.dirty
    }

    /// The ram_addr spans `(offset, len)` of freed blocks that are not reclaimed yet (a
    /// reader or a [`RamBlockRef`](crate::RamBlockRef)(crate::RamBlockRef) may still hold them): no new block
    /// is placed there until they are.
    pub fn reserved_spans(&self) -> Vec<(u64, u64)> {
        let mut spans = self.shared.reserved().clone();
        spans.sort_unstable();
        spans
    }

    /// Calls `notify` with every block of this list about to be unmapped (freed blocks
    /// after their grace periods, and blocks left when the list is dropped), on the
    /// call_rcu thread: the place to check that nothing still uses the memory, or to
    /// account for it. A panic in it is logged and the block unmapped all the same.
    pub fn set_reclaim_notifier(&self, notify: Option<ReclaimNotifier>) {
        *self
            .shared
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = notify;
    }

    /// Blocks freed whose memory is not unmapped yet.
    pub fn reclaim_pending(&self) -> usize {
        self.shared.pending.load(Acquire)
    }

    /// Waits for the reclamation of every block freed so far, except those a
    /// [`RamBlockRef`](crate::RamBlockRef)(crate::RamBlockRef) still holds; returns how many remain pending.
    ///
    /// # Panics
    /// Inside a read section (it waits for grace periods).
    pub fn drain_reclaim(&self) -> usize {
        for _ in 0..RECLAIM_STEPS {
            if self.reclaim_pending() == 0 {
                break;
            }
            rcu::drain_call_rcu();
        }
        self.reclaim_pending()
    }
}

/// The held writer lock of a [`RamList`]. Readers go on meanwhile; dropping it ends the
/// writer's turn (a read guard taken before may outlive it: the downgrade idiom).
pub struct RamListWriter<'a> {
    list: &'a RamList,
    writer: ListWriter<'a, RamBlock>,
}

impl RamListWriter<'_> {
    /// See [`RamList::alloc`].
    pub fn alloc(&mut self, id: &str, size: u64) -> Result<u64, RamError> {
        self.alloc_with(id, size, RamBlockOptions::default())
    }

    /// See [`RamList::alloc_with`].
    pub fn alloc_with(
        &mut self,
        id: &str,
        size: u64,
        opts: RamBlockOptions,
    ) -> Result<u64, RamError> {
        self.add(
            id,
            size,
            opts,
            || HostMemory::anonymous(id, size, &opts),
            no_hook,
        )
    }

    /// See [`RamList::alloc_from_fd`].
    pub fn alloc_from_fd(
        &mut self,
        id: &str,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        opts: RamBlockOptions,
    ) -> Result<u64, RamError> {
        self.alloc_from_fd_before_link(id, size, fd, offset, opts, no_hook)
    }

    /// See [`RamList::alloc_from_ptr`].
    ///
    /// # Safety
    /// As for [`RamList::alloc_from_ptr`].
    pub unsafe fn alloc_from_ptr(
        &mut self,
        id: &str,
        size: u64,
        host: *mut u8,
        opts: RamBlockOptions,
    ) -> Result<u64, RamError> {
        // SAFETY: the caller's guarantee, passed on.
        self.add(
            id,
            size,
            opts,
            || unsafe { HostMemory::from_ptr(id, size, host, &opts) },
            no_hook,
        )
    }

    /// Checks everything, then makes the memory, then lets `before_link` see the built
    /// block, then publishes: an error at any step leaves the list (and its version) as
    /// it was.
    fn add<E: From<RamError>>(
        &mut self,
        id: &str,
        size: u64,
        opts: RamBlockOptions,
        memory: impl FnOnce() -> Result<HostMemory, RamError>,
        before_link: impl FnOnce(&RamBlock) -> Result<(), E>,
    ) -> Result<u64, E> {
        check_id(id)?;
        check_size(id, size)?;
        if self.writer.iter().any(|b| b.id() == id) {
            return Err(RamError::DuplicateId(id.to_string()).into());
        }
        if let Some(start) = opts.guest_addr {
            check_guest_addr(id, start, size)?;
            let end = start + size;
            let clash = self.writer.iter().find(|b| {
                b.guest_range()
                    .is_some_and(|r| start < r.end && r.start < end)
            });
            if let Some(other) = clash {
                return Err(RamError::GuestOverlap {
                    id: id.to_string(),
                    start,
                    end,
                    other: other.id().to_string(),
                }
                .into());
            }
        }
        // Freed blocks not reclaimed yet keep their spans (see the module's rules).
        let mut spans: Vec<(u64, u64)> =
            self.writer.iter().map(|b| (b.offset(), b.len())).collect();
        spans.extend(self.list.shared.reserved().iter().copied());
        let offset = find_ram_offset(&spans, size).ok_or_else(|| RamError::NoRamAddrSpace {
            id: id.to_string(),
            size,
        })?;
        let mem = memory()?;
        let list = self.list;
        let block = RamBlock::new(id, offset, mem, &opts, Some(Arc::clone(&list.shared)));
        // Refused: the block is dropped here (its memory unmapped), never seen by anyone.
        before_link(&block)?;
        let dirty = &list.shared.dirty;
        dirty.grow_to(last_ram_offset(&spans).max(offset + size));
        dirty.mark_dirty(offset, size);
        self.writer.insert_before_first(|b| b.len() < size, block);
        list.table.store(AddrTable::build(self.writer.iter()));
        list.total.fetch_add(size, Release);
        list.version.fetch_add(1, Release);
        log::debug!("ramlist: added {id:?} at ram_addr {offset:#x} (+{size:#x})");
        Ok(offset)
    }

    /// See [`RamList::free`].
    pub fn free(&mut self, id: &str) -> Result<(), RamError> {
        let list = self.list;
        let Some(block) = self.writer.iter().find(|b| b.id() == id) else {
            return Err(RamError::UnknownId(id.to_string()));
        };
        block.mark_removed();
        let len = block.len();
        list.shared.pending.fetch_add(1, AcqRel);
        list.shared.reserved().push((block.offset(), len));
        // Unlinking hands the node to call_rcu: the table and version change first.
        list.table.store(AddrTable::build(
            self.writer.iter().filter(|b| b.id() != id),
        ));
        list.total.fetch_sub(len, Release);
        list.version.fetch_add(1, Release);
        #[cfg(test)]
        test_hooks::after_free_bump(list);
        let removed = self.writer.remove_first(|b| b.id() == id);
        debug_assert!(removed);
        log::debug!("ramlist: freed {id:?} (+{len:#x})");
        Ok(())
    }

    /// The linked blocks, biggest first, as this writer sees them.
    pub fn blocks(&self) -> impl Iterator<Item = &RamBlock> {
        self.writer.iter()
    }

    /// The list this writer holds.
    pub fn list(&self) -> &RamList {
        self.list
    }
}

/// The `before_link` of the plain allocations: nothing to do.
fn no_hook(_: &RamBlock) -> Result<(), RamError> {
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Allocation with a check before publication (used by `kvm::KvmRam::add`, issue 10
// point 12: a KVM slot is registered before its block is linked, so no reader ever sees
// a placed block without its slot, and a refusal leaves the list and its version as
// they were).
// ---------------------------------------------------------------------------------------

impl RamListWriter<'_> {
    /// [`alloc_with`](Self::alloc_with), but `before_link` is called with the fully built
    /// block (memory mapped, offset chosen) before it is linked. If it fails, the block is
    /// unmapped at once (the reclaim notifier sees it, as any block about to be unmapped)
    /// and the list and its version stay as they were; its error is returned.
    pub fn alloc_with_before_link<E: From<RamError>>(
        &mut self,
        id: &str,
        size: u64,
        opts: RamBlockOptions,
        before_link: impl FnOnce(&RamBlock) -> Result<(), E>,
    ) -> Result<u64, E> {
        self.add(
            id,
            size,
            opts,
            || HostMemory::anonymous(id, size, &opts),
            before_link,
        )
    }

    /// [`alloc_from_fd`](Self::alloc_from_fd) with the same `before_link` step as
    /// [`alloc_with_before_link`](Self::alloc_with_before_link).
    pub fn alloc_from_fd_before_link<E: From<RamError>>(
        &mut self,
        id: &str,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        opts: RamBlockOptions,
        before_link: impl FnOnce(&RamBlock) -> Result<(), E>,
    ) -> Result<u64, E> {
        self.alloc_fd(id, size, fd, offset, opts, true, before_link)
    }

    /// [`alloc_from_fd_before_link`](Self::alloc_from_fd_before_link), but the file is
    /// mapped MAP_PRIVATE, copy on write: it is only read (pages come in on first touch)
    /// and the writes stay in this process (a snapshot restored by mapping). The block is
    /// not shared ([`RamBlock::is_shared`]): nothing may take the file for its contents.
    pub fn alloc_private_from_fd_before_link<E: From<RamError>>(
        &mut self,
        id: &str,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        opts: RamBlockOptions,
        before_link: impl FnOnce(&RamBlock) -> Result<(), E>,
    ) -> Result<u64, E> {
        self.alloc_fd(id, size, fd, offset, opts, false, before_link)
    }

    /// A block over a file, mapped shared or private: the flag records what the memory is
    /// (and `HostMemory::from_fd` maps by it).
    #[allow(clippy::too_many_arguments)]
    fn alloc_fd<E: From<RamError>>(
        &mut self,
        id: &str,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        opts: RamBlockOptions,
        shared: bool,
        before_link: impl FnOnce(&RamBlock) -> Result<(), E>,
    ) -> Result<u64, E> {
        let opts = RamBlockOptions { shared, ..opts };
        self.add(
            id,
            size,
            opts,
            || HostMemory::from_fd(id, size, fd, offset, &opts),
            before_link,
        )
    }
}

/// A hook for unit tests into the one step no black-box test can stop at reliably: inside
/// a free, after the version bump and before the unlink.
#[cfg(test)]
pub(crate) mod test_hooks {
    use super::RamList;
    use std::cell::RefCell;

    type Hook = Box<dyn FnMut(&RamList)>;

    std::thread_local! {
        static AFTER_FREE_BUMP: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs `hook` (on this thread) inside this thread's next frees, between the version
    /// bump and the unlink, until [`clear`] is called.
    pub(crate) fn set_after_free_bump(hook: impl FnMut(&RamList) + 'static) {
        AFTER_FREE_BUMP.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
    }

    /// Removes the hook.
    pub(crate) fn clear() {
        AFTER_FREE_BUMP.with(|h| *h.borrow_mut() = None);
    }

    pub(super) fn after_free_bump(list: &RamList) {
        AFTER_FREE_BUMP.with(|h| {
            if let Some(hook) = h.borrow_mut().as_mut() {
                hook(list);
            }
        });
    }
}
