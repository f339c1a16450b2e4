//! [`AddrTable`]: the ram_addr → block index that lookups use when the MRU block misses,
//! published under RCU (QEMU walks its list instead).
//!
//! Two levels: a direct index and a sorted span array. The direct index maps ram_addr
//! granules to blocks, with the granule the largest power of two that divides every
//! block's offset and length — so a granule lies wholly inside one block or one gap, and
//! a lookup is one shift and one load, with no branch to mispredict on random addresses.
//! Layouts that would need more than [`MAX_INDEX_ENTRIES`] granules (a tiny block far from
//! zero) fall back to binary search over the spans.

use crate::block::RamBlock;

/// The largest direct index built (512 KiB of pointers).
pub(crate) const MAX_INDEX_ENTRIES: u64 = 1 << 16;

/// One linked block's ram_addr span.
struct Span {
    start: u64,
    end: u64,
    block: *const RamBlock,
}

/// The linked blocks' spans, sorted and non-overlapping, and the direct index over them.
pub(crate) struct AddrTable {
    spans: Box<[Span]>,
    /// log2 of the index granule.
    shift: u32,
    /// One entry per granule from ram_addr 0 (null: a gap); empty when not built.
    index: Box<[*const RamBlock]>,
}

// SAFETY: the table only carries pointers to blocks, which are Send + Sync; it is read under
// RCU read guards and dereferenced only while the guard keeps the blocks alive (below).
unsafe impl Send for AddrTable {}
// SAFETY: as above.
unsafe impl Sync for AddrTable {}

impl AddrTable {
    /// An empty table.
    pub(crate) fn empty() -> AddrTable {
        AddrTable {
            spans: Box::new([]),
            shift: 0,
            index: Box::new([]),
        }
    }

    /// The table of `blocks` (the writer's view of the linked blocks).
    pub(crate) fn build<'a>(blocks: impl Iterator<Item = &'a RamBlock>) -> AddrTable {
        let mut spans: Vec<Span> = blocks
            .map(|b| Span {
                start: b.offset(),
                end: b.offset() + b.len(),
                block: b,
            })
            .collect();
        spans.sort_unstable_by_key(|s| s.start);
        let shift = spans
            .iter()
            .map(|s| (s.start | (s.end - s.start)).trailing_zeros())
            .min();
        let end = spans.last().map_or(0, |s| s.end);
        let index = match shift {
            Some(shift) if (end >> shift) <= MAX_INDEX_ENTRIES => {
                let mut index = vec![std::ptr::null::<RamBlock>(); (end >> shift) as usize];
                for s in &spans {
                    for slot in &mut index[(s.start >> shift) as usize..(s.end >> shift) as usize] {
                        *slot = s.block;
                    }
                }
                index
            }
            _ => Vec::new(),
        };
        AddrTable {
            spans: spans.into_boxed_slice(),
            shift: shift.unwrap_or(0),
            index: index.into(),
        }
    }

    /// The block holding `ram_addr`.
    ///
    /// A table is published by the writer in the same writer-locked step that links or
    /// unlinks a block, before an unlinked block goes to call_rcu, so a table reachable
    /// under a guard names only blocks whose memory is reclaimed after that guard's
    /// section (list.rs's reclamation rules): the returned reference borrows the table,
    /// which borrows the guard.
    #[inline]
    pub(crate) fn find(&self, ram_addr: u64) -> Option<&RamBlock> {
        let p = if !self.index.is_empty() {
            *self.index.get((ram_addr >> self.shift) as usize)?
        } else {
            let i = self.spans.partition_point(|s| s.start <= ram_addr);
            let span = self.spans.get(i.checked_sub(1)?)?;
            if ram_addr >= span.end {
                return None;
            }
            span.block
        };
        // SAFETY: see above: the block outlives the read section this table was loaded in.
        unsafe { p.as_ref() }
    }

    /// Whether lookups go through the direct index (for tests).
    #[cfg(test)]
    fn indexed(&self) -> bool {
        !self.index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{page_size, RamList};

    /// Every address of `list` (sampled per page, plus both edges of every block and gap)
    /// resolves through the table exactly as a walk of the list says.
    fn check_against_walk(list: &RamList) {
        let g = rcu::read_lock();
        let table = list.table.load(&g);
        let p = page_size();
        let end = list.last_ram_offset() + 4 * p;
        let mut addr = 0;
        while addr < end {
            for a in [addr, addr + p - 1] {
                let walked = list.blocks(&g).find(|b| b.contains(a)).map(|b| b.id());
                assert_eq!(table.find(a).map(|b| b.id()), walked, "ram_addr {a:#x}");
            }
            addr += p;
        }
    }

    #[test]
    fn the_direct_index_agrees_with_the_list() {
        let p = page_size();
        let list = RamList::new();
        list.alloc("big", 256 * p).unwrap();
        list.alloc("mid", 64 * p).unwrap();
        list.alloc("small", 64 * p).unwrap();
        list.free("mid").unwrap(); // leaves a gap
        {
            let g = rcu::read_lock();
            assert!(list.table.load(&g).indexed());
        }
        check_against_walk(&list);
    }

    #[test]
    fn a_layout_too_fine_for_the_index_falls_back_to_binary_search() {
        let p = page_size();
        let list = RamList::new();
        // A one-page block far from zero would need (offset / page) index entries.
        let big = MAX_INDEX_ENTRIES * p;
        list.alloc("huge", big).unwrap();
        list.alloc("one-page", p).unwrap();
        {
            let g = rcu::read_lock();
            assert!(!list.table.load(&g).indexed());
        }
        check_against_walk(&list);
    }
}
