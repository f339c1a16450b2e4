//! Guest-physical placement of RAM blocks as KVM memory slots, and the dirty-log sync that
//! feeds KVM's per-slot logs into the RAM list's [`DirtyMemory`].
//!
//! # Slot table rules
//!
//! [`KvmRam`] is the only writer of a VM's slots; its slot table (the `slots` field,
//! where these rules are declared again) holds one record per slot. Readers of the RAM
//! list are not involved: they never take the table's lock.
//!
//! - **Lock order**: (for `add` and `remove`) the RAM list's writer lock, then the
//!   slot-table lock; nothing waits for the writer lock while it holds the slot table.
//!   So a caller holding [`RamList::lock`] (the VMM's big lock) may call every other
//!   method of `KvmRam` — `placed`, `sync_dirty_log`, `set_dirty_logging`... — while
//!   another thread is inside `add` or `remove`; it must not call `add`/`remove` itself
//!   (they take the writer lock).
//! - **A slot keeps its memory mapped**: every record holds a counted reference
//!   ([`RamBlockRef`]) to its block, dropped only after KVM deleted the slot. A block freed
//!   with `RamList::free` behind our back is therefore unlinked at once but stays mapped
//!   (and its ram_addr span reserved) for as long as KVM maps it; the guest's stores land
//!   in that old memory, never in a block mapped later at the same host address.
//! - **Freed blocks lose their slots** (QEMU's memory listener, run lazily): every entry
//!   to the table first deletes the slots of blocks that were freed behind our back, which
//!   drops the last reference and lets the block be reclaimed.
//! - **add** registers the slot with KVM *before* the block is linked (under the list's
//!   writer lock, through [`RamListWriter::alloc_with_before_link`]): no reader ever sees
//!   a placed block without its slot, and a refusal leaves the list and its version
//!   unchanged.
//! - **remove** holds the slot-table lock and the list's writer lock from the slot's
//!   deletion to the block's free, so no concurrent `add` sees the slot number free but
//!   the block (its id, its guest range) still linked.
//! - **Dirty logging is per client**: a slot logs while any [`DirtyClient`] fed by KVM
//!   ([`DirtyClient::KVM`]) wants it, and a sync merges its log only into those clients.
//! - **Sync** is GET, then CLEAR of what GET reported (re-arming write protection), then
//!   merge into the bitmaps: a bit reaches a consumer only after KVM was re-armed for its
//!   page, so a guest write after the consumer copied the page is always logged again.
//!   Clearing early is harmless (the bit is already in our hands); clearing late is not.
//!
//! # Page size
//!
//! KVM's dirty log has one bit per 4 KiB guest page on x86 ([`KVM_LOG_PAGE_SIZE`]),
//! whatever the host page size; slot sizes are multiples of the host page size
//! ([`crate::page_size`]), hence of it. The RAM list's bitmaps count in the same 4 KiB
//! pages ([`crate::dirty::PAGE_SIZE`]), so bit `i` of a slot's log is page `i` of its
//! block; both facts are asserted.
//!
//! ```compile_fail
//! // Safe code cannot hand KVM a buffer sized from a page count of its own: the old
//! // public `get_dirty_log_into(vm, slot, pages, buf)` let KVM write the slot's real
//! // bitmap size past a short buffer. Logs are read through `KvmRam::sync_dirty_log`.
//! fn misuse(vm: &kvm_ioctls::VmFd) {
//!     let mut buf = [0u64; 1];
//!     let _ = ramlist::kvm::get_dirty_log_into(vm, 0, 1, &mut buf);
//! }
//! ```

mod adopt;
mod dirty_log;
mod peek;
#[cfg(test)]
mod tests;

pub use dirty_log::{
    clear_dirty_log, dirty_span, enable_mode, log_words, offered_flags, DirtyLogMode,
};

use crate::dirty::{DirtyClient, DirtyMemory};
use crate::guest::GuestRam;
use crate::{RamBlock, RamBlockOptions, RamBlockRef, RamError, RamList, RamListWriter};
use dirty_log::SlotLog;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, VmFd};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::errno;

/// The page KVM's dirty log counts in: one bit per 4 KiB guest page on x86, whatever the
/// host page size (see the module docs).
pub const KVM_LOG_PAGE_SIZE: u64 = 4096;

// The sync merges bit `i` of a slot's log into page `i` of the block in the bitmaps.
const _: () = assert!(KVM_LOG_PAGE_SIZE == crate::dirty::PAGE_SIZE);

/// Why placing, removing or syncing guest RAM failed. Every variant names the block and
/// the value KVM or the RAM list refused.
#[derive(Debug, thiserror::Error)]
pub enum KvmRamError {
    /// The RAM list refused the block (bad id or size, duplicate id, mmap failure...).
    #[error(transparent)]
    Ram(#[from] RamError),
    /// No block with this id is placed in guest-physical space by us.
    #[error("no RAM block {0:?} is placed in guest-physical space")]
    UnknownId(String),
    /// Every memory slot KVM offers is in use.
    #[error("RAM block {id:?}: all {max} KVM memory slots are in use")]
    NoFreeSlot {
        /// The block's id.
        id: String,
        /// How many slots this KVM offers.
        max: u32,
    },
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("RAM block {id:?}: KVM refused slot {slot} at {guest_addr:#x} (+{size:#x}, flags {flags:#x}): {source}")]
    SetRegion {
        /// The block's id.
        id: String,
        /// The slot number.
        slot: u32,
        /// Guest-physical address.
        guest_addr: u64,
        /// Size in bytes (0 when deleting).
        size: u64,
        /// KVM_MEM_* flags.
        flags: u32,
        /// KVM's errno.
        source: errno::Error,
    },
    /// KVM_GET_DIRTY_LOG or KVM_CLEAR_DIRTY_LOG failed.
    #[error("RAM block {id:?}: {op} on slot {slot} failed: {source}")]
    DirtyLog {
        /// The block's id.
        id: String,
        /// The slot number.
        slot: u32,
        /// "KVM_GET_DIRTY_LOG" or "KVM_CLEAR_DIRTY_LOG".
        op: &'static str,
        /// KVM's errno.
        source: errno::Error,
    },
    /// KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) failed or is not offered.
    #[error("KVM refused dirty-log mode {mode:?} (it offers flags {offered:#x}): {source}")]
    DirtyLogMode {
        /// The mode asked for.
        mode: DirtyLogMode,
        /// The flags KVM offers.
        offered: u32,
        /// KVM's errno.
        source: errno::Error,
    },
    /// Dirty logging asked for a client KVM's log does not feed.
    #[error(
        "dirty client {client:?} is not fed by KVM's dirty log (only {:?} are)",
        DirtyClient::KVM
    )]
    NotKvmClient {
        /// The client asked for.
        client: DirtyClient,
    },
}

/// A set of [`DirtyClient`]s, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Clients(u8);

impl Clients {
    fn bit(c: DirtyClient) -> u8 {
        match c {
            DirtyClient::Migration => 1,
            DirtyClient::Vga => 2,
            DirtyClient::Code => 4,
        }
    }

    fn contains(self, c: DirtyClient) -> bool {
        self.0 & Clients::bit(c) != 0
    }

    fn with(self, c: DirtyClient, on: bool) -> Clients {
        if on {
            Clients(self.0 | Clients::bit(c))
        } else {
            Clients(self.0 & !Clients::bit(c))
        }
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The clients of the set, in bitmap order, and how many there are.
    fn list(self) -> ([DirtyClient; 3], usize) {
        let mut out = [DirtyClient::Migration; 3];
        let mut n = 0;
        for c in DirtyClient::ALL.into_iter().filter(|&c| self.contains(c)) {
            out[n] = c;
            n += 1;
        }
        (out, n)
    }
}

/// What KVM is told about one slot (KVM_SET_USER_MEMORY_REGION's arguments but the size
/// and flags, which vary between calls).
#[derive(Clone, Copy)]
struct Region<'a> {
    slot: u32,
    id: &'a str,
    guest_addr: u64,
    host: u64,
}

/// One placed block: where the guest sees it and what KVM was told.
struct Slot {
    slot: u32,
    id: String,
    guest_addr: u64,
    size: u64,
    ram_addr: u64,
    /// Keeps the block, and so its mapping, alive while KVM maps it.
    block: RamBlockRef,
    /// The clients that want this slot's dirty log; logging is on iff not empty.
    clients: Clients,
    /// The KVM log buffer while logging, kept between syncs.
    log: Option<SlotLog>,
}

impl Slot {
    fn logging(&self) -> bool {
        !self.clients.is_empty()
    }

    fn region(&self) -> Region<'_> {
        Region {
            slot: self.slot,
            id: &self.id,
            guest_addr: self.guest_addr,
            host: self.block.host() as u64,
        }
    }
}

fn flags_for(clients: Clients) -> u32 {
    if clients.is_empty() {
        0
    } else {
        KVM_MEM_LOG_DIRTY_PAGES
    }
}

/// What a block placed in guest-physical space looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedBlock {
    /// The block's id.
    pub id: String,
    /// The KVM slot number.
    pub slot: u32,
    /// Guest-physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset in the ram_addr space (the dirty bitmaps' index).
    pub ram_addr: u64,
    /// Whether KVM logs its dirty pages (some client wants them).
    pub logging: bool,
    /// The clients its dirty log feeds, in bitmap order.
    pub log_clients: Vec<DirtyClient>,
}

/// Figures from one [`KvmRam::sync_dirty_log`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Slots whose log was read.
    pub slots: usize,
    /// Pages KVM reported dirty (now set in the bitmaps of the slots' logging clients).
    pub dirty_pages: u64,
}

/// A VM's guest RAM: blocks of a [`RamList`] placed in guest-physical space as KVM memory
/// slots, with their dirty logs synced into the list's [`DirtyMemory`].
///
/// Remove placed blocks with [`KvmRam::remove`]. A block freed with `RamList::free`
/// directly is safe all the same (its slot keeps it mapped) and loses its slot at the
/// next call into this `KvmRam`; see the module docs for the rules.
pub struct KvmRam {
    ram: Arc<RamList>,
    vm: Arc<VmFd>,
    mode: DirtyLogMode,
    max_slots: u32,
    /// The slot table: one record per KVM slot we created. Rules (module docs): taken
    /// after the RAM list's writer lock, never before it; each record holds a counted reference to its
    /// block, dropped only after KVM deleted the slot; records of blocks freed behind our
    /// back are retired on every entry ([`KvmRam::table`]).
    slots: Mutex<Vec<Slot>>,
    /// The clients that asked for every slot's dirty log
    /// ([`KvmRam::set_dirty_logging_all`]): a slot added meanwhile logs for them from its
    /// creation. Read and written only under the slot-table lock.
    logging_all: AtomicU8,
}

impl KvmRam {
    /// Takes charge of `vm`'s memory slots with the best dirty-log protocol it offers
    /// ([`DirtyLogMode::detect`]). Call before any slot exists.
    pub fn new(ram: Arc<RamList>, vm: Arc<VmFd>) -> Result<KvmRam, KvmRamError> {
        let mode = DirtyLogMode::detect(&vm);
        KvmRam::with_mode(ram, vm, mode)
    }

    /// As [`KvmRam::new`] with a chosen dirty-log protocol (benchmarks compare them).
    pub fn with_mode(
        ram: Arc<RamList>,
        vm: Arc<VmFd>,
        mode: DirtyLogMode,
    ) -> Result<KvmRam, KvmRamError> {
        // Slot sizes and addresses are host pages; the log counts in KVM pages.
        assert!(
            crate::page_size().is_multiple_of(KVM_LOG_PAGE_SIZE),
            "host page size {:#x} is not a multiple of KVM's dirty-log page {KVM_LOG_PAGE_SIZE:#x}",
            crate::page_size()
        );
        let offered = offered_flags(&vm);
        if offered & mode.cap_flags() != mode.cap_flags() {
            return Err(KvmRamError::DirtyLogMode {
                mode,
                offered,
                source: errno::Error::new(libc::EOPNOTSUPP),
            });
        }
        enable_mode(&vm, mode).map_err(|source| KvmRamError::DirtyLogMode {
            mode,
            offered,
            source,
        })?;
        let max_slots = u32::try_from(vm.check_extension_int(Cap::NrMemslots))
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(32);
        Ok(KvmRam {
            ram,
            vm,
            mode,
            max_slots,
            slots: Mutex::new(Vec::new()),
            logging_all: AtomicU8::new(0),
        })
    }

    /// The dirty-log protocol in use.
    pub fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    /// The RAM list the blocks live on.
    pub fn ram(&self) -> &Arc<RamList> {
        &self.ram
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The dirty bitmaps syncs write into (the RAM list's).
    pub fn dirty(&self) -> &DirtyMemory {
        self.ram.dirty()
    }

    /// A snapshot of the guest-physical view, for loaders and device emulation (see
    /// [`GuestRam`]).
    pub fn guest_memory(&self) -> GuestRam {
        GuestRam::snapshot(&self.ram)
    }

    /// The slot table, after retiring the slots of blocks freed behind our back.
    fn table(&self) -> MutexGuard<'_, Vec<Slot>> {
        // A panic while holding the table cannot leave a half-updated slot: every change
        // is one push, one remove or one field store after its ioctl succeeded.
        let mut table = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        self.retire_freed(&mut table);
        table
    }

    /// Deletes the slots whose block is no longer on the list (freed with `RamList::free`
    /// directly) and drops their references, so the blocks can be reclaimed. A slot KVM
    /// refuses to delete stays, and keeps its block mapped.
    fn retire_freed(&self, table: &mut Vec<Slot>) {
        let mut i = 0;
        while i < table.len() {
            if !table[i].block.is_removed() {
                i += 1;
                continue;
            }
            let s = &table[i];
            match self.set_region(s.region(), 0, 0) {
                Ok(()) => {
                    log::debug!("kvm: deleted slot {} of freed RAM block {:?}", s.slot, s.id);
                    // The reference goes only now, after KVM let go of the memory.
                    table.remove(i);
                }
                Err(e) => {
                    log::error!("deleting the slot of freed RAM block {:?}: {e}", s.id);
                    i += 1;
                }
            }
        }
    }

    /// Allocates a block of `size` bytes and places it at `guest_addr` as a new KVM slot
    /// (dirty logging off). KVM accepts the slot before the block is linked: on any error
    /// nothing stays allocated or placed, and the list's version is unchanged.
    pub fn add(
        &self,
        id: &str,
        size: u64,
        guest_addr: u64,
        options: RamBlockOptions,
    ) -> Result<PlacedBlock, KvmRamError> {
        self.place(id, size, guest_addr, options, None)
    }

    /// [`add`](Self::add) for a block over `fd` from `offset` (a memfd, a file on tmpfs or
    /// hugetlbfs): mapped shared, so another process that maps the same file sees the same
    /// memory. The block keeps its own duplicate of `fd`.
    pub fn add_from_fd(
        &self,
        id: &str,
        size: u64,
        guest_addr: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        options: RamBlockOptions,
    ) -> Result<PlacedBlock, KvmRamError> {
        self.place(id, size, guest_addr, options, Some((fd, offset, false)))
    }

    /// [`add_from_fd`](Self::add_from_fd), mapped private (copy on write): the file is
    /// only read, the guest's writes stay in this process (a snapshot restored by
    /// mapping); see [`RamListWriter::alloc_private_from_fd_before_link`](crate::RamListWriter::alloc_private_from_fd_before_link).
    pub fn add_from_fd_private(
        &self,
        id: &str,
        size: u64,
        guest_addr: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        options: RamBlockOptions,
    ) -> Result<PlacedBlock, KvmRamError> {
        self.place(id, size, guest_addr, options, Some((fd, offset, true)))
    }

    fn place(
        &self,
        id: &str,
        size: u64,
        guest_addr: u64,
        options: RamBlockOptions,
        fd: Option<(BorrowedFd<'_>, u64, bool)>,
    ) -> Result<PlacedBlock, KvmRamError> {
        // Writer lock first (the module's lock order): a thread that holds it may still
        // query the slot table while we wait here.
        let mut writer = self.ram.lock();
        let mut table = self.table();
        let slot = (0..self.max_slots)
            .find(|n| table.iter().all(|s| s.slot != *n))
            .ok_or_else(|| KvmRamError::NoFreeSlot {
                id: id.to_string(),
                max: self.max_slots,
            })?;
        let options = RamBlockOptions {
            guest_addr: Some(guest_addr),
            ..options
        };
        // A client logging every slot (a migration under way) logs this one from the
        // start, or the guest's writes to it would never reach that client's bitmap.
        let clients = Clients(self.logging_all.load(Ordering::Relaxed));
        // The RAM list refuses a bad or overlapping guest-physical range itself
        // (RamError::BadGuestAddr / GuestOverlap), before anything is mapped; KVM sees
        // the built block before it is linked.
        let before_link = |block: &RamBlock| {
            let region = Region {
                slot,
                id,
                guest_addr,
                host: block.host() as u64,
            };
            // The mapping KVM gets: the block is not linked yet, so only this writer
            // holds it; if KVM accepts, it is linked and counted below before the
            // writer lock is released, so nobody can free it in between.
            self.set_region(region, size, flags_for(clients))
        };
        let ram_addr = match fd {
            None => writer.alloc_with_before_link(id, size, options, before_link)?,
            Some((fd, offset, false)) => {
                writer.alloc_from_fd_before_link(id, size, fd, offset, options, before_link)?
            }
            Some((fd, offset, true)) => writer.alloc_private_from_fd_before_link(
                id,
                size,
                fd,
                offset,
                options,
                before_link,
            )?,
        };
        let block = match counted(&writer, id) {
            Some(b) => b,
            None => {
                // Impossible: we hold the writer lock since the link. Undo all the same.
                let region = Region {
                    slot,
                    id,
                    guest_addr,
                    host: 0,
                };
                if let Err(e) = self.set_region(region, 0, 0) {
                    log::error!("deleting slot {slot} of RAM block {id:?}: {e}");
                }
                return Err(RamError::UnknownId(id.to_string()).into());
            }
        };
        drop(writer);
        let mut placed = Slot {
            slot,
            id: id.to_string(),
            guest_addr,
            size,
            ram_addr,
            block,
            clients,
            log: (!clients.is_empty()).then(|| SlotLog::new(slot, size)),
        };
        if placed.logging() {
            // The list marked every page of the new block dirty for every client. One
            // sync now takes KVM's initial log (all set with KVM_DIRTY_LOG_INITIALLY_SET)
            // and arms write protection, so that later syncs report only real writes.
            if let Err(e) = self.sync_slot(&mut placed) {
                log::warn!("first dirty-log sync of RAM block {id:?}: {e}");
            }
        }
        let info = describe(&placed);
        table.push(placed);
        Ok(info)
    }

    /// Deletes the block's slot, then frees the block (its memory is unmapped after a grace
    /// period and once the slot's reference is gone). Both happen under the slot-table
    /// lock and the list's writer lock: a concurrent `add` sees either the old block and
    /// its slot or neither. The slot number becomes free for the next [`KvmRam::add`].
    pub fn remove(&self, id: &str) -> Result<(), KvmRamError> {
        let mut writer = self.ram.lock();
        let mut table = self.table();
        let i = table
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| KvmRamError::UnknownId(id.to_string()))?;
        self.set_region(table[i].region(), 0, 0)?;
        #[cfg(test)]
        tests::hooks::reached(tests::hooks::Point::SlotDeleted);
        let slot = table.remove(i);
        // A block freed behind our back (and possibly replaced by a new block of the same
        // id) is not ours to free again; under the writer lock this cannot change.
        let freed = if slot.block.is_removed() {
            Ok(())
        } else {
            writer.free(id)
        };
        drop(writer);
        drop(table);
        // Our reference goes last: the block is reclaimed when its readers are done.
        drop(slot);
        freed?;
        Ok(())
    }

    /// Turns `client`'s wish for the block's dirty log on or off. The slot logs while any
    /// client wants it, so one client ending (a migration) never stops another's log (the
    /// display's). A client's bitmap is fed from the first sync after it starts logging:
    /// what changed before is its own business, as in QEMU (a migration's setup treats
    /// every page as dirty, a display redraws in full). With
    /// [`DirtyLogMode::ManualInitiallySet`], the first sync after the slot's logging goes
    /// from off to on reports every page.
    pub fn set_dirty_logging(
        &self,
        id: &str,
        client: DirtyClient,
        on: bool,
    ) -> Result<(), KvmRamError> {
        check_client(client)?;
        let mut table = self.table();
        let slot = table
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or_else(|| KvmRamError::UnknownId(id.to_string()))?;
        self.set_logging(slot, client, on)
    }

    /// [`KvmRam::set_dirty_logging`] for every placed block (a migration's start and end),
    /// and for every block [`KvmRam::add`] places until it is turned off again.
    pub fn set_dirty_logging_all(&self, client: DirtyClient, on: bool) -> Result<(), KvmRamError> {
        check_client(client)?;
        let mut table = self.table();
        let all = Clients(self.logging_all.load(Ordering::Relaxed)).with(client, on);
        self.logging_all.store(all.0, Ordering::Relaxed);
        for slot in table.iter_mut() {
            self.set_logging(slot, client, on)?;
        }
        Ok(())
    }

    fn set_logging(
        &self,
        slot: &mut Slot,
        client: DirtyClient,
        on: bool,
    ) -> Result<(), KvmRamError> {
        if slot.clients.contains(client) == on {
            return Ok(());
        }
        let clients = slot.clients.with(client, on);
        if clients.is_empty() != slot.clients.is_empty() {
            self.set_region(slot.region(), slot.size, flags_for(clients))?;
            slot.log = (!clients.is_empty()).then(|| SlotLog::new(slot.slot, slot.size));
        }
        slot.clients = clients;
        Ok(())
    }

    /// Reads KVM's dirty log of every logging slot, re-arms it for the pages it reported,
    /// then sets those pages in the bitmaps of the slot's logging clients. Call it before
    /// reading pages to send: a page written after its bit was taken is reported by the
    /// next sync.
    pub fn sync_dirty_log(&self) -> Result<SyncStats, KvmRamError> {
        let mut table = self.table();
        let mut stats = SyncStats::default();
        for slot in table.iter_mut().filter(|s| s.logging()) {
            stats.slots += 1;
            stats.dirty_pages += self.sync_slot(slot)?;
        }
        Ok(stats)
    }

    fn sync_slot(&self, slot: &mut Slot) -> Result<u64, KvmRamError> {
        let (id, number, ram_addr) = (&slot.id, slot.slot, slot.ram_addr);
        let (clients, n) = slot.clients.list();
        let Some(log) = slot.log.as_mut() else {
            return Ok(0);
        };
        let err = |op, source| KvmRamError::DirtyLog {
            id: id.clone(),
            slot: number,
            op,
            source,
        };
        log.get(&self.vm).map_err(|e| err("KVM_GET_DIRTY_LOG", e))?;
        let Some(span) = dirty_span(log.bits()) else {
            return Ok(0);
        };
        // Re-arm before any consumer can take these bits (see the module docs).
        if self.mode.is_manual() {
            log.clear(&self.vm, span)
                .map_err(|e| err("KVM_CLEAR_DIRTY_LOG", e))?;
        }
        let dirty = self
            .ram
            .dirty()
            .merge_bitmap(&clients[..n], ram_addr, log.bits(), log.pages());
        #[cfg(test)]
        tests::hooks::reached(tests::hooks::Point::BitsMerged);
        Ok(dirty)
    }

    /// The blocks placed, in slot order.
    pub fn placed(&self) -> Vec<PlacedBlock> {
        let mut v: Vec<PlacedBlock> = self.table().iter().map(describe).collect();
        v.sort_by_key(|p| p.slot);
        v
    }

    /// One placed block by id.
    pub fn find(&self, id: &str) -> Option<PlacedBlock> {
        self.table().iter().find(|s| s.id == id).map(describe)
    }

    fn set_region(&self, r: Region<'_>, size: u64, flags: u32) -> Result<(), KvmRamError> {
        let region = kvm_userspace_memory_region {
            slot: r.slot,
            flags,
            guest_phys_addr: r.guest_addr,
            memory_size: size,
            userspace_addr: r.host,
        };
        // SAFETY: either `size` is 0 (deleting: KVM lets go of the memory and touches
        // none), or `host` is the start of a block's mapping of `size` bytes that stays
        // mapped while the slot exists: the slot's record holds a counted reference to
        // the block from its creation (see `add`) until after KVM deleted the slot
        // (`remove`, `retire_freed`, `Drop`; a failed deletion keeps the reference).
        // Overlaps with our other slots are refused by the RAM list's guest-range check
        // and by KVM itself.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| KvmRamError::SetRegion {
            id: r.id.to_string(),
            slot: r.slot,
            guest_addr: r.guest_addr,
            size,
            flags,
            source,
        })
    }
}

/// A counted reference to the block `id`, as the writer sees the list.
fn counted(writer: &RamListWriter<'_>, id: &str) -> Option<RamBlockRef> {
    let guard = rcu::read_lock();
    writer.list().block_ref(&guard, id)
}

fn check_client(client: DirtyClient) -> Result<(), KvmRamError> {
    if DirtyClient::KVM.contains(&client) {
        Ok(())
    } else {
        Err(KvmRamError::NotKvmClient { client })
    }
}

fn describe(s: &Slot) -> PlacedBlock {
    let (clients, n) = s.clients.list();
    PlacedBlock {
        id: s.id.clone(),
        slot: s.slot,
        guest_addr: s.guest_addr,
        size: s.size,
        ram_addr: s.ram_addr,
        logging: s.logging(),
        log_clients: clients[..n].to_vec(),
    }
}

impl Drop for KvmRam {
    /// Deletes every slot we created, so the VM (which may outlive us) never reaches
    /// memory the RAM list may later unmap. The blocks stay on the list; a slot KVM
    /// refuses to delete keeps its block mapped for good (its reference is leaked).
    fn drop(&mut self) {
        let table = std::mem::take(&mut *self.slots.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in table {
            if let Err(e) = self.set_region(slot.region(), 0, 0) {
                log::error!(
                    "deleting KVM slot {} of block {:?}: {e}",
                    slot.slot,
                    slot.id
                );
                std::mem::forget(slot.block);
            }
        }
    }
}
