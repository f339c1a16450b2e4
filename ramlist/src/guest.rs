//! The guest-physical view of a [`RamList`] through vm-memory's traits
//! ([`GuestMemoryBackend`], [`GuestMemoryRegion`], hence `GuestMemory` and
//! `Bytes<GuestAddress>`), so loaders such as linux-loader can write kernels and boot data
//! into guest RAM; every write made through it marks its pages dirty for every client.
//!
//! vm-memory wants an immutable collection of regions it can borrow from freely, while our
//! blocks live on an RCU list and are reachable only under a read guard. So [`GuestRam`] is
//! a *snapshot*: it holds a counted reference ([`RamBlockRef`]) to each block that has a
//! guest address, taken under one guard. A counted block stays mapped while the snapshot
//! lives, even if it is freed meanwhile, so every slice the traits hand out points at
//! mapped memory. After a hot-plug the snapshot is stale (see [`GuestRam::is_current`]):
//! writes to a removed block land in memory no guest sees any more; take a new one.

use crate::dirty::DirtyMemory;
use crate::{RamBlockRef, RamList};
use std::fmt;
use std::sync::Arc;
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice, BS};
use vm_memory::guest_memory::Result as GuestResult;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryRegionBytes, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

/// vm-memory's dirty-tracking hook for one block: marks pages of the list's
/// [`DirtyMemory`], from `ram_addr` on (the slice's first byte).
#[derive(Clone)]
pub struct RamDirtyBitmap {
    ram: Arc<RamList>,
    ram_addr: u64,
}

impl RamDirtyBitmap {
    fn dirty(&self) -> &DirtyMemory {
        self.ram.dirty()
    }
}

impl fmt::Debug for RamDirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RamDirtyBitmap({:#x})", self.ram_addr)
    }
}

impl WithBitmapSlice<'_> for RamDirtyBitmap {
    type S = RamDirtyBitmap;
}

impl BitmapSlice for RamDirtyBitmap {}

impl Bitmap for RamDirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.dirty()
            .mark_dirty(self.ram_addr + offset as u64, len as u64);
    }

    /// Dirty for migration (the client that resends pages).
    fn dirty_at(&self, offset: usize) -> bool {
        self.dirty().is_dirty(
            crate::dirty::DirtyClient::Migration,
            self.ram_addr + offset as u64,
        )
    }

    fn slice_at(&self, offset: usize) -> RamDirtyBitmap {
        RamDirtyBitmap {
            ram: self.ram.clone(),
            ram_addr: self.ram_addr + offset as u64,
        }
    }
}

/// One block seen at its guest-physical address.
pub struct GuestRamRegion {
    block: RamBlockRef,
    start: GuestAddress,
    bitmap: RamDirtyBitmap,
}

impl GuestRamRegion {
    /// The block behind this region.
    pub fn block(&self) -> &RamBlockRef {
        &self.block
    }
}

impl fmt::Debug for GuestRamRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GuestRamRegion({:?} at {:#x}, {:#x} bytes)",
            self.block.id(),
            self.start.0,
            self.block.len()
        )
    }
}

impl GuestMemoryRegion for GuestRamRegion {
    type B = RamDirtyBitmap;

    fn len(&self) -> GuestUsize {
        self.block.len()
    }

    fn start_addr(&self) -> GuestAddress {
        self.start
    }

    fn bitmap(&self) -> BS<'_, RamDirtyBitmap> {
        self.bitmap.clone()
    }

    fn get_host_address(&self, addr: MemoryRegionAddress) -> GuestResult<*mut u8> {
        let off = self
            .check_address(addr)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        // The offset is below the block's length, so it stays inside its mapping.
        Ok(self.block.host().wrapping_add(off.raw_value() as usize))
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> GuestResult<VolatileSlice<'_, RamDirtyBitmap>> {
        let start = offset.raw_value();
        let end = start
            .checked_add(count as u64)
            .filter(|&e| e <= self.block.len())
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        let host = self.block.host().wrapping_add(start as usize);
        // SAFETY: `start..end` lies inside the block (checked above), whose mapping lives
        // as long as our counted reference, hence longer than the `&self` borrow the slice
        // carries. Guest memory is shared with the guest and other threads by nature; all
        // access through the slice is volatile, as vm-memory requires.
        Ok(unsafe {
            VolatileSlice::with_bitmap(
                host,
                (end - start) as usize,
                self.bitmap.slice_at(start as usize),
                None,
            )
        })
    }
}

impl GuestMemoryRegionBytes for GuestRamRegion {}

/// A snapshot of the guest-physical memory map of a [`RamList`]: every block with a guest
/// address, sorted by it. Implements vm-memory's `GuestMemoryBackend` (and through it
/// `GuestMemory` and `Bytes<GuestAddress>`).
pub struct GuestRam {
    regions: Vec<GuestRamRegion>,
    version: u64,
    ram: Arc<RamList>,
}

impl GuestRam {
    /// Takes counted references to the placed blocks of `ram` under one read guard, each
    /// paired with the guest address of that very block. A walk that raced with a change
    /// of the list (a block freed and another placed meanwhile, perhaps under the same id
    /// or over the same guest range) is thrown away and taken again: the regions are the
    /// list's placed blocks at one version, never overlapping.
    pub fn snapshot(ram: &Arc<RamList>) -> GuestRam {
        loop {
            let guard = rcu::read_lock();
            // Read the version first: a change after it makes the snapshot report stale.
            let version = ram.version();
            let mut regions = Vec::new();
            let mut consistent = true;
            for b in ram.blocks(&guard) {
                // A block being freed is not part of the list at `version`.
                let Some(start) = b.guest_addr().filter(|_| !b.is_removed()) else {
                    continue;
                };
                // The id may name another block by now: keep the reference only if it is
                // this one, else walk again.
                match ram.block_ref(&guard, b.id()).filter(|r| r.is(b)) {
                    Some(block) => regions.push(GuestRamRegion {
                        bitmap: RamDirtyBitmap {
                            ram: ram.clone(),
                            ram_addr: block.offset(),
                        },
                        block,
                        start: GuestAddress(start),
                    }),
                    None => {
                        consistent = false;
                        break;
                    }
                }
            }
            if !consistent || ram.version() != version {
                continue;
            }
            regions.sort_by_key(|r| r.start);
            return GuestRam {
                regions,
                version,
                ram: ram.clone(),
            };
        }
    }

    /// Whether the RAM list is unchanged since the snapshot was taken.
    pub fn is_current(&self) -> bool {
        self.ram.version() == self.version
    }
}

impl fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.regions).finish()
    }
}

impl GuestMemoryBackend for GuestRam {
    type R = GuestRamRegion;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&GuestRamRegion> {
        let i = self.regions.partition_point(|r| r.start <= addr);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (addr.raw_value() - r.start.raw_value() < r.block.len()).then_some(r)
    }

    fn iter(&self) -> impl Iterator<Item = &GuestRamRegion> {
        self.regions.iter()
    }
}
