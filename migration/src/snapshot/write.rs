//! [`write_snapshot`]: the guest paused and RAM hot-plug held off, each block's pages that
//! hold data written at the block's offset in `DIR/memory` (holes everywhere else), then
//! `DIR/state`.

use super::format::{SnapshotBlock, SnapshotError, SnapshotState};
use super::{memory_path, state_path};
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
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.display().to_string();
    move |source| SnapshotError::Io { what, path, source }
}

/// Writes a snapshot of `vm` into `dir` (made if missing; a snapshot already there is
/// replaced). The guest is paused first and stays paused; on failure it is resumed if
/// this call paused it, and nothing replaces a snapshot already in `dir`.
pub fn write_snapshot(vm: &dyn MigratableVm, dir: &Path) -> Result<SnapshotStats, SnapshotError> {
    let t0 = Instant::now();
    let _hold = vm.hold_ram_layout();
    let paused = vm.pause().map_err(|source| SnapshotError::Vm {
        op: "pause",
        source,
    })?;
    let written = write_paused(vm, dir, t0);
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
    t0: Instant,
) -> Result<SnapshotStats, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let ram = vm.ram();
    let mut stats = SnapshotStats {
        status: "completed",
        ..SnapshotStats::default()
    };
    let layout = layout(vm, &ram);
    let memory_len = layout
        .last()
        .map_or(0, |b| (b.file_offset + b.len).next_multiple_of(BLOCK_ALIGN));
    let (mp, sp) = (memory_path(dir), state_path(dir));
    let (mtmp, stmp) = (dir.join(".memory.tmp"), dir.join(".state.tmp"));
    let mem = File::create(&mtmp).map_err(io("creating", &mtmp))?;
    mem.set_len(memory_len).map_err(io("sizing", &mtmp))?;
    let mut pagemap = PageMap::open().ok();
    let mut scan = PageScan::new();
    for b in &layout {
        write_block(&ram, b, &mem, &mtmp, &mut pagemap, &mut scan, &mut stats)?;
    }
    let states = vm.save_state().map_err(|source| SnapshotError::Vm {
        op: "save its state",
        source,
    })?;
    let state = SnapshotState {
        id: std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish(),
        memory_len,
        blocks: layout,
        states,
    };
    let bytes = state.encode();
    std::fs::write(&stmp, &bytes).map_err(io("writing", &stmp))?;
    stats.allocated_bytes = mem.metadata().map_err(io("reading", &mtmp))?.blocks() * 512;
    drop(mem);
    std::fs::rename(&mtmp, &mp).map_err(io("renaming into", &mp))?;
    std::fs::rename(&stmp, &sp).map_err(io("renaming into", &sp))?;
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

/// Writes the pages of `b` that hold data; the rest stay holes.
fn write_block(
    ram: &RamList,
    b: &SnapshotBlock,
    mem: &File,
    path: &Path,
    pagemap: &mut Option<PageMap>,
    scan: &mut PageScan,
    stats: &mut SnapshotStats,
) -> Result<(), SnapshotError> {
    let guard = rcu::read_lock();
    let Some(block) = ram.block_by_id(&guard, &b.id) else {
        return Err(SnapshotError::Vm {
            op: "keep its RAM layout",
            source: format!("block {:?} went away during the snapshot", b.id).into(),
        });
    };
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
            mem.write_all_at(data, b.file_offset + start * PAGE_SIZE)
                .map_err(io("writing", path))?;
            stats.pages_written += page - start;
        }
    }
    Ok(())
}
