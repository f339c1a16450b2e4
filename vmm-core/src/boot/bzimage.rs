//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst) for bzImage kernels,
//! entered at their 64-bit entry point.
//!
//! linux-loader's `BzImage` copies the protected-mode code (everything after the setup
//! sectors) to `code32_start` (1 MiB). We fill the zero page (`struct boot_params`): the
//! image's setup header with the loader's fields (type_of_loader, command line, initrd),
//! and an e820 map built from the same RAM ranges as the PVH map. The vCPU then starts at
//! `startup_64` (load address + 0x200) in long mode: identity page tables for the first
//! 4 GiB, a GDT with the flat `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18), interrupts off,
//! %rsi = the zero page. The kernel's decompressor runs in the guest.

use super::image::{too_small, Initrd};
use super::layout::{BOOT_PML4, CMDLINE_START, HIGH_RAM_START, ZERO_PAGE};
use super::params::{memory_map, write_cmdline, write_words};
use crate::error::VmmError;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use ramlist::guest::GuestRam;
use std::io::Cursor;
use vm_memory::{ByteValued, GuestAddress};

/// Where the setup header starts in the image (and in `boot_params`).
const SETUP_HEADER: usize = 0x1f1;
/// `loadflags`: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x01;
/// `xloadflags`: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 0x01;
/// Offset of `startup_64` from the load address.
const ENTRY_64_OFFSET: u64 = 0x200;
/// `type_of_loader`: a boot loader with no assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// Oldest boot protocol with `xloadflags` (2.12).
const MIN_VERSION: u16 = 0x020c;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;

/// The boot GDT of the 64-bit entry: null, null, 64-bit code (0x10), flat data (0x18).
pub const GDT64: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
/// `__BOOT_CS`.
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`.
pub const BOOT_DS: u16 = 0x18;

/// Where the boot vCPU of a bzImage starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxEntry {
    /// `startup_64`.
    pub entry: u64,
    /// The zero page (%rsi at entry).
    pub boot_params: u64,
    /// The page-table root (CR3).
    pub pml4: u64,
    /// First byte after the memory the kernel needs to decompress and run (`init_size`
    /// from its preferred address).
    pub kernel_end: u64,
}

/// The setup header of the bzImage `image`, if it has one.
pub fn setup_header_of(image: &[u8]) -> Option<setup_header> {
    let bytes = image.get(SETUP_HEADER..SETUP_HEADER + std::mem::size_of::<setup_header>())?;
    setup_header::from_slice(bytes).copied()
}

fn layout_error(kernel: &str, what: impl Into<String>) -> VmmError {
    VmmError::KernelLayout {
        kernel: kernel.to_string(),
        what: what.into(),
    }
}

/// Checks the header of `image` and returns the end of the memory the kernel needs.
fn check_header(hdr: &setup_header, image_len: usize, name: &str) -> Result<u64, VmmError> {
    let version = hdr.version;
    if version < MIN_VERSION {
        return Err(layout_error(
            name,
            format!("boot protocol {version:#x} is too old: 2.12 or later is needed"),
        ));
    }
    let (loadflags, xloadflags) = (hdr.loadflags, hdr.xloadflags);
    if loadflags & LOADED_HIGH == 0 || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(layout_error(name, "the bzImage has no 64-bit entry point"));
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let syssize = u64::from(hdr.syssize) * 16;
    let expected = (setup_sects + 1) * 512 + syssize;
    if (image_len as u64) < expected {
        return Err(layout_error(
            name,
            format!("the bzImage is truncated: {image_len} bytes, its header says {expected}"),
        ));
    }
    // The decompressor runs from the load address and writes the kernel at its preferred
    // address (relocatable kernels never below it): init_size bytes from there.
    let start = hdr.pref_address.max(HIGH_RAM_START);
    Ok(start + u64::from(hdr.init_size))
}

/// Identity page tables for the first 4 GiB in 2 MiB pages at [`BOOT_PML4`].
fn write_page_tables(mem: &GuestRam) -> Result<(), VmmError> {
    let pdpt = BOOT_PML4 + 0x1000;
    let pd = BOOT_PML4 + 0x2000;
    let mut pml4 = vec![0u64; 512];
    pml4[0] = pdpt | 0x3; // present, writable
    write_words(mem, BOOT_PML4, &pml4)?;
    let mut dirs = vec![0u64; 512];
    for (i, e) in dirs.iter_mut().take(4).enumerate() {
        *e = (pd + 0x1000 * i as u64) | 0x3;
    }
    write_words(mem, pdpt, &dirs)?;
    let pages: Vec<u64> = (0..2048u64).map(|i| (i << 21) | 0x83).collect(); // PS
    write_words(mem, pd, &pages)
}

/// Loads the bzImage `image` (named `name` in errors) with `cmdline` and `initrd` into
/// `mem`, whose RAM lies at `ranges`, and writes the zero page, GDT and page tables.
pub fn load_bzimage(
    mem: &GuestRam,
    image: &[u8],
    name: &str,
    cmdline: &str,
    initrd: Option<&Initrd>,
    ranges: &[(u64, u64)],
) -> Result<LinuxEntry, VmmError> {
    let hdr = setup_header_of(image).ok_or_else(|| VmmError::NotAKernel(name.to_string()))?;
    let kernel_end = check_header(&hdr, image.len(), name)?;
    let ram_end = ranges.first().map_or(0, |&(a, s)| a + s);
    if kernel_end > ram_end {
        return Err(too_small(name, kernel_end, ram_end));
    }
    let cmdline_size = hdr.cmdline_size;
    if cmdline.len() >= cmdline_size as usize {
        return Err(VmmError::Cmdline(format!(
            "{} bytes, this kernel takes at most {}",
            cmdline.len(),
            cmdline_size.saturating_sub(1)
        )));
    }

    let loaded = BzImage::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_RAM_START)),
    )
    .map_err(|source| VmmError::KernelLoad {
        kernel: name.to_string(),
        source,
    })?;
    let mut params = boot_params {
        hdr: loaded.setup_header.unwrap_or(hdr),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    write_cmdline(mem, cmdline)?;

    if let Some(initrd) = initrd {
        // initrd_addr_max is the highest address the initrd's last byte may have.
        let limit = u64::from(params.hdr.initrd_addr_max) + 1;
        let addr = initrd.place(ranges, kernel_end, limit)?;
        mem_write(mem, addr, &initrd.data)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = initrd.data.len() as u32;
    }

    let map = memory_map(ranges);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestRam>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(VmmError::BootParams)?;
    write_words(mem, super::layout::BOOT_GDT, &GDT64)?;
    write_page_tables(mem)?;
    Ok(LinuxEntry {
        entry: loaded.kernel_load.0 + ENTRY_64_OFFSET,
        boot_params: ZERO_PAGE,
        pml4: BOOT_PML4,
        kernel_end,
    })
}

fn mem_write(mem: &GuestRam, addr: u64, data: &[u8]) -> Result<(), VmmError> {
    use vm_memory::Bytes;
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| VmmError::GuestMemory { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> setup_header {
        setup_header {
            setup_sects: 1,
            syssize: 0x100,
            header: 0x5372_6448,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            xloadflags: XLF_KERNEL_64,
            pref_address: 0x100_0000,
            init_size: 0x200_0000,
            ..Default::default()
        }
    }

    #[test]
    fn header_checks() {
        let h = header();
        assert_eq!(check_header(&h, 1024 + 0x1000, "k").unwrap(), 0x300_0000);
        assert!(check_header(&h, 1024 + 0xfff, "k")
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let old = setup_header {
            version: 0x0204,
            ..h
        };
        assert!(check_header(&old, 1 << 20, "k").is_err());
        let no64 = setup_header { xloadflags: 0, ..h };
        assert!(check_header(&no64, 1 << 20, "k")
            .unwrap_err()
            .to_string()
            .contains("64-bit"));
    }

    #[test]
    fn header_read_from_the_image() {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let h = setup_header_of(&image).unwrap();
        assert_eq!({ h.version }, 0x020f);
        assert!(setup_header_of(&image[..0x210]).is_none());
    }
}
