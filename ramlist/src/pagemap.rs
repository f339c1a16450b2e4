//! Which pages of a block the guest ever wrote, from `/proc/self/pagemap`: migration's
//! first pass sends only those (DESIGN.md, "Send only what the guest ever wrote").
//!
//! Reading every page of an untouched 2 GiB block to find the zero ones faults in the
//! shared zero page 512 Ki times (~370 ms here); pagemap answers the same question from
//! the page tables, 8 bytes per page, read in 64 KiB chunks (a few ms). Each page of a
//! private anonymous block is then one of:
//!
//! - **absent**: no page behind it (never touched, or discarded). It reads as zero, and so
//!   does the destination's fresh mapping: nothing to send, nothing to check.
//! - **known zero**: it maps the shared zero page (it was only ever read). Present in the
//!   page table, not exclusively mapped (bit 56 clear) — and its PFN is the zero page's.
//!   Bit 56 alone is not enough: a page shared copy-on-write with a forked child, or
//!   merged by KSM, is present, not exclusive, and holds data. So the zero page's PFNs are
//!   learnt once by reading fresh memory of our own (the 4 KiB zero page, and the 2 MiB
//!   huge zero page where THP maps it); PFNs read as 0 without CAP_SYS_ADMIN, and then no
//!   page is known zero: such pages are counted as data, and the saver's zero check finds
//!   them (slower, never wrong).
//! - **data**: present otherwise, or swapped out (bit 62: a swapped page still holds data,
//!   which is why mincore is not enough). To be read and sent (or sent as a zero page).
//!
//! Verified on this machine's kernel (6.18): fresh anonymous memory reads 0 (absent);
//! after a read its entry is present with bit 56 clear and the zero page's PFN; after a
//! write, present with bit 56 set; a read in an `MADV_HUGEPAGE` region maps the huge zero
//! page (PFNs base..base+511, bit 61 set).
//!
//! Shared mappings (anonymous shared memory is a shmem file) and fd- or pointer-backed
//! blocks may hold data the page table does not show (written through another mapping or
//! another process, or paged out of the file): for them the answer is "every page may have
//! data". The answer is a snapshot: take it after dirty logging is on, so a page written
//! after the scan is in the next dirty pass.

use crate::block::{page_size, Backing, RamBlock};
use crate::RamError;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

/// Entries read per `pread`: 64 KiB of pagemap, 32 MiB of 4 KiB pages.
pub const ENTRIES_PER_READ: usize = 8192;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const EXCLUSIVE: u64 = 1 << 56;
/// The page is a file page (or shared anonymous): for a private mapping of a file, one
/// the process has not written (a write makes a private anonymous copy).
const FILE_PAGE: u64 = 1 << 61;
const PFN_MASK: u64 = (1 << 55) - 1;
/// 4 KiB pages in a 2 MiB huge zero page.
const HUGE_ZERO_PAGES: u64 = 512;

/// What one pagemap entry says about its page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// No page behind it: reads as zero, never written (or discarded since).
    Absent,
    /// It maps the shared zero page: reads as zero.
    Zero,
    /// A page that may hold data (present, or swapped out).
    Data,
}

/// The zero page's PFNs, learnt from pages of our own mapped read-only-touched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroPfns {
    /// The 4 KiB zero page's PFN (None: PFNs are hidden from us).
    pub small: Option<u64>,
    /// The first PFN of the 2 MiB huge zero page, when THP maps it.
    pub huge: Option<u64>,
}

impl ZeroPfns {
    /// What pagemap entry `entry` says about its page.
    #[inline]
    pub fn classify(&self, entry: u64) -> PageState {
        if entry & PRESENT == 0 {
            return if entry & SWAPPED != 0 {
                PageState::Data
            } else {
                PageState::Absent
            };
        }
        let pfn = entry & PFN_MASK;
        let zero = entry & EXCLUSIVE == 0
            && pfn != 0
            && (self.small == Some(pfn)
                || self
                    .huge
                    .is_some_and(|h| pfn.wrapping_sub(h) < HUGE_ZERO_PAGES));
        if zero {
            PageState::Zero
        } else {
            PageState::Data
        }
    }
}

/// The answer for one block: per page, whether it may hold data and whether it is known
/// zero, as bitmaps (bit `i % 64` of word `i / 64` for page `i` of the block). Reused from
/// one scan to the next: it allocates only when a block is larger than any before.
#[derive(Clone, Debug, Default)]
pub struct PageScan {
    pages: u64,
    exact: bool,
    data: Vec<u64>,
    zero: Vec<u64>,
    data_pages: u64,
    zero_pages: u64,
}

impl PageScan {
    /// An empty answer, to pass to [`PageMap::scan`].
    pub fn new() -> PageScan {
        PageScan::default()
    }

    fn reset(&mut self, pages: u64, exact: bool) {
        let words = pages.div_ceil(64) as usize;
        self.pages = pages;
        self.exact = exact;
        self.data.clear();
        self.zero.clear();
        if exact {
            self.data.resize(words, 0);
        } else {
            self.data.resize(words, !0);
            if !pages.is_multiple_of(64) {
                self.data[words - 1] = (1 << (pages % 64)) - 1;
            }
        }
        self.zero.resize(words, 0);
        self.data_pages = if exact { 0 } else { pages };
        self.zero_pages = 0;
    }

    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// False when the block is not private anonymous memory, so every page was reported
    /// as possibly holding data.
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// Bitmap of the pages that may hold data: the ones to read and send.
    pub fn data_words(&self) -> &[u64] {
        &self.data
    }

    /// Bitmap of the pages known to be zero (they map the zero page).
    pub fn zero_words(&self) -> &[u64] {
        &self.zero
    }

    /// How many pages may hold data.
    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// How many pages are known zero.
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }

    /// How many pages have nothing behind them.
    pub fn absent_pages(&self) -> u64 {
        self.pages - self.data_pages - self.zero_pages
    }

    /// What the scan found for block page `page` (`None` past the block's end).
    pub fn state(&self, page: u64) -> Option<PageState> {
        if page >= self.pages {
            return None;
        }
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        Some(if self.data[w] & bit != 0 {
            PageState::Data
        } else if self.zero[w] & bit != 0 {
            PageState::Zero
        } else {
            PageState::Absent
        })
    }

    /// The runs of consecutive pages that may hold data, in order: what a first pass sends.
    pub fn data_runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut page = 0u64;
        std::iter::from_fn(move || {
            let start = next_set(&self.data, page, self.pages)?;
            let end = next_clear(&self.data, start, self.pages);
            page = end;
            Some(start..end)
        })
    }
}

/// The first set bit at or after `from` (below `limit`).
fn next_set(words: &[u64], from: u64, limit: u64) -> Option<u64> {
    let mut i = from;
    while i < limit {
        let w = words[(i / 64) as usize] & (!0u64 << (i % 64));
        if w != 0 {
            let found = i - i % 64 + u64::from(w.trailing_zeros());
            return (found < limit).then_some(found);
        }
        i = i - i % 64 + 64;
    }
    None
}

/// The first clear bit at or after `from`, or `limit`.
fn next_clear(words: &[u64], from: u64, limit: u64) -> u64 {
    let mut i = from;
    while i < limit {
        let w = !words[(i / 64) as usize] & (!0u64 << (i % 64));
        if w != 0 {
            return (i - i % 64 + u64::from(w.trailing_zeros())).min(limit);
        }
        i = i - i % 64 + 64;
    }
    limit
}

/// A private anonymous mapping of ours, read once so it maps the zero page; unmapped on
/// drop. Kept for the reader's life so the huge zero page (freed by the kernel when no
/// one maps it) keeps its PFN.
struct ZeroProbe {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the probe owns its mapping and only reads it; any thread may unmap it.
unsafe impl Send for ZeroProbe {}

impl ZeroProbe {
    fn map(len: usize) -> io::Result<ZeroProbe> {
        // SAFETY: a fresh private mapping at an address of the kernel's choosing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(ZeroProbe { addr, len })
    }

    /// Reads the byte at `off`, which maps the zero page there.
    fn touch(&self, off: usize) -> *const u8 {
        assert!(off < self.len);
        let p = self.addr.as_ptr().wrapping_add(off);
        // SAFETY: `p` lies inside our own readable mapping.
        unsafe { p.read_volatile() };
        p
    }
}

impl Drop for ZeroProbe {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours alone and nothing borrows it.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// A reader of this process's pagemap, with its buffer and the zero page's PFNs. One per
/// migration; [`scan`](Self::scan) a block at a time.
pub struct PageMap {
    file: File,
    buf: Box<[u64]>,
    zero: ZeroPfns,
    _probes: Vec<ZeroProbe>,
}

impl PageMap {
    /// Opens `/proc/self/pagemap` and learns the zero page's PFNs.
    pub fn open() -> Result<PageMap, RamError> {
        let file = File::open("/proc/self/pagemap")
            .map_err(|source| RamError::Pagemap { id: None, source })?;
        let mut map = PageMap {
            file,
            buf: vec![0u64; ENTRIES_PER_READ].into_boxed_slice(),
            zero: ZeroPfns::default(),
            _probes: Vec::new(),
        };
        map.learn_zero_pfns()
            .map_err(|source| RamError::Pagemap { id: None, source })?;
        Ok(map)
    }

    /// The zero page's PFNs as learnt (both `None` when PFNs are hidden from us).
    pub fn zero_pfns(&self) -> ZeroPfns {
        self.zero
    }

    fn entry(&self, addr: *const u8) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.file
            .read_exact_at(&mut b, addr as u64 / page_size() * 8)?;
        Ok(u64::from_ne_bytes(b))
    }

    fn learn_zero_pfns(&mut self) -> io::Result<()> {
        let pfn_of_zero = |e: u64| (e & PRESENT != 0 && e & EXCLUSIVE == 0).then_some(e & PFN_MASK);
        // One page: a VMA too small for a huge page maps the 4 KiB zero page.
        let small = ZeroProbe::map(page_size() as usize)?;
        let e = self.entry(small.touch(0))?;
        self.zero.small = pfn_of_zero(e).filter(|&pfn| pfn != 0);
        self._probes.push(small);
        if self.zero.small.is_none() {
            return Ok(());
        }
        // A 2 MiB-aligned region asking for huge pages maps the huge zero page, if THP
        // offers it; otherwise it maps the small one again.
        const HUGE: usize = 2 << 20;
        let huge = ZeroProbe::map(2 * HUGE)?;
        let start = huge.addr.as_ptr() as usize;
        let off = start.next_multiple_of(HUGE) - start;
        // SAFETY: advice on a range of our own mapping; a refusal only means no THP.
        unsafe {
            libc::madvise(
                huge.addr.as_ptr().add(off).cast(),
                HUGE,
                libc::MADV_HUGEPAGE,
            )
        };
        let e = self.entry(huge.touch(off))?;
        if let Some(pfn) = pfn_of_zero(e).filter(|&p| p != 0 && Some(p) != self.zero.small) {
            if pfn % HUGE_ZERO_PAGES == 0 {
                self.zero.huge = Some(pfn);
            }
        }
        self._probes.push(huge);
        Ok(())
    }

    /// Whether [`scan`](Self::scan) knows which pages of `block` hold data: private
    /// anonymous memory (from the page tables), or a file on tmpfs, a memfd among them
    /// (from the file's own holes: `SEEK_DATA`/`SEEK_HOLE`, which count swapped-out pages
    /// as data). Any other block has every page reported as possibly holding data.
    pub fn answers_for(block: &RamBlock) -> bool {
        match block.backing() {
            Backing::Anonymous => !block.is_shared(),
            // A shared file on tmpfs: its holes. A private mapping of a file (a snapshot
            // restored copy-on-write): the file's holes say nothing of the pages written
            // here (copied on write, out of the file's sight), so its data extents and
            // this process's private copies together.
            Backing::Fd { .. } if block.is_shared() => block.fd().is_some_and(on_tmpfs),
            Backing::Fd { .. } => block.fd().is_some(),
            Backing::HostPtr => false,
        }
    }

    /// Fills `out` with what the page tables say about each page of `block`. The caller
    /// holds the block (a read guard or a counted reference), so its range stays mapped.
    pub fn scan(&mut self, block: &RamBlock, out: &mut PageScan) -> Result<(), RamError> {
        let page = page_size();
        let pages = block.len() / page;
        if let (Backing::Fd { offset, .. }, false, Some(fd)) =
            (block.backing(), block.is_shared(), block.fd())
        {
            self.scan_private_copies(block, out)?;
            scan_file(fd, offset, block.len(), page, out).map_err(|source| RamError::Pagemap {
                id: Some(block.id().to_string()),
                source,
            })?;
            out.data_pages = out.data.iter().map(|w| u64::from(w.count_ones())).sum();
            return Ok(());
        }
        if let (Backing::Fd { offset, .. }, true) = (block.backing(), block.is_shared()) {
            if let Some(fd) = block.fd().filter(|fd| on_tmpfs(*fd)) {
                out.reset(pages, true);
                return scan_file(fd, offset, block.len(), page, out).map_err(|source| {
                    RamError::Pagemap {
                        id: Some(block.id().to_string()),
                        source,
                    }
                });
            }
        }
        let exact = Self::answers_for(block);
        out.reset(pages, exact);
        if !exact {
            return Ok(());
        }
        let first = block.host() as u64 / page;
        let zero = self.zero;
        let (mut data_pages, mut zero_pages) = (0u64, 0u64);
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(ENTRIES_PER_READ as u64) as usize;
            let buf = &mut self.buf[..n];
            read_entries(&self.file, buf, (first + done) * 8).map_err(|source| {
                RamError::Pagemap {
                    id: Some(block.id().to_string()),
                    source,
                }
            })?;
            // `done` is a multiple of ENTRIES_PER_READ, hence of 64: words line up.
            for (k, group) in buf.chunks(64).enumerate() {
                if group.iter().all(|&e| e == 0) {
                    continue; // nothing behind 64 pages: the common case of untouched RAM
                }
                let (mut d, mut z) = (0u64, 0u64);
                for (i, &e) in group.iter().enumerate() {
                    match zero.classify(e) {
                        PageState::Absent => {}
                        PageState::Zero => z |= 1 << i,
                        PageState::Data => d |= 1 << i,
                    }
                }
                let w = (done / 64) as usize + k;
                out.data[w] = d;
                out.zero[w] = z;
                data_pages += u64::from(d.count_ones());
                zero_pages += u64::from(z.count_ones());
            }
            done += n as u64;
        }
        out.data_pages = data_pages;
        out.zero_pages = zero_pages;
        Ok(())
    }

    /// For a block that maps a file privately (copy on write: a snapshot restored by
    /// mapping), the pages this process wrote since it mapped the file: each write made a
    /// private anonymous copy, present without the file bit (61), or swapped out (only
    /// anonymous pages swap). Every other page is still the file's. Fills `out` exactly
    /// (the copies as data); fails for any other block.
    pub fn scan_private_copies(
        &mut self,
        block: &RamBlock,
        out: &mut PageScan,
    ) -> Result<(), RamError> {
        let page = page_size();
        let err = |source| RamError::Pagemap {
            id: Some(block.id().to_string()),
            source,
        };
        if !matches!(block.backing(), Backing::Fd { .. }) || block.is_shared() {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a private mapping of a file",
            )));
        }
        let pages = block.len() / page;
        out.reset(pages, true);
        let first = block.host() as u64 / page;
        let mut copies = 0u64;
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(ENTRIES_PER_READ as u64) as usize;
            let buf = &mut self.buf[..n];
            read_entries(&self.file, buf, (first + done) * 8).map_err(err)?;
            for (k, group) in buf.chunks(64).enumerate() {
                let mut d = 0u64;
                for (i, &e) in group.iter().enumerate() {
                    let copy = (e & PRESENT != 0 && e & FILE_PAGE == 0) || e & SWAPPED != 0;
                    if copy {
                        d |= 1 << i;
                    }
                }
                out.data[(done / 64) as usize + k] = d;
                copies += u64::from(d.count_ones());
            }
            done += n as u64;
        }
        out.data_pages = copies;
        Ok(())
    }
}

/// Whether `fd` is a file on tmpfs (memfds are): its holes are exactly the pages never
/// written (or faulted in), and `SEEK_DATA` finds the rest without touching a page.
fn on_tmpfs(fd: BorrowedFd<'_>) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `fd` is open (borrowed for the call); `st` is a writable statfs.
    let r = unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    // f_type is a c_long on some architectures and a c_int on others.
    #[allow(clippy::unnecessary_cast)]
    // SAFETY: fstatfs filled `st` when it returned 0 (only then is it read).
    let tmpfs = r == 0 && unsafe { st.assume_init() }.f_type as i64 == TMPFS_MAGIC;
    tmpfs
}

/// Marks in `out` the pages of the `len` bytes from `offset` in `fd` that are not holes.
fn scan_file(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    page: u64,
    out: &mut PageScan,
) -> io::Result<()> {
    let end = offset + len;
    let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let from = libc::off_t::try_from(from)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
        // SAFETY: lseek on a descriptor `fd` keeps open; no memory is passed.
        let r = unsafe { libc::lseek(fd.as_raw_fd(), from, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or no hole) at or after `from`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut pos = offset;
    let mut data_pages = 0u64;
    while pos < end {
        let Some(data) = seek(pos, libc::SEEK_DATA)?.filter(|&d| d < end) else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let (first, last) = ((data - offset) / page, (hole - offset).div_ceil(page));
        for p in first..last {
            out.data[(p / 64) as usize] |= 1 << (p % 64);
        }
        data_pages += last - first;
        pos = hole.max(data + 1);
    }
    out.data_pages = data_pages;
    Ok(())
}

/// Fills `buf` with the pagemap entries from byte `offset`, in as many reads as it takes.
fn read_entries(file: &File, buf: &mut [u64], offset: u64) -> io::Result<()> {
    // SAFETY: any bytes are valid u64s; the byte view covers exactly `buf`.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(buf))
    };
    file.read_exact_at(bytes, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_classified_by_presence_swap_and_zero_pfn() {
        let z = ZeroPfns {
            small: Some(0x3b34),
            huge: Some(0x42c000),
        };
        assert_eq!(z.classify(0), PageState::Absent);
        assert_eq!(z.classify(SWAPPED | 0x1234), PageState::Data, "swapped");
        assert_eq!(z.classify(PRESENT | EXCLUSIVE | 0x999), PageState::Data);
        assert_eq!(z.classify(PRESENT | 0x3b34), PageState::Zero);
        assert_eq!(z.classify(PRESENT | (1 << 61) | 0x42c000), PageState::Zero);
        assert_eq!(z.classify(PRESENT | (1 << 61) | 0x42c1ff), PageState::Zero);
        assert_eq!(z.classify(PRESENT | 0x42c200), PageState::Data);
        // Shared and not exclusive, but not the zero page: COW after fork, or KSM.
        assert_eq!(z.classify(PRESENT | 0x5555), PageState::Data);
        // PFNs hidden: nothing is known zero.
        let hidden = ZeroPfns::default();
        assert_eq!(hidden.classify(PRESENT), PageState::Data);
        assert_eq!(hidden.classify(PRESENT | 0x3b34), PageState::Data);
        assert_eq!(hidden.classify(0), PageState::Absent);
    }

    /// A memfd block: the pages written (through the block's mapping) are data, the rest
    /// holes, found without touching them; a partly written page counts whole.
    #[test]
    fn a_memfd_block_is_answered_from_its_holes() {
        use crate::{RamBlockOptions, RamList};
        use std::os::fd::{AsFd, FromRawFd, OwnedFd};
        let page = page_size();
        let name = std::ffi::CString::new("pagemap-test").unwrap();
        // SAFETY: a valid name and flags; a new descriptor comes back.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().unwrap())
            .set_len(256 * page)
            .unwrap();
        let ram = RamList::new();
        ram.alloc_from_fd("m", 256 * page, fd.as_fd(), 0, RamBlockOptions::default())
            .unwrap();
        let g = rcu::read_lock();
        let b = ram.block_by_id(&g, "m").unwrap();
        for p in [0u64, 3, 64, 65, 200] {
            // SAFETY: inside the block, which the guard keeps mapped; nothing else writes.
            unsafe { *b.host().add((p * page + 7) as usize) = 1 };
        }
        assert!(PageMap::answers_for(b));
        let mut map = PageMap::open().unwrap();
        let mut scan = PageScan::new();
        map.scan(b, &mut scan).unwrap();
        assert!(scan.is_exact());
        let runs: Vec<_> = scan.data_runs().collect();
        assert_eq!(runs, vec![0..1, 3..4, 64..66, 200..201]);
        assert_eq!(scan.data_pages(), 5);
        assert_eq!(scan.absent_pages(), 251);
    }

    /// A memfd mapped private (a snapshot restored copy-on-write): a page written through
    /// the mapping goes to a private copy, the file keeps its hole there, so the file's
    /// holes alone cannot answer for the block: its data and the private copies together.
    #[test]
    fn a_private_mapping_of_a_memfd_is_not_answered_from_its_holes() {
        use crate::{RamBlockOptions, RamList};
        use std::os::fd::{AsFd, FromRawFd, OwnedFd};
        let page = page_size();
        let name = std::ffi::CString::new("pagemap-private").unwrap();
        // SAFETY: a valid name and flags; a new descriptor comes back.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().unwrap())
            .set_len(64 * page)
            .unwrap();
        let ram = RamList::new();
        ram.alloc_private_from_fd("p", 64 * page, fd.as_fd(), 0, RamBlockOptions::default())
            .unwrap();
        let g = rcu::read_lock();
        let b = ram.block_by_id(&g, "p").unwrap();
        assert!(!b.is_shared());
        // SAFETY: inside the block, which the guard keeps mapped; nothing else writes.
        unsafe { *b.host().add((9 * page) as usize) = 1 };
        // SAFETY: as above; a read of a hole of the file.
        let read = unsafe { b.host().add((20 * page) as usize).read_volatile() };
        assert_eq!(read, 0);
        // The file's data (page 30, written to the file itself) and the page written
        // through the mapping, not the hole only read.
        std::os::unix::fs::FileExt::write_all_at(
            &File::from(fd.try_clone().unwrap()),
            &[5],
            30 * page,
        )
        .unwrap();
        assert!(PageMap::answers_for(b));
        let mut map = PageMap::open().unwrap();
        let mut scan = PageScan::new();
        map.scan(b, &mut scan).unwrap();
        assert!(scan.is_exact());
        // (Page 20, only read, is data too on tmpfs: a read fault there allocates the
        // file's page. Any other file system leaves it a hole.)
        let pages: Vec<u64> = scan.data_runs().flatten().collect();
        assert!(pages.contains(&9) && pages.contains(&30), "{pages:?}");
        assert!(pages.iter().all(|p| [9, 20, 30].contains(p)), "{pages:?}");
        // Its private copies are exactly the page written, not the page only read.
        map.scan_private_copies(b, &mut scan).unwrap();
        assert_eq!(scan.data_runs().collect::<Vec<_>>(), vec![9..10]);
    }

    #[test]
    fn runs_cover_the_data_bitmap() {
        let mut s = PageScan::new();
        s.reset(200, true);
        for p in [0u64, 1, 2, 63, 64, 65, 130, 199] {
            s.data[(p / 64) as usize] |= 1 << (p % 64);
        }
        let runs: Vec<_> = s.data_runs().collect();
        assert_eq!(runs, [0..3, 63..66, 130..131, 199..200]);
        s.reset(130, false);
        assert_eq!(s.data_runs().collect::<Vec<_>>(), vec![0..130]);
        assert_eq!((s.data_pages(), s.absent_pages()), (130, 0));
        assert_eq!(s.data_words()[2], 0b11);
    }
}
