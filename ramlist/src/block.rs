//! [`RamBlock`]: one contiguous piece of guest RAM — its id, its place in the ram_addr
//! space, and the host memory behind it (an anonymous mapping, a caller's file, or a
//! caller's pointer).

use crate::list::Shared;
use crate::RamError;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};

/// Longest id in bytes: QEMU's `idstr[256]` holds 255 bytes and its NUL.
pub const MAX_ID_LEN: usize = 255;

/// Largest single block (1 TiB): far above any guest here, and small enough that offsets
/// and sums of sizes stay far from the end of the u64 range.
pub const MAX_BLOCK_SIZE: u64 = 1 << 40;

/// Called with a block just before its memory is unmapped, on the call_rcu thread, once no
/// reader and no counted reference can reach it any more (see
/// [`RamList::set_reclaim_notifier`](crate::RamList::set_reclaim_notifier)).
pub type ReclaimNotifier = Arc<dyn Fn(&RamBlock) + Send + Sync>;

/// The host page size; sizes, file offsets and host pointers are multiples of it.
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(p)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// log2 of [`page_size`]: shift a ram_addr or a size by it to count pages.
pub fn page_shift() -> u32 {
    page_size().trailing_zeros()
}

/// How a block is to be created, besides its id and size (QEMU's `RAM_SHARED`,
/// `RAM_PREALLOC` flags and the memory region's address).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamBlockOptions {
    /// Map shared (visible to another process mapping the same memory, or kept on
    /// fork) instead of private.
    pub shared: bool,
    /// Fault every page in now (`MADV_POPULATE_WRITE`) rather than on the guest's first
    /// touch; a page the kernel cannot provide fails the allocation
    /// ([`RamError::Prealloc`]) instead of a later SIGBUS in the guest.
    pub prealloc: bool,
    /// Where the guest sees the block; `None` for RAM the guest does not address
    /// directly (video memory, ROMs) or that is placed later.
    pub guest_addr: Option<u64>,
}

/// What memory a block's host range is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// An anonymous mapping the block made and unmaps.
    Anonymous,
    /// A MAP_SHARED mapping of a caller's file, made and unmapped by the block. The block
    /// owns a duplicate of the caller's descriptor (close-on-exec), closed when the block
    /// is reclaimed: the caller may close its own at once.
    Fd {
        /// The block's own descriptor for the file ([`RamBlock::fd`]), valid while the
        /// block is (under a read guard or a counted reference).
        fd: RawFd,
        /// Offset of the block in the file.
        offset: u64,
    },
    /// A caller's memory (QEMU's `qemu_ram_alloc_from_ptr`): never unmapped by the block.
    HostPtr,
}

/// A file mapped over a block's range in place of its own memory.
#[derive(Debug)]
struct Adopted {
    fd: OwnedFd,
    offset: u64,
}

/// Process-wide count of the mappings blocks own, for leak checks.
static MAPPED_BLOCKS: AtomicUsize = AtomicUsize::new(0);
static MAPPED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Mappings owned by live blocks in this process: (count, bytes). A freed block's mapping
/// leaves this count when it is really unmapped, after its grace period.
pub fn mapped_blocks() -> (usize, u64) {
    (MAPPED_BLOCKS.load(Acquire), MAPPED_BYTES.load(Acquire))
}

/// One block of guest RAM. Blocks live on a [`RamList`](crate::RamList); readers reach
/// them under an RCU read guard and may touch their memory until the guard ends.
pub struct RamBlock {
    id: String,
    offset: u64,
    len: u64,
    host: NonNull<u8>,
    backing: Backing,
    shared: bool,
    prealloc: bool,
    guest_addr: Option<u64>,
    /// The block's duplicate of the caller's fd, for [`Backing::Fd`]; closed after the
    /// memory is unmapped.
    fd: Option<OwnedFd>,
    /// Set by the writer before unlinking, so a lookup that finds the block meanwhile does
    /// not make it its MRU block (see `mru.rs`).
    removed: AtomicBool,
    /// Another file mapped shared over the block's range in place of its memory
    /// (`RamListWriter::adopt_fd`): set once, then what `backing`, `fd` and `is_shared`
    /// report. Closed after the memory is unmapped, as `fd` is.
    adopted: OnceLock<Adopted>,
    /// The list's shared state: reclaim notifier, pending count.
    list: Option<Arc<Shared>>,
}

// SAFETY: `host` points to memory the block maps (or the caller vouched for) for the
// block's whole life; the block itself only hands the pointer out and unmaps it in Drop,
// which runs once, after every reader is gone. Every other field is Send + Sync.
unsafe impl Send for RamBlock {}
// SAFETY: as above; `&RamBlock` gives no access to the memory except the raw pointer.
unsafe impl Sync for RamBlock {}

/// Refuses ids the migration stream and C could not carry.
pub(crate) fn check_id(id: &str) -> Result<(), RamError> {
    if id.is_empty() {
        return Err(RamError::EmptyId);
    }
    if id.len() > MAX_ID_LEN {
        return Err(RamError::IdTooLong {
            id: id.to_string(),
            len: id.len(),
            max: MAX_ID_LEN,
        });
    }
    if id.contains('\0') {
        return Err(RamError::IdHasNul(id.to_string()));
    }
    Ok(())
}

/// Refuses sizes that are zero, not whole pages, or too large.
pub(crate) fn check_size(id: &str, size: u64) -> Result<(), RamError> {
    let page = page_size();
    if size == 0 {
        return Err(RamError::ZeroSize { id: id.to_string() });
    }
    if size > MAX_BLOCK_SIZE {
        return Err(RamError::SizeTooLarge {
            id: id.to_string(),
            size,
            max: MAX_BLOCK_SIZE,
        });
    }
    if !size.is_multiple_of(page) {
        return Err(RamError::UnalignedSize {
            id: id.to_string(),
            size,
            page,
        });
    }
    Ok(())
}

/// Refuses a guest-physical address that is unaligned or whose range passes 2^64.
pub(crate) fn check_guest_addr(id: &str, addr: u64, size: u64) -> Result<(), RamError> {
    if !addr.is_multiple_of(page_size()) || addr.checked_add(size).is_none() {
        return Err(RamError::BadGuestAddr {
            id: id.to_string(),
            addr,
            size,
        });
    }
    Ok(())
}

/// The memory a new block is given; turned into a [`RamBlock`] by [`RamBlock::new`].
pub(crate) struct HostMemory {
    host: NonNull<u8>,
    len: u64,
    backing: Backing,
    /// The block-owned descriptor of an fd-backed mapping.
    fd: Option<OwnedFd>,
}

impl HostMemory {
    /// Maps `size` anonymous bytes.
    pub(crate) fn anonymous(id: &str, size: u64, opts: &RamBlockOptions) -> Result<Self, RamError> {
        let mut flags = libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        flags |= if opts.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let host = map(id, size, flags, -1, 0)?;
        let mem = HostMemory::owned(host, size, Backing::Anonymous, None);
        if opts.prealloc {
            // On failure `mem` is dropped, which unmaps it.
            populate(id, host, size)?;
        }
        Ok(mem)
    }

    /// Maps `size` bytes of the caller's file `fd` from `offset`: shared, or private (copy
    /// on write) when `opts.shared` is false (the list decides which).
    /// The block keeps a duplicate of `fd`, never the caller's descriptor itself.
    pub(crate) fn from_fd(
        id: &str,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        opts: &RamBlockOptions,
    ) -> Result<Self, RamError> {
        if !offset.is_multiple_of(page_size()) || i64::try_from(offset).is_err() {
            return Err(RamError::BadHostMemory {
                id: id.to_string(),
                what: "file offset",
                value: offset,
            });
        }
        check_file_size(id, size, fd.as_raw_fd(), offset)?;
        // F_DUPFD_CLOEXEC: the duplicate does not leak into children the VMM spawns.
        let own = fd.try_clone_to_owned().map_err(|source| RamError::DupFd {
            id: id.to_string(),
            fd: fd.as_raw_fd(),
            source,
        })?;
        let flags = if !opts.shared {
            libc::MAP_PRIVATE | libc::MAP_NORESERVE
        } else {
            libc::MAP_SHARED
        };
        let host = map(id, size, flags, own.as_raw_fd(), offset)?;
        let backing = Backing::Fd {
            fd: own.as_raw_fd(),
            offset,
        };
        let mem = HostMemory::owned(host, size, backing, Some(own));
        if opts.prealloc {
            // On failure `mem` is dropped: unmapped, its descriptor closed.
            populate(id, host, size)?;
        }
        Ok(mem)
    }

    /// Takes the caller's memory at `host` as it is (it is not unmapped on drop).
    ///
    /// # Safety
    /// `host..host + size` must stay mapped, readable and writable, and used by nothing
    /// that assumes exclusive access, for as long as the block lives (until after the
    /// grace period that follows its free).
    pub(crate) unsafe fn from_ptr(
        id: &str,
        size: u64,
        host: *mut u8,
        opts: &RamBlockOptions,
    ) -> Result<Self, RamError> {
        let host = NonNull::new(host)
            .filter(|h| (h.as_ptr() as u64).is_multiple_of(page_size()))
            .ok_or_else(|| RamError::BadHostMemory {
                id: id.to_string(),
                what: "host pointer",
                value: host as u64,
            })?;
        if opts.prealloc {
            populate(id, host, size)?;
        }
        Ok(HostMemory {
            host,
            len: size,
            backing: Backing::HostPtr,
            fd: None,
        })
    }

    fn owned(host: NonNull<u8>, len: u64, backing: Backing, fd: Option<OwnedFd>) -> Self {
        MAPPED_BLOCKS.fetch_add(1, Release);
        MAPPED_BYTES.fetch_add(len, Release);
        HostMemory {
            host,
            len,
            backing,
            fd,
        }
    }

    fn owns_mapping(&self) -> bool {
        self.backing != Backing::HostPtr
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if !self.owns_mapping() {
            return;
        }
        // SAFETY: the range was mapped by `map` and is owned by this value alone; the
        // block that held it is unreachable (dropped after its grace period) or was never
        // published.
        let r = unsafe { libc::munmap(self.host.as_ptr().cast(), self.len as usize) };
        if r != 0 {
            log::error!(
                "ramlist: munmap({:p}, {:#x}) failed: {}",
                self.host,
                self.len,
                io::Error::last_os_error()
            );
            return;
        }
        MAPPED_BLOCKS.fetch_sub(1, Release);
        MAPPED_BYTES.fetch_sub(self.len, Release);
    }
}

/// Whether this kernel knows `MADV_POPULATE_WRITE` (Linux 5.14+). madvise checks the
/// advice before the range, and an empty range is then accepted as is: so an empty call
/// tells an unknown advice (EINVAL) from a mapping that refuses it.
fn populate_write_supported() -> bool {
    static KNOWN: OnceLock<bool> = OnceLock::new();
    *KNOWN.get_or_init(|| {
        // SAFETY: an empty range at a page-aligned address touches no memory.
        let r = unsafe {
            libc::madvise(
                page_size() as *mut libc::c_void,
                0,
                libc::MADV_POPULATE_WRITE,
            )
        };
        r == 0
    })
}

/// Faults in every page of `size` bytes at `host` for writing, as the guest's first
/// touch would, and reports a page the kernel cannot provide (a full tmpfs or hugetlbfs,
/// a memory limit) as [`RamError::Prealloc`] — where MAP_POPULATE would hide it and the
/// guest would take a SIGBUS later (QEMU moved to `MADV_POPULATE_WRITE` for this).
///
/// On kernels without `MADV_POPULATE_WRITE` it falls back to writing one byte per page
/// (QEMU's `touch_all_pages`), which cannot report such a failure.
fn populate(id: &str, host: NonNull<u8>, size: u64) -> Result<(), RamError> {
    let len = usize::try_from(size).unwrap_or(usize::MAX);
    // SAFETY: `host..host + size` is a mapping of ours (or the caller vouched for it);
    // populating faults pages in and leaves their contents as they are.
    let r = unsafe { libc::madvise(host.as_ptr().cast(), len, libc::MADV_POPULATE_WRITE) };
    if r == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EINVAL) && !populate_write_supported() {
        // SAFETY: as above. For anonymous memory the block is not published yet, so
        // nothing else writes there. Fd- and pointer-backed memory may be written
        // meanwhile by another process (or the caller): the mapping stays valid, but such a
        // write landing between a page's read and its write-back is lost — QEMU's
        // `touch_all_pages` race, accepted only on kernels without MADV_POPULATE_WRITE.
        unsafe { touch_pages(host, len) };
        return Ok(());
    }
    Err(RamError::Prealloc {
        id: id.to_string(),
        size,
        source,
    })
}

/// Writes every page of `len` bytes at `host` with the byte it holds.
///
/// # Safety
/// The range must be mapped read-write. A write by anyone else meanwhile may be undone
/// (a page's byte is read, then written back).
unsafe fn touch_pages(host: NonNull<u8>, len: usize) {
    for off in (0..len).step_by(page_size() as usize) {
        let p = host.as_ptr().wrapping_add(off);
        // SAFETY: `p` lies inside the range (the caller's guarantee); writing back the
        // byte read keeps the contents.
        unsafe { p.write_volatile(p.read_volatile()) };
    }
}

/// A regular file must be long enough: touching a mapping past its end raises SIGBUS.
pub(crate) fn check_file_size(id: &str, size: u64, fd: RawFd, offset: u64) -> Result<(), RamError> {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`; a bad fd is reported as an error.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(RamError::Mmap {
            id: id.to_string(),
            size,
            source: io::Error::last_os_error(),
        });
    }
    let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
    let file_len = u64::try_from(st.st_size).unwrap_or(0);
    if regular && offset.checked_add(size).is_none_or(|end| end > file_len) {
        return Err(RamError::Mmap {
            id: id.to_string(),
            size,
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("fd {fd} is {file_len:#x} bytes, the block needs {offset:#x}+{size:#x}"),
            ),
        });
    }
    Ok(())
}

fn map(id: &str, size: u64, flags: i32, fd: RawFd, offset: u64) -> Result<NonNull<u8>, RamError> {
    let err = |source| RamError::Mmap {
        id: id.to_string(),
        size,
        source,
    };
    let len = usize::try_from(size).map_err(|_| err(io::Error::from_raw_os_error(libc::ENOMEM)))?;
    let off = libc::off_t::try_from(offset)
        .map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: a fresh mapping at an address of the kernel's choosing touches no existing
    // memory; the arguments are checked by the kernel.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(err(io::Error::last_os_error()));
    }
    NonNull::new(p.cast()).ok_or_else(|| err(io::Error::from_raw_os_error(libc::EFAULT)))
}

impl RamBlock {
    /// A block over `mem` at ram_addr `offset`; checks are the caller's (the list's).
    pub(crate) fn new(
        id: &str,
        offset: u64,
        mem: HostMemory,
        opts: &RamBlockOptions,
        list: Option<Arc<Shared>>,
    ) -> RamBlock {
        let mut mem = mem;
        let fd = mem.fd.take();
        let (host, len, backing) = (mem.host, mem.len, mem.backing);
        // The block takes over the mapping; its own Drop unmaps it.
        std::mem::forget(mem);
        RamBlock {
            id: id.to_string(),
            offset,
            len,
            host,
            backing,
            shared: opts.shared,
            prealloc: opts.prealloc,
            guest_addr: opts.guest_addr,
            fd,
            removed: AtomicBool::new(false),
            adopted: OnceLock::new(),
            list,
        }
    }

    /// The block's unique name (the migration stream's idstr).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the block starts in the ram_addr space (dirty bitmaps are indexed by it).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Its length in bytes, a multiple of the page size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: blocks are at least a page; here for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address of the block's first byte. Valid while the caller holds a read
    /// guard under which it found the block, or a counted reference to it.
    pub fn host(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    /// What memory backs the block.
    ///
    /// After [`RamListWriter::adopt_fd`](crate::RamListWriter::adopt_fd), the adopted
    /// file's.
    pub fn backing(&self) -> Backing {
        match self.adopted.get() {
            Some(a) => Backing::Fd {
                fd: a.fd.as_raw_fd(),
                offset: a.offset,
            },
            None => self.backing,
        }
    }

    /// The block's own descriptor of the file behind it ([`Backing::Fd`]), for as long as
    /// the borrow of the block lasts: e.g. to hand the memory to another process. After
    /// [`RamListWriter::adopt_fd`](crate::RamListWriter::adopt_fd), the adopted file's.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self.adopted.get() {
            Some(a) => Some(a.fd.as_fd()),
            None => self.fd.as_ref().map(|fd| fd.as_fd()),
        }
    }

    /// Whether the memory is mapped shared (an adopted file always is).
    pub fn is_shared(&self) -> bool {
        self.shared || self.adopted.get().is_some()
    }

    /// Records that `fd` from `offset` is now mapped shared over the block's range; false
    /// (and `fd` closed) if a file was adopted before. For `RamListWriter::adopt_fd`, which
    /// has just mapped it.
    pub(crate) fn set_adopted(&self, fd: OwnedFd, offset: u64) -> bool {
        self.adopted.set(Adopted { fd, offset }).is_ok()
    }

    /// Whether a file was adopted in place of the block's own memory.
    pub(crate) fn is_adopted(&self) -> bool {
        self.adopted.get().is_some()
    }

    /// Whether the memory was faulted in at allocation.
    pub fn is_prealloc(&self) -> bool {
        self.prealloc
    }

    /// Where the guest sees the block, if it does.
    pub fn guest_addr(&self) -> Option<u64> {
        self.guest_addr
    }

    /// The guest-physical range the block occupies, if placed.
    pub fn guest_range(&self) -> Option<std::ops::Range<u64>> {
        self.guest_addr.map(|a| a..a + self.len)
    }

    /// Whether `ram_addr` falls inside the block.
    pub fn contains(&self, ram_addr: u64) -> bool {
        ram_addr.wrapping_sub(self.offset) < self.len
    }

    /// The offset inside the block of host address `p`, if the block's memory holds it.
    pub fn host_offset(&self, p: *const u8) -> Option<u64> {
        let d = (p as u64).wrapping_sub(self.host.as_ptr() as u64);
        (d < self.len).then_some(d)
    }

    /// Whether the block was freed (unlinked). A reader may still see such a block under
    /// a guard it took before the free.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Acquire)
    }

    /// Whether `dirty` is the bitmap of this block's list.
    pub(crate) fn dirty_is(&self, dirty: &crate::dirty::DirtyMemory) -> bool {
        self.list
            .as_ref()
            .is_some_and(|l| std::ptr::eq(&l.dirty, dirty))
    }

    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Release);
    }

    fn host_memory(&self) -> HostMemory {
        HostMemory {
            host: self.host,
            len: self.len,
            backing: self.backing,
            fd: None,
        }
    }
}

impl Drop for RamBlock {
    fn drop(&mut self) {
        let list = self.list.take();
        if let Some(list) = &list {
            list.before_unmap(self);
        }
        drop(self.host_memory());
        if let Some(list) = &list {
            list.after_unmap(self);
        }
    }
}

impl fmt::Debug for RamBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamBlock")
            .field("id", &self.id)
            .field("offset", &format_args!("{:#x}", self.offset))
            .field("len", &format_args!("{:#x}", self.len))
            .field("host", &self.host)
            .field("backing", &self.backing)
            .field("guest_addr", &self.guest_addr)
            .field("removed", &self.removed.load(Relaxed))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(id: &str, mem: HostMemory) -> RamBlock {
        RamBlock::new(id, 0, mem, &RamBlockOptions::default(), None)
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("pc.ram").is_ok());
        assert!(matches!(check_id(""), Err(RamError::EmptyId)));
        assert!(check_id(&"x".repeat(MAX_ID_LEN)).is_ok());
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert!(matches!(
            check_id(&long),
            Err(RamError::IdTooLong { len: 256, .. })
        ));
        assert!(matches!(check_id("a\0b"), Err(RamError::IdHasNul(_))));
    }

    #[test]
    fn sizes_are_checked() {
        let p = page_size();
        assert!(check_size("a", p).is_ok());
        assert!(check_size("a", MAX_BLOCK_SIZE).is_ok());
        assert!(matches!(check_size("a", 0), Err(RamError::ZeroSize { .. })));
        assert!(matches!(
            check_size("a", p + 1),
            Err(RamError::UnalignedSize { size, .. }) if size == p + 1
        ));
        assert!(matches!(
            check_size("a", MAX_BLOCK_SIZE + p),
            Err(RamError::SizeTooLarge { .. })
        ));
        assert!(matches!(
            check_size("a", u64::MAX),
            Err(RamError::SizeTooLarge { .. })
        ));
    }

    #[test]
    fn anonymous_memory_is_writable_and_zeroed() {
        let p = page_size();
        let opts = RamBlockOptions {
            prealloc: true,
            ..Default::default()
        };
        let b = block("anon", HostMemory::anonymous("anon", 4 * p, &opts).unwrap());
        assert_eq!(b.backing(), Backing::Anonymous);
        // SAFETY: the block owns 4 pages at `host`.
        unsafe {
            assert_eq!(*b.host().add(3 * p as usize), 0);
            b.host().add(3 * p as usize).write(7);
            assert_eq!(*b.host().add(3 * p as usize), 7);
        }
        assert_eq!(b.host_offset(b.host().wrapping_add(5)), Some(5));
        assert_eq!(b.host_offset(b.host().wrapping_add(4 * p as usize)), None);
    }

    /// Pages of `b` that are resident.
    fn resident(b: &RamBlock) -> usize {
        let pages = (b.len() / page_size()) as usize;
        let mut v = vec![0u8; pages];
        // SAFETY: mincore writes one byte per page of the block's own mapping into `v`.
        let r = unsafe { libc::mincore(b.host().cast(), b.len() as usize, v.as_mut_ptr()) };
        assert_eq!(r, 0);
        v.iter().filter(|&&x| x & 1 == 1).count()
    }

    #[test]
    fn populate_faults_every_page_in_and_so_does_its_fallback() {
        assert!(
            populate_write_supported(),
            "this kernel has MADV_POPULATE_WRITE (5.14+)"
        );
        let p = page_size();
        let lazy = RamBlockOptions::default();
        let b = block(
            "lazy",
            HostMemory::anonymous("lazy", 16 * p, &lazy).unwrap(),
        );
        assert_eq!(resident(&b), 0);
        populate("lazy", b.host, 8 * p).unwrap();
        assert_eq!(resident(&b), 8);
        // SAFETY: the block's own memory, used by nothing else.
        unsafe { touch_pages(b.host, 16 * p as usize) };
        assert_eq!(resident(&b), 16);
    }

    #[test]
    fn caller_pointer_is_not_unmapped() {
        let p = page_size();
        let opts = RamBlockOptions {
            prealloc: true,
            ..Default::default()
        };
        let own = HostMemory::anonymous("own", p, &RamBlockOptions::default()).unwrap();
        // SAFETY: `own` stays mapped until the end of the test, after the block is gone.
        let mem = unsafe { HostMemory::from_ptr("ptr", p, own.host.as_ptr(), &opts) }.unwrap();
        drop(block("ptr", mem));
        // SAFETY: still mapped: the block did not unmap the caller's memory.
        unsafe { own.host.as_ptr().write(1) };
        // SAFETY: a null pointer is refused before any use.
        let bad = unsafe { HostMemory::from_ptr("ptr", p, std::ptr::null_mut(), &opts) };
        assert!(matches!(bad, Err(RamError::BadHostMemory { value: 0, .. })));
        // SAFETY: an unaligned pointer is refused before any use.
        let bad =
            unsafe { HostMemory::from_ptr("ptr", p, own.host.as_ptr().wrapping_add(1), &opts) };
        assert!(matches!(bad, Err(RamError::BadHostMemory { .. })));
    }

    #[test]
    fn short_file_and_bad_offset_are_refused() {
        let p = page_size();
        let opts = RamBlockOptions::default();
        // A bad descriptor cannot be passed any more: BorrowedFd guarantees an open one.
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let len = f.metadata().unwrap().len();

        let r = HostMemory::from_fd("f", p, f.as_fd(), (len + 2 * p) & !(p - 1), &opts);
        assert!(
            matches!(r, Err(RamError::Mmap { .. })),
            "{r:?}",
            r = r.err()
        );
        let r = HostMemory::from_fd("f", p, f.as_fd(), 1, &opts);
        assert!(matches!(
            r,
            Err(RamError::BadHostMemory {
                what: "file offset",
                ..
            })
        ));
    }
}
