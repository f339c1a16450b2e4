//! The tiny guest kernel, built from `guest/` by `build.rs` and embedded here: the kernel
//! `vmm run` boots when no `--kernel` is given, and what `vmm tiny-kernel PATH` writes out
//! for other VMMs (`qemu-system-x86_64 -kernel PATH`).

use std::io;
use std::path::Path;

/// The tiny guest: a 64-bit ELF with a Xen PVH entry note.
pub static TINY_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tiny.elf"));

/// Writes [`TINY_KERNEL`] to `path`.
pub fn write_tiny_kernel(path: &Path) -> io::Result<()> {
    std::fs::write(path, TINY_KERNEL)
}
