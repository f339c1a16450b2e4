//! [`RecentWrites`]: the pages a VM's guest wrote since the last dirty-log sync, read
//! without taking them.
//!
//! A migration pass that is about to send a page the guest wrote since the pass began
//! sends it for nothing: the next sync reports it again and the page goes again. QEMU's
//! first pass sends all of RAM this way, the working set included, and sends the working
//! set once more after. With KVM's manual-protect dirty log, `KVM_GET_DIRTY_LOG` only
//! reads the log (nothing is cleared or re-armed until `KVM_CLEAR_DIRTY_LOG`), so a
//! saver can look at what the guest wrote since the last sync
//! ([`KvmRam::peek_dirty_log`](crate::kvm::KvmRam::peek_dirty_log)) and hold those pages
//! back, leaving them marked. This type is that look: per logged range of ram_addr
//! space, one bit per page.

use crate::dirty::PAGE_SIZE;

/// One logged range: `pages` pages from `ram_addr`, bit `i` of `bits` page `i`.
#[derive(Debug, Clone)]
struct Range {
    ram_addr: u64,
    pages: u64,
    bits: Vec<u64>,
}

/// Pages written since the last dirty-log sync, by ram_addr. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct RecentWrites {
    /// Sorted by `ram_addr`, not overlapping.
    ranges: Vec<Range>,
}

impl RecentWrites {
    /// An empty set.
    pub fn new() -> RecentWrites {
        RecentWrites::default()
    }

    /// Adds the log of `pages` pages from `ram_addr` (page-aligned), bit `i` of `bits`
    /// standing for page `i`; bits past `pages` (and words missing from `bits`) count as
    /// clean. A range overlapping one added before is refused (returns false).
    pub fn add(&mut self, ram_addr: u64, pages: u64, mut bits: Vec<u64>) -> bool {
        if !ram_addr.is_multiple_of(PAGE_SIZE) {
            return false;
        }
        let Some(end) = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| ram_addr.checked_add(len))
        else {
            return false;
        };
        let at = self.ranges.partition_point(|r| r.ram_addr < ram_addr);
        let before_ok = at == 0 || {
            let r = &self.ranges[at - 1];
            r.ram_addr + r.pages * PAGE_SIZE <= ram_addr
        };
        let after_ok = self.ranges.get(at).is_none_or(|r| end <= r.ram_addr);
        if !(before_ok && after_ok) {
            return false;
        }
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        bits.truncate(words);
        let full = bits.len() == words;
        if let Some(last) = bits.last_mut() {
            if full && !pages.is_multiple_of(64) {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        self.ranges.insert(
            at,
            Range {
                ram_addr,
                pages,
                bits,
            },
        );
        true
    }

    /// The 64 pages from `ram_addr` (page-aligned): bit `i` set if page `i` was written.
    /// Pages outside every logged range read as not written.
    pub fn word(&self, ram_addr: u64) -> u64 {
        let page = ram_addr / PAGE_SIZE;
        let mut out = 0u64;
        // The ranges that may overlap [page, page + 64): the one holding `page` and those
        // starting after it.
        let from = self
            .ranges
            .partition_point(|r| r.ram_addr / PAGE_SIZE + r.pages <= page);
        for r in &self.ranges[from..] {
            let first = r.ram_addr / PAGE_SIZE;
            if first >= page + 64 {
                break;
            }
            // Bit `i` of the answer is page `page + i`, i.e. page `page + i - first` of r.
            for i in 0..64u64 {
                let Some(p) = (page + i).checked_sub(first) else {
                    continue;
                };
                if p >= r.pages {
                    break;
                }
                let set = r
                    .bits
                    .get((p / 64) as usize)
                    .is_some_and(|w| w & (1 << (p % 64)) != 0);
                if set {
                    out |= 1 << i;
                }
            }
        }
        out
    }

    /// Pages written, over all ranges.
    pub fn count(&self) -> u64 {
        self.ranges
            .iter()
            .flat_map(|r| r.bits.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_line_up_with_pages_across_ranges() {
        let mut r = RecentWrites::new();
        // Range A: 100 pages at page 10, pages 10+0, 10+63, 10+64 and 10+99 written.
        let mut a = vec![0u64; 2];
        a[0] = 1 | (1 << 63);
        a[1] = 1 | (1 << 35);
        assert!(r.add(10 * PAGE_SIZE, 100, a));
        // Range B right after it, page 110 written; a stray bit past its end is dropped.
        assert!(r.add(110 * PAGE_SIZE, 3, vec![1 | (1 << 10)]));
        assert_eq!(r.count(), 5);
        assert_eq!(r.word(0), 1 << 10);
        assert_eq!(r.word(10 * PAGE_SIZE), 1 | (1 << 63));
        // Page 73 is A's page 63; A's 64 and 99 follow, then B's page 0 (page 110).
        assert_eq!(r.word(73 * PAGE_SIZE), 0b11 | (1 << 36) | (1 << 37));
        assert_eq!(r.word(74 * PAGE_SIZE), 1 | (1 << 35) | (1 << 36));
        assert_eq!(r.word(200 * PAGE_SIZE), 0);
        // Overlaps are refused, and so is an unaligned address.
        assert!(!r.add(109 * PAGE_SIZE, 1, vec![1]));
        assert!(!r.add(5 * PAGE_SIZE, 6, vec![1]));
        assert!(!r.add(1, 1, vec![1]));
        assert!(r.add(5 * PAGE_SIZE, 5, vec![0]));
    }
}
