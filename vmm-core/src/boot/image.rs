//! The kernel and initrd files as bytes: telling an ELF vmlinux from a bzImage by their
//! magic, where an ELF's segments end, where an initrd goes, and the error for a kernel
//! that does not fit. Every check here runs before a byte is written to guest memory.

use crate::error::VmmError;
use std::path::{Path, PathBuf};

/// What a kernel file holds, by its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF executable (a vmlinux, the tiny guest).
    Elf,
    /// A bzImage (the `HdrS` setup header at 0x202).
    BzImage,
}

/// The format of `image`, or `None` when it is neither.
pub fn format(image: &[u8]) -> Option<KernelFormat> {
    if image.starts_with(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else if image.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

/// The initrd to pass to the kernel, read from its file.
pub struct Initrd {
    /// The file, for messages.
    pub path: PathBuf,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl Initrd {
    /// Reads `path`; an empty file is refused (a kernel would ignore it silently).
    pub fn read(path: &Path) -> Result<Initrd, VmmError> {
        let data = std::fs::read(path).map_err(|source| VmmError::InitrdRead {
            path: path.to_path_buf(),
            source,
        })?;
        if data.is_empty() {
            return Err(VmmError::InitrdRead {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
            });
        }
        Ok(Initrd {
            path: path.to_path_buf(),
            data,
        })
    }

    /// Where the initrd goes: page aligned, as high as it fits below `limit` (exclusive)
    /// and the end of the RAM range that starts at 0 (`ranges[0]`), and not below
    /// `kernel_end`.
    pub fn place(
        &self,
        ranges: &[(u64, u64)],
        kernel_end: u64,
        limit: u64,
    ) -> Result<u64, VmmError> {
        let size = self.data.len() as u64;
        let top = ranges.first().map_or(0, |&(a, s)| a + s).min(limit);
        let too_big = || VmmError::InitrdTooBig {
            path: self.path.clone(),
            size,
            room: top.saturating_sub(kernel_end),
        };
        let addr = top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
        if addr < kernel_end {
            return Err(too_big());
        }
        Ok(addr)
    }
}

/// The end of the highest PT_LOAD segment of the ELF `image` (physical addresses), or
/// `None` when its program headers cannot be read (linux-loader then says why).
pub fn elf_load_end(image: &[u8]) -> Option<u64> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(image.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(image.get(at..at + 8)?.try_into().ok()?));
    const PT_LOAD: u32 = 1;
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut end = None;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != PT_LOAD {
            continue;
        }
        let seg_end = u64_at(ph + 0x18)?.checked_add(u64_at(ph + 0x28)?)?;
        end = Some(end.map_or(seg_end, |e: u64| e.max(seg_end)));
    }
    end
}

/// The zero-filled tails of the ELF `image`'s PT_LOAD segments (`.bss`): `(physical
/// address, length)` of each part of a segment past its file bytes. A loader must zero
/// them (linux-loader copies only the file bytes): guest RAM is zero at the first boot,
/// but not when the kernel is loaded again by a reset.
pub fn elf_zero_fill(image: &[u8]) -> Vec<(u64, u64)> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(image.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(image.get(at..at + 8)?.try_into().ok()?));
    const PT_LOAD: u32 = 1;
    let headers = || -> Option<Vec<(u64, u64)>> {
        let phoff = usize::try_from(u64_at(0x20)?).ok()?;
        let phentsize = usize::from(u16_at(0x36)?);
        let phnum = usize::from(u16_at(0x38)?);
        let mut tails = Vec::new();
        for i in 0..phnum {
            let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
            if u32_at(ph)? != PT_LOAD {
                continue;
            }
            let (paddr, filesz, memsz) =
                (u64_at(ph + 0x18)?, u64_at(ph + 0x20)?, u64_at(ph + 0x28)?);
            if memsz > filesz {
                tails.push((paddr.checked_add(filesz)?, memsz - filesz));
            }
        }
        Some(tails)
    };
    headers().unwrap_or_default()
}

/// The error for a kernel that needs RAM up to `needs_end` when the RAM range starting at
/// 0 ends at `ram_end`.
pub fn too_small(name: &str, needs_end: u64, ram_end: u64) -> VmmError {
    VmmError::MemoryTooSmall {
        kernel: name.to_string(),
        needs_mib: needs_end.div_ceil(1 << 20),
        has_mib: ram_end >> 20,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::tiny::TINY_KERNEL;

    #[test]
    fn formats() {
        assert_eq!(format(TINY_KERNEL), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(format(b"\x7fEL"), None);
        assert_eq!(format(&[0x5a; 4096]), None);
        assert_eq!(format(&[]), None);
    }

    #[test]
    fn the_tiny_guest_has_a_zero_filled_tail_inside_its_load_end() {
        let end = elf_load_end(TINY_KERNEL).unwrap();
        let tails = elf_zero_fill(TINY_KERNEL);
        assert!(!tails.is_empty(), "no .bss in the tiny guest");
        for (at, len) in tails {
            assert!(at + len <= end, "{at:#x}+{len:#x} past {end:#x}");
        }
        assert!(elf_zero_fill(&TINY_KERNEL[..0x30]).is_empty());
    }

    #[test]
    fn elf_end_of_the_tiny_guest() {
        let end = elf_load_end(TINY_KERNEL).expect("program headers");
        assert!(end > 0x10_0000 && end < 4 << 20, "{end:#x}");
        assert_eq!(elf_load_end(&TINY_KERNEL[..0x30]), None);
        assert_eq!(elf_load_end(&[]), None);
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let initrd = Initrd {
            path: "initrd".into(),
            data: vec![0; 5000],
        };
        let ranges = [(0, 64 << 20)];
        let at = initrd.place(&ranges, 2 << 20, u64::MAX).unwrap();
        assert_eq!(at, (64 << 20) - 0x2000);
        let at = initrd.place(&ranges, 2 << 20, 32 << 20).unwrap();
        assert_eq!(at, (32 << 20) - 0x2000);
        assert!(initrd
            .place(&ranges, (64 << 20) - 0x1000, u64::MAX)
            .is_err());
        assert!(initrd.place(&[(0, 0x1000)], 0, u64::MAX).is_err());
    }
}
