//! Helpers shared by the migration tests: destination RAM fenced by guard pages (a write
//! outside a block faults the test), page access through block host pointers, a hotplug
//! over fenced arenas, and a small valid stream to break in every way.
#![allow(dead_code)]

use migration::load::{BlockHotplug, HotplugError, LoadOptions};

/// Returns from the calling test, printing `SKIPPED: no userfaultfd (...)`, when the
/// post-copy destination's userfaultfd cannot be opened.
#[macro_export]
macro_rules! require_uffd {
    () => {
        if let Err(e) = migration::postcopy::uffd::Userfaultfd::open() {
            println!("SKIPPED: no userfaultfd ({e})");
            return;
        }
    };
}
use migration::stream::{StreamWriter, PAGE_SIZE};
use ramlist::{RamBlockOptions, RamList};
use std::sync::Arc;

/// Host memory `[guard page][len bytes][guard page]`, the guards PROT_NONE. Never
/// unmapped: lists built over it may be reclaimed at any later time, and the tests are
/// short-lived processes.
#[derive(Clone, Copy)]
pub struct Arena {
    base: *mut u8,
    pub len: u64,
}

// SAFETY: the arena is plain mapped memory that lives for the rest of the process.
unsafe impl Send for Arena {}
// SAFETY: as above; users of one arena take turns (one loader at a time).
unsafe impl Sync for Arena {}

impl Arena {
    /// A fenced mapping of `len` bytes (a multiple of the page size), filled with `fill`.
    pub fn new(len: u64, fill: u8) -> Arena {
        let page = ramlist::page_size() as usize;
        let total = len as usize + 2 * page;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the middle of the mapping just made; the guards stay PROT_NONE.
        let base = unsafe { p.cast::<u8>().add(page) };
        // SAFETY: as above.
        let r = unsafe {
            libc::mprotect(
                base.cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        assert_eq!(r, 0);
        let a = Arena { base, len };
        a.fill(fill);
        a
    }

    /// Sets every byte of the arena.
    pub fn fill(&self, b: u8) {
        // SAFETY: the arena's own read-write bytes; no loader runs during test setup.
        unsafe { std::ptr::write_bytes(self.base, b, self.len as usize) }
    }

    /// A copy of the arena's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        // SAFETY: the arena's own read-write bytes, read while no loader runs.
        unsafe { std::slice::from_raw_parts(self.base, self.len as usize) }.to_vec()
    }

    /// Makes `id` a block of `ram` over this arena.
    pub fn add_to(&self, ram: &RamList, id: &str) {
        // SAFETY: the arena stays mapped read-write for the rest of the process (never
        // unmapped), which outlives any block over it.
        unsafe {
            ram.alloc_from_ptr(id, self.len, self.base, RamBlockOptions::default())
                .unwrap();
        }
    }
}

/// A destination list whose blocks are `blocks` (id, arena).
pub fn fenced_list(blocks: &[(&str, Arena)]) -> Arc<RamList> {
    let ram = Arc::new(RamList::new());
    for (id, a) in blocks {
        a.add_to(&ram, id);
    }
    ram
}

/// Hotplug over fenced arenas: `add_block` takes the first free arena of the right size
/// (zeroed, as the contract asks), `remove_block` frees the block.
pub struct ArenaHotplug {
    pub pool: Vec<Arena>,
}

impl BlockHotplug for ArenaHotplug {
    fn add_block(&mut self, ram: &RamList, id: &str, len: u64) -> Result<(), HotplugError> {
        let i = self
            .pool
            .iter()
            .position(|a| a.len == len)
            .ok_or("no arena of that size")?;
        let a = self.pool.remove(i);
        a.fill(0);
        a.add_to(ram, id);
        Ok(())
    }

    fn remove_block(&mut self, ram: &RamList, id: &str) -> Result<(), HotplugError> {
        ram.free(id)?;
        Ok(())
    }
}

/// Options for small fenced destinations.
pub fn small_opts() -> LoadOptions {
    LoadOptions {
        max_state_len: 4096,
        max_state_total: 8192,
        max_new_block: 1 << 20,
        pages_per_read_section: 3,
    }
}

/// A page of `b` bytes, except its first byte, which holds `b ^ 0x5a` (so that pages
/// with different fill bytes also differ at their start).
pub fn page_of(b: u8) -> Vec<u8> {
    let mut v = vec![b; PAGE_SIZE as usize];
    v[0] = b ^ 0x5a;
    v
}

/// Writes `data` into block `id` at `off` on a source list and marks it dirty.
pub fn write_block(ram: &RamList, id: &str, off: u64, data: &[u8]) {
    let g = rcu::read_lock();
    let b = ram.block_by_id(&g, id).unwrap();
    assert!(off + data.len() as u64 <= b.len());
    // SAFETY: checked inside the block, which the guard keeps mapped; the test thread is
    // the only one touching this memory now.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.host().add(off as usize), data.len()) };
    ram.dirty().mark_dirty(b.offset() + off, data.len() as u64);
}

/// A copy of block `id` of `ram`.
pub fn read_block(ram: &RamList, id: &str) -> Vec<u8> {
    let g = rcu::read_lock();
    let b = ram.block_by_id(&g, id).unwrap();
    // SAFETY: the whole block, kept mapped by the guard; no loader writes it now.
    unsafe { std::slice::from_raw_parts(b.host(), b.len() as usize) }.to_vec()
}

/// Block sizes of the small destination: "ram" 8 pages, "vga" 2 pages.
pub const RAM_PAGES: u64 = 8;
pub const VGA_PAGES: u64 = 2;
pub const HOT_PAGES: u64 = 2;

/// A small valid stream for the small destination, exercising every record: setup,
/// pages, a run and zero pages with and without CONTINUE across three RAM sections, a block
/// added and one removed, two states, the end marker.
pub fn small_stream() -> Vec<u8> {
    let p = PAGE_SIZE;
    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    w.ram_setup([("ram", RAM_PAGES * p), ("vga", VGA_PAGES * p)].into_iter())
        .unwrap();
    w.begin_ram().unwrap();
    w.page("ram", 0, &page_of(1)).unwrap();
    w.zero_page("ram", p).unwrap();
    w.page_run("ram", 4 * p, &[page_of(5), page_of(6)].concat())
        .unwrap();
    w.zero_page("vga", 0).unwrap();
    w.page("vga", p, &page_of(2)).unwrap();
    w.zero_page("ram", 7 * p).unwrap();
    w.eos().unwrap();
    w.begin_ram().unwrap();
    w.block_add("hot", HOT_PAGES * p).unwrap();
    w.page("hot", p, &page_of(3)).unwrap();
    w.zero_page("hot", 0).unwrap();
    w.block_del("vga").unwrap();
    w.zero_page("ram", 2 * p).unwrap();
    w.zero_page("ram", 3 * p).unwrap();
    w.eos().unwrap();
    w.begin_ram().unwrap();
    w.page("ram", 0, &page_of(4)).unwrap();
    w.eos().unwrap();
    w.state("cpu0", b"registers").unwrap();
    w.state("serial", &[7; 100]).unwrap();
    w.end().unwrap();
    w.into_inner().unwrap()
}

/// The byte ranges of page data in `small_stream`'s layout.
pub fn page_data_ranges(stream: &[u8]) -> Vec<std::ops::Range<usize>> {
    let p = PAGE_SIZE as usize;
    let mut out = Vec::new();
    for b in [1u8, 2, 3, 4, 5, 6] {
        let page = page_of(b);
        if let Some(i) = stream.windows(p).position(|w| w == page.as_slice()) {
            out.push(i..i + p);
        }
    }
    out
}
