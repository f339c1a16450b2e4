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
//! A diff snapshot (`vmm snapshot --diff-from BASE`) holds only the pages written since
//! BASE and names BASE as its parent; [`open_stack`] reads the stack back, and a restore
//! maps the full snapshot's memory and copies each diff's pages over it, oldest first.
//!
//! `DIR/memory` and `DIR/state` are written for their owner only (0600), under
//! temporary names of the writer's own (made afresh: a file, FIFO or symlink at that name
//! is removed, never followed), and renamed into place, state first: a state that cannot
//! be replaced leaves the old snapshot whole. The memory's last page names its snapshot,
//! so a state is never restored over another snapshot's memory (a failure between the two
//! renames, two writers into one DIR): such a pair is refused. A snapshot taken again into
//! the same DIR replaces both. Every file a restore opens is opened without waiting (a
//! FIFO is refused, not waited on).
//!
//! The memory file must not change while a guest restored from it runs (as Firecracker
//! says of its own): a write to it reaches pages the guest has not touched yet, and a file
//! cut short makes the guest's next touch of the lost pages fail. The VMM checks the
//! file's length before it writes a snapshot from the mapping, and says so instead of
//! dying of SIGBUS.

mod direct;
pub mod format;
mod write;

pub use format::{Parent, SnapshotBlock, SnapshotError, SnapshotState, MAX_STATE_FILE};
pub use write::{write_snapshot, SnapshotStats};

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The last page of `DIR/memory`: "MVSM" and the snapshot's id, so that a state is never
/// restored over another snapshot's memory of the same length.
pub fn trailer(id: u64) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(b"MVSM");
    t[4..].copy_from_slice(&id.to_be_bytes());
    t
}

/// Opens `path` for reading without waiting on it (a FIFO would block an open) and
/// without following a symlink at its last component; the caller checks it is a regular
/// file.
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

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
    let f = open_nonblocking(&sp).map_err(io("opening", &sp))?;
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
    let memory = open_nonblocking(&mp).map_err(io("opening", &mp))?;
    let meta = memory.metadata().map_err(io("reading", &mp))?;
    if !meta.is_file() {
        return Err(SnapshotError::BadState {
            path: mp.display().to_string(),
            why: "not a regular file".into(),
        });
    }
    if meta.len() != state.memory_len {
        return Err(SnapshotError::MemoryLength {
            path: mp.display().to_string(),
            actual: meta.len(),
            expected: state.memory_len,
        });
    }
    let mut t = [0u8; 12];
    let at = state.memory_len.saturating_sub(crate::stream::PAGE_SIZE);
    let read = std::os::unix::fs::FileExt::read_exact_at(&memory, &mut t, at);
    if read.is_err() || t != trailer(state.id) {
        return Err(SnapshotError::BadState {
            path: mp.display().to_string(),
            why: "its last page does not name this snapshot: another snapshot's memory, or a damaged one".into(),
        });
    }
    Ok(OpenSnapshot {
        state,
        memory,
        dir: dir.to_path_buf(),
    })
}

/// The most snapshots a stack holds (a full one and its diffs).
pub const MAX_STACK: usize = 16;

/// The snapshot in `dir` and the ones under it, oldest (the full snapshot) first: each
/// diff's parent opened ([`open_snapshot`]) from the directory it names, and checked to be
/// the very snapshot it was taken against (its id) with the same layout and memory length.
pub fn open_stack(dir: &Path) -> Result<Vec<OpenSnapshot>, SnapshotError> {
    let mut stack = vec![open_snapshot(dir)?];
    loop {
        let top = &stack[stack.len() - 1];
        let Some(p) = top.state.parent.clone() else {
            break;
        };
        let bad = |why: String| SnapshotError::BadState {
            path: state_path(&top.dir).display().to_string(),
            why,
        };
        if stack.len() >= MAX_STACK {
            return Err(bad(format!("more than {MAX_STACK} snapshots stacked")));
        }
        let parent = open_snapshot(Path::new(&p.dir))?;
        if parent.state.id != p.id {
            return Err(bad(format!(
                "its base {} holds another snapshot (id {:#x}, not {:#x}): it was replaced since",
                p.dir, parent.state.id, p.id
            )));
        }
        if parent.state.blocks != top.state.blocks
            || parent.state.memory_len != top.state.memory_len
        {
            return Err(bad(format!("its layout is not its base {}'s", p.dir)));
        }
        stack.push(parent);
    }
    stack.reverse();
    Ok(stack)
}
