//! Giving a linked block another file's memory in place: [`RamListWriter::adopt_fd`] maps
//! a caller's file shared over the block's own host range (`MAP_FIXED`) and records it as
//! the block's backing. The block itself stays: same object on the list, same id, host
//! address, length, ram_addr span and guest address.
//!
//! Why: a KVM slot (and anything else that holds the block's host address) keeps working
//! unchanged — the kernel drops the old pages from every page table, KVM's through its
//! MMU notifier, and the next touch finds the file's. A local migration's destination
//! takes the source's memfd as its boot RAM this way instead of deleting and recreating a
//! multi-GiB KVM slot (milliseconds on these hosts).
//!
//! Rules, on top of the list's (see `list.rs`):
//! - The swap of the mapping is one `mmap` call: a thread touching the range meanwhile
//!   sees the old memory or the new, never a hole. Nothing changes in the list's layout,
//!   so readers, the MRU cache, the address table and counted references are untouched:
//!   whoever holds the block reads the new memory through it.
//! - The adoption is recorded once (a second is refused) and only then do `backing`,
//!   `fd` and `is_shared` say so; the adopted descriptor lives as long as the block and is
//!   closed after the range is unmapped, as the block's own is. The range is unmapped by
//!   the block's reclamation as before (munmap does not care what is mapped there).
//! - Every page is marked dirty for every client: the contents changed under them.
//! - A block that was a memfd of its own gives that memfd's pages back (a hole punched
//!   over its range; the descriptor stays open for whoever borrowed it); a preallocated
//!   block has the adopted mapping faulted in.

use crate::block::check_file_size;
use crate::{Backing, RamError, RamListWriter};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

impl RamListWriter<'_> {
    /// Maps `len` bytes of `fd` from `offset` shared over the memory of block `id` (whose
    /// length must be `len`) and records the file as the block's backing
    /// ([`Backing::Fd`], shared, its own duplicate of `fd`). Returns the block's ram_addr.
    ///
    /// Refused, with the block and its memory as they were: an unknown id, another
    /// length, a block over the caller's memory ([`Backing::HostPtr`]: not ours to
    /// replace), a block that adopted a file already, a file shorter than
    /// `offset + len`, an offset or length that is not a whole number of the file's
    /// pages (hugetlbfs). A preallocated block whose adopted pages the kernel cannot
    /// provide is [`RamError::Prealloc`], the file adopted all the same. If the kernel refuses the new mapping, the
    /// block keeps a mapping of its own kind there (its old one is put back when the
    /// kernel removed it first; the old contents of anonymous memory are then lost).
    pub fn adopt_fd(
        &mut self,
        id: &str,
        len: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<u64, RamError> {
        let list = self.list();
        let guard = rcu::read_lock();
        let block = list
            .block_by_id(&guard, id)
            .ok_or_else(|| RamError::UnknownId(id.to_string()))?;
        let refuse = |why: String| RamError::NotReplaceable {
            id: id.to_string(),
            why,
        };
        if block.len() != len {
            return Err(refuse(format!(
                "it has {:#x} bytes, the new memory {len:#x}",
                block.len()
            )));
        }
        if block.backing() == Backing::HostPtr {
            return Err(refuse(
                "it is the caller's memory, not a mapping of its own".into(),
            ));
        }
        if block.is_adopted() {
            return Err(refuse("it took another file's memory already".into()));
        }
        if !offset.is_multiple_of(crate::page_size()) || i64::try_from(offset).is_err() {
            return Err(RamError::BadHostMemory {
                id: id.to_string(),
                what: "file offset",
                value: offset,
            });
        }
        check_file_size(id, len, fd.as_raw_fd(), offset)?;
        // A hugetlbfs file is mapped in whole huge pages: a length that is not a multiple
        // of its page would have MAP_FIXED cover what lies past the block.
        let file_page = file_page_size(fd);
        if !len.is_multiple_of(file_page) || !offset.is_multiple_of(file_page) {
            return Err(refuse(format!(
                "the file's pages are {file_page:#x} bytes: {len:#x} bytes from                  {offset:#x} is not a whole number of them"
            )));
        }
        let own = fd.try_clone_to_owned().map_err(|source| RamError::DupFd {
            id: id.to_string(),
            fd: fd.as_raw_fd(),
            source,
        })?;
        let size = usize::try_from(len).map_err(|_| refuse("too large for this host".into()))?;
        let host = block.host();
        // SAFETY: `host..host + len` is the block's own mapping (not the caller's memory:
        // checked above), made by this crate and unmapped only when the block is
        // reclaimed, which cannot happen while it is linked and we hold the writer lock
        // (and the read guard). MAP_FIXED replaces it in one step: no thread ever finds
        // the range unmapped, and the new mapping has the same length and protection, so
        // every pointer into the range (readers' raw pointers, KVM's slot) stays valid;
        // what they read is the file's memory from now on, which is the purpose. The file
        // holds `offset + len` bytes (checked above), so no touch of the range faults
        // past its end, and the range is a whole number of the file's pages (checked
        // above), so the kernel maps exactly it. Slices over guest RAM are made only
        // for the moment of a load or a snapshot write, on the thread doing it; the one
        // caller that adopts (a local migration's destination) does it on its loader's
        // thread before any page is loaded, with no snapshot possible meanwhile, so no
        // Rust reference to these bytes is alive while their memory is swapped.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                own.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            keep_mapped(block);
            return Err(RamError::Mmap {
                id: id.to_string(),
                size: len,
                source,
            });
        }
        let old_file = match (block.backing(), block.fd()) {
            (Backing::Fd { offset, .. }, Some(f)) => {
                f.try_clone_to_owned().ok().map(|f| (f, offset))
            }
            _ => None,
        };
        let adopted = block.set_adopted(own, offset);
        // Only the writer adopts, and it checked `is_adopted` under the same lock.
        debug_assert!(adopted, "block {id:?} adopted twice under the writer lock");
        list.dirty().mark_dirty(block.offset(), len);
        if let Some((f, at)) = old_file {
            release_old_memfd(id, f.as_fd(), at, len);
        }
        if block.is_prealloc() {
            prealloc(id, host, len)?;
        }
        log::debug!(
            "ramlist: {id:?} now maps fd {} from {offset:#x} in place",
            fd.as_raw_fd()
        );
        Ok(block.offset())
    }
}

/// The page size of the file behind `fd` (`st_blksize`: a hugetlbfs file's huge page,
/// 4 KiB for tmpfs); the host's page size if it cannot be told.
fn file_page_size(fd: BorrowedFd<'_>) -> u64 {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`; the fd is borrowed, open for the call.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    let page = crate::page_size();
    match u64::try_from(st.st_blksize) {
        Ok(b) if r == 0 && b >= page && b.is_power_of_two() => b,
        _ => page,
    }
}

/// The block no longer maps its own file: if that file is a memfd (nobody else can name
/// it), its pages over the block's range are given back (`FALLOC_FL_PUNCH_HOLE`), so a
/// preallocated or written memfd does not hold a second copy of guest RAM for the VM's
/// life. The descriptor stays open (a reader may hold it borrowed) and the file keeps its
/// length. A file on a filesystem (`--memory-backend file:`) is the user's and is left
/// as it is.
fn release_old_memfd(id: &str, fd: BorrowedFd<'_>, offset: u64, len: u64) {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    if !link.is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:")) {
        return;
    }
    let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: fallocate on a borrowed, open descriptor; punching a hole changes the file's
    // contents only, which nothing maps or reads any more (the block maps the adopted
    // file now).
    let r = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at,
            n,
        )
    };
    if r != 0 {
        log::warn!(
            "ramlist: {id:?}: giving back the memory of the memfd it no longer maps: {}",
            io::Error::last_os_error()
        );
    }
}

/// A preallocated block stays so: the adopted mapping is faulted in
/// (`MADV_POPULATE_WRITE`, which leaves the file's contents as they are), and a page the
/// kernel cannot provide is an error now rather than a SIGBUS in the guest later. Never
/// by touching each page (the fallback a fresh block uses on old kernels): another
/// process writes this file meanwhile, and a touch could undo its write. On a kernel
/// without `MADV_POPULATE_WRITE` the pages come on first touch, said in the log.
fn prealloc(id: &str, host: *mut u8, len: u64) -> Result<(), RamError> {
    let size = usize::try_from(len).unwrap_or(usize::MAX);
    // SAFETY: `host..host + len` is the block's mapping of the adopted file, kept mapped
    // by the writer lock held by the caller; populating faults pages in and changes no
    // byte.
    let r = unsafe { libc::madvise(host.cast(), size, libc::MADV_POPULATE_WRITE) };
    if r == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EINVAL) {
        log::warn!("ramlist: {id:?}: cannot preallocate the adopted file here ({source})");
        return Ok(());
    }
    Err(RamError::Prealloc {
        id: id.to_string(),
        size: len,
        source,
    })
}

/// After a refused MAP_FIXED: the kernel may have removed the old mapping before failing
/// (kernels before 6.12 could). The range must never be a hole while the block, and a KVM
/// slot, point at it: so the block's own kind of memory is mapped there again (its file,
/// or fresh anonymous memory). If even that fails the process cannot go on safely, and
/// aborts.
fn keep_mapped(block: &crate::RamBlock) {
    let (host, len) = (block.host(), block.len() as usize);
    // SAFETY: msync only checks that the range is mapped (MS_ASYNC writes nothing back
    // since Linux 2.6.19); ENOMEM means part of it is not.
    let mapped = unsafe { libc::msync(host.cast(), len, libc::MS_ASYNC) } == 0;
    if mapped {
        return;
    }
    let share = if block.is_shared() {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE | libc::MAP_NORESERVE
    };
    let (flags, fd, off) = match (block.backing(), block.fd()) {
        (Backing::Fd { offset, .. }, Some(fd)) => (share, fd.as_raw_fd(), offset),
        _ => (share | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0),
    };
    // SAFETY: the range is the block's own and is (at least partly) unmapped now, by the
    // kernel's failed MAP_FIXED. Mapping it again covers only the block's own extent. One
    // race remains that userspace cannot close: on those kernels another thread's mmap
    // could have been placed in the hole in between, and MAP_FIXED takes it back. The
    // window is as narrow as the failed call, and leaving a hole under a KVM slot and
    // the list's readers would be worse.
    let p = unsafe {
        libc::mmap(
            host.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED,
            fd,
            off as libc::off_t,
        )
    };
    if p != host.cast() {
        log::error!(
            "ramlist: block {:?} lost its memory and it could not be mapped again: {}",
            block.id(),
            io::Error::last_os_error()
        );
        std::process::abort();
    }
    log::warn!(
        "ramlist: block {:?}: the kernel removed its memory on a failed remap; mapped again",
        block.id()
    );
}
