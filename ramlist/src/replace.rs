//! Replacing a linked block's memory in place: [`RamListWriter::replace_with_fd`] maps a
//! caller's file shared over the block's own host range (`MAP_FIXED`) and links, in the
//! old block's place, a block that describes the new memory at the same host address,
//! ram_addr span and guest address.
//!
//! Why: a KVM slot (and anything else that holds the block's host address) keeps working
//! unchanged — the kernel drops the old pages from every page table, KVM's through its
//! MMU notifier, and the next touch finds the file's. A local migration's destination
//! uses it to take the source's memfd as its boot RAM without deleting and recreating a
//! multi-GiB KVM slot.
//!
//! Rules, on top of the list's (see `list.rs`):
//! - The swap of the mapping is one `mmap` call: a thread touching the range meanwhile
//!   sees the old memory or the new, never a hole. A reader that still holds the old
//!   block (under a guard or a [`RamBlockRef`](crate::RamBlockRef)) reads the new memory
//!   through it: both blocks name the same range.
//! - The old block is marked removed and *moved*: when it is reclaimed it unmaps nothing,
//!   clears no dirty bit and gives no span back — the mapping and the span are the new
//!   block's. Its own descriptor of the old file is closed then.
//! - The new block is marked dirty for every client before it is linked, as every new
//!   block is: its contents are not what the old block's bits described.
//! - The old block is swapped for the new one in one step
//!   ([`CursorMut::replace_current`](rcu::CursorMut::replace_current)): a walker
//!   sees one of them, never both or neither; the version is bumped after.

use crate::block::{check_file_size, Backing, HostMemory, RamBlock, RamBlockOptions};
use crate::table::AddrTable;
use crate::{RamError, RamListWriter};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::Release;
use std::sync::Arc;

impl RamListWriter<'_> {
    /// Maps `len` bytes of `fd` from `offset` shared over the memory of block `id` (whose
    /// length must be `len`), and links in its place a block over that memory: same id,
    /// host address, ram_addr and guest address; [`Backing::Fd`], shared, with its own
    /// duplicate of `fd`. Returns the block's ram_addr.
    ///
    /// Refused, with the list and the memory as they were: an unknown id, another length,
    /// a block over the caller's memory ([`Backing::HostPtr`]: not ours to replace), a
    /// file shorter than `offset + len`, an unaligned offset. If the kernel refuses the
    /// new mapping, the block keeps its memory (its old mapping is put back when the
    /// kernel removed it first; the old contents of anonymous memory are then lost).
    pub fn replace_with_fd(
        &mut self,
        id: &str,
        len: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<u64, RamError> {
        let old = self
            .writer
            .iter()
            .find(|b| b.id() == id)
            .ok_or_else(|| RamError::UnknownId(id.to_string()))?;
        let refuse = |why: String| RamError::NotReplaceable {
            id: id.to_string(),
            why,
        };
        if old.len() != len {
            return Err(refuse(format!(
                "it has {:#x} bytes, the new memory {len:#x}",
                old.len()
            )));
        }
        if old.backing() == Backing::HostPtr {
            return Err(refuse(
                "it is the caller's memory, not a mapping of its own".into(),
            ));
        }
        if !offset.is_multiple_of(crate::page_size()) || i64::try_from(offset).is_err() {
            return Err(RamError::BadHostMemory {
                id: id.to_string(),
                what: "file offset",
                value: offset,
            });
        }
        check_file_size(id, len, fd.as_raw_fd(), offset)?;
        let own = fd.try_clone_to_owned().map_err(|source| RamError::DupFd {
            id: id.to_string(),
            fd: fd.as_raw_fd(),
            source,
        })?;
        let host = NonNull::new(old.host()).ok_or_else(|| refuse("no host memory".into()))?;
        let size = usize::try_from(len).map_err(|_| refuse("too large for this host".into()))?;
        // SAFETY: `host..host + len` is the old block's own mapping (not the caller's
        // memory: checked above), made by this crate and unmapped only by the block's
        // Drop, which cannot run while the block is linked and we hold the writer lock.
        // MAP_FIXED replaces it in one step: no thread ever finds the range unmapped, and
        // the new mapping has the same length and protection, so every pointer into the
        // range (readers' borrows, KVM's slot) stays valid; what they read is the file's
        // memory from now on, which is the purpose. The file holds `offset + len` bytes
        // (checked above) and nothing Rust-side holds a reference into guest RAM (it is
        // only ever reached through raw pointers).
        let p = unsafe {
            libc::mmap(
                host.as_ptr().cast(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                own.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            keep_mapped(old);
            return Err(RamError::Mmap {
                id: id.to_string(),
                size: len,
                source,
            });
        }
        let backing = Backing::Fd {
            fd: own.as_raw_fd(),
            offset,
        };
        let mem = HostMemory::owned(host, len, backing, Some(own));
        let opts = RamBlockOptions {
            shared: true,
            prealloc: false,
            guest_addr: old.guest_addr(),
        };
        let ram_addr = old.offset();
        let list = self.list;
        let block = RamBlock::new(id, ram_addr, mem, &opts, Some(Arc::clone(&list.shared)));
        list.shared.dirty.mark_dirty(ram_addr, len);
        old.mark_removed();
        old.mark_moved();
        let mut c = self.writer.cursor_front();
        while c.current().is_some_and(|b| b.id() != id) {
            c.move_next();
        }
        let replaced = c.replace_current(block);
        debug_assert!(replaced, "block {id:?} vanished under the writer lock");
        list.table.store(AddrTable::build(self.writer.iter()));
        list.version.fetch_add(1, Release);
        log::debug!(
            "ramlist: {id:?} now maps fd {} from {offset:#x} in place",
            fd.as_raw_fd()
        );
        Ok(ram_addr)
    }
}

/// After a refused MAP_FIXED: the kernel may have removed the old mapping before failing
/// (kernels before 6.12 could). The range must never be a hole while the block, and a KVM
/// slot, point at it: so the block's own memory is mapped there again (its file, or fresh
/// anonymous memory). If even that fails the process cannot go on safely, and aborts.
fn keep_mapped(old: &RamBlock) {
    let (host, len) = (old.host(), old.len() as usize);
    // SAFETY: msync only checks that the range is mapped (MS_ASYNC writes nothing back
    // since Linux 2.6.19); ENOMEM means part of it is not.
    let mapped = unsafe { libc::msync(host.cast(), len, libc::MS_ASYNC) } == 0;
    if mapped {
        return;
    }
    let share = if old.is_shared() {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE | libc::MAP_NORESERVE
    };
    let (flags, fd, off) = match (old.backing(), old.fd()) {
        (Backing::Fd { offset, .. }, Some(fd)) => (share, fd.as_raw_fd(), offset),
        _ => (share | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0),
    };
    // SAFETY: the range is the old block's own and is unmapped now (checked above):
    // mapping it again touches no other memory.
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
            old.id(),
            io::Error::last_os_error()
        );
        std::process::abort();
    }
    log::warn!(
        "ramlist: block {:?}: the kernel removed its memory on a failed remap; mapped again",
        old.id()
    );
}
