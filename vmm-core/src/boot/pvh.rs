//! Loading an ELF kernel and the PVH boot structures it starts from.
//!
//! The kernel's segments go to their physical addresses (linux-loader); its
//! XEN_ELFNOTE_PHYS32_ENTRY note gives the 32-bit entry point. The vCPU starts there in
//! protected mode with %ebx pointing at an `hvm_start_info` that carries the command line,
//! the memory map and the initrd as its one module (see [`super::layout`] for the
//! addresses). The memory map and the command-line writer ([`super::params`]) are shared with the
//! bzImage path.

use super::image::{elf_load_end, elf_zero_fill, too_small, Initrd};
use super::layout::{
    BOOT_GDT, CMDLINE_START, HIGH_RAM_START, PVH_MEMMAP, PVH_MODLIST, PVH_START_INFO,
};
use super::params::{memory_map, write_cmdline, write_words};
use crate::error::VmmError;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use ramlist::guest::GuestRam;
use std::io::Cursor;
use vm_memory::{Bytes, GuestAddress};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

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
    // The segments' zero-filled tails (.bss): zero already at the first boot, not after a
    // reset loads the kernel again over the RAM the guest used.
    for (addr, len) in elf_zero_fill(image) {
        let zeros = vec![0u8; len as usize];
        mem.write_slice(&zeros, GuestAddress(addr))
            .map_err(|source| VmmError::GuestMemory { addr, source })?;
    }
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
