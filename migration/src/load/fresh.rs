//! The destination's side of ZERO_SKIPPED blocks: the source sends nothing for pages it
//! knows are zero, so before the first page arrives the loader makes sure that every
//! page of such a block reads as zero.
//!
//! The destination is a fresh process whose blocks were just mapped: nothing is behind
//! them, and `/proc/self/pagemap` says so in a few milliseconds for gigabytes, without
//! touching a page. Only the pages pagemap shows as possibly holding data are read (and
//! cleared if they are not zero); a block pagemap cannot answer for (fd- or
//! pointer-backed, shared) is read whole. Never wrong, and as cheap as the destination is
//! fresh.

use crate::is_zero;
use crate::stream::PAGE_SIZE;
use ramlist::pagemap::{PageMap, PageScan};
use ramlist::RamBlock;

/// What a block's check cost and found.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Checked {
    /// Pages read (pagemap said they may hold data, or pagemap could not answer).
    pub read: u64,
    /// Pages that held data and were cleared.
    pub cleared: u64,
}

/// Pagemap reader and its scan buffer, opened on first use; `None` inside once opening
/// failed (every block is then read whole).
#[derive(Default)]
pub(super) struct FreshCheck {
    map: Option<Option<PageMap>>,
    scan: PageScan,
}

impl FreshCheck {
    /// Makes every page of `block` read as zero, clearing those that do not.
    ///
    /// The caller keeps the block mapped (a counted reference) and is the only writer of
    /// its memory (the destination guest does not run while it loads).
    pub(super) fn ensure_zero(&mut self, block: &RamBlock) -> Checked {
        let map = self.map.get_or_insert_with(|| match PageMap::open() {
            Ok(m) => Some(m),
            Err(e) => {
                log::warn!("migration: {e}; destination blocks are checked by reading them");
                None
            }
        });
        let pages = block.len() / PAGE_SIZE;
        let scanned = ramlist::page_size() == PAGE_SIZE
            && map
                .as_mut()
                .is_some_and(|m| match m.scan(block, &mut self.scan) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("migration: {e}; reading block {:?} instead", block.id());
                        false
                    }
                });
        let mut out = Checked::default();
        let mut check = |first: u64, end: u64| {
            for page in first..end {
                let off = (page * PAGE_SIZE) as usize;
                // SAFETY: `page < pages`, so the page lies inside the block's mapping,
                // which the caller keeps mapped; nothing else writes it meanwhile (see
                // the function's contract), so a mutable slice for this call is unique.
                let p = unsafe {
                    std::slice::from_raw_parts_mut(block.host().add(off), PAGE_SIZE as usize)
                };
                out.read += 1;
                if !is_zero(p) {
                    p.fill(0);
                    out.cleared += 1;
                }
            }
        };
        if scanned {
            for run in self.scan.data_runs() {
                check(run.start, run.end.min(pages));
            }
        } else {
            check(0, pages);
        }
        out
    }
}
