//! [`write_snapshot`]: the guest paused and RAM hot-plug held off, each block's pages that
//! hold data written at the block's offset in `DIR/memory` (holes everywhere else), then
//! `DIR/state`. A diff snapshot (a base given) writes only the pages the guest wrote since
//! it was restored by mapping: its private copies of the mapped file
//! ([`PageMap::scan_private_copies`]), zero or not, at the base's offsets.

use super::direct::PageWriter;
use super::format::{Parent, SnapshotBlock, SnapshotError, SnapshotState};
use super::{memory_path, state_path, OpenSnapshot};
use crate::live::MigratableVm;
use crate::stream::PAGE_SIZE;
use ramlist::pagemap::{PageMap, PageScan};
use ramlist::RamList;
use serde::Serialize;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Instant;

/// Blocks start at multiples of this in `DIR/memory` (huge-page friendly).
const BLOCK_ALIGN: u64 = 2 << 20;

/// What a snapshot wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotStats {
    /// "completed".
    pub status: &'static str,
    /// From the pause to `DIR/state` in place, in ms.
    pub total_ms: f64,
    /// Pages written to `DIR/memory`.
    pub pages_written: u64,
    /// Pages read and found zero: holes.
    pub zero_pages: u64,
    /// Pages never read: nothing behind them (pagemap, or the memfd's holes).
    pub skipped_pages: u64,
    /// `DIR/memory`'s length (the sum of the blocks, aligned).
    pub memory_bytes: u64,
    /// What `DIR/memory` takes on disk.
    pub allocated_bytes: u64,
    /// `DIR/state`'s size.
    pub state_bytes: u64,
    /// Blocks in the layout.
    pub blocks: u64,
    /// A diff snapshot: only the pages written since its base.
    pub diff: bool,
    /// The pages went to the file past the page cache (`O_DIRECT`) all the way.
    pub direct: bool,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.display().to_string();
    move |source| SnapshotError::Io { what, path, source }
}

/// Writes a snapshot of `vm` into `dir` (made if missing; a snapshot already there is
/// replaced): a full one, or with `base`, a diff of it. A diff needs a guest restored by
/// mapping from `base` or from a snapshot stacked on it (the caller checks which), whose
/// layout is still the base's. The guest is paused first and stays paused; on failure it
/// is resumed if this call paused it, and nothing replaces a snapshot already in `dir`.
pub fn write_snapshot(
    vm: &dyn MigratableVm,
    dir: &Path,
    base: Option<&OpenSnapshot>,
) -> Result<SnapshotStats, SnapshotError> {
    let t0 = Instant::now();
    let _hold = vm.hold_ram_layout();
    let paused = vm.pause().map_err(|source| SnapshotError::Vm {
        op: "pause",
        source,
    })?;
    let written = write_paused(vm, dir, base, t0);
    if written.is_err() && paused {
        if let Err(e) = vm.resume() {
            log::error!("snapshot failed, and resuming the guest too: {e}");
        }
    }
    written
}

fn write_paused(
    vm: &dyn MigratableVm,
    dir: &Path,
    base: Option<&OpenSnapshot>,
    t0: Instant,
) -> Result<SnapshotStats, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    // What will be replaced must be plain files (or absent): checked before anything is
    // written, so a failure cannot leave a new memory beside an old state.
    let (mp, sp) = (memory_path(dir), state_path(dir));
    for p in [&mp, &sp] {
        match std::fs::symlink_metadata(p) {
            Ok(m) if !m.file_type().is_file() => {
                return Err(SnapshotError::BadState {
                    path: p.display().to_string(),
                    why: "is not a regular file: not replaced".into(),
                })
            }
            _ => {}
        }
    }
    let ram = vm.ram();
    let mut stats = SnapshotStats {
        status: "completed",
        ..SnapshotStats::default()
    };
    let mut layout = layout(vm, &ram);
    // The blocks, then one page naming the snapshot (the trailer: a state is never taken
    // with another snapshot's memory of the same length).
    let mut memory_len = layout
        .last()
        .map_or(0, |b| (b.file_offset + b.len).next_multiple_of(BLOCK_ALIGN))
        + PAGE_SIZE;
    let mut parent = None;
    if let Some(base) = base {
        check_base(dir, base)?;
        layout = same_layout(&layout, base)?;
        memory_len = base.state.memory_len;
        let dir = std::path::absolute(&base.dir).map_err(io("resolving", &base.dir))?;
        parent = Some(Parent {
            id: base.state.id,
            dir: dir
                .to_str()
                .ok_or_else(|| SnapshotError::BadState {
                    path: dir.display().to_string(),
                    why: "a base directory whose path is not UTF-8".into(),
                })?
                .to_string(),
        });
        stats.diff = true;
    }
    let id = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        .max(1);
    // Names of this writer's own (two VMMs writing into one DIR never share a file),
    // removed on any failure.
    let tag = format!("{}.{id:016x}", std::process::id());
    let tmp = Temporaries {
        memory: dir.join(format!(".memory.tmp.{tag}")),
        state: dir.join(format!(".state.tmp.{tag}")),
    };
    let (mtmp, stmp) = (&tmp.memory, &tmp.state);
    let mem = create_private(mtmp)?;
    mem.set_len(memory_len).map_err(io("sizing", mtmp))?;
    let mut pagemap = PageMap::open().ok();
    let mut scan = PageScan::new();
    let mut out = PageWriter::new(&mem);
    stats.direct = out.is_direct();
    for b in &layout {
        match base {
            None => write_block(&ram, b, &mut out, mtmp, &mut pagemap, &mut scan, &mut stats)?,
            Some(_) => write_copies(&ram, b, &mut out, mtmp, &mut pagemap, &mut scan, &mut stats)?,
        }
    }
    stats.direct &= out.is_direct();
    out.buffered().map_err(io("writing", mtmp))?;
    let pages_at = t0.elapsed();
    let states = vm.save_state().map_err(|source| SnapshotError::Vm {
        op: "save its state",
        source,
    })?;
    mem.write_all_at(&super::trailer(id), memory_len - PAGE_SIZE)
        .map_err(io("writing", mtmp))?;
    let state = SnapshotState {
        id,
        memory_len,
        parent,
        blocks: layout,
        states,
    };
    let bytes = state.encode();
    create_private(stmp)?
        .write_all_at(&bytes, 0)
        .map_err(io("writing", stmp))?;
    stats.allocated_bytes = mem.metadata().map_err(io("reading", mtmp))?.blocks() * 512;
    drop(mem);
    let state_at = t0.elapsed();
    // The state first: if it cannot be replaced, nothing was. If the memory then cannot
    // be, the new state sits beside the old memory, whose last page names another
    // snapshot: a restore refuses the pair, it never runs a guest on it.
    std::fs::rename(stmp, &sp).map_err(io("renaming into", &sp))?;
    std::fs::rename(mtmp, &mp).map_err(io("renaming into", &mp))?;
    tmp.done();
    log::debug!(
        "snapshot: pages written at {pages_at:?}, state at {state_at:?}, renamed at {:?}",
        t0.elapsed()
    );
    stats.memory_bytes = memory_len;
    stats.state_bytes = bytes.len() as u64;
    stats.blocks = state.blocks.len() as u64;
    stats.total_ms = (t0.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    Ok(stats)
}

/// The blocks, each at the next aligned offset of the file.
fn layout(vm: &dyn MigratableVm, ram: &RamList) -> Vec<SnapshotBlock> {
    let guard = rcu::read_lock();
    let mut at = 0u64;
    let mut out = Vec::new();
    for b in ram.blocks(&guard) {
        out.push(SnapshotBlock {
            id: b.id().to_string(),
            len: b.len(),
            guest_addr: b.guest_addr(),
            file_offset: at,
            hotplugged: vm.is_hotplugged(b),
        });
        at = (at + b.len()).next_multiple_of(BLOCK_ALIGN);
    }
    out
}

/// A snapshot's files under their temporary names: removed when dropped, unless
/// [`done`](Self::done) (they were renamed into place).
struct Temporaries {
    memory: std::path::PathBuf,
    state: std::path::PathBuf,
}

impl Temporaries {
    fn done(self) {
        std::mem::forget(self);
    }
}

impl Drop for Temporaries {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.memory);
        let _ = std::fs::remove_file(&self.state);
    }
}

/// A new file at `path` for its owner only (all of guest RAM is in it), made afresh: a
/// file, FIFO or symlink left at that name is removed first, never opened or followed.
fn create_private(path: &Path) -> Result<File, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing", path)(e)),
    }
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io("creating", path))
}

/// A diff may not be written over its base or any snapshot under it (that would break the
/// stack it names), nor make a stack deeper than [`MAX_STACK`](super::MAX_STACK).
fn check_base(dir: &Path, base: &OpenSnapshot) -> Result<(), SnapshotError> {
    let stack = super::open_stack(&base.dir)?;
    if stack.len() >= super::MAX_STACK {
        return Err(SnapshotError::BadState {
            path: base.dir.display().to_string(),
            why: format!(
                "already {} snapshots stacked, the most a restore takes ({}): take a full snapshot",
                stack.len(),
                super::MAX_STACK
            ),
        });
    }
    let here = std::fs::canonicalize(dir).map_err(io("resolving", dir))?;
    for s in &stack {
        if std::fs::canonicalize(&s.dir).is_ok_and(|d| d == here) {
            return Err(SnapshotError::BadState {
                path: dir.display().to_string(),
                why: format!(
                    "holds {}, which the diff would stand on: write it elsewhere",
                    if s.dir == base.dir {
                        "its base"
                    } else {
                        "a snapshot under its base"
                    }
                ),
            });
        }
    }
    Ok(())
}

/// The current layout, placed as `base`'s: the same blocks (id, length, guest address),
/// or an error naming the difference.
fn same_layout(
    now: &[SnapshotBlock],
    base: &OpenSnapshot,
) -> Result<Vec<SnapshotBlock>, SnapshotError> {
    let changed = |why: String| SnapshotError::BadState {
        path: base.dir.display().to_string(),
        why: format!("the RAM layout changed since this snapshot ({why}): take a full snapshot"),
    };
    if now.len() != base.state.blocks.len() {
        return Err(changed(format!(
            "the VM has {} RAM blocks, the snapshot {}",
            now.len(),
            base.state.blocks.len()
        )));
    }
    now.iter()
        .map(|b| {
            let was = base.state.blocks.iter().find(|o| o.id == b.id);
            match was {
                Some(o) if o.len == b.len && o.guest_addr == b.guest_addr => Ok(o.clone()),
                Some(_) => Err(changed(format!("block {:?} changed size or place", b.id))),
                None => Err(changed(format!("block {:?} was added", b.id))),
            }
        })
        .collect()
}

/// Writes the pages of block `b` the guest wrote since it was restored by mapping (its
/// private copies), zero or not.
fn write_copies(
    ram: &RamList,
    b: &SnapshotBlock,
    mem: &mut PageWriter<'_>,
    path: &Path,
    pagemap: &mut Option<PageMap>,
    scan: &mut PageScan,
    stats: &mut SnapshotStats,
) -> Result<(), SnapshotError> {
    let guard = rcu::read_lock();
    let block = still_there(ram, &guard, b)?;
    let not_restored = |why: String| {
        SnapshotError::Vm {
        op: "tell which pages it wrote",
        source: format!(
            "block {:?}: {why}; a diff snapshot records the pages of a guest restored by mapping (vmm run --restore)",
            b.id
        )
        .into(),
    }
    };
    let map = pagemap
        .as_mut()
        .ok_or_else(|| not_restored("/proc/self/pagemap cannot be read".into()))?;
    if ramlist::page_size() != PAGE_SIZE {
        return Err(not_restored("a page size other than the stream's".into()));
    }
    file_still_whole(block)?;
    map.scan_private_copies(block, scan)
        .map_err(|e| not_restored(e.to_string()))?;
    let pages = block.len() / PAGE_SIZE;
    for run in scan.data_runs() {
        let (start, end) = (run.start, run.end.min(pages));
        // SAFETY: pages `start..end` lie inside the block, which the guard keeps mapped;
        // the guest is paused, and this only reads.
        let data = unsafe {
            std::slice::from_raw_parts(
                block.host().add((start * PAGE_SIZE) as usize),
                ((end - start) * PAGE_SIZE) as usize,
            )
        };
        mem.write_pages(data, b.file_offset + start * PAGE_SIZE)
            .map_err(io("writing", path))?;
        stats.pages_written += end - start;
    }
    stats.skipped_pages += pages - scan.data_pages();
    Ok(())
}

/// A block over a file (a restored snapshot's) must still have all of its file behind it:
/// reading a page past a file cut short would end this process with SIGBUS. Said as an
/// error instead (the file was changed under the guest; it is damaged either way).
fn file_still_whole(block: &ramlist::RamBlock) -> Result<(), SnapshotError> {
    let (ramlist::Backing::Fd { offset, .. }, Some(fd)) = (block.backing(), block.fd()) else {
        return Ok(());
    };
    let size = fd
        .try_clone_to_owned()
        .and_then(|fd| File::from(fd).metadata())
        .map(|m| m.len());
    match size {
        Ok(n) if n >= offset + block.len() => Ok(()),
        other => Err(SnapshotError::Vm {
            op: "read its RAM",
            source: format!(
                "block {:?}: the file it maps holds {} bytes, short of {:#x}: it was cut short under the guest",
                block.id(),
                other.map_or_else(|e| e.to_string(), |n| format!("{n:#x}")),
                offset + block.len()
            )
            .into(),
        }),
    }
}

/// Block `b` of `ram` (hot-plug is held: it cannot have gone, but is checked).
fn still_there<'g>(
    ram: &RamList,
    guard: &'g rcu::ReadGuard,
    b: &SnapshotBlock,
) -> Result<&'g ramlist::RamBlock, SnapshotError> {
    ram.block_by_id(guard, &b.id)
        .ok_or_else(|| SnapshotError::Vm {
            op: "keep its RAM layout",
            source: format!("block {:?} went away during the snapshot", b.id).into(),
        })
}

/// Writes the pages of `b` that hold data; the rest stay holes.
fn write_block(
    ram: &RamList,
    b: &SnapshotBlock,
    mem: &mut PageWriter<'_>,
    path: &Path,
    pagemap: &mut Option<PageMap>,
    scan: &mut PageScan,
    stats: &mut SnapshotStats,
) -> Result<(), SnapshotError> {
    let guard = rcu::read_lock();
    let block = still_there(ram, &guard, b)?;
    file_still_whole(block)?;
    let pages = block.len() / PAGE_SIZE;
    let exact = ramlist::page_size() == PAGE_SIZE
        && PageMap::answers_for(block)
        && pagemap
            .as_mut()
            .is_some_and(|m| m.scan(block, scan).is_ok());
    let runs: Vec<std::ops::Range<u64>> = if exact {
        scan.data_runs()
            .map(|r| r.start..r.end.min(pages))
            .collect()
    } else {
        std::iter::once(0..pages).collect()
    };
    let listed: u64 = runs.iter().map(|r| r.end - r.start).sum();
    stats.skipped_pages += pages - listed;
    for run in runs {
        let mut page = run.start;
        while page < run.end {
            // The next stretch of non-zero pages.
            let at = |p: u64| {
                // SAFETY: `p < pages`, inside the block, which the guard keeps mapped; the
                // guest is paused, and this only reads.
                unsafe {
                    std::slice::from_raw_parts(
                        block.host().add((p * PAGE_SIZE) as usize),
                        PAGE_SIZE as usize,
                    )
                }
            };
            if crate::is_zero(at(page)) {
                stats.zero_pages += 1;
                page += 1;
                continue;
            }
            let start = page;
            while page < run.end && page - start < 256 && !crate::is_zero(at(page)) {
                page += 1;
            }
            // SAFETY: pages `start..page` lie inside the block (as above).
            let data = unsafe {
                std::slice::from_raw_parts(
                    block.host().add((start * PAGE_SIZE) as usize),
                    ((page - start) * PAGE_SIZE) as usize,
                )
            };
            mem.write_pages(data, b.file_offset + start * PAGE_SIZE)
                .map_err(io("writing", path))?;
            stats.pages_written += page - start;
        }
    }
    Ok(())
}
