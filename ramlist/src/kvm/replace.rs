//! [`KvmRam::replace_with_fd`]: a placed block's memory replaced by a caller's file at the
//! same host address, its KVM slot left as it is (see `crate::replace` for the RAM list's
//! side). Deleting and recreating a slot of several GiB costs milliseconds on these hosts
//! (KVM frees and allocates its per-page arrays); keeping the slot costs one MMU-notifier
//! invalidation of its range, which the `MAP_FIXED` triggers.

use super::{counted, describe, KvmRam, KvmRamError, PlacedBlock};
use crate::RamError;
use std::os::fd::BorrowedFd;

#[cfg(test)]
mod tests;

impl KvmRam {
    /// Replaces the memory of placed block `id` (of `size` bytes) with `size` bytes of
    /// `fd` from `offset`, mapped shared at the block's own host address: the block keeps
    /// its slot, guest address and ram_addr, and becomes [`Backing::Fd`](crate::Backing::Fd)
    /// (shared, its own duplicate of `fd`), so a later migration or snapshot sees the new
    /// file. The slot's record takes a counted reference to the new block before it drops
    /// the old one's (slot table rule: a slot always holds its memory's block).
    ///
    /// Refused with nothing changed: an id with no slot, another size, a block over the
    /// caller's memory, a file too short.
    pub fn replace_with_fd(
        &self,
        id: &str,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<PlacedBlock, KvmRamError> {
        // Lock order: the RAM list's writer lock, then the slot table.
        let mut writer = self.ram.lock();
        let mut table = self.table();
        let slot = table
            .iter_mut()
            .find(|s| s.id == id && !s.block.is_removed())
            .ok_or_else(|| KvmRamError::UnknownId(id.to_string()))?;
        if slot.size != size {
            return Err(RamError::NotReplaceable {
                id: id.to_string(),
                why: format!(
                    "its slot has {:#x} bytes, the new memory {size:#x}",
                    slot.size
                ),
            }
            .into());
        }
        writer.replace_with_fd(id, size, fd, offset)?;
        let new = counted(&writer, id)
            .filter(|b| b.host() == slot.block.host() && b.offset() == slot.ram_addr)
            .ok_or_else(|| RamError::UnknownId(id.to_string()))?;
        // The old block's reference goes now: it is moved (unmaps nothing when
        // reclaimed), and the new block maps the very range KVM was told about.
        slot.block = new;
        Ok(describe(slot))
    }
}
