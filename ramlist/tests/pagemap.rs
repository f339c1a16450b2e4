//! The "pages ever written" answer from /proc/self/pagemap: absent, known zero and data
//! pages of real blocks, the kernel behaviour it rests on, the blocks it cannot answer for
//! exactly, and its speed on a large untouched block.

use ramlist::pagemap::{PageMap, PageScan, PageState};
use ramlist::{page_size, RamBlock, RamBlockOptions, RamList};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Instant;

const GIB: u64 = 1 << 30;

/// The raw pagemap entry of the page holding `p`.
fn raw_entry(p: *const u8) -> u64 {
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, p as u64 / page_size() * 8).unwrap();
    u64::from_ne_bytes(b)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn page(b: &RamBlock, i: u64) -> *mut u8 {
    b.host().wrapping_add((i * page_size()) as usize)
}

fn scan(b: &RamBlock) -> PageScan {
    let mut out = PageScan::new();
    PageMap::open().unwrap().scan(b, &mut out).unwrap();
    out
}

/// What the module's rules rest on, checked on this kernel: untouched anonymous memory has
/// no entry; a read maps the zero page (present, bit 56 clear, the zero page's PFN when
/// we may see PFNs); a write maps a page of its own (present, bit 56 set).
#[test]
fn the_kernel_reports_pages_as_the_rules_assume() {
    let p = page_size();
    let list = RamList::new();
    list.alloc("probe", 4 * p).unwrap();
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, "probe").unwrap();
    let (fresh, read, written) = (page(b, 0), page(b, 1), page(b, 2));
    // SAFETY: pages of the block, mapped under the guard.
    unsafe {
        read.read_volatile();
        written.write_volatile(1);
    }
    let (e0, e1, e2) = (raw_entry(fresh), raw_entry(read), raw_entry(written));
    println!("pagemap entries: untouched {e0:#018x}, read {e1:#018x}, written {e2:#018x}");
    assert_eq!(e0, 0, "untouched: nothing behind it");
    assert!(
        e1 >> 63 == 1 && e1 >> 56 & 1 == 0,
        "read: present, not exclusive"
    );
    assert!(
        e2 >> 63 == 1 && e2 >> 56 & 1 == 1,
        "written: present, exclusive"
    );
    let pfns = PageMap::open().unwrap().zero_pfns();
    if is_root() {
        assert_eq!(
            pfns.small,
            Some(e1 & ((1 << 55) - 1)),
            "the zero page's PFN"
        );
        assert_ne!(e2 & ((1 << 55) - 1), 0, "PFNs are visible to root");
    } else {
        println!("not root: PFNs hidden, no page is known zero ({pfns:?})");
    }
}

#[test]
fn absent_zero_and_written_pages_of_an_anonymous_block() {
    let p = page_size();
    let list = RamList::new();
    list.alloc("ram", 256 * p).unwrap();
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, "ram").unwrap();
    // SAFETY: pages of the block, mapped under the guard.
    unsafe {
        page(b, 3).read_volatile(); // only read: the zero page
        page(b, 5).write_volatile(1);
        page(b, 7).write_volatile(0); // written, even if with a zero
        page(b, 9).read_volatile();
        page(b, 9).write_volatile(2); // read, then written
        page(b, 200).write_volatile(3);
    }
    let s = scan(b);
    assert!(s.is_exact());
    assert_eq!(s.pages(), 256);
    let zero_known = PageMap::open().unwrap().zero_pfns().small.is_some();
    let (want_data, want_zero) = if zero_known { (4, 1) } else { (5, 0) };
    assert_eq!(
        (s.data_pages(), s.zero_pages(), s.absent_pages()),
        (want_data, want_zero, 256 - 5)
    );
    for (i, want) in [
        (0, PageState::Absent),
        (5, PageState::Data),
        (7, PageState::Data),
        (9, PageState::Data),
        (200, PageState::Data),
        (255, PageState::Absent),
    ] {
        assert_eq!(s.state(i), Some(want), "page {i}");
    }
    if zero_known {
        assert_eq!(s.state(3), Some(PageState::Zero));
        assert_eq!(s.zero_words()[0], 1 << 3);
    }
    assert_eq!(s.state(256), None);
    let runs: Vec<_> = s.data_runs().collect();
    let mut want_runs = vec![5..6, 7..8, 9..10, 200..201];
    if !zero_known {
        want_runs.insert(0, 3..4);
    }
    assert_eq!(runs, want_runs);
    // A discarded page has nothing behind it again (and reads as zero).
    // SAFETY: discarding a page of the block's own private mapping.
    assert_eq!(
        unsafe { libc::madvise(page(b, 5).cast(), p as usize, libc::MADV_DONTNEED) },
        0
    );
    assert_eq!(scan(b).state(5), Some(PageState::Absent));
}

/// Memory another mapping or process may write (shared anonymous memory) holds data the
/// page table need not show: every page may have data. A memfd is answered from the
/// file's holes instead (what pagemap cannot say, the file can).
#[test]
fn shared_blocks_may_have_data_on_every_page_but_a_memfd_has_its_holes() {
    let p = page_size();
    let list = RamList::new();
    let shared = RamBlockOptions {
        shared: true,
        ..Default::default()
    };
    list.alloc_with("shm", 100 * p, shared).unwrap();
    let f = {
        // SAFETY: memfd_create reads the NUL-terminated name only.
        let fd = unsafe { libc::memfd_create(c"pagemap-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    std::fs::File::from(f.try_clone().unwrap())
        .set_len(64 * p)
        .unwrap();
    list.alloc_from_fd("file", 64 * p, f.as_fd(), 0, RamBlockOptions::default())
        .unwrap();
    let g = rcu::read_lock();
    // Shared anonymous memory: pagemap cannot tell, every page may hold data.
    let s = scan(list.block_by_id(&g, "shm").unwrap());
    assert!(!s.is_exact());
    assert_eq!((s.data_pages(), s.absent_pages()), (100, 0));
    assert_eq!(s.data_runs().collect::<Vec<_>>(), vec![0..100]);
    // A memfd (tmpfs): answered from its holes; nothing was written, nothing is data.
    let s = scan(list.block_by_id(&g, "file").unwrap());
    assert!(s.is_exact());
    assert_eq!((s.data_pages(), s.absent_pages()), (0, 64));
}

/// A written page shared copy-on-write with a forked child is present and not exclusively
/// mapped — like the zero page — but holds data: it must not be reported zero.
#[test]
fn a_page_shared_with_a_forked_child_is_data() {
    let p = page_size();
    let list = RamList::new();
    list.alloc("cow", 8 * p).unwrap();
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, "cow").unwrap();
    // SAFETY: a page of the block, mapped under the guard.
    unsafe { page(b, 2).write_volatile(0xab) };
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only calls async-signal-safe functions (close, alarm, read, _exit).
    let child = unsafe { libc::fork() };
    if child == 0 {
        let mut byte = 0u8;
        // SAFETY: closing the child's copy of the write end (so the parent's close ends
        // the read), a watchdog alarm, reading one byte into a local, then leaving.
        unsafe {
            libc::close(fds[1]);
            libc::alarm(30);
            libc::read(fds[0], (&mut byte as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    assert!(child > 0);
    let e = raw_entry(page(b, 2));
    let s = scan(b);
    // SAFETY: closing our pipe ends ends the child's read; then reap it.
    unsafe {
        libc::close(fds[1]);
        libc::close(fds[0]);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    assert_eq!(
        e >> 56 & 1,
        0,
        "shared with the child: not exclusive ({e:#x})"
    );
    assert_eq!(
        s.state(2),
        Some(PageState::Data),
        "a COW-shared page with data"
    );
    assert_eq!((s.data_pages(), s.zero_pages()), (1, 0));
}

/// The measure DESIGN.md quotes: an untouched 2 GiB block is answered in a few ms (reading
/// it would fault in 512 Ki zero pages). Prints the time only; the release figures come
/// from `pagemap_timing` (scripts/bench-ramlist.sh).
#[test]
fn an_untouched_2_gib_block_is_answered_without_touching_it() {
    let list = RamList::new();
    list.alloc("big", 2 * GIB).unwrap();
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, "big").unwrap();
    let mut map = PageMap::open().unwrap();
    let mut out = PageScan::new();
    let t = Instant::now();
    map.scan(b, &mut out).unwrap();
    let took = t.elapsed();
    println!("pagemap: 2 GiB untouched answered in {took:?} (this build's profile)");
    assert_eq!(out.absent_pages(), 2 * GIB / page_size());
    assert_eq!(out.data_runs().count(), 0);
}

/// Release-mode timing for scripts/bench-ramlist.sh: a 2 GiB block untouched, then with
/// every 64th page written, scanned 20 times each (median, min, max), against reading
/// every page of the untouched block once.
#[test]
#[ignore = "timing; run by scripts/bench-ramlist.sh in release mode"]
fn pagemap_timing() {
    let p = page_size();
    let list = RamList::new();
    list.alloc("big", 2 * GIB).unwrap();
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, "big").unwrap();
    let mut map = PageMap::open().unwrap();
    let mut out = PageScan::new();
    let mut measure = |label: &str, out: &mut PageScan| {
        let mut times: Vec<f64> = (0..20)
            .map(|_| {
                let t = Instant::now();
                map.scan(b, out).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "pagemap {label}: median {:.2} ms (min {:.2}, max {:.2}) for 2 GiB; {} data, {} zero, {} absent pages",
            times[10],
            times[0],
            times[19],
            out.data_pages(),
            out.zero_pages(),
            out.absent_pages()
        );
    };
    measure("untouched", &mut out);
    let pages = 2 * GIB / p;
    for i in (0..pages).step_by(64) {
        // SAFETY: a page of the block, mapped under the guard.
        unsafe { page(b, i).write_volatile(1) };
    }
    measure("1/64 written", &mut out);
    drop(g);
    list.alloc("cold", 2 * GIB).unwrap();
    let g = rcu::read_lock();
    let cold = list.block_by_id(&g, "cold").unwrap();
    let t = Instant::now();
    let mut sum = 0u64;
    for i in 0..pages {
        // SAFETY: a page of the block, mapped under the guard.
        sum += u64::from(unsafe { page(cold, i).read_volatile() });
    }
    println!(
        "pagemap baseline: reading every page of 2 GiB untouched took {:.1} ms (sum {sum})",
        t.elapsed().as_secs_f64() * 1e3
    );
}
