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
//!  ...         hot-added RAM blocks: first fit, 2 MiB aligned, above the boot RAM
//! ```

use ramlist::kvm::PlacedBlock;

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

/// Hot-added RAM blocks start on this boundary in guest-physical space.
pub const HOTPLUG_ALIGN: u64 = 2 << 20;

/// Ids of the boot RAM blocks, one per range of [`ram_ranges`]: below the MMIO hole, and
/// above 4 GiB. Reserved: `ram-add` refuses them.
pub const RAM_BLOCK_IDS: [&str; 2] = ["ram-below-4g", "ram-above-4g"];

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

/// Where hot-added blocks go in a VM whose boot RAM is `boot`: above it and above 4 GiB,
/// [`HOTPLUG_ALIGN`]ed (`ram-add` places first fit from there with [`free_guest_range`]).
pub fn hotplug_base(boot: &[PlacedBlock]) -> u64 {
    let base = boot_blocks_end(boot).max(RAM_ABOVE_4G);
    align_up(base, HOTPLUG_ALIGN).unwrap_or(base)
}

/// Checks that a block of `size` bytes may be hot-added at `addr` given the VM's
/// [`hotplug_base`]: where `ram-add` could have put it (at or above the base, aligned).
/// Overlaps with placed blocks are the RAM list's to refuse.
pub fn check_hotplug_addr(base: u64, addr: u64, size: u64) -> Result<(), String> {
    if addr < base || !addr.is_multiple_of(HOTPLUG_ALIGN) || addr.checked_add(size).is_none() {
        return Err(format!(
            "guest range {addr:#x}+{size:#x} is not a hotplug range (from {base:#x}, \
             {HOTPLUG_ALIGN:#x}-aligned)"
        ));
    }
    Ok(())
}

/// One past the highest guest-physical address of the boot RAM.
pub fn boot_blocks_end(placed: &[PlacedBlock]) -> u64 {
    placed
        .iter()
        .map(|p| p.guest_addr.saturating_add(p.size))
        .max()
        .unwrap_or(0)
}

/// `x` rounded up to `align` (a power of two); `None` past 2^64.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// The lowest [`HOTPLUG_ALIGN`]ed guest-physical address at or above `base` where `size`
/// bytes overlap no placed block (first fit); `None` past 2^64.
pub fn free_guest_range(placed: &[PlacedBlock], base: u64, size: u64) -> Option<u64> {
    let mut ranges: Vec<(u64, u64)> = placed
        .iter()
        .map(|p| (p.guest_addr, p.guest_addr.saturating_add(p.size)))
        .collect();
    ranges.sort_unstable();
    let mut at = align_up(base, HOTPLUG_ALIGN)?;
    for (start, end) in ranges {
        if end <= at {
            continue;
        }
        if at.checked_add(size)? <= start {
            break;
        }
        at = align_up(end, HOTPLUG_ALIGN)?;
    }
    at.checked_add(size)?;
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(ranges: &[(u64, u64)]) -> Vec<PlacedBlock> {
        ranges
            .iter()
            .enumerate()
            .map(|(i, &(guest_addr, size))| PlacedBlock {
                id: format!("b{i}"),
                slot: i as u32,
                guest_addr,
                size,
                ram_addr: 0,
                logging: false,
                log_clients: vec![],
            })
            .collect()
    }

    #[test]
    fn hot_added_ram_goes_to_the_first_free_aligned_range() {
        const G: u64 = 1 << 30;
        const M: u64 = 1 << 20;
        let boot = placed(&[(0, 128 * M)]);
        assert_eq!(boot_blocks_end(&boot), 128 * M);
        assert_eq!(free_guest_range(&boot, 4 * G, G), Some(4 * G));
        let some = placed(&[(0, 128 * M), (4 * G, 16 * M), (4 * G + 64 * M, 16 * M)]);
        // Fits in the hole between the two blocks above 4 GiB.
        assert_eq!(free_guest_range(&some, 4 * G, 32 * M), Some(4 * G + 16 * M));
        // Does not fit: after the last one.
        assert_eq!(free_guest_range(&some, 4 * G, 64 * M), Some(4 * G + 80 * M));
        // Unaligned ends are rounded up.
        let odd = placed(&[(4 * G, 4096)]);
        assert_eq!(free_guest_range(&odd, 4 * G, 4096), Some(4 * G + 2 * M));
        assert_eq!(free_guest_range(&[], u64::MAX - M, 4096), None);
        assert_eq!(free_guest_range(&[], 4 * G, u64::MAX), None);
    }

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
