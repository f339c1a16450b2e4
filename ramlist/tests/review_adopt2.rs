//! Second review of `RamListWriter::adopt_fd` (797dc8c): reproductions through the public
//! API only. Each test states the contract it holds the change to; the first two failed
//! on 797dc8c and pass since the old memfd's pages are given back and a preallocated
//! block's adopted mapping is faulted in, kept as regression tests.

use ramlist::{page_size, RamBlockOptions, RamList};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// A memfd named `name` of `len` bytes, with sealing allowed.
fn memfd(name: &std::ffi::CStr, len: u64) -> std::fs::File {
    // SAFETY: a NUL-terminated name and valid flags; the call makes a new descriptor.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned to us and nothing else owns it.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len).unwrap();
    f
}

/// How many descriptors of this process name a memfd called `name`.
fn open_memfds(name: &str) -> usize {
    let want = format!("/memfd:{name} ");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| format!("{} ", t.display()).contains(&want))
        .count()
}

/// The number of pages of `host..host + len` resident (mincore).
fn resident(host: *mut u8, len: u64) -> usize {
    let mut v = vec![0u8; (len / page_size()) as usize];
    // SAFETY: mincore only writes one byte per page into `v`, which has room for them.
    let r = unsafe { libc::mincore(host.cast(), len as usize, v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().filter(|&&b| b & 1 != 0).count()
}

/// A block over a memfd of its own that adopts another file no longer maps its old
/// one, but keeps it open (the block's own duplicate, which a reader may have borrowed)
/// until the block is reclaimed. Every page the old memfd held stayed allocated for the
/// life of the VM (for a preallocated memfd, the whole block: the destination's RAM
/// counted twice). The old memfd's pages must be given back at the adoption.
/// (Reviewed as "the old file must be let go"; mended by punching its pages out, the
/// descriptor kept open for borrowers.)
#[test]
fn review2_adopting_a_file_lets_the_replaced_file_go() {
    let p = page_size();
    let len = 64 * p;
    let list = RamList::new();
    let old = memfd(c"review2-old-file", len);
    list.alloc_from_fd(
        "ram",
        len,
        old.as_fd(),
        0,
        RamBlockOptions {
            shared: true,
            prealloc: true,
            guest_addr: None,
        },
    )
    .unwrap();
    let allocated = |f: &std::fs::File| {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    };
    assert_eq!(allocated(&old), len, "preallocated");
    assert_eq!(open_memfds("review2-old-file"), 2);
    let new = memfd(c"review2-new-file", len);
    list.lock().adopt_fd("ram", len, new.as_fd(), 0).unwrap();
    drop(new);
    let held = allocated(&old);
    list.free("ram").unwrap();
    assert_eq!(
        held, 0,
        "the memfd the block no longer maps still holds {held:#x} bytes after adopting \
         another"
    );
}

/// `RamBlockOptions::prealloc` promises every page faulted in, so that a page the kernel
/// cannot provide fails up front instead of a SIGBUS in the guest later; `is_prealloc()`
/// still says so after an adoption. The adopted mapping is not populated at all.
#[test]
fn review2_a_preallocated_block_stays_preallocated_after_adopting() {
    let p = page_size();
    let len = 64 * p;
    let list = RamList::new();
    list.alloc_with(
        "ram",
        len,
        RamBlockOptions {
            shared: false,
            prealloc: true,
            guest_addr: None,
        },
    )
    .unwrap();
    let host = {
        let g = rcu::read_lock();
        list.block_by_id(&g, "ram").unwrap().host()
    };
    assert_eq!(resident(host, len), 64);
    let new = memfd(c"review2-sparse", len); // holes only
    list.lock().adopt_fd("ram", len, new.as_fd(), 0).unwrap();
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, "ram").unwrap();
    assert!(b.is_prealloc());
    let n = resident(host, len);
    assert_eq!(
        n, 64,
        "a block that says is_prealloc() has {n} of 64 pages behind it after adopt_fd"
    );
}

/// An adoption the kernel refuses must leave the block's memory as it was ("Refused,
/// with the block and its memory as they were"). A write-sealed memfd cannot be mapped
/// shared and writable: a refusal anyone can see coming (F_GET_SEALS), checked here
/// only by the kernel.
#[test]
fn review2_a_refused_adoption_keeps_the_blocks_contents() {
    let p = page_size();
    let len = 16 * p;
    let list = RamList::new();
    list.alloc("ram", len).unwrap();
    let host = {
        let g = rcu::read_lock();
        list.block_by_id(&g, "ram").unwrap().host()
    };
    for i in 0..16 {
        // SAFETY: inside the block's own mapping; nothing else touches it.
        unsafe { host.add((i * p) as usize).write_volatile(0xa5) };
    }
    let sealed = memfd(c"review2-sealed", len);
    // SAFETY: fcntl on our own descriptor.
    let r = unsafe {
        libc::fcntl(
            sealed.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(r, 0);
    let res = list.lock().adopt_fd("ram", len, sealed.as_fd(), 0);
    assert!(res.is_err(), "a write-sealed file was adopted");
    let lost = (0..16)
        // SAFETY: as above; the block keeps a mapping there (keep_mapped).
        .filter(|&i| unsafe { host.add((i * p) as usize).read_volatile() } != 0xa5)
        .count();
    assert_eq!(
        lost, 0,
        "{lost} of 16 pages lost their contents on a refused adoption"
    );
}
