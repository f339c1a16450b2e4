//! [`KvmRam::adopt_fd`]: a placed block's memory replaced by a caller's file at the same
//! host address, its KVM slot left as it is (the RAM list's side is in `crate::adopt`).
//! Deleting and recreating a slot of several GiB costs milliseconds on these hosts (KVM
//! frees and zeroes its per-page arrays); keeping it costs one MMU-notifier invalidation
//! of its range, which the `MAP_FIXED` triggers.

use super::{KvmRam, KvmRamError, PlacedBlock};
use crate::RamError;
use std::os::fd::BorrowedFd;

#[cfg(test)]
mod tests;

impl KvmRam {
    /// [`RamListWriter::adopt_fd`](crate::RamListWriter::adopt_fd) for a placed block:
    /// `size` bytes of `fd` from `offset` mapped shared over block `id`'s memory. The
    /// block is the same object, with the same slot, guest address, host address and
    /// ram_addr, so the slot record (and its counted reference) needs no change.
    ///
    /// Refused with nothing changed: an id with no slot, another size, and what
    /// `adopt_fd` refuses.
    pub fn adopt_fd(
        &self,
        id: &str,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<PlacedBlock, KvmRamError> {
        // Lock order: the RAM list's writer lock, then the slot table (in `find`).
        let mut writer = self.ram.lock();
        let placed = self
            .find(id)
            .ok_or_else(|| KvmRamError::UnknownId(id.to_string()))?;
        if placed.size != size {
            return Err(RamError::NotReplaceable {
                id: id.to_string(),
                why: format!(
                    "its slot has {:#x} bytes, the new memory {size:#x}",
                    placed.size
                ),
            }
            .into());
        }
        writer.adopt_fd(id, size, fd, offset)?;
        Ok(placed)
    }
}
