//! Loading an ELF kernel and the PVH boot structures it starts from.
//!
//! The kernel's segments go to their physical addresses (linux-loader); its
//! XEN_ELFNOTE_PHYS32_ENTRY note gives the 32-bit entry point. The vCPU starts there in
//! protected mode with %ebx pointing at an `hvm_start_info` that carries the command line,
//! the memory map and the initrd as its one module (see [`crate::layout`] for the
//! addresses). The memory map and the command-line writer are shared with the bzImage path.

use crate::error::VmmError;
use crate::kernel::{elf_load_end, too_small, Initrd};
use crate::layout::{
    BOOT_GDT, CMDLINE_MAX, CMDLINE_START, HIGH_RAM_START, LOW_RAM_END, PVH_MEMMAP, PVH_MEMMAP_MAX,
    PVH_MODLIST, PVH_START_INFO,
};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use ramlist::guest::GuestRam;
use std::io::Cursor;
use vm_memory::{Bytes, GuestAddress};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Memory-map type of usable RAM.
const E820_RAM: u32 = 1;

/// The boot GDT: null, flat 32-bit code (selector 0x08), flat data (0x10).
pub const GDT: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
/// Code selector of [`GDT`].
pub const CODE_SELECTOR: u16 = 0x08;
/// Data selector of [`GDT`].
pub const DATA_SELECTOR: u16 = 0x10;

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvhEntry {
    /// The 32-bit entry point.
    pub entry: u64,
    /// The physical address of `hvm_start_info` (%ebx at entry).
    pub start_info: u64,
    /// First byte after the kernel's highest segment.
    pub kernel_end: u64,
}

/// Loads the ELF kernel `image` (named `name` in errors) and writes the PVH boot
/// structures for `cmdline`, `initrd` and the RAM `ranges` (guest address, size).
pub fn load_pvh(
    mem: &GuestRam,
    image: &[u8],
    name: &str,
    cmdline: &str,
    initrd: Option<&Initrd>,
    ranges: &[(u64, u64)],
) -> Result<PvhEntry, VmmError> {
    let low_end = ranges.first().map_or(0, |&(a, s)| a + s);
    if let Some(end) = elf_load_end(image) {
        if end > low_end {
            return Err(too_small(name, end, low_end));
        }
    }
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_RAM_START)),
    )
    .map_err(|source| VmmError::KernelLoad {
        kernel: name.to_string(),
        source,
    })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => return Err(VmmError::NoPvhEntry(name.to_string())),
    };
    let ram_end = ranges.iter().map(|&(a, s)| a + s).max().unwrap_or(0);
    if entry < HIGH_RAM_START || entry >= ram_end {
        return Err(VmmError::KernelLayout {
            kernel: name.to_string(),
            what: format!("PVH entry {entry:#x} is outside guest RAM above 1 MiB"),
        });
    }

    write_words(mem, BOOT_GDT, &GDT)?;
    write_cmdline(mem, cmdline)?;
    let memmap = memory_map(ranges);
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut module = None;
    if let Some(initrd) = initrd {
        let addr = initrd.place(ranges, loaded.kernel_end, u64::MAX)?;
        mem.write_slice(&initrd.data, GuestAddress(addr))
            .map_err(|source| VmmError::GuestMemory { addr, source })?;
        module = Some(hvm_modlist_entry {
            paddr: addr,
            size: initrd.data.len() as u64,
            ..Default::default()
        });
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
    if let Some(module) = module {
        params.set_modules(&[module], GuestAddress(PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams::<GuestRam>(&params, mem)
        .map_err(VmmError::BootParams)?;
    Ok(PvhEntry {
        entry,
        start_info: PVH_START_INFO,
        kernel_end: loaded.kernel_end,
    })
}

/// Writes `words` little-endian at `addr`.
pub(crate) fn write_words(mem: &GuestRam, addr: u64, words: &[u64]) -> Result<(), VmmError> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|source| VmmError::GuestMemory { addr, source })
}

/// Writes `cmdline`, NUL terminated, at [`CMDLINE_START`].
pub(crate) fn write_cmdline(mem: &GuestRam, cmdline: &str) -> Result<(), VmmError> {
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
    use crate::layout::ram_ranges;

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
