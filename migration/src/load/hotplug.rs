//! [`BlockHotplug`]: how the destination creates and drops the RAM blocks that the source
//! added or removed while it migrated. The VMM provides it (a block may need a KVM slot or
//! a guest address besides its memory); two plain implementations serve tests and VMs
//! without hotplug.

use super::error::HotplugError;
use ramlist::{RamBlockOptions, RamList};

/// The destination's side of a block added or removed on the source during migration.
///
/// The loader calls it outside any read-side section, after checking the id and length it
/// passes (a valid idstr the destination does not have, a whole number of pages no larger
/// than [`LoadOptions::max_new_block`](super::LoadOptions::max_new_block)), and checks
/// afterwards that the block is there with that length before writing to it.
pub trait BlockHotplug {
    /// Creates block `id` of `len` bytes on `ram`. Its memory must read as zeros: the
    /// source sends nothing for pages it never wrote.
    fn add_block(&mut self, ram: &RamList, id: &str, len: u64) -> Result<(), HotplugError>;

    /// Creates block `id` of `len` bytes where the guest saw it on the source:
    /// `guest_addr` (page-aligned, `guest_addr + len` checked not to overflow) when the
    /// source's block had one. A VMM that places blocks in guest-physical memory must put
    /// it exactly there, or fail; the loader checks the block's
    /// [`guest_addr`](ramlist::RamBlock::guest_addr) afterwards when it has one. The
    /// default ignores the address and calls [`add_block`](Self::add_block), for VMMs
    /// whose blocks have no guest address.
    fn add_block_placed(
        &mut self,
        ram: &RamList,
        id: &str,
        len: u64,
        guest_addr: Option<u64>,
    ) -> Result<(), HotplugError> {
        let _ = guest_addr;
        self.add_block(ram, id, len)
    }

    /// Drops block `id` from `ram`.
    fn remove_block(&mut self, ram: &RamList, id: &str) -> Result<(), HotplugError>;

    /// A local migration ([`crate::live::local`]): maps `block`'s file as block
    /// `block.id`, where the guest saw it on the source. A block of that id here (built
    /// from the same configuration) must have the same length and guest address, and is
    /// replaced; otherwise the block is added as [`add_block_placed`](Self::add_block_placed)
    /// would. The file was checked to hold the whole block. The default refuses.
    fn map_shared(
        &mut self,
        ram: &RamList,
        block: &crate::live::local::SharedBlock,
    ) -> Result<(), HotplugError> {
        let _ = (ram, block);
        Err("this destination cannot map memory handed over (local migration)".into())
    }
}

/// Hotplug by plain anonymous blocks: [`RamList::alloc_with`] (at the source's guest
/// address, when the stream gives one) and [`RamList::free`].
#[derive(Debug, Default, Clone, Copy)]
pub struct AnonymousHotplug;

impl BlockHotplug for AnonymousHotplug {
    fn add_block(&mut self, ram: &RamList, id: &str, len: u64) -> Result<(), HotplugError> {
        self.add_block_placed(ram, id, len, None)
    }

    fn add_block_placed(
        &mut self,
        ram: &RamList,
        id: &str,
        len: u64,
        guest_addr: Option<u64>,
    ) -> Result<(), HotplugError> {
        let opts = RamBlockOptions {
            guest_addr,
            ..RamBlockOptions::default()
        };
        ram.alloc_with(id, len, opts)?;
        Ok(())
    }

    fn remove_block(&mut self, ram: &RamList, id: &str) -> Result<(), HotplugError> {
        ram.free(id)?;
        Ok(())
    }

    fn map_shared(
        &mut self,
        ram: &RamList,
        block: &crate::live::local::SharedBlock,
    ) -> Result<(), HotplugError> {
        crate::live::local::map_shared_plain(ram, block)
    }
}

/// Refuses every change: for a destination that cannot change its RAM (QEMU's behaviour).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHotplug;

impl BlockHotplug for NoHotplug {
    fn add_block(&mut self, _: &RamList, _: &str, _: u64) -> Result<(), HotplugError> {
        Err("this destination does not accept RAM hotplug".into())
    }

    fn remove_block(&mut self, _: &RamList, _: &str) -> Result<(), HotplugError> {
        Err("this destination does not accept RAM hotplug".into())
    }
}
