//! Which pages the saver sends: the first pass's choice and each window's dirty pages.
//!
//! Kept behind these two functions so the choice can change in one place: today the first
//! pass marks every page of a block dirty (QEMU's `ram_list_init_bitmaps`) and windows take
//! the Migration client's dirty bits; with ramlist's "pages ever written" query (pagemap)
//! the first pass will mark only the pages that exist, and with its per-block dirty take a
//! window will be one call.

use crate::stream::PAGE_SIZE;
use ramlist::dirty::DirtyClient;
use ramlist::{RamBlock, RamList};

/// The most pages one window takes: 256 KiB of RAM, so a batch checks its clock (and the
/// rate limit) every few hundred microseconds of sending.
pub(super) const WINDOW_PAGES: u64 = 64;

/// Marks what the first pass must send of `block` (all of it, for now).
pub(super) fn first_pass(ram: &RamList, block: &RamBlock) {
    ram.dirty()
        .mark_dirty_for(DirtyClient::Migration, block.offset(), block.len());
}

/// What a window found.
pub(super) struct Window {
    /// Where in the block the next window starts (`block.len()` when the block is done).
    pub next: u64,
    /// Bytes passed over with no dirty page.
    pub clean: u64,
}

/// Takes (clears) the dirty pages of the next window of `block` at or after offset `from`,
/// pushing their offsets in the block onto `pages`. Bits are cleared before the caller
/// reads the pages (the dirty-bitmap ordering rule), so a write racing the send either is
/// seen by it or leaves its bit set for the next pass.
pub(super) fn take_window(
    ram: &RamList,
    block: &RamBlock,
    from: u64,
    pages: &mut Vec<u64>,
) -> Window {
    let dirty = ram.dirty();
    let base = block.offset();
    let len = block.len();
    let Some(first) = dirty.find_next_dirty(DirtyClient::Migration, base + from, base + len) else {
        return Window {
            next: len,
            clean: len.saturating_sub(from),
        };
    };
    let start = first - base;
    let end = (start + WINDOW_PAGES * PAGE_SIZE).min(len);
    dirty.take_dirty(DirtyClient::Migration, first, end - start, |addr| {
        pages.push(addr - base)
    });
    Window {
        next: end,
        clean: start - from,
    }
}

/// Pages of `block` still to send.
pub(super) fn pending(ram: &RamList, block: &RamBlock) -> u64 {
    ram.dirty()
        .count_dirty(DirtyClient::Migration, block.offset(), block.len())
}
