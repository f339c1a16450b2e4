//! Guest RAM's backing, per `--memory-backend`: private anonymous memory (the default), a
//! memfd per block, or a file per block in a directory (tmpfs or hugetlbfs), unlinked as
//! soon as it is made. The shared
//! kinds are memory another process can map; the RAM list maps them shared and keeps its
//! own duplicate of the descriptor, so the one made here is closed once the block exists.
//! Boot blocks and hot-added ones, on a source or a migration destination, all go
//! through [`add_block`].

use crate::config::MemoryBackend;
use ramlist::kvm::{KvmRam, KvmRamError, PlacedBlock};
use ramlist::{RamBlockOptions, RamError};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// A memfd of `size` bytes named after block `id`, sealed against shrinking and growing:
/// a process it is handed to (a local migration's destination) maps it knowing nobody can
/// cut it short under the mapping.
fn memfd(id: &str, size: u64) -> io::Result<OwnedFd> {
    let name = CString::new(format!("minivmm-{id}"))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a block id with a NUL"))?;
    // SAFETY: a valid NUL-terminated name and flags; the call creates a new descriptor.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    File::from(fd.try_clone()?).set_len(size)?;
    // SAFETY: F_ADD_SEALS on a descriptor we own; no memory is passed.
    let sealed = unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if sealed < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A new file for block `id` in `dir`, for its owner only, sized to `size` bytes, and
/// unlinked at once (as QEMU's `mem-path` files are): the descriptor and the mapping keep
/// it, nothing is left behind when the VMM ends, and two VMMs given the same directory
/// (a source and its destination on one host) never share or truncate each other's RAM.
fn file(dir: &std::path::Path, id: &str, size: u64) -> io::Result<OwnedFd> {
    let path = dir.join(format!("minivmm-{}-{id}", std::process::id()));
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    let sized = f.set_len(size);
    std::fs::remove_file(&path)?;
    sized?;
    Ok(f.into())
}

/// Places block `id` of `size` bytes at guest `addr`, backed as `backend` says.
pub fn add_block(
    ram: &KvmRam,
    backend: &MemoryBackend,
    id: &str,
    size: u64,
    addr: u64,
) -> Result<PlacedBlock, KvmRamError> {
    let opts = RamBlockOptions::default();
    let fd = match backend {
        MemoryBackend::Anon => return ram.add(id, size, addr, opts),
        MemoryBackend::Memfd => memfd(id, size),
        MemoryBackend::File(dir) => file(dir, id, size),
    };
    let fd = fd.map_err(|source| {
        KvmRamError::Ram(RamError::Backing {
            id: id.to_string(),
            what: match backend {
                MemoryBackend::File(dir) => format!("creating its file in {}", dir.display()),
                _ => "creating its memfd".to_string(),
            },
            source,
        })
    })?;
    ram.add_from_fd(id, size, addr, fd.as_fd(), 0, opts)
}
