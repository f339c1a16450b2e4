//! The RAM list's public behaviour: ordering, placement, lookups, versions, errors, the
//! downgrade idiom and counted references.

use ramlist::dirty::DirtyClient;
use ramlist::{
    page_size, ram_offset_align, Backing, RamBlockOptions, RamError, RamList, MAX_BLOCK_SIZE,
    MAX_ID_LEN,
};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

fn ids(list: &RamList) -> Vec<String> {
    let g = rcu::read_lock();
    list.blocks(&g).map(|b| b.id().to_string()).collect()
}

/// A memfd of `size` bytes with a name unique to this process, to find in /proc/self/maps.
fn memfd(tag: &str, size: u64) -> (OwnedFd, String) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "ramcore-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, SeqCst)
    );
    let cname = std::ffi::CString::new(name.clone()).unwrap();
    // SAFETY: memfd_create reads the NUL-terminated name only.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd.
    assert_eq!(
        unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&fd), size as i64) },
        0
    );
    (fd, name)
}

fn mapped_in_proc(name: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| l.contains(&format!("/memfd:{name} ")))
}

#[test]
fn blocks_are_sorted_biggest_first() {
    let p = page_size();
    let list = RamList::new();
    list.alloc("small", p).unwrap();
    list.alloc("big", 4 * p).unwrap();
    list.alloc("mid", 2 * p).unwrap();
    list.alloc("big2", 4 * p).unwrap();
    list.alloc("tiny", p).unwrap();
    assert_eq!(ids(&list), ["big", "big2", "mid", "small", "tiny"]);
    list.free("big").unwrap();
    list.alloc("huge", 8 * p).unwrap();
    assert_eq!(ids(&list), ["huge", "big2", "mid", "small", "tiny"]);
    assert_eq!(list.total_bytes(), 16 * p);
    assert_eq!(list.len(), 5);
}

#[test]
fn freed_gaps_are_reused_smallest_first() {
    let a = ram_offset_align();
    let list = RamList::new();
    assert_eq!(list.alloc("a", a).unwrap(), 0);
    assert_eq!(list.alloc("b", 2 * a).unwrap(), a);
    assert_eq!(list.alloc("c", a).unwrap(), 3 * a);
    assert_eq!(list.alloc("d", 3 * a).unwrap(), 4 * a);
    assert_eq!(list.alloc("e", a).unwrap(), 7 * a);
    assert_eq!(list.last_ram_offset(), 8 * a);
    list.free("d").unwrap(); // gap of 3a at 4a
    list.free("b").unwrap(); // gap of 2a at a
    assert_eq!(list.last_ram_offset(), 8 * a);
    // Freed spans are reused once their blocks are reclaimed.
    assert_eq!(list.drain_reclaim(), 0);
    assert_eq!(
        list.alloc("f", a).unwrap(),
        a,
        "the 2a gap is the smallest that fits"
    );
    assert_eq!(
        list.alloc("g", 3 * a).unwrap(),
        4 * a,
        "only the 3a gap fits"
    );
    assert_eq!(
        list.alloc("h", 2 * a).unwrap(),
        8 * a,
        "no gap left below the top"
    );
    list.free("a").unwrap();
    assert_eq!(list.drain_reclaim(), 0);
    assert_eq!(list.alloc("i", a).unwrap(), 0, "the gap at zero counts too");
    // No two blocks overlap in the ram_addr space.
    let g = rcu::read_lock();
    let mut spans: Vec<(u64, u64)> = list.blocks(&g).map(|b| (b.offset(), b.len())).collect();
    spans.sort();
    assert!(
        spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
        "{spans:x?}"
    );
}

#[test]
fn every_lookup_finds_the_right_block() {
    let p = page_size();
    let list = RamList::new();
    let a_off = list.alloc("a", 2 * p).unwrap();
    let b_off = list.alloc("b", 4 * p).unwrap();
    let g = rcu::read_lock();
    for (id, off, len) in [("a", a_off, 2 * p), ("b", b_off, 4 * p)] {
        for addr in [off, off + len / 2, off + len - 1] {
            // Twice: through a walk, then through the MRU block.
            for _ in 0..2 {
                let blk = list.block_at(&g, addr).unwrap();
                assert_eq!((blk.id(), blk.offset(), blk.len()), (id, off, len));
            }
            let host = list.host_ptr(&g, addr).unwrap();
            let blk = list.block_by_id(&g, id).unwrap();
            assert_eq!(host, blk.host().wrapping_add((addr - off) as usize));
            let (found, inner) = list.block_from_host(&g, host).unwrap();
            assert_eq!((found.id(), inner), (id, addr - off));
            assert_eq!(list.ram_addr_from_host(&g, host).unwrap(), addr);
            assert_eq!(list.block_ref_at(&g, addr).unwrap().id(), id);
        }
    }
    // Memory written through one lookup is read through another.
    let host = list.host_ptr(&g, b_off + p + 8).unwrap();
    // SAFETY: inside block "b", mapped while the guard lives.
    unsafe { host.write(0x5a) };
    let b = list.block_by_id(&g, "b").unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { *b.host().add(p as usize + 8) }, 0x5a);
    assert!(list.block_at(&g, list.last_ram_offset()).is_none());
    assert!(list.block_by_id(&g, "c").is_none());
    assert!(list.block_ref(&g, "c").is_none());
    let mut seen = Vec::new();
    list.foreach(|b| {
        seen.push(b.id().to_string());
        Ok::<(), ()>(())
    })
    .unwrap();
    assert_eq!(seen, ["b", "a"]);
    assert_eq!(
        list.foreach(|b| if b.id() == "b" { Err(b.len()) } else { Ok(()) }),
        Err(4 * p)
    );
    // Walking with counted references, as migration does.
    let first = list.next_block_ref(&g, None).unwrap();
    let second = list.next_block_ref(&g, Some(&first)).unwrap();
    assert_eq!((first.id(), second.id()), ("b", "a"));
    assert!(list.next_block_ref(&g, Some(&second)).is_none());
    assert!(first.is_linked() && first.is(b));
}

#[test]
fn lookup_misses_are_typed_errors() {
    let p = page_size();
    let list = RamList::new();
    let off = list.alloc("a", p).unwrap();
    let g = rcu::read_lock();
    let host = list.block_by_id(&g, "a").unwrap().host();
    assert!(matches!(list.host_ptr(&g, off + p), Err(RamError::UnknownRamAddr(x)) if x == off + p));
    let outside = host.wrapping_add(p as usize);
    assert!(matches!(
        list.block_from_host(&g, outside),
        Err(RamError::UnknownHostAddr(x)) if x == outside as usize
    ));
    assert!(matches!(
        list.ram_addr_from_host(&g, std::ptr::null()),
        Err(RamError::UnknownHostAddr(0))
    ));
    drop(g);
    assert!(matches!(list.free("nope"), Err(RamError::UnknownId(ref id)) if id == "nope"));
}

#[test]
fn version_counts_every_change_and_nothing_else() {
    let p = page_size();
    let list = RamList::new();
    let v0 = list.version();
    list.alloc("a", p).unwrap();
    assert_eq!(list.version(), v0 + 1);
    list.alloc("b", p).unwrap();
    assert_eq!(list.version(), v0 + 2);
    {
        let g = rcu::read_lock();
        list.block_at(&g, 0).unwrap();
    }
    assert_eq!(list.version(), v0 + 2, "lookups change nothing");
    list.free("a").unwrap();
    assert_eq!(list.version(), v0 + 3);
    assert!(list.free("a").is_err());
    assert_eq!(list.version(), v0 + 3);
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let p = page_size();
    let list = RamList::new();
    list.alloc_with(
        "pc.ram",
        4 * p,
        RamBlockOptions {
            guest_addr: Some(0x10_0000),
            ..Default::default()
        },
    )
    .unwrap();
    let (v, n, total, last) = (
        list.version(),
        list.len(),
        list.total_bytes(),
        list.last_ram_offset(),
    );
    let long = "x".repeat(MAX_ID_LEN + 1);
    // Read-only: a shared writable mapping of it is refused by mmap (EACCES).
    let exe = std::fs::File::open("/proc/self/exe").unwrap();
    let at = |addr| RamBlockOptions {
        guest_addr: Some(addr),
        ..Default::default()
    };
    let errors = [
        list.alloc("pc.ram", p).unwrap_err(),
        list.alloc("", p).unwrap_err(),
        list.alloc(&long, p).unwrap_err(),
        list.alloc("a\0b", p).unwrap_err(),
        list.alloc("z", 0).unwrap_err(),
        list.alloc("z", p + 1).unwrap_err(),
        list.alloc("z", MAX_BLOCK_SIZE + p).unwrap_err(),
        list.alloc("z", u64::MAX).unwrap_err(),
        list.alloc_with("z", p, at(0x10_0000 + 3 * p)).unwrap_err(),
        list.alloc_with("z", 2 * p, at(0x10_0000 - p)).unwrap_err(),
        list.alloc_with("z", p, at(0x10_0001)).unwrap_err(),
        list.alloc_with("z", 2 * p, at(u64::MAX - p + 1))
            .unwrap_err(),
        list.alloc_from_fd("z", p, exe.as_fd(), 0, RamBlockOptions::default())
            .unwrap_err(),
        list.free("z").unwrap_err(),
    ];
    let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let mut it = errors.into_iter();
    assert!(matches!(it.next(), Some(RamError::DuplicateId(id)) if id == "pc.ram"));
    assert!(matches!(it.next(), Some(RamError::EmptyId)));
    assert!(matches!(it.next(), Some(RamError::IdTooLong { len, .. }) if len == MAX_ID_LEN + 1));
    assert!(matches!(it.next(), Some(RamError::IdHasNul(_))));
    assert!(matches!(it.next(), Some(RamError::ZeroSize { id }) if id == "z"));
    assert!(matches!(it.next(), Some(RamError::UnalignedSize { size, .. }) if size == p + 1));
    assert!(
        matches!(it.next(), Some(RamError::SizeTooLarge { size, .. }) if size == MAX_BLOCK_SIZE + p)
    );
    assert!(matches!(
        it.next(),
        Some(RamError::SizeTooLarge { size: u64::MAX, .. })
    ));
    assert!(matches!(it.next(), Some(RamError::GuestOverlap { other, .. }) if other == "pc.ram"));
    assert!(matches!(
        it.next(),
        Some(RamError::GuestOverlap { start, .. }) if start == 0x10_0000 - p
    ));
    assert!(matches!(
        it.next(),
        Some(RamError::BadGuestAddr {
            addr: 0x10_0001,
            ..
        })
    ));
    assert!(matches!(it.next(), Some(RamError::BadGuestAddr { .. })));
    assert!(matches!(
        it.next(),
        Some(RamError::Mmap { source, .. }) if source.raw_os_error() == Some(libc::EACCES)
    ));
    assert!(matches!(it.next(), Some(RamError::UnknownId(id)) if id == "z"));
    // The messages name the bad value.
    assert!(shown[0].contains("\"pc.ram\""), "{}", shown[0]);
    assert!(shown[5].contains(&format!("{:#x}", p + 1)), "{}", shown[5]);
    assert!(shown[8].contains("pc.ram"), "{}", shown[8]);
    assert!(shown[12].contains("os error"), "{}", shown[12]);
    assert_eq!(
        (list.version(), list.len(), list.total_bytes()),
        (v, n, total)
    );
    assert_eq!(list.last_ram_offset(), last);
    assert_eq!(ids(&list), ["pc.ram"]);
    assert_eq!(list.reclaim_pending(), 0);
    // Adjacent guest ranges are fine.
    list.alloc_with("above", p, at(0x10_0000 + 4 * p)).unwrap();
}

#[test]
fn new_blocks_are_dirty_for_every_client() {
    let a = ram_offset_align();
    let list = RamList::new();
    list.alloc("a", a).unwrap();
    let off = list.alloc("b", 2 * a).unwrap();
    assert!(list.dirty().pages() * page_size() >= list.last_ram_offset());
    for client in DirtyClient::ALL {
        assert_eq!(
            list.dirty().test_and_clear(client, off, 2 * a),
            2 * a / page_size()
        );
        assert!(!list.dirty().is_dirty(client, off));
    }
}

#[test]
fn options_reach_the_mapping() {
    let p = page_size();
    let list = RamList::new();
    let opts = RamBlockOptions {
        shared: true,
        prealloc: true,
        guest_addr: Some(1 << 32),
    };
    list.alloc_with("s", 8 * p, opts).unwrap();
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, "s").unwrap();
    assert!(b.is_shared() && b.is_prealloc());
    assert_eq!(b.guest_range(), Some((1 << 32)..(1 << 32) + 8 * p));
    assert_eq!(b.backing(), Backing::Anonymous);
    let mut resident = vec![0u8; 8];
    // SAFETY: mincore writes one byte per page of the block's own mapping into `resident`.
    let r = unsafe { libc::mincore(b.host().cast(), (8 * p) as usize, resident.as_mut_ptr()) };
    assert_eq!(r, 0);
    assert!(
        resident.iter().all(|&v| v & 1 == 1),
        "prealloc faulted every page in: {resident:?}"
    );
}

#[test]
fn downgrade_keeps_reading_after_the_writer_lock_is_dropped() {
    let p = page_size();
    let list = RamList::new();
    let mut w = list.lock();
    let off = w.alloc("hot", 2 * p).unwrap();
    let g = rcu::read_lock();
    drop(w); // downgraded: still reading under `g`
    let blk = list.block_at(&g, off).unwrap();
    let version = list.version();
    // Another writer can now take the lock and free the block without waiting for us.
    std::thread::scope(|s| s.spawn(|| list.free("hot").unwrap()).join().unwrap());
    assert_eq!(list.version(), version + 1);
    assert_eq!(
        list.reclaim_pending(),
        1,
        "unlinked, not reclaimed under our guard"
    );
    assert!(list.block_by_id(&g, "hot").is_none());
    assert!(blk.is_removed());
    // SAFETY: the guard keeps the freed block's memory mapped.
    unsafe {
        blk.host().add(p as usize).write(9);
        assert_eq!(*blk.host().add(p as usize), 9);
    }
    drop(g);
    assert_eq!(list.drain_reclaim(), 0);
}

#[test]
fn a_counted_ref_keeps_a_freed_block_mapped_until_dropped() {
    let p = page_size();
    let list = RamList::new();
    let reclaimed = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&reclaimed);
    list.set_reclaim_notifier(Some(Arc::new(move |b| {
        r.lock().unwrap().push(b.id().to_string())
    })));
    let (fd, name) = memfd("kept", 4 * p);
    let off = list
        .alloc_from_fd("kept", 4 * p, fd.as_fd(), 0, RamBlockOptions::default())
        .unwrap();
    drop(fd); // the mapping keeps the file
    assert!(mapped_in_proc(&name));
    let kept = {
        let g = rcu::read_lock();
        let k = list.block_ref_at(&g, off).unwrap();
        // SAFETY: inside the block, under the guard.
        unsafe { list.host_ptr(&g, off + 3 * p).unwrap().write(42) };
        k
    };
    assert!(matches!(kept.backing(), Backing::Fd { offset: 0, .. }));
    assert!(kept.is_shared());
    list.free("kept").unwrap();
    assert!(!kept.is_linked());
    assert_eq!(list.drain_reclaim(), 1, "the counted reference holds it");
    assert!(reclaimed.lock().unwrap().is_empty());
    assert!(mapped_in_proc(&name));
    // SAFETY: the counted reference keeps the memory mapped.
    assert_eq!(unsafe { *kept.host().add(3 * p as usize) }, 42);
    drop(kept);
    assert_eq!(list.drain_reclaim(), 0);
    assert_eq!(*reclaimed.lock().unwrap(), ["kept"]);
    assert!(!mapped_in_proc(&name), "munmap happened");
}

#[test]
fn caller_memory_is_not_unmapped() {
    let p = page_size() as usize;
    let list = RamList::new();
    let mut mem = vec![0u64; 3 * p / 8];
    // An aligned page inside `mem`, which outlives the block's reclamation below.
    let base = mem.as_mut_ptr().cast::<u8>();
    let host = base.wrapping_add(base.align_offset(p));
    // SAFETY: `host..host + p` lies inside `mem`, alive and otherwise unused until after
    // drain_reclaim below.
    let off =
        unsafe { list.alloc_from_ptr("ptr", p as u64, host, RamBlockOptions::default()) }.unwrap();
    {
        let g = rcu::read_lock();
        assert_eq!(list.host_ptr(&g, off).unwrap(), host);
        assert_eq!(list.block_at(&g, off).unwrap().backing(), Backing::HostPtr);
        // SAFETY: the block's memory, under the guard.
        unsafe { host.write(7) };
    }
    list.free("ptr").unwrap();
    assert_eq!(list.drain_reclaim(), 0);
    assert!(mem.contains(&7), "caller memory still there and written");
    // SAFETY: a null host pointer is refused before use.
    let bad = unsafe {
        list.alloc_from_ptr(
            "n",
            p as u64,
            std::ptr::null_mut(),
            RamBlockOptions::default(),
        )
    };
    assert!(matches!(
        bad,
        Err(RamError::BadHostMemory {
            what: "host pointer",
            ..
        })
    ));
}

/// The pages of `len` bytes at `off` dirty for each client.
fn dirty_counts(list: &RamList, off: u64, len: u64) -> Vec<u64> {
    DirtyClient::ALL
        .iter()
        .map(|&c| list.dirty().count_dirty(c, off, len))
        .collect()
}

/// A freed block's span is not handed out while a counted reference holds the block: a
/// migration batch on the stale block takes only its own bits, never a new block's.
#[test]
fn a_freed_span_stays_reserved_while_a_counted_ref_holds_it() {
    let a = ram_offset_align();
    let pages = 2 * a / page_size();
    let m = DirtyClient::Migration;
    let list = RamList::new();
    let old = list.alloc("old", 2 * a).unwrap();
    list.alloc("above", a).unwrap(); // so the old span becomes a gap, not the top
    let kept = {
        let g = rcu::read_lock();
        list.block_ref(&g, "old").unwrap()
    };
    assert_eq!(list.dirty().test_and_clear(m, old, 2 * a), pages);
    list.free("old").unwrap();
    assert_eq!(list.reserved_spans(), [(old, 2 * a)]);
    // A last write to the old block, seen after its free (a late sync).
    list.dirty().mark_dirty(old + a, 1);
    let new = list.alloc("new", 2 * a).unwrap();
    assert_ne!(new, old, "a held block's span was handed out again");
    assert!(
        new >= old + 2 * a || new + 2 * a <= old,
        "{new:#x} overlaps {old:#x}"
    );
    // The stale block's batch takes its own page, and the new block keeps its first copy.
    let mut taken = Vec::new();
    list.dirty()
        .take_dirty(m, kept.offset(), kept.len(), |addr| taken.push(addr));
    assert_eq!(taken, [old + a]);
    assert_eq!(list.dirty().count_dirty(m, new, 2 * a), pages);
    assert_eq!(list.drain_reclaim(), 1, "held by the counted reference");
    assert_eq!(list.reserved_spans(), [(old, 2 * a)]);
    // Dropping the reference reclaims the block; its span is free and clean again.
    list.dirty().mark_dirty(old, 1);
    drop(kept);
    assert_eq!(list.drain_reclaim(), 0);
    assert!(list.reserved_spans().is_empty());
    assert_eq!(dirty_counts(&list, old, 2 * a), [0, 0, 0]);
    assert_eq!(
        list.alloc("again", 2 * a).unwrap(),
        old,
        "the span is reused"
    );
    assert_eq!(dirty_counts(&list, old, 2 * a), [pages; 3]);
}

/// The same with a plain read guard holding the freed block (the free runs on another
/// thread, as the writer would).
#[test]
fn a_freed_span_stays_reserved_while_a_reader_holds_it() {
    let a = ram_offset_align();
    let list = RamList::new();
    let old = list.alloc("old", a).unwrap();
    list.alloc("above", 2 * a).unwrap();
    let g = rcu::read_lock();
    let stale = list.block_at(&g, old).unwrap();
    let new = std::thread::scope(|s| {
        s.spawn(|| {
            list.free("old").unwrap();
            list.alloc("new", a).unwrap()
        })
        .join()
        .unwrap()
    });
    assert_ne!(new, old, "a span under a reader was handed out again");
    assert!(stale.is_removed() && stale.offset() == old);
    drop(g);
    assert_eq!(list.drain_reclaim(), 0);
    assert!(list.reserved_spans().is_empty());
    assert_eq!(
        dirty_counts(&list, old, a),
        [0, 0, 0],
        "bits cleared at reclaim"
    );
    assert_eq!(list.alloc("again", a).unwrap(), old);
}

/// The inode number of the file behind `fd`.
fn inode(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`.
    let r = unsafe { libc::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut st) };
    assert_eq!(r, 0, "fstat: {}", std::io::Error::last_os_error());
    st.st_ino
}

/// Whether any descriptor of this process is the memfd `name`.
fn fd_open_on(name: &str) -> bool {
    std::fs::read_dir("/proc/self/fd").unwrap().any(|e| {
        std::fs::read_link(e.unwrap().path())
            .is_ok_and(|l| l.to_string_lossy().contains(&format!("memfd:{name} ")))
    })
}

/// The block owns a duplicate of the caller's descriptor: the caller may close its own
/// (and the number be reused by another file) while the block's still names the memory;
/// the duplicate is closed when the block is reclaimed.
#[test]
fn an_fd_block_owns_a_duplicate_of_the_callers_fd() {
    let p = page_size();
    let list = RamList::new();
    let (fd, name) = memfd("dup", 4 * p);
    let ino = inode(fd.as_fd());
    let caller_raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    list.alloc_from_fd("f", 4 * p, fd.as_fd(), 0, RamBlockOptions::default())
        .unwrap();
    drop(fd);
    // Another file takes the lowest free number: most likely the caller's old one.
    let other = std::fs::File::open("/dev/null").unwrap();
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, "f").unwrap();
    let Backing::Fd { fd: raw, offset: 0 } = b.backing() else {
        panic!("{:?}", b.backing());
    };
    let own = b.fd().expect("an fd-backed block has its own descriptor");
    assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&own), raw);
    assert_ne!(raw, caller_raw, "the block kept the caller's descriptor");
    assert_eq!(inode(own), ino, "the block's descriptor names the memfd");
    // SAFETY: F_GETFD on the block's own descriptor only reads its flags.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "close-on-exec");
    drop(g);
    drop(other);
    assert!(fd_open_on(&name));
    list.free("f").unwrap();
    assert_eq!(list.drain_reclaim(), 0);
    assert!(!fd_open_on(&name), "the duplicate is closed at reclaim");
}

/// A file on a tmpfs of 1 MiB, 8 MiB long (sparse), in a mount namespace of its own (the
/// calling thread's only); `None` when this process may not mount.
fn file_on_a_full_tmpfs() -> Option<OwnedFd> {
    std::thread::spawn(|| {
        let dir = std::env::temp_dir().join(format!("ramlist-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cdir = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        let root = c"/";
        // SAFETY: unshare and mount take plain arguments; the new namespace is this
        // thread's alone (CLONE_NEWNS implies CLONE_FS), and making it private keeps the
        // mount from propagating back to the host's.
        let ok = unsafe {
            libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    c"ramlist-test".as_ptr(),
                    cdir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    c"size=1m".as_ptr().cast(),
                ) == 0
        };
        if !ok {
            println!(
                "SKIPPED: cannot mount a tmpfs: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("ram"))
            .unwrap();
        f.set_len(8 << 20).unwrap();
        Some(OwnedFd::from(f))
    })
    .join()
    .unwrap()
}

/// Preallocation that the kernel cannot satisfy (8 MiB on a 1 MiB tmpfs) fails the
/// allocation with a typed error naming the block, instead of leaving holes that would
/// SIGBUS the guest on first touch (which MAP_POPULATE silently does).
#[test]
fn a_failed_prealloc_is_an_error() {
    let Some(fd) = file_on_a_full_tmpfs() else {
        return;
    };
    let _ = std::fs::remove_dir(
        std::env::temp_dir().join(format!("ramlist-tmpfs-{}", std::process::id())),
    );
    let list = RamList::new();
    let prealloc = RamBlockOptions {
        prealloc: true,
        ..Default::default()
    };
    let v = list.version();
    let err = list
        .alloc_from_fd("full", 8 << 20, fd.as_fd(), 0, prealloc)
        .unwrap_err();
    assert!(
        matches!(&err, RamError::Prealloc { id, size, .. } if id == "full" && *size == 8 << 20),
        "{err}"
    );
    assert!(err.to_string().contains("\"full\""), "{err}");
    assert_eq!(
        (list.version(), list.len()),
        (v, 0),
        "the list is unchanged"
    );
    // What fits is preallocated; without prealloc the sparse mapping is accepted.
    list.alloc_from_fd("fits", 512 << 10, fd.as_fd(), 0, prealloc)
        .unwrap();
    list.alloc_from_fd("lazy", 8 << 20, fd.as_fd(), 0, RamBlockOptions::default())
        .unwrap();
}
