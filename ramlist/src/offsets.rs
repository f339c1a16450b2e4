//! Placing blocks in the ram_addr space: QEMU's `find_ram_offset`, the smallest gap that
//! fits, so freed ranges are reused and the space (and the dirty bitmaps indexed by it)
//! stays compact.

use crate::block::page_size;

/// Alignment of block offsets: one 64-bit dirty-bitmap word of pages, so that a block's
/// bits start on a word boundary and KVM's per-slot bitmaps copy in whole words (QEMU
/// rounds candidates up to `BITS_PER_LONG << TARGET_PAGE_BITS` for the same reason).
pub fn ram_offset_align() -> u64 {
    64 * page_size()
}

/// The start of the smallest gap between `blocks` (given as `(offset, len)`, any order)
/// that holds `size` bytes at an aligned offset, or `None` if the u64 range has no room.
///
/// Candidates are 0 and the aligned end of every block; a candidate counts only if no
/// block overlaps it, and its gap runs up to the next block above it (or u64::MAX, which no block may reach past).
pub fn find_ram_offset(blocks: &[(u64, u64)], size: u64) -> Option<u64> {
    let align = ram_offset_align();
    let candidates = std::iter::once(0).chain(
        blocks
            .iter()
            .filter_map(|&(off, len)| off.checked_add(len)?.checked_next_multiple_of(align)),
    );
    let mut best: Option<(u64, u64)> = None; // (gap length, offset)
    for start in candidates {
        if blocks
            .iter()
            .any(|&(off, len)| start >= off && start - off < len)
        {
            continue;
        }
        let next = blocks
            .iter()
            .map(|&(off, _)| off)
            .filter(|&off| off >= start)
            .min();
        // Blocks end at or below u64::MAX (their end must be representable).
        let gap = next.unwrap_or(u64::MAX) - start;
        if gap >= size && best.is_none_or(|(g, _)| gap < g) {
            best = Some((gap, start));
        }
    }
    best.map(|(_, start)| start)
}

/// One past the highest byte any block occupies (QEMU's `last_ram_offset`): the size
/// dirty bitmaps must cover.
pub fn last_ram_offset(blocks: &[(u64, u64)]) -> u64 {
    blocks
        .iter()
        .map(|&(off, len)| off + len)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_space_starts_at_zero() {
        assert_eq!(find_ram_offset(&[], 4096), Some(0));
        assert_eq!(last_ram_offset(&[]), 0);
    }

    #[test]
    fn appends_after_the_last_block_aligned() {
        let a = ram_offset_align();
        let p = page_size();
        assert_eq!(find_ram_offset(&[(0, p)], p), Some(a));
        assert_eq!(find_ram_offset(&[(0, a)], p), Some(a));
        assert_eq!(last_ram_offset(&[(0, a), (a, p)]), a + p);
    }

    #[test]
    fn picks_the_smallest_gap_that_fits() {
        let a = ram_offset_align();
        // Blocks at [0,a) [3a,4a) [6a,8a) [10a,11a): gaps of 2a at a, 2a at 4a, 2a at 8a.
        // Make the gaps differ: [0,a) [4a,5a) [7a,8a): gap 3a at a, 2a at 5a, rest above.
        let blocks = [(0, a), (4 * a, a), (7 * a, a)];
        assert_eq!(find_ram_offset(&blocks, 2 * a), Some(5 * a));
        assert_eq!(find_ram_offset(&blocks, 3 * a), Some(a));
        assert_eq!(find_ram_offset(&blocks, 4 * a), Some(8 * a));
        assert_eq!(find_ram_offset(&blocks, a), Some(5 * a));
    }

    #[test]
    fn reuses_the_gap_at_zero() {
        let a = ram_offset_align();
        assert_eq!(find_ram_offset(&[(2 * a, a)], a), Some(0));
        assert_eq!(find_ram_offset(&[(2 * a, a)], 3 * a), Some(3 * a));
    }

    #[test]
    fn refuses_when_the_space_is_full() {
        let a = ram_offset_align();
        let top = u64::MAX - a + 1; // the last aligned slot: only a - 1 bytes fit there
        assert_eq!(find_ram_offset(&[(0, top - a)], a), Some(top - a));
        assert_eq!(find_ram_offset(&[(0, top - a)], 2 * a), None);
        assert_eq!(find_ram_offset(&[(0, top)], 1), Some(top));
        assert_eq!(find_ram_offset(&[(0, top)], a), None);
    }
}
