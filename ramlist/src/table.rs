//! [`AddrTable`]: the ram_addr → block index that lookups binary-search when the MRU block
//! misses, published under RCU (QEMU walks its list instead; a sorted array answers a
//! random address in a few comparisons with no pointer chasing).

use crate::block::RamBlock;

/// One linked block's ram_addr span.
pub(crate) struct Span {
    start: u64,
    end: u64,
    block: *const RamBlock,
}

/// Spans of every linked block, sorted by start; they never overlap.
pub(crate) struct AddrTable(Box<[Span]>);

// SAFETY: the table only carries pointers to blocks, which are Send + Sync; it is read under
// RCU read guards and dereferenced only while the guard keeps the blocks alive (below).
unsafe impl Send for AddrTable {}
// SAFETY: as above.
unsafe impl Sync for AddrTable {}

impl AddrTable {
    /// An empty table.
    pub(crate) fn empty() -> AddrTable {
        AddrTable(Box::new([]))
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
        AddrTable(spans.into_boxed_slice())
    }

    /// The block holding `ram_addr`.
    ///
    /// A table is published by the writer in the same writer-locked step that links or
    /// unlinks a block, so a table reachable under a guard names only blocks whose memory
    /// is reclaimed after that guard's section (list.rs's reclamation rules): the returned
    /// reference borrows the table, which borrows the guard.
    pub(crate) fn find(&self, ram_addr: u64) -> Option<&RamBlock> {
        let i = self.0.partition_point(|s| s.start <= ram_addr);
        let span = self.0.get(i.checked_sub(1)?)?;
        if ram_addr < span.end {
            // SAFETY: see above: the block outlives the read section this table was
            // loaded in.
            Some(unsafe { &*span.block })
        } else {
            None
        }
    }
}
