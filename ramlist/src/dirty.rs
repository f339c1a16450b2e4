//! Dirty-page bitmaps, one per client (migration, display, code), indexed by ram_addr page.
//!
//! QEMU keeps `ram_list.dirty_memory[client]` as an RCU-protected array of pointers to
//! fixed-size bitmap blocks (`DirtyMemoryBlocks`). Growing the RAM space copies the small
//! pointer array and publishes it; the bits themselves never move. That is what this module
//! does with [`rcu::RcuArray`] of `Arc`'d chunks: a reader (a vCPU thread marking a page, the
//! migration thread clearing one) loads the current pointer array under a read guard and
//! works on the chunk with atomic word operations, so a grow never blocks it, and a bit set
//! through an old copy of the pointer array lands in a chunk the new copy shares — it is
//! never lost.
//!
//! Ordering: whoever changes guest memory writes the page first and marks it afterwards
//! (a `Release` OR); whoever sends it clears the bit first (an `AcqRel` AND) and reads the
//! page afterwards. A write that races with a send is therefore either seen by the read or
//! leaves its bit set for the next pass.

use crate::block::RamBlock;
pub use crate::block::{page_shift, page_size};
pub use crate::recent::RecentWrites;
use crate::RamError;
use rcu::RcuArray;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::Arc;

/// log2 of x86's 4 KiB page. The bitmaps count in the host's page size
/// ([`page_size`], [`DirtyMemory::page_size`]), which KVM logs in; this constant equals it
/// on x86-64 only and stays for code written for x86 — prefer [`page_shift`].
pub const PAGE_SHIFT: u32 = 12;
/// x86's 4 KiB page; see [`PAGE_SHIFT`] — prefer [`page_size`].
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Pages per bitmap chunk: 256 Ki pages, i.e. 1 GiB of RAM in a 32 KiB chunk. A grow adds
/// whole chunks, so the pointer array stays tiny (four entries for 4 GiB).
pub const CHUNK_PAGES: u64 = 1 << 18;
const CHUNK_WORDS: usize = (CHUNK_PAGES / 64) as usize;

/// Who a dirty bit is for. Each client clears its own bits without disturbing the others:
/// migration resending a page must not hide that page from the display, say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DirtyClient {
    /// Live migration: pages to (re)send.
    Migration,
    /// A display device: framebuffer pages to redraw.
    Vga,
    /// Translated-code invalidation (kept for QEMU's shape; KVM guests do not need it).
    Code,
}

impl DirtyClient {
    /// Every client, in bitmap order.
    pub const ALL: [DirtyClient; 3] = [DirtyClient::Migration, DirtyClient::Vga, DirtyClient::Code];
    /// The clients KVM's dirty log feeds: as in QEMU, translated-code invalidation only
    /// serves TCG, so a KVM guest's writes skip the Code bitmap.
    pub const KVM: [DirtyClient; 2] = [DirtyClient::Migration, DirtyClient::Vga];

    fn index(self) -> usize {
        match self {
            DirtyClient::Migration => 0,
            DirtyClient::Vga => 1,
            DirtyClient::Code => 2,
        }
    }
}

/// One fixed-size piece of a client's bitmap, shared by every copy of the pointer array.
type Chunk = Arc<[AtomicU64]>;

fn new_chunk() -> Chunk {
    (0..CHUNK_WORDS).map(|_| AtomicU64::new(0)).collect()
}

/// The dirty bitmaps of one VM's RAM space, per client, growable while in use.
///
/// Pages beyond the grown size (see [`DirtyMemory::grow_to`]) are ignored by every
/// operation: the RAM list grows the bitmaps before it links a block there, so a page
/// outside them belongs to no block.
pub struct DirtyMemory {
    clients: [RcuArray<Chunk>; 3],
    /// log2 of the page size one bit stands for.
    shift: u32,
}

impl Default for DirtyMemory {
    fn default() -> Self {
        DirtyMemory::new()
    }
}

impl std::fmt::Debug for DirtyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyMemory")
            .field("pages", &self.pages())
            .field("page_size", &self.page_size())
            .finish()
    }
}

/// A half-open range of page numbers.
#[derive(Clone, Copy)]
struct Pages {
    first: u64,
    end: u64,
}

impl Pages {
    /// The pages of `1 << shift` bytes touched by `len` bytes at `ram_addr`, clipped to
    /// `limit` pages.
    fn of(ram_addr: u64, len: u64, shift: u32, limit: u64) -> Pages {
        if len == 0 {
            return Pages { first: 0, end: 0 };
        }
        let first = ram_addr >> shift;
        let last = ram_addr.saturating_add(len - 1) >> shift;
        Pages {
            first,
            end: (last + 1).min(limit),
        }
    }

    /// Calls `f(word, mask, first_page_of_word)` for every bitmap word the range touches,
    /// with `mask` selecting the range's bits in it.
    fn for_each_word(self, chunks: &[Chunk], mut f: impl FnMut(&AtomicU64, u64, u64)) {
        let mut page = self.first;
        while page < self.end {
            let base = page & !63;
            let lo = page - base;
            let hi = (self.end - base).min(64);
            let mask = if hi - lo == 64 {
                !0
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let word = (page >> 6) as usize;
            f(&chunks[word / CHUNK_WORDS][word % CHUNK_WORDS], mask, base);
            page = base + 64;
        }
    }
}

/// Up to 64 dirty pages of one block, taken together: bit `i` of `bits` stands for page
/// `first_page + i` of the block (page 0 at the block's offset). `first_page` is a
/// multiple of 64, and `bits` has no bit past the block's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyWord {
    /// The block page of bit 0.
    pub first_page: u64,
    /// One bit per page, set for a page that was dirty (and is now taken).
    pub bits: u64,
}

impl DirtyWord {
    /// The block pages this word took, in increasing order.
    pub fn pages(self) -> impl Iterator<Item = u64> {
        let mut bits = self.bits;
        std::iter::from_fn(move || {
            let i = bits.trailing_zeros();
            (bits != 0).then(|| {
                bits &= bits - 1;
                self.first_page + u64::from(i)
            })
        })
    }

    /// How many pages it took.
    pub fn count(self) -> u32 {
        self.bits.count_ones()
    }
}

/// Calls `f` with the page number of every set bit of `bits`, `base` being bit 0's page.
#[inline]
fn for_each_bit(mut bits: u64, base: u64, f: &mut impl FnMut(u64)) {
    if bits == !0 {
        // A fully dirty word (a first pass, a busy guest): a plain loop the compiler can
        // unroll, instead of a bit scan per page.
        (base..base + 64).for_each(f);
        return;
    }
    while bits != 0 {
        f(base + u64::from(bits.trailing_zeros()));
        bits &= bits - 1;
    }
}

impl DirtyMemory {
    /// Empty bitmaps covering no RAM yet, one bit per host page ([`page_size`]).
    pub fn new() -> DirtyMemory {
        DirtyMemory::with_shift(page_shift())
    }

    /// Empty bitmaps with one bit per `page` bytes (a power of two of at least 512 bytes):
    /// for a guest whose dirty log counts in another page size than the host's.
    pub fn with_page_size(page: u64) -> Result<DirtyMemory, RamError> {
        if !page.is_power_of_two() || page < 512 {
            return Err(RamError::BadPageSize(page));
        }
        Ok(DirtyMemory::with_shift(page.trailing_zeros()))
    }

    fn with_shift(shift: u32) -> DirtyMemory {
        DirtyMemory {
            clients: std::array::from_fn(|_| RcuArray::new(Vec::new())),
            shift,
        }
    }

    /// The bytes one bit stands for.
    pub fn page_size(&self) -> u64 {
        1 << self.shift
    }

    /// Grows every client's bitmap to cover `ram_bytes` of ram_addr space (rounded up to
    /// whole chunks). Never shrinks; concurrent markers and clearers are not blocked and no
    /// bit they set is lost.
    pub fn grow_to(&self, ram_bytes: u64) {
        let pages = ram_bytes.div_ceil(self.page_size());
        let chunks = usize::try_from(pages.div_ceil(CHUNK_PAGES)).unwrap_or(usize::MAX);
        for array in &self.clients {
            array.grow_with(chunks, |_| new_chunk());
        }
    }

    /// Number of pages the bitmaps cover now.
    pub fn pages(&self) -> u64 {
        let guard = rcu::read_lock();
        self.clients[0].load(&guard).len() as u64 * CHUNK_PAGES
    }

    /// Runs `f` with one client's chunks and the page range of `ram_addr, len` clipped to them.
    fn with_range<R>(
        &self,
        client: DirtyClient,
        ram_addr: u64,
        len: u64,
        f: impl FnOnce(&[Chunk], Pages) -> R,
    ) -> R {
        let guard = rcu::read_lock();
        let chunks = self.clients[client.index()].load(&guard);
        let range = Pages::of(ram_addr, len, self.shift, chunks.len() as u64 * CHUNK_PAGES);
        f(chunks, range)
    }

    /// Marks the pages of `len` bytes at `ram_addr` dirty for every client: the VMM wrote
    /// them (call it after the write).
    pub fn mark_dirty(&self, ram_addr: u64, len: u64) {
        for client in DirtyClient::ALL {
            self.mark_dirty_for(client, ram_addr, len);
        }
    }

    /// Marks the pages of `len` bytes at `ram_addr` dirty for one client.
    pub fn mark_dirty_for(&self, client: DirtyClient, ram_addr: u64, len: u64) {
        self.with_range(client, ram_addr, len, |chunks, range| {
            range.for_each_word(chunks, |word, mask, _| {
                word.fetch_or(mask, Release);
            })
        })
    }

    /// Clears one client's bits for `len` bytes at `ram_addr`; returns how many of those
    /// pages were dirty. Read the pages only after this returns.
    pub fn test_and_clear(&self, client: DirtyClient, ram_addr: u64, len: u64) -> u64 {
        self.with_range(client, ram_addr, len, |chunks, range| {
            let mut n = 0u64;
            range.for_each_word(chunks, |word, mask, _| {
                if word.load(Relaxed) & mask != 0 {
                    n += u64::from((word.fetch_and(!mask, AcqRel) & mask).count_ones());
                }
            });
            n
        })
    }

    /// Clears every client's bits for `len` bytes at `ram_addr`: a reclaimed block's span,
    /// before it is handed to a new block.
    pub(crate) fn clear_all(&self, ram_addr: u64, len: u64) {
        for client in DirtyClient::ALL {
            self.with_range(client, ram_addr, len, |chunks, range| {
                range.for_each_word(chunks, |word, mask, _| {
                    if word.load(Relaxed) & mask != 0 {
                        word.fetch_and(!mask, AcqRel);
                    }
                })
            })
        }
    }

    /// Whether the page holding `ram_addr` is dirty for `client`.
    pub fn is_dirty(&self, client: DirtyClient, ram_addr: u64) -> bool {
        self.with_range(client, ram_addr, 1, |chunks, range| {
            let mut dirty = false;
            range.for_each_word(chunks, |word, mask, _| {
                dirty = word.load(Acquire) & mask != 0
            });
            dirty
        })
    }

    /// How many pages of `len` bytes at `ram_addr` are dirty for `client` (a snapshot:
    /// migration's "remaining" figure).
    pub fn count_dirty(&self, client: DirtyClient, ram_addr: u64, len: u64) -> u64 {
        self.with_range(client, ram_addr, len, |chunks, range| {
            let mut n = 0u64;
            range.for_each_word(chunks, |word, mask, _| {
                n += u64::from((word.load(Relaxed) & mask).count_ones());
            });
            n
        })
    }

    /// Clears `client`'s dirty pages in `len` bytes at `ram_addr` and calls `f` with the
    /// ram_addr of each, in increasing order; returns how many there were. Clean words cost
    /// one load and no write, so walking a mostly clean range runs at memory speed.
    ///
    /// `f` runs inside a read section: keep it short (queue the page, do not send it).
    pub fn take_dirty(
        &self,
        client: DirtyClient,
        ram_addr: u64,
        len: u64,
        mut f: impl FnMut(u64),
    ) -> u64 {
        self.with_range(client, ram_addr, len, |chunks, range| {
            let mut n = 0u64;
            let shift = self.shift;
            let mut visit = |page: u64| f(page << shift);
            range.for_each_word(chunks, |word, mask, base| {
                if word.load(Relaxed) & mask == 0 {
                    return;
                }
                let bits = if mask == !0 {
                    word.swap(0, AcqRel)
                } else {
                    word.fetch_and(!mask, AcqRel) & mask
                };
                n += u64::from(bits.count_ones());
                for_each_bit(bits, base, &mut visit);
            });
            n
        })
    }

    /// The bitmap page of `block`'s first page and its page count; refuses a block of
    /// another list (its span there may belong to anything).
    fn block_pages(&self, block: &RamBlock) -> Result<(u64, u64), RamError> {
        if !block.dirty_is(self) {
            return Err(RamError::ForeignBlock(block.id().to_string()));
        }
        let first = block.offset() >> self.shift;
        // Blocks are placed at multiples of 64 pages (`ram_offset_align`): a block's bits
        // start a word, and no other block's bits share its words.
        debug_assert!(first.is_multiple_of(64), "{block:?}");
        Ok((first, block.len() >> self.shift))
    }

    /// Takes (test-and-clears) `client`'s bits of `block` from block page `from_page` on,
    /// a word at a time: returns the first word that had a dirty page, or `None` when the
    /// rest of the block is clean. Clean words cost one load and no write; nothing is
    /// allocated. A migration saver walks a block with it, resuming after the word it got:
    ///
    /// ```
    /// # use ramlist::{RamList, dirty::DirtyClient};
    /// let ram = RamList::new();
    /// ram.alloc("pc.ram", 1 << 20).unwrap(); // new blocks are dirty for every client
    /// let guard = rcu::read_lock();
    /// let block = ram.block_ref(&guard, "pc.ram").unwrap(); // kept across batches
    /// let (mut page, mut sent) = (0, 0);
    /// while let Some(word) = ram.dirty().take_block_word(DirtyClient::Migration, &block, page).unwrap() {
    ///     sent += word.pages().count() as u64; // queue those pages, send after the batch
    ///     page = word.first_page + 64;
    /// }
    /// assert_eq!(sent, (1 << 20) / ramlist::page_size());
    /// ```
    ///
    /// A block stays correct to take from while it is being removed: its span is not given
    /// to another block until it is reclaimed, which a `&RamBlock` (under a guard or a
    /// [`RamBlockRef`](crate::RamBlockRef)) prevents — so the bits taken are this block's,
    /// never a newer block's. A bit of a page before `from_page` in the same word is left.
    ///
    /// # Errors
    /// [`RamError::ForeignBlock`] for a block of another list than these bitmaps'.
    pub fn take_block_word(
        &self,
        client: DirtyClient,
        block: &RamBlock,
        from_page: u64,
    ) -> Result<Option<DirtyWord>, RamError> {
        let (first, pages) = self.block_pages(block)?;
        if from_page >= pages {
            return Ok(None);
        }
        let guard = rcu::read_lock();
        let chunks = self.clients[client.index()].load(&guard);
        let end = (first + pages).min(chunks.len() as u64 * CHUNK_PAGES);
        let mut page = first + from_page;
        while page < end {
            let base = page & !63;
            let mut mask = !0u64 << (page - base);
            if end - base < 64 {
                mask &= (1u64 << (end - base)) - 1;
            }
            let i = (page >> 6) as usize;
            let word = &chunks[i / CHUNK_WORDS][i % CHUNK_WORDS];
            if word.load(Relaxed) & mask != 0 {
                let bits = if mask == !0 {
                    word.swap(0, AcqRel)
                } else {
                    word.fetch_and(!mask, AcqRel) & mask
                };
                if bits != 0 {
                    return Ok(Some(DirtyWord {
                        first_page: base - first,
                        bits,
                    }));
                }
            }
            page = base + 64;
        }
        Ok(None)
    }

    /// Takes (test-and-clears) `client`'s bits of `block` for `out.len()` words from block
    /// page `first_page` (a multiple of 64): `out[k]` bit `i` is block page
    /// `first_page + 64 k + i`. Words past the block's end come back zero. Returns the
    /// number of dirty pages taken. For a saver that takes a fixed chunk per call into a
    /// buffer it reuses; [`take_block_word`](Self::take_block_word) explains why the bits
    /// are the block's own even while it is being removed.
    ///
    /// # Errors
    /// [`RamError::ForeignBlock`] for a block of another list, and
    /// [`RamError::UnalignedPage`] when `first_page` is not a multiple of 64.
    pub fn take_block(
        &self,
        client: DirtyClient,
        block: &RamBlock,
        first_page: u64,
        out: &mut [u64],
    ) -> Result<u64, RamError> {
        let (first, pages) = self.block_pages(block)?;
        if !first_page.is_multiple_of(64) {
            return Err(RamError::UnalignedPage {
                id: block.id().to_string(),
                page: first_page,
            });
        }
        out.fill(0);
        let guard = rcu::read_lock();
        let chunks = self.clients[client.index()].load(&guard);
        let end = (first + pages).min(chunks.len() as u64 * CHUNK_PAGES);
        let mut n = 0u64;
        for (k, slot) in out.iter_mut().enumerate() {
            // Checked all the way: a `first_page` near 2^64 must not wrap around to
            // another block's words.
            let base = match (k as u64)
                .checked_mul(64)
                .and_then(|d| first.checked_add(first_page)?.checked_add(d))
            {
                Some(b) if b < end => b,
                _ => break,
            };
            let mask = if end - base < 64 {
                (1u64 << (end - base)) - 1
            } else {
                !0
            };
            let i = (base >> 6) as usize;
            let word = &chunks[i / CHUNK_WORDS][i % CHUNK_WORDS];
            if word.load(Relaxed) & mask == 0 {
                continue;
            }
            let bits = if mask == !0 {
                word.swap(0, AcqRel)
            } else {
                word.fetch_and(!mask, AcqRel) & mask
            };
            *slot = bits;
            n += u64::from(bits.count_ones());
        }
        Ok(n)
    }

    /// The first ram_addr (page-aligned) at or after `ram_addr` and before `end` whose page
    /// is dirty for `client`, without clearing it: QEMU's `migration_bitmap_find_dirty`.
    pub fn find_next_dirty(&self, client: DirtyClient, ram_addr: u64, end: u64) -> Option<u64> {
        let len = end.checked_sub(ram_addr).filter(|&l| l > 0)?;
        self.with_range(client, ram_addr, len, |chunks, range| {
            let mut page = range.first;
            while page < range.end {
                let base = page & !63;
                let word = (page >> 6) as usize;
                let mut bits = chunks[word / CHUNK_WORDS][word % CHUNK_WORDS].load(Acquire);
                bits &= !0u64 << (page - base);
                if range.end - base < 64 {
                    bits &= (1u64 << (range.end - base)) - 1;
                }
                if bits != 0 {
                    return Some((base + u64::from(bits.trailing_zeros())) << self.shift);
                }
                page = base + 64;
            }
            None
        })
    }

    /// Merges a KVM dirty log (`KVM_GET_DIRTY_LOG`'s little-endian bitmap of a slot, bit
    /// `i` = page `i` of the slot) of `pages` pages into `clients` (usually
    /// [`DirtyClient::KVM`]), the slot's first page being at `ram_addr`. Returns the number
    /// of dirty pages in the log. Source words that are zero cost nothing; an aligned block
    /// costs one OR per word and client.
    pub fn merge_bitmap(
        &self,
        clients: &[DirtyClient],
        ram_addr: u64,
        bitmap: &[u64],
        pages: u64,
    ) -> u64 {
        let guard = rcu::read_lock();
        let mut chosen: [&[Chunk]; 3] = [&[]; 3];
        let mut n = 0;
        for c in DirtyClient::ALL {
            if clients.contains(&c) {
                chosen[n] = self.clients[c.index()].load(&guard);
                n += 1;
            }
        }
        let arrays = &chosen[..n];
        let limit = arrays.iter().map(|a| a.len() as u64).min().unwrap_or(0) * CHUNK_PAGES;
        let first = ram_addr >> self.shift;
        let shift = first % 64;
        let mut total = 0u64;
        let or_word = |page: u64, bits: u64| {
            if bits == 0 || page >= limit {
                return;
            }
            let word = (page >> 6) as usize;
            for chunks in arrays {
                chunks[word / CHUNK_WORDS][word % CHUNK_WORDS].fetch_or(bits, Release);
            }
        };
        for (i, &src) in bitmap.iter().enumerate() {
            let start = i as u64 * 64;
            if start >= pages {
                break;
            }
            let mut bits = src;
            if pages - start < 64 {
                bits &= (1u64 << (pages - start)) - 1;
            }
            if bits == 0 {
                continue;
            }
            let dest = first + start; // the page bit 0 of `bits` stands for
            let kept = if dest >= limit {
                0
            } else if limit - dest < 64 {
                bits & ((1u64 << (limit - dest)) - 1)
            } else {
                bits
            };
            total += u64::from(kept.count_ones());
            let base = dest - shift;
            or_word(base, kept << shift);
            if shift != 0 {
                or_word(base + 64, kept >> (64 - shift));
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicBool;

    const MIB: u64 = 1 << 20;

    fn ps() -> u64 {
        page_size()
    }

    /// One bit per page of the bitmap's own size, whatever the host's: a 16 KiB-page
    /// bitmap counts a 16 KiB write as one page, and hands back 16 KiB-aligned addresses.
    #[test]
    fn bits_count_in_the_bitmaps_page_size() {
        assert!(matches!(
            DirtyMemory::with_page_size(3 << 12),
            Err(RamError::BadPageSize(0x3000))
        ));
        let big = 16 * 1024;
        let d = DirtyMemory::with_page_size(big).unwrap();
        assert_eq!(d.page_size(), big);
        d.grow_to(64 * MIB);
        assert_eq!(
            d.pages(),
            CHUNK_PAGES,
            "one chunk covers 64 MiB of 16 KiB pages"
        );
        d.mark_dirty(3 * big, big);
        d.mark_dirty(70 * big + 5, 1);
        assert_eq!(d.count_dirty(DirtyClient::Migration, 0, 64 * MIB), 2);
        assert_eq!(
            d.find_next_dirty(DirtyClient::Migration, 0, u64::MAX),
            Some(3 * big)
        );
        let mut seen = Vec::new();
        d.take_dirty(DirtyClient::Vga, 0, u64::MAX, |a| seen.push(a));
        assert_eq!(seen, [3 * big, 70 * big]);
        d.merge_bitmap(&[DirtyClient::Code], 64 * big, &[0b101], 3);
        let mut seen = Vec::new();
        d.take_dirty(DirtyClient::Code, 64 * big, 64 * big, |a| seen.push(a));
        assert_eq!(seen, [64 * big, 66 * big, 70 * big]);
        assert_eq!(DirtyMemory::new().page_size(), page_size());
    }

    #[test]
    fn mark_test_and_clear_per_client() {
        let d = DirtyMemory::new();
        d.grow_to(64 * MIB);
        d.mark_dirty(5 * ps() + 17, 2 * ps()); // touches pages 5, 6, 7
        for c in DirtyClient::ALL {
            assert_eq!(d.count_dirty(c, 0, 64 * MIB), 3, "{c:?}");
        }
        assert!(d.is_dirty(DirtyClient::Vga, 7 * ps()));
        assert!(!d.is_dirty(DirtyClient::Vga, 8 * ps()));
        assert_eq!(d.test_and_clear(DirtyClient::Migration, 0, 64 * MIB), 3);
        assert_eq!(d.test_and_clear(DirtyClient::Migration, 0, 64 * MIB), 0);
        assert_eq!(
            d.count_dirty(DirtyClient::Vga, 0, 64 * MIB),
            3,
            "other clients untouched"
        );
        d.mark_dirty_for(DirtyClient::Code, 100 * ps(), 1);
        assert!(!d.is_dirty(DirtyClient::Migration, 100 * ps()));
        assert!(d.is_dirty(DirtyClient::Code, 100 * ps()));
        // Clearing a sub-range leaves the neighbours set.
        assert_eq!(d.test_and_clear(DirtyClient::Vga, 6 * ps(), 1), 1);
        assert!(d.is_dirty(DirtyClient::Vga, 5 * ps()));
        assert!(d.is_dirty(DirtyClient::Vga, 7 * ps()));
    }

    #[test]
    fn ranges_across_words_and_chunks() {
        let d = DirtyMemory::new();
        d.grow_to(3 * CHUNK_PAGES * ps());
        let start = (CHUNK_PAGES - 70) * ps();
        d.mark_dirty_for(DirtyClient::Migration, start, 200 * ps());
        let mut seen = Vec::new();
        let n = d.take_dirty(DirtyClient::Migration, 0, u64::MAX, |a| seen.push(a));
        assert_eq!(n, 200);
        let want: Vec<u64> = (0..200).map(|i| start + i * ps()).collect();
        assert_eq!(seen, want);
        assert_eq!(d.count_dirty(DirtyClient::Migration, 0, u64::MAX), 0);
    }

    #[test]
    fn pages_beyond_the_grown_size_are_ignored() {
        let d = DirtyMemory::new();
        d.mark_dirty(0, ps());
        assert!(!d.is_dirty(DirtyClient::Migration, 0));
        d.grow_to(1);
        assert_eq!(d.pages(), CHUNK_PAGES);
        d.mark_dirty(CHUNK_PAGES * ps() - 1, 2);
        assert_eq!(d.count_dirty(DirtyClient::Migration, 0, u64::MAX), 1);
    }

    #[test]
    fn find_next_dirty_skips_clean_pages_and_respects_end() {
        let d = DirtyMemory::new();
        d.grow_to(CHUNK_PAGES * ps());
        d.mark_dirty(130 * ps(), 1);
        d.mark_dirty(700 * ps(), 1);
        let m = DirtyClient::Migration;
        assert_eq!(d.find_next_dirty(m, 0, u64::MAX), Some(130 * ps()));
        assert_eq!(d.find_next_dirty(m, 131 * ps(), u64::MAX), Some(700 * ps()));
        assert_eq!(d.find_next_dirty(m, 131 * ps(), 700 * ps()), None);
        assert_eq!(d.find_next_dirty(m, 701 * ps(), 700 * ps()), None);
    }

    #[test]
    fn merge_bitmap_aligned_and_shifted() {
        for first_page in [0u64, 64, 3, 61, CHUNK_PAGES - 5] {
            let d = DirtyMemory::new();
            d.grow_to(2 * CHUNK_PAGES * ps());
            // A 130-page slot with pages 0, 63, 64, 100 and 129 dirty, plus junk past its end.
            let log = [1u64 | 1 << 63, 1 | 1 << 36, 1 << 1 | 1 << 40];
            let n = d.merge_bitmap(&DirtyClient::ALL, first_page * ps(), &log, 130);
            assert_eq!(n, 5, "first_page {first_page}");
            for c in DirtyClient::ALL {
                let mut got = BTreeSet::new();
                d.take_dirty(c, 0, u64::MAX, |a| {
                    got.insert((a >> page_shift()) - first_page);
                });
                assert_eq!(
                    got,
                    BTreeSet::from([0, 63, 64, 100, 129]),
                    "{first_page} {c:?}"
                );
            }
        }
    }

    #[test]
    fn take_dirty_reports_full_and_partial_words_in_order() {
        let d = DirtyMemory::new();
        d.grow_to(4 * 64 * ps());
        // Pages 60..200: a partial word, two full words, a partial word.
        d.mark_dirty_for(DirtyClient::Migration, 60 * ps(), 140 * ps());
        let mut seen = Vec::new();
        let n = d.take_dirty(DirtyClient::Migration, 0, u64::MAX, |a| {
            seen.push(a >> page_shift())
        });
        assert_eq!(n, 140);
        assert_eq!(seen, (60..200).collect::<Vec<u64>>());
        assert_eq!(d.count_dirty(DirtyClient::Migration, 0, u64::MAX), 0);
    }

    #[test]
    fn merge_bitmap_clips_to_the_grown_size() {
        let d = DirtyMemory::new();
        d.grow_to(1);
        let n = d.merge_bitmap(&DirtyClient::KVM, (CHUNK_PAGES - 2) * ps(), &[!0u64], 64);
        assert_eq!(n, 2);
        assert_eq!(d.count_dirty(DirtyClient::Vga, 0, u64::MAX), 2);
        assert_eq!(d.count_dirty(DirtyClient::Migration, 0, u64::MAX), 2);
        assert_eq!(
            d.count_dirty(DirtyClient::Code, 0, u64::MAX),
            0,
            "KVM skips Code"
        );
    }

    /// Setters mark pages inside the size grown so far while another thread keeps growing:
    /// every bit must survive the pointer-array copies.
    #[test]
    fn grow_never_loses_a_bit() {
        let d = Arc::new(DirtyMemory::new());
        d.grow_to(ps());
        let grown = Arc::new(AtomicU64::new(d.pages()));
        let done = Arc::new(AtomicBool::new(false));
        let marks = Arc::new(AtomicU64::new(0));
        let setters: Vec<_> = (0..2u64)
            .map(|t| {
                let (d, grown, done, marks) =
                    (d.clone(), grown.clone(), done.clone(), marks.clone());
                std::thread::spawn(move || {
                    let mut marked = Vec::new();
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    let mut after_done = 0;
                    while after_done < 1000 {
                        if done.load(Acquire) {
                            after_done += 1;
                        }
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let page = x % grown.load(Acquire);
                        d.mark_dirty_for(DirtyClient::Migration, page * ps(), 1);
                        marked.push(page);
                        marks.fetch_add(1, Relaxed);
                    }
                    marked
                })
            })
            .collect();
        for step in 2..=24u64 {
            // Let the setters make progress between grows, so they race every one.
            while marks.load(Relaxed) < step * 500 {
                std::thread::yield_now();
            }
            d.grow_to(step * CHUNK_PAGES * ps());
            grown.store(d.pages(), Release);
        }
        done.store(true, Release);
        let mut want = BTreeSet::new();
        for s in setters {
            want.extend(s.join().unwrap());
        }
        assert_eq!(d.pages(), 24 * CHUNK_PAGES);
        let mut got = BTreeSet::new();
        d.take_dirty(DirtyClient::Migration, 0, u64::MAX, |a| {
            got.insert(a >> page_shift());
        });
        assert_eq!(got, want);
    }
}
