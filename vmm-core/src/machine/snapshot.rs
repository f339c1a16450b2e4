//! A snapshot's RAM mapped into a machine built for it (`vmm run --restore DIR`): each
//! block of the layout becomes its range of `DIR/memory` mapped MAP_PRIVATE (copy on
//! write: pages are read on the guest's first touch, its writes stay in this process), at
//! the guest address it had. A block the configuration built (the boot RAM) must match
//! the snapshot's in length and address, and its own fresh memory is dropped for the
//! mapping — unless the machine was built from this snapshot
//! ([`MachineParts::build_from`](super::MachineParts::build_from)) and the block already
//! is that very mapping (same file, offset, MAP_PRIVATE): it is kept as it is. A
//! hot-added one is placed where it was. With `prefault`, every page of data is
//! read in before the guest runs (`MADV_POPULATE_READ` over the file's data extents);
//! without, readahead is off (`MADV_RANDOM`): the guest's touches read their pages only.

use super::Machine;
use crate::boot::layout::check_hotplug_addr;
use migration::snapshot::OpenSnapshot;
use ramlist::RamBlockOptions;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;

/// What mapping a snapshot did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Mapped {
    /// Blocks mapped.
    pub blocks: usize,
    /// Bytes read in ahead of the guest (`prefault`), else 0.
    pub prefaulted: u64,
    /// Bytes of diff snapshots copied over the full one's mapping.
    pub diff_bytes: u64,
}

impl Machine {
    /// Maps a snapshot `stack` (the full snapshot first, then its diffs, as
    /// [`migration::snapshot::open_stack`] gives it) as this machine's RAM: the full one's
    /// blocks mapped (see the module documentation), then each diff's pages copied over
    /// them, oldest first. The vCPUs must not have run. On error the machine must not run
    /// either.
    pub fn map_snapshot(&self, stack: &[OpenSnapshot], prefault: bool) -> Result<Mapped, String> {
        let (snap, diffs) = stack
            .split_first()
            .ok_or_else(|| "an empty snapshot stack".to_string())?;
        let mut out = self.map_full(snap, prefault)?;
        for d in diffs {
            out.diff_bytes += self.copy_diff(d)?;
        }
        Ok(out)
    }

    /// Copies the pages `diff` holds (its file's data, found with SEEK_DATA/SEEK_HOLE)
    /// over the blocks it names; its holes are left as they are.
    fn copy_diff(&self, diff: &OpenSnapshot) -> Result<u64, String> {
        let ram = self.ram().ram();
        let mut copied = 0u64;
        for b in &diff.state.blocks {
            let guard = rcu::read_lock();
            let block = ram.block_by_id(&guard, &b.id).ok_or_else(|| {
                format!("block {:?} of {} is not mapped", b.id, diff.dir.display())
            })?;
            let end = b.file_offset + b.len;
            let mut at = b.file_offset;
            while at < end {
                let Some((start, stop)) = data_extent(&diff.memory, at, end)? else {
                    break;
                };
                let len = (stop - start) as usize;
                // SAFETY: `start..stop` lies within the block's range of the file
                // (`b.file_offset..end`), so the slice is inside the block's mapping, which
                // the guard keeps mapped; the vCPUs have not run and nothing else writes it.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        block.host().add((start - b.file_offset) as usize),
                        len,
                    )
                };
                diff.memory
                    .read_exact_at(dst, start)
                    .map_err(|e| format!("reading {}: {e}", diff.dir.display()))?;
                copied += len as u64;
                at = stop;
            }
        }
        Ok(copied)
    }

    fn map_full(&self, snap: &OpenSnapshot, prefault: bool) -> Result<Mapped, String> {
        let ram = self.ram();
        let mut out = Mapped::default();
        for b in &snap.state.blocks {
            let id = b.id.as_str();
            let addr = match ram.find(id) {
                Some(here) => {
                    if here.size != b.len || b.guest_addr.is_some_and(|a| a != here.guest_addr) {
                        return Err(format!(
                            "block {id:?}: {:#x} bytes at guest {:#x} in the snapshot, {:#x} at {:#x} here",
                            b.len,
                            b.guest_addr.unwrap_or_default(),
                            here.size,
                            here.guest_addr
                        ));
                    }
                    if maps_snapshot(ram.ram(), snap, b) {
                        out.blocks += 1;
                        out.prefaulted += prepare(ram.ram(), snap, b, prefault)?;
                        continue;
                    }
                    ram.remove(id).map_err(|e| format!("block {id:?}: {e}"))?;
                    here.guest_addr
                }
                None if !b.hotplugged => {
                    return Err(format!(
                        "boot RAM block {id:?} of the snapshot is not in this VM's layout"
                    ))
                }
                None => {
                    let addr = b
                        .guest_addr
                        .ok_or_else(|| format!("hot-added block {id:?} has no guest address"))?;
                    check_hotplug_addr(self.hotplug_base(), addr, b.len)
                        .map_err(|e| format!("block {id:?}: {e}"))?;
                    addr
                }
            };
            let opts = RamBlockOptions::default();
            ram.add_from_fd_private(id, b.len, addr, snap.memory.as_fd(), b.file_offset, opts)
                .map_err(|e| format!("mapping block {id:?}: {e}"))?;
            out.blocks += 1;
            out.prefaulted += prepare(ram.ram(), snap, b, prefault)?;
        }
        let guard = rcu::read_lock();
        if let Some(extra) = ram
            .ram()
            .blocks(&guard)
            .find(|blk| !snap.state.blocks.iter().any(|b| b.id == blk.id()))
        {
            return Err(format!(
                "block {:?} of this VM is not in the snapshot",
                extra.id()
            ));
        }
        Ok(out)
    }
}

/// Whether block `b` of `ram` already is `snap`'s memory file mapped MAP_PRIVATE from
/// `b`'s offset with `b`'s length (built so by `MachineParts::build_from`): the same file
/// (device and inode), not shared, at that offset.
fn maps_snapshot(
    ram: &ramlist::RamList,
    snap: &OpenSnapshot,
    b: &migration::snapshot::SnapshotBlock,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    let guard = rcu::read_lock();
    let Some(block) = ram.block_by_id(&guard, &b.id) else {
        return false;
    };
    let ramlist::Backing::Fd { offset, .. } = block.backing() else {
        return false;
    };
    if offset != b.file_offset || block.len() != b.len || block.is_shared() {
        return false;
    }
    let same_file = |fd: std::os::fd::BorrowedFd<'_>| -> Option<bool> {
        let mine = std::fs::File::from(fd.try_clone_to_owned().ok()?)
            .metadata()
            .ok()?;
        let theirs = snap.memory.metadata().ok()?;
        Some((mine.dev(), mine.ino()) == (theirs.dev(), theirs.ino()))
    };
    block.fd().and_then(same_file).unwrap_or(false)
}

/// Prepares block `b`'s mapping (guest RAM over `snap`'s memory file): with `prefault`,
/// reads in the stretches of the file that hold data (`MADV_POPULATE_READ`: holes read as
/// zero at fault time without IO, and populating them would only fill memory with zeros);
/// without, turns readahead off for it (`MADV_RANDOM`): each page the guest touches is read
/// alone, so a restore reads what the guest uses, not the megabytes around it. Returns the
/// bytes read in.
fn prepare(
    ram: &ramlist::RamList,
    snap: &OpenSnapshot,
    b: &migration::snapshot::SnapshotBlock,
    prefault: bool,
) -> Result<u64, String> {
    let guard = rcu::read_lock();
    let id = &b.id;
    let block = ram
        .block_by_id(&guard, id)
        .ok_or_else(|| format!("block {id:?} went away"))?;
    let advise = |at: u64, len: u64, advice: libc::c_int| {
        // SAFETY: `at..at + len` lies inside the block's own mapping, which the guard keeps
        // mapped; both advices change no byte (one faults pages in for reading, the other
        // sets the readahead policy).
        let r =
            unsafe { libc::madvise(block.host().add(at as usize).cast(), len as usize, advice) };
        if r != 0 {
            return Err(format!(
                "block {id:?}: madvise: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    if !prefault {
        advise(0, block.len(), libc::MADV_RANDOM)?;
        return Ok(0);
    }
    let end = b.file_offset + b.len;
    let mut at = b.file_offset;
    let mut read = 0;
    while let Some((start, stop)) = data_extent(&snap.memory, at, end)? {
        advise(
            start - b.file_offset,
            stop - start,
            libc::MADV_POPULATE_READ,
        )?;
        read += stop - start;
        at = stop;
    }
    Ok(read)
}

/// The next stretch of data of `file` in `from..end` (page-aligned: the file's blocks are
/// whole pages), or `None` when only holes are left.
fn data_extent(file: &std::fs::File, from: u64, end: u64) -> Result<Option<(u64, u64)>, String> {
    let seek = |whence: libc::c_int, at: u64| -> Result<Option<u64>, String> {
        // SAFETY: lseek on a descriptor we hold open; no memory is passed.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `at`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(format!("looking for data in a diff snapshot: {e}"));
        }
        Ok(Some(r as u64))
    };
    let Some(start) = seek(libc::SEEK_DATA, from)?.filter(|&s| s < end) else {
        return Ok(None);
    };
    let stop = seek(libc::SEEK_HOLE, start)?.unwrap_or(end).min(end);
    // Whole pages: a file system may report finer extents.
    let page = migration::stream::PAGE_SIZE;
    Ok(Some((
        start & !(page - 1),
        stop.next_multiple_of(page).min(end),
    )))
}
