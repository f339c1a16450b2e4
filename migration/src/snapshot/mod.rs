//! Snapshots restored by mapping: [`write_snapshot`] writes `DIR/state` (the RAM layout
//! and every component's state, [`format`](mod@format)) and `DIR/memory`, a sparse file holding each
//! RAM block at a fixed, 2 MiB-aligned offset (QEMU's mapped-ram idea): pages the guest
//! never wrote and zero pages are holes, so the file's allocated size is what the guest
//! wrote. [`open_snapshot`] reads and checks it all back before anything is mapped; the
//! VMM then maps each block's range of `DIR/memory` MAP_PRIVATE as guest RAM (pages come
//! in on the guest's first touch, its writes stay in its own process) and starts the
//! vCPUs.
//!
//! The guest stays paused after a snapshot, as after a `file:` migration: `resume` or
//! `quit` decide. RAM hot-plug is held off while it is written, so the layout written is
//! the layout of the pages written.
//!
//! `DIR/memory` and `DIR/state` are written under temporary names and renamed into place,
//! memory first: a `DIR/state` is only ever beside the memory it describes (a snapshot
//! taken again into the same DIR replaces both).

pub mod format;
mod write;

pub use format::{SnapshotBlock, SnapshotError, SnapshotState, MAX_STATE_FILE};
pub use write::{write_snapshot, SnapshotStats};

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where the layout and the states are.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("state")
}

/// Where the pages are.
pub fn memory_path(dir: &Path) -> PathBuf {
    dir.join("memory")
}

/// A snapshot read and checked: its state, and its memory file open for mapping.
#[derive(Debug)]
pub struct OpenSnapshot {
    /// The layout and states.
    pub state: SnapshotState,
    /// `DIR/memory`, of exactly `state.memory_len` bytes.
    pub memory: File,
    /// The directory.
    pub dir: PathBuf,
}

/// Reads `DIR/state` (at most [`MAX_STATE_FILE`] bytes) and checks it
/// ([`SnapshotState::decode`]), then opens `DIR/memory` and checks that it is a regular
/// file of exactly the length the layout says: a truncated, grown or swapped memory file
/// is refused here, before anything is mapped (a mapping past a file's end would fault on
/// the guest's first touch).
pub fn open_snapshot(dir: &Path) -> Result<OpenSnapshot, SnapshotError> {
    let sp = state_path(dir);
    let io = |what: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |source| SnapshotError::Io { what, path, source }
    };
    let f = File::open(&sp).map_err(io("opening", &sp))?;
    let meta = f.metadata().map_err(io("reading", &sp))?;
    if !meta.is_file() || meta.len() > MAX_STATE_FILE {
        return Err(SnapshotError::BadState {
            path: sp.display().to_string(),
            why: format!(
                "not a regular file of at most {MAX_STATE_FILE} bytes ({} bytes)",
                meta.len()
            ),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io("reading", &sp))?;
    let state = SnapshotState::decode(&bytes, &sp.display().to_string())?;
    let mp = memory_path(dir);
    let memory = File::open(&mp).map_err(io("opening", &mp))?;
    let meta = memory.metadata().map_err(io("reading", &mp))?;
    if !meta.is_file() || meta.len() != state.memory_len {
        return Err(SnapshotError::MemoryLength {
            path: mp.display().to_string(),
            actual: meta.len(),
            expected: state.memory_len,
        });
    }
    Ok(OpenSnapshot {
        state,
        memory,
        dir: dir.to_path_buf(),
    })
}
