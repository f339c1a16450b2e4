//! Guest-physical placement of RAM blocks as KVM memory slots, and the dirty-log sync that
//! feeds KVM's per-slot logs into the RAM list's [`DirtyMemory`].
//!
//! [`KvmRam`] is the only writer of a VM's slots. Its slot table lock serializes adding,
//! removing, toggling logging and syncing; readers of the RAM list are not involved.
//! Ordering rules it keeps:
//! - add: allocate and link the block, then create the slot; if KVM refuses, free the
//!   block again, so no caller ever sees a block without its slot.
//! - remove: delete the slot (memory_size 0) *before* the block is unlinked; the block's
//!   memory is unmapped only after a grace period, so KVM never holds a mapping that
//!   goes away under it.

mod dirty_log;

pub use dirty_log::{
    clear_dirty_log, dirty_span, enable_mode, get_dirty_log_into, log_words, offered_flags,
    DirtyLogMode,
};

use crate::dirty::{DirtyClient, DirtyMemory, PAGE_SHIFT};
use crate::guest::GuestRam;
use crate::{RamBlockOptions, RamError, RamList};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, VmFd};
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::errno;

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
}

/// One placed block: where the guest sees it and what KVM was told.
struct Slot {
    slot: u32,
    id: String,
    guest_addr: u64,
    size: u64,
    host: u64,
    ram_addr: u64,
    logging: bool,
    /// The KVM log buffer, kept between syncs (one bit per page).
    log: Vec<u64>,
}

impl Slot {
    fn pages(&self) -> u64 {
        self.size >> PAGE_SHIFT
    }

    fn flags(&self) -> u32 {
        if self.logging {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
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
    /// Whether KVM logs its dirty pages.
    pub logging: bool,
}

/// Figures from one [`KvmRam::sync_dirty_log`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Slots whose log was read.
    pub slots: usize,
    /// Pages KVM reported dirty (now set in the bitmaps of `DirtyClient::KVM`).
    pub dirty_pages: u64,
}

/// A VM's guest RAM: blocks of a [`RamList`] placed in guest-physical space as KVM memory
/// slots, with their dirty logs synced into the list's [`DirtyMemory`].
///
/// Blocks placed through it must be removed through it ([`KvmRam::remove`]), never with
/// `RamList::free` directly, or KVM would keep a slot on memory about to be unmapped.
pub struct KvmRam {
    ram: Arc<RamList>,
    vm: Arc<VmFd>,
    mode: DirtyLogMode,
    max_slots: u32,
    slots: Mutex<Vec<Slot>>,
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

    fn table(&self) -> MutexGuard<'_, Vec<Slot>> {
        // A panic while holding the table cannot leave a half-updated slot: every change
        // is one push, one remove or one field store after its ioctl succeeded.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates a block of `size` bytes on the RAM list and places it at `guest_addr` as a
    /// new KVM slot (dirty logging off). On any error nothing stays allocated or placed.
    pub fn add(
        &self,
        id: &str,
        size: u64,
        guest_addr: u64,
        options: RamBlockOptions,
    ) -> Result<PlacedBlock, KvmRamError> {
        // The RAM list refuses a bad or overlapping guest-physical range itself
        // (RamError::BadGuestAddr / GuestOverlap), before anything is mapped.
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
        let ram_addr = self.ram.alloc_with(id, size, options)?;
        let host = {
            let guard = rcu::read_lock();
            self.ram.block_at(&guard, ram_addr).map(|b| b.host() as u64)
        };
        let Some(host) = host else {
            // Only a concurrent free behind our back could do this; report it as such.
            return Err(KvmRamError::Ram(RamError::UnknownRamAddr(ram_addr)));
        };
        let placed = Slot {
            slot,
            id: id.to_string(),
            guest_addr,
            size,
            host,
            ram_addr,
            logging: false,
            log: Vec::new(),
        };
        if let Err(e) = self.set_region(&placed, placed.size, placed.flags()) {
            if let Err(free) = self.ram.free(id) {
                log::error!("freeing RAM block {id:?} after KVM refused its slot: {free}");
            }
            return Err(e);
        }
        let info = describe(&placed);
        table.push(placed);
        Ok(info)
    }

    /// Deletes the block's slot, then frees the block (its memory is unmapped after a grace
    /// period). The slot number becomes free for the next [`KvmRam::add`].
    pub fn remove(&self, id: &str) -> Result<(), KvmRamError> {
        let mut table = self.table();
        let i = table
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| KvmRamError::UnknownId(id.to_string()))?;
        self.set_region(&table[i], 0, 0)?;
        table.remove(i);
        drop(table);
        self.ram.free(id)?;
        Ok(())
    }

    /// Turns KVM's dirty logging for one block on or off. With
    /// [`DirtyLogMode::ManualInitiallySet`] turning it on reports every page dirty at the
    /// next sync.
    pub fn set_dirty_logging(&self, id: &str, on: bool) -> Result<(), KvmRamError> {
        let mut table = self.table();
        let slot = table
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or_else(|| KvmRamError::UnknownId(id.to_string()))?;
        self.set_logging(slot, on)
    }

    /// Turns dirty logging on or off for every placed block (migration start and end).
    pub fn set_dirty_logging_all(&self, on: bool) -> Result<(), KvmRamError> {
        let mut table = self.table();
        for slot in table.iter_mut() {
            self.set_logging(slot, on)?;
        }
        Ok(())
    }

    fn set_logging(&self, slot: &mut Slot, on: bool) -> Result<(), KvmRamError> {
        if slot.logging == on {
            return Ok(());
        }
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        self.set_region(slot, slot.size, flags)?;
        slot.logging = on;
        slot.log = if on {
            vec![0; log_words(slot.pages())]
        } else {
            Vec::new()
        };
        Ok(())
    }

    /// Reads KVM's dirty log of every logging slot into the bitmaps of
    /// [`DirtyClient::KVM`] and re-arms it for the pages taken. Call it before reading pages to send: a page written
    /// after its log was read is reported by the next sync.
    pub fn sync_dirty_log(&self) -> Result<SyncStats, KvmRamError> {
        let mut table = self.table();
        let mut stats = SyncStats::default();
        for slot in table.iter_mut().filter(|s| s.logging) {
            stats.slots += 1;
            stats.dirty_pages += self.sync_slot(slot)?;
        }
        Ok(stats)
    }

    fn sync_slot(&self, slot: &mut Slot) -> Result<u64, KvmRamError> {
        let pages = slot.pages();
        let err = |op, source| KvmRamError::DirtyLog {
            id: slot.id.clone(),
            slot: slot.slot,
            op,
            source,
        };
        get_dirty_log_into(&self.vm, slot.slot, pages, &mut slot.log)
            .map_err(|e| err("KVM_GET_DIRTY_LOG", e))?;
        let Some(span) = dirty_span(&slot.log) else {
            return Ok(0);
        };
        let n = self
            .ram
            .dirty()
            .merge_bitmap(&DirtyClient::KVM, slot.ram_addr, &slot.log, pages);
        if self.mode.is_manual() {
            let first_page = span.start as u64 * 64;
            let num_pages = (span.end as u64 * 64).min(pages) - first_page;
            // Slots are below 2^32 pages (16 TiB) since sizes come from the RAM list.
            let num_pages = u32::try_from(num_pages).unwrap_or(u32::MAX);
            clear_dirty_log(
                &self.vm,
                slot.slot,
                first_page,
                num_pages,
                &mut slot.log[span],
            )
            .map_err(|e| err("KVM_CLEAR_DIRTY_LOG", e))?;
        }
        Ok(n)
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

    fn set_region(&self, slot: &Slot, size: u64, flags: u32) -> Result<(), KvmRamError> {
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            flags,
            guest_phys_addr: slot.guest_addr,
            memory_size: size,
            userspace_addr: slot.host,
        };
        // SAFETY: `host` is the start of the block's mapping of `size` bytes (or size is 0:
        // deleting). The block stays mapped until after it is freed, and every free of a
        // placed block goes through `remove`, which deletes this slot first; Drop deletes
        // the remaining slots. Overlaps with our other slots were refused in `add`.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| KvmRamError::SetRegion {
            id: slot.id.clone(),
            slot: slot.slot,
            guest_addr: slot.guest_addr,
            size,
            flags,
            source,
        })
    }
}

fn describe(s: &Slot) -> PlacedBlock {
    PlacedBlock {
        id: s.id.clone(),
        slot: s.slot,
        guest_addr: s.guest_addr,
        size: s.size,
        ram_addr: s.ram_addr,
        logging: s.logging,
    }
}

impl Drop for KvmRam {
    /// Deletes every slot we created, so the VM (which may outlive us) never reaches
    /// memory the RAM list may later unmap. The blocks stay on the list.
    fn drop(&mut self) {
        let table = std::mem::take(&mut *self.table());
        for slot in &table {
            if let Err(e) = self.set_region(slot, 0, 0) {
                log::error!(
                    "deleting KVM slot {} of block {:?}: {e}",
                    slot.slot,
                    slot.id
                );
            }
        }
    }
}
