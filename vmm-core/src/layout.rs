//! Where things sit in guest-physical memory at boot (x86 PC conventions, as Firecracker
//! and Cloud Hypervisor lay out a PVH boot).
//!
//! ```text
//! 0x0000_0500  GDT the vCPU starts with (null, 32-bit code, 32-bit data)
//! 0x0000_6000  hvm_start_info (PVH), its module list at 0x6800 (the initrd)
//! 0x0000_7000  PVH memory map (e820 entries), or the bzImage's zero page (boot_params)
//! 0x0000_9000  bzImage only: identity page tables (PML4, PDPT, four 2 MiB-page PDs)
//! 0x0002_0000  kernel command line
//! 0x000a_0000  legacy VGA/BIOS hole (backed, but not RAM in the map)
//! 0x0010_0000  kernel (ELF segments at their physical addresses, or the bzImage's
//!              protected-mode code at its code32_start)
//!  ...         initrd: page aligned, as high as it fits below the hole (or the
//!              kernel's initrd_addr_max)
//! 0xc000_0000  32-bit MMIO hole up to 4 GiB (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000)
//! 0x1_0000_0000 the rest of RAM
//! ```

/// The boot GDT.
pub const BOOT_GDT: u64 = 0x500;
/// `hvm_start_info`.
pub const PVH_START_INFO: u64 = 0x6000;
/// The PVH module list (`hvm_start_info.modlist_paddr`): the initrd.
pub const PVH_MODLIST: u64 = 0x6800;
/// The Linux boot protocol's zero page (`struct boot_params`, %rsi at the 64-bit entry).
pub const ZERO_PAGE: u64 = 0x7000;
/// The bzImage entry's page tables: PML4, then the PDPT, then four page directories.
pub const BOOT_PML4: u64 = 0x9000;
/// The memory map `hvm_start_info.memmap_paddr` points at.
pub const PVH_MEMMAP: u64 = 0x7000;
/// Most memory-map entries that fit before the command line.
pub const PVH_MEMMAP_MAX: usize = ((CMDLINE_START - PVH_MEMMAP) / 24) as usize;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line accepted, its NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// End of the low RAM that the memory map reports (below the legacy hole).
pub const LOW_RAM_END: u64 = 0xa_0000;
/// Where kernels start (and the memory map's second RAM range).
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM beyond this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Where RAM resumes after the hole.
pub const RAM_ABOVE_4G: u64 = 1 << 32;

/// The guest-physical RAM ranges for `memory` bytes of RAM: below the hole, and the rest
/// above 4 GiB.
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    let low = memory.min(MMIO_HOLE_START);
    let mut v = vec![(0, low)];
    if memory > low {
        v.push((RAM_ABOVE_4G, memory - low));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_HOLE_START),
                (RAM_ABOVE_4G, (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }
}
