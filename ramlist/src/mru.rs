//! The MRU block, kept per thread.
//!
//! QEMU keeps one MRU block for the whole RAM list and rewrites it on every lookup that
//! misses it; with lookups on several CPUs that one cache line bounces between them on
//! every miss. Here each thread remembers the block it last found in each list, tagged
//! with the list's version when it found it: lookups then write only thread-local memory.
//!
//! Why a remembered block is still safe to use. A free marks the block removed, then bumps
//! the list's version, then unlinks the block (handing it to `call_rcu`), each with release
//! ordering. A lookup loads the version (acquire) before it searches, and remembers what it
//! found only if the block is not marked removed: so an entry is tagged with a version
//! older than the bump of any free of its block that was under way (had the lookup seen
//! the bump, it would have seen the mark). A later lookup uses an entry only if the version
//! still equals its tag, under its own read guard: if the block was freed since, either
//! that read section began before the free's grace period did, so the grace period waits
//! for it and the block is alive until it ends, or it began after, and then it sees the
//! bumped version and ignores the entry.

use crate::block::RamBlock;
use std::cell::Cell;
use std::ptr;

#[derive(Clone, Copy)]
struct Entry {
    list: u64,
    version: u64,
    block: *const RamBlock,
}

std::thread_local! {
    static MRU: Cell<Entry> = const {
        Cell::new(Entry { list: 0, version: 0, block: ptr::null() })
    };
}

/// The block this thread last found in list `list` at `version`, if any.
///
/// # Safety
/// The caller is inside a read section, has just loaded `version` (acquire) from list
/// `list`, and uses the reference no longer than that section.
#[inline]
pub(crate) unsafe fn recall<'g>(list: u64, version: u64) -> Option<&'g RamBlock> {
    let e = MRU.with(Cell::get);
    if e.list == list && e.version == version {
        // SAFETY: see the module doc: the tag matches, so the block is alive for the
        // caller's read section.
        unsafe { e.block.as_ref() }
    } else {
        None
    }
}

/// Remembers `block`, found under a guard in list `list` whose version was `version`
/// before the lookup — unless it is being freed.
#[inline]
pub(crate) fn remember(list: u64, version: u64, block: &RamBlock) {
    if !block.is_removed() {
        MRU.with(|m| {
            m.set(Entry {
                list,
                version,
                block,
            })
        });
    }
}
