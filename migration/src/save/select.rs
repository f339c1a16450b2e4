//! Which pages the saver sends: the first pass's choice (from pagemap) and each window's
//! dirty pages (a word of the Migration client's bitmap).
//!
//! # The first pass (DESIGN.md, "Send only what the guest ever wrote")
//!
//! QEMU's first pass marks every page dirty and reads each one to find the zero pages:
//! for an untouched 2 GiB guest that is 512 Ki page faults on the shared zero page
//! (~370 ms). Here, for a private anonymous block, `/proc/self/pagemap` says which pages
//! have anything behind them ([`PageMap::scan`], a few ms for 2 GiB):
//!
//! - absent pages (never touched) are not marked, so never read or sent;
//! - pages known zero (they map the shared zero page) are not marked either;
//! - the rest (present or swapped) are marked, read by the batches, and sent as data or as
//!   a ZERO record when they turn out to be zero.
//!
//! Skipping instead of sending ZERO records (QEMU sends every zero page) relies on the
//! destination's block reading as zero where nothing arrives: the destination is always
//! a fresh process here, whose blocks are fresh anonymous mappings. The saver does not
//! just assume it: such blocks carry the ZERO_SKIPPED flag in the RAM setup
//! ([`BlockFlags`]), and the loader makes the block read as zero before the first page
//! (pagemap on its side: nothing to do for a fresh process).
//!
//! A block on a tmpfs file (a memfd: `--memory-backend memfd`) is answered the same way
//! from the file's holes (`SEEK_DATA`/`SEEK_HOLE`): a page the guest never wrote is a
//! hole, and the destination's fresh file reads as zero there too. Any other block (other
//! files, pointer-backed), and every block when pagemap cannot be read, has every page
//! marked, and goes without the flag.
//!
//! Order: the driver starts dirty logging before the setup, and the first pass clears the
//! block's Migration bits *before* it reads pagemap. A page written before the scan is
//! present in it; one written after the clear has its dirty bit set again (by the VMM, or
//! by the next sync of KVM's log). Nothing written is missed.
//!
//! # Windows
//!
//! Iterations take the Migration client's bits a word (64 pages) at a time with
//! [`DirtyMemory::take_block_word`](ramlist::dirty::DirtyMemory::take_block_word): clean
//! words cost one load, nothing is allocated, and the bits taken are the block's own even
//! while it is being removed.

use crate::stream::{BlockFlags, PAGE_SIZE};
use ramlist::dirty::{DirtyClient, DirtyWord, RecentWrites};
use ramlist::pagemap::{PageMap, PageScan};
use ramlist::{RamBlock, RamList};
use std::time::{Duration, Instant};

/// The most pages one window takes: one bitmap word (256 KiB of RAM), so a batch checks
/// its clock (and the rate limit) every few hundred microseconds of sending.
pub(super) const WINDOW_PAGES: u64 = 64;

/// The most stream bytes one window encodes: its pages' data, a record word and a count
/// per page at worst, and an idstr.
pub(super) const WINDOW_BYTES: u64 = WINDOW_PAGES * (PAGE_SIZE + 8 + 2) + 1 + 255;

/// What the first pass found, over every block of the setup.
#[derive(Debug, Default, Clone, Copy)]
pub struct FirstPassStats {
    /// Pages marked to be read and sent.
    pub marked_pages: u64,
    /// Pages of ZERO_SKIPPED blocks with nothing behind them: never read, never sent.
    pub absent_pages: u64,
    /// Pages of ZERO_SKIPPED blocks mapping the shared zero page: never read, never sent.
    pub known_zero_pages: u64,
    /// Time spent reading pagemap and marking.
    pub scan_time: Duration,
}

/// The first pass's pagemap reader and scan buffer (reused from block to block).
pub(super) struct FirstPass {
    map: Option<PageMap>,
    scan: PageScan,
}

impl FirstPass {
    /// Opens pagemap; without it every block is sent whole.
    pub(super) fn open() -> FirstPass {
        let map = if ramlist::page_size() == PAGE_SIZE {
            PageMap::open()
                .map_err(|e| log::warn!("migration: {e}; the first pass sends every page"))
                .ok()
        } else {
            None
        };
        FirstPass {
            map,
            scan: PageScan::new(),
        }
    }

    /// The flags `block` goes with in the RAM setup: ZERO_SKIPPED when pagemap answers
    /// for it (private anonymous memory).
    pub(super) fn flags(&self, block: &RamBlock) -> BlockFlags {
        if self.map.is_some() && PageMap::answers_for(block) {
            BlockFlags::ZERO_SKIPPED
        } else {
            BlockFlags::NONE
        }
    }

    /// Marks what the first pass must send of `block`: the pages pagemap shows as
    /// possibly holding data when `flags` has ZERO_SKIPPED, else every page.
    pub(super) fn mark(
        &mut self,
        ram: &RamList,
        block: &RamBlock,
        flags: BlockFlags,
        stats: &mut FirstPassStats,
    ) {
        let start = Instant::now();
        let dirty = ram.dirty();
        let (base, len) = (block.offset(), block.len());
        let mark_all = |stats: &mut FirstPassStats| {
            dirty.mark_dirty_for(DirtyClient::Migration, base, len);
            stats.marked_pages += len / PAGE_SIZE;
        };
        match self.map.as_mut() {
            Some(map) if flags.contains(BlockFlags::ZERO_SKIPPED) => {
                // Clear first, scan after: see the module docs for why nothing is lost.
                dirty.test_and_clear(DirtyClient::Migration, base, len);
                match map.scan(block, &mut self.scan) {
                    Ok(()) if self.scan.is_exact() => {
                        for run in self.scan.data_runs() {
                            dirty.mark_dirty_for(
                                DirtyClient::Migration,
                                base + run.start * PAGE_SIZE,
                                (run.end - run.start) * PAGE_SIZE,
                            );
                        }
                        stats.marked_pages += self.scan.data_pages();
                        stats.absent_pages += self.scan.absent_pages();
                        stats.known_zero_pages += self.scan.zero_pages();
                    }
                    Ok(()) => mark_all(stats),
                    Err(e) => {
                        log::warn!("migration: {e}; sending every page of {:?}", block.id());
                        mark_all(stats);
                    }
                }
            }
            _ => mark_all(stats),
        }
        stats.scan_time += start.elapsed();
    }
}

/// What a window found.
pub(super) struct Window {
    /// Where in the block the next window starts (`block.len()` when the block is done).
    pub next: u64,
    /// Bytes passed over with no page to send.
    pub clean: u64,
    /// Dirty pages left marked because the guest wrote them since the last sync.
    pub held_back: u64,
}

/// Takes (clears) the dirty pages of the next window of `block` at or after offset `from`,
/// pushing their offsets in the block onto `pages`. Bits are cleared before the caller
/// reads the pages (the dirty-bitmap ordering rule), so a write racing the send either is
/// seen by it or leaves its bit set for the next pass.
///
/// Pages `hold_back` shows written since the last sync are not pushed: their bits are
/// set again (the next sync would report them anyway) and [`Window::held_back`] counts
/// them. A window whose every page was held back counts as clean, so a lap that finds
/// only those ends the pass.
pub(super) fn take_window(
    ram: &RamList,
    block: &RamBlock,
    from: u64,
    hold_back: Option<&RecentWrites>,
    pages: &mut Vec<u64>,
) -> Window {
    let len = block.len();
    match ram
        .dirty()
        .take_block_word(DirtyClient::Migration, block, from / PAGE_SIZE)
    {
        Ok(Some(mut word)) => {
            let next = ((word.first_page + WINDOW_PAGES) * PAGE_SIZE).min(len);
            let held = hold_back.map_or(0, |recent| {
                let held = word.bits & recent.word(block.offset() + word.first_page * PAGE_SIZE);
                word.bits &= !held;
                held
            });
            // Put the held-back pages' bits back: the pass leaves them for the next one.
            // (The marks come after the take; a write meanwhile is logged by KVM.)
            let held_word = DirtyWord {
                first_page: word.first_page,
                bits: held,
            };
            for p in held_word.pages() {
                ram.dirty().mark_dirty_for(
                    DirtyClient::Migration,
                    block.offset() + p * PAGE_SIZE,
                    PAGE_SIZE,
                );
            }
            pages.extend(word.pages().map(|p| p * PAGE_SIZE));
            let start = word.first_page * PAGE_SIZE;
            Window {
                next,
                clean: if word.bits == 0 {
                    next.saturating_sub(from)
                } else {
                    start.saturating_sub(from)
                },
                held_back: u64::from(held.count_ones()),
            }
        }
        Ok(None) => Window {
            next: len,
            clean: len.saturating_sub(from),
            held_back: 0,
        },
        Err(e) => {
            // Only a block of another list is refused: the saver walks its own list.
            log::error!("migration: {e}");
            debug_assert!(false, "{e}");
            Window {
                next: len,
                clean: len.saturating_sub(from),
                held_back: 0,
            }
        }
    }
}

/// Pages of `block` still to send.
pub(super) fn pending(ram: &RamList, block: &RamBlock) -> u64 {
    ram.dirty()
        .count_dirty(DirtyClient::Migration, block.offset(), block.len())
}
