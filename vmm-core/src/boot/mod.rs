//! Booting a guest: reading `--kernel` and `--initrd`, telling an ELF vmlinux from a
//! bzImage, checking that both fit the guest's RAM, and loading them through the PVH
//! entry ([`pvh`]) or the Linux boot protocol ([`bzimage`]); where the boot vCPU starts
//! ([`entry`]); the guest-physical layout everything is placed by ([`layout`]); and the
//! built-in tiny guest ([`tiny`]).
//!
//! Files, from the bottom: [`layout`] (addresses, RAM ranges, hot-plug placement),
//! [`image`] (the files as bytes), [`params`] (command line and memory map, shared by
//! both protocols), [`pvh`] and [`bzimage`], [`entry`] (the boot vCPU's registers), and
//! [`load_kernel`] here. Every check runs before a byte is written to guest memory, so a
//! kernel that is missing, truncated, not a kernel or too big for `--memory` is one clear
//! error.

pub mod bzimage;
pub mod entry;
pub mod image;
pub mod layout;
pub mod params;
pub mod pvh;
pub mod tiny;

use crate::config::{KernelSource, VmmConfig};
use crate::error::VmmError;
use bzimage::load_bzimage;
pub use entry::BootEntry;
use image::{format, Initrd, KernelFormat};
use pvh::load_pvh;
use ramlist::guest::GuestRam;
use tiny::TINY_KERNEL;

/// Reads the kernel (and initrd) `config` names and loads them into `mem`, whose RAM
/// lies at `ranges`. Returns where the boot vCPU starts and the kernel's name.
pub fn load_kernel(
    mem: &GuestRam,
    config: &VmmConfig,
    ranges: &[(u64, u64)],
) -> Result<(BootEntry, String), VmmError> {
    let (image, name): (Vec<u8>, String) = match &config.kernel {
        KernelSource::Tiny => (TINY_KERNEL.to_vec(), "built-in tiny guest".into()),
        KernelSource::Path(path) => (
            std::fs::read(path).map_err(|source| VmmError::KernelRead {
                path: path.clone(),
                source,
            })?,
            path.display().to_string(),
        ),
    };
    let initrd = config.initrd.as_deref().map(Initrd::read).transpose()?;
    let entry = match format(&image) {
        Some(KernelFormat::Elf) => BootEntry::Pvh(load_pvh(
            mem,
            &image,
            &name,
            &config.cmdline,
            initrd.as_ref(),
            ranges,
        )?),
        Some(KernelFormat::BzImage) => BootEntry::Linux64(load_bzimage(
            mem,
            &image,
            &name,
            &config.cmdline,
            initrd.as_ref(),
            ranges,
        )?),
        None => return Err(VmmError::NotAKernel(name)),
    };
    Ok((entry, name))
}
