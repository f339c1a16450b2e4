//! Fuzzes the loader: any bytes, loaded into a small destination ("ram" 8 pages, "vga" 2
//! pages, hotplug up to 64 KiB per block), must end in `Ok` or a typed error — never a
//! panic, a hang or a write outside a block (the sanitizer and the guard pages around each
//! block catch those).
//!
//! Run: `cd migration/fuzz && cargo +nightly fuzz run load`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::load::{load, AnonymousHotplug, LoadOptions};
use ramlist::RamList;
use std::sync::OnceLock;

/// Fenced host memory for one block: `[PROT_NONE page][len bytes][PROT_NONE page]`,
/// mapped once and never unmapped; returns the address of its first usable byte.
fn fenced(len: usize) -> usize {
    let page = ramlist::page_size() as usize;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + 2 * page,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let base = p as usize + page;
    // SAFETY: the middle of the mapping just made; the guards stay PROT_NONE.
    let r = unsafe { libc::mprotect(base as *mut _, len, libc::PROT_READ | libc::PROT_WRITE) };
    assert_eq!(r, 0);
    base
}

const P: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    static ARENAS: OnceLock<(usize, usize)> = OnceLock::new();
    let (ram_at, vga_at) = *ARENAS.get_or_init(|| (fenced(8 * P as usize), fenced(2 * P as usize)));
    let ram = RamList::new();
    // SAFETY: the arenas stay mapped read-write for the rest of the process, which
    // outlives any block over them; one fuzz input runs at a time.
    unsafe {
        ram.alloc_from_ptr("ram", 8 * P, ram_at as *mut u8, Default::default())
            .unwrap();
        ram.alloc_from_ptr("vga", 2 * P, vga_at as *mut u8, Default::default())
            .unwrap();
    }
    let opts = LoadOptions {
        max_state_len: 4096,
        max_state_total: 16384,
        max_new_block: 64 * 1024,
        pages_per_read_section: 5,
    };
    let _ = load(&ram, data, &mut AnonymousHotplug, &opts);
});
