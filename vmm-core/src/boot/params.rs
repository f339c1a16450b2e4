//! What both boot protocols write into guest memory before the kernel runs: the kernel
//! command line, the e820-style memory map built from the RAM ranges, and raw words (the
//! boot GDT, page tables). The PVH path ([`super::pvh`]) and the Linux boot protocol
//! ([`super::bzimage`]) share them.

use super::layout::{CMDLINE_MAX, CMDLINE_START, HIGH_RAM_START, LOW_RAM_END, PVH_MEMMAP_MAX};
use crate::error::VmmError;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::start_info::hvm_memmap_table_entry;
use linux_loader::loader::load_cmdline;
use ramlist::guest::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// Memory-map type of usable RAM.
const E820_RAM: u32 = 1;

/// Writes `words` little-endian at `addr`.
pub fn write_words(mem: &GuestRam, addr: u64, words: &[u64]) -> Result<(), VmmError> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|source| VmmError::GuestMemory { addr, source })
}

/// Writes `cmdline`, NUL terminated, at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestRam, cmdline: &str) -> Result<(), VmmError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(VmmError::Cmdline(format!(
            "{} bytes, at most {} fit",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let mut c = Cmdline::new(CMDLINE_MAX).map_err(|e| VmmError::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        c.insert_str(cmdline)
            .map_err(|e| VmmError::Cmdline(format!("{cmdline:?}: {e}")))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c).map_err(|e| VmmError::Cmdline(e.to_string()))
}

/// The e820-style map the guest sees: low RAM below the legacy hole, then RAM from 1 MiB,
/// then whatever lies above the MMIO hole.
pub fn memory_map(ranges: &[(u64, u64)]) -> Vec<hvm_memmap_table_entry> {
    let ram = |addr, size| hvm_memmap_table_entry {
        addr,
        size,
        type_: E820_RAM,
        reserved: 0,
    };
    let mut map = Vec::new();
    for &(addr, size) in ranges {
        let end = addr + size;
        if addr < HIGH_RAM_START {
            map.push(ram(addr, end.min(LOW_RAM_END) - addr));
            if end > HIGH_RAM_START {
                map.push(ram(HIGH_RAM_START, end - HIGH_RAM_START));
            }
        } else {
            map.push(ram(addr, size));
        }
    }
    map.truncate(PVH_MEMMAP_MAX);
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::ram_ranges;

    #[test]
    fn memory_map_skips_the_legacy_hole() {
        let map = memory_map(&ram_ranges(128 << 20));
        let v: Vec<(u64, u64)> = map.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(v, vec![(0, 0xa0000), (0x100000, (128 << 20) - 0x100000)]);
        let map = memory_map(&ram_ranges(4 << 30));
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, 1 << 32);
        assert_eq!(map[2].size, 1 << 30);
    }
}
