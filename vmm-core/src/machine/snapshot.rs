//! A snapshot's RAM mapped into a machine built for it (`vmm run --restore DIR`): each
//! block of the layout becomes its range of `DIR/memory` mapped MAP_PRIVATE (copy on
//! write: pages are read on the guest's first touch, its writes stay in this process), at
//! the guest address it had. A block the configuration built (the boot RAM) must match
//! the snapshot's in length and address, and its own fresh memory is dropped for the
//! mapping; a hot-added one is placed where it was. With `prefault`, every page is read
//! in before the guest runs (`MADV_POPULATE_READ`).

use super::Machine;
use crate::boot::layout::check_hotplug_addr;
use migration::snapshot::OpenSnapshot;
use ramlist::RamBlockOptions;
use std::os::fd::AsFd;

/// What mapping a snapshot did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Mapped {
    /// Blocks mapped.
    pub blocks: usize,
    /// Bytes read in ahead of the guest (`prefault`), else 0.
    pub prefaulted: u64,
}

impl Machine {
    /// Maps `snap`'s blocks as this machine's RAM (see the module documentation). The
    /// vCPUs must not have run. On error the machine must not run either.
    pub fn map_snapshot(&self, snap: &OpenSnapshot, prefault: bool) -> Result<Mapped, String> {
        let ram = self.ram();
        let mut out = Mapped::default();
        for b in &snap.state.blocks {
            let id = b.id.as_str();
            let addr = match ram.find(id) {
                Some(here) => {
                    if here.size != b.len || b.guest_addr.is_some_and(|a| a != here.guest_addr) {
                        return Err(format!(
                            "block {id:?}: {:#x} bytes at guest {:#x} in the snapshot, {:#x} at {:#x} here",
                            b.len,
                            b.guest_addr.unwrap_or_default(),
                            here.size,
                            here.guest_addr
                        ));
                    }
                    ram.remove(id).map_err(|e| format!("block {id:?}: {e}"))?;
                    here.guest_addr
                }
                None if !b.hotplugged => {
                    return Err(format!(
                        "boot RAM block {id:?} of the snapshot is not in this VM's layout"
                    ))
                }
                None => {
                    let addr = b
                        .guest_addr
                        .ok_or_else(|| format!("hot-added block {id:?} has no guest address"))?;
                    check_hotplug_addr(self.hotplug_base(), addr, b.len)
                        .map_err(|e| format!("block {id:?}: {e}"))?;
                    addr
                }
            };
            let opts = RamBlockOptions::default();
            ram.add_from_fd_private(id, b.len, addr, snap.memory.as_fd(), b.file_offset, opts)
                .map_err(|e| format!("mapping block {id:?}: {e}"))?;
            out.blocks += 1;
            if prefault {
                out.prefaulted += populate_read(ram.ram(), id)?;
            }
        }
        let guard = rcu::read_lock();
        if let Some(extra) = ram
            .ram()
            .blocks(&guard)
            .find(|blk| !snap.state.blocks.iter().any(|b| b.id == blk.id()))
        {
            return Err(format!(
                "block {:?} of this VM is not in the snapshot",
                extra.id()
            ));
        }
        Ok(out)
    }
}

/// Reads every page of block `id` in (page cache and page tables), without writing.
fn populate_read(ram: &ramlist::RamList, id: &str) -> Result<u64, String> {
    let guard = rcu::read_lock();
    let b = ram
        .block_by_id(&guard, id)
        .ok_or_else(|| format!("block {id:?} went away"))?;
    // SAFETY: the range is the block's own mapping, which the guard keeps mapped;
    // MADV_POPULATE_READ only faults pages in for reading and changes no byte.
    let r = unsafe { libc::madvise(b.host().cast(), b.len() as usize, libc::MADV_POPULATE_READ) };
    if r != 0 {
        return Err(format!(
            "reading block {id:?} in: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(b.len())
}
