//! [`RamError`]: every way a RAM-list request can be refused, each naming the bad value.

use std::io;

/// Why a RAM-list operation was refused. A refused operation leaves the list as it was:
/// same blocks, same version.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// Another block already has this id (ids name blocks in the migration stream).
    #[error("RAM block id {0:?} is already in use")]
    DuplicateId(String),
    /// An empty id cannot name a block in the stream.
    #[error("RAM block id is empty")]
    EmptyId,
    /// QEMU's idstr is 256 bytes including its NUL; ours is held to the same limit.
    #[error("RAM block id {id:?} is {len} bytes long; at most {max} are allowed")]
    IdTooLong {
        /// The id as given.
        id: String,
        /// Its length in bytes.
        len: usize,
        /// The longest id allowed.
        max: usize,
    },
    /// An id with a NUL byte could not cross into C or the stream unchanged.
    #[error("RAM block id {0:?} contains a NUL byte")]
    IdHasNul(String),
    /// A block of no bytes.
    #[error("RAM block {id:?}: size is zero")]
    ZeroSize {
        /// The block's id.
        id: String,
    },
    /// Sizes are whole pages.
    #[error("RAM block {id:?}: size {size:#x} is not a multiple of the page size {page:#x}")]
    UnalignedSize {
        /// The block's id.
        id: String,
        /// The size asked for.
        size: u64,
        /// The host page size.
        page: u64,
    },
    /// Larger than one block may be.
    #[error("RAM block {id:?}: size {size:#x} exceeds the limit of {max:#x} bytes")]
    SizeTooLarge {
        /// The block's id.
        id: String,
        /// The size asked for.
        size: u64,
        /// The largest block allowed.
        max: u64,
    },
    /// No gap of the ram_addr space is large enough.
    #[error("RAM block {id:?}: no room for {size:#x} bytes in the ram_addr space")]
    NoRamAddrSpace {
        /// The block's id.
        id: String,
        /// The size asked for.
        size: u64,
    },
    /// No block has this id.
    #[error("no RAM block with id {0:?}")]
    UnknownId(String),
    /// No block covers this ram_addr.
    #[error("no RAM block at ram_addr {0:#x}")]
    UnknownRamAddr(u64),
    /// No block's host mapping holds this pointer.
    #[error("host address {0:#x} is outside every RAM block")]
    UnknownHostAddr(usize),
    /// A guest-physical address that is not page aligned, or a range past 2^64.
    #[error("RAM block {id:?}: bad guest-physical range at {addr:#x} (+{size:#x})")]
    BadGuestAddr {
        /// The block's id.
        id: String,
        /// The guest-physical address asked for.
        addr: u64,
        /// The block's size.
        size: u64,
    },
    /// The guest-physical range would overlap another block's.
    #[error(
        "RAM block {id:?}: guest-physical range {start:#x}..{end:#x} overlaps block {other:?}"
    )]
    GuestOverlap {
        /// The block's id.
        id: String,
        /// First guest-physical address of the new block.
        start: u64,
        /// One past its last.
        end: u64,
        /// The block already there.
        other: String,
    },
    /// A host pointer or file offset that is null or not page aligned.
    #[error("RAM block {id:?}: {what} {value:#x} is not usable (null or not page aligned)")]
    BadHostMemory {
        /// The block's id.
        id: String,
        /// "host pointer" or "file offset".
        what: &'static str,
        /// The value given.
        value: u64,
    },
    /// The file or memfd a shared block is made of could not be made (carries the system's
    /// error).
    #[error("RAM block {id:?}: {what}: {source}")]
    Backing {
        /// The block's id.
        id: String,
        /// What was being done ("creating its memfd", "creating /dev/shm/g/extra").
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The kernel refused the mapping (carries its errno).
    #[error("RAM block {id:?}: mmap of {size:#x} bytes failed: {source}")]
    Mmap {
        /// The block's id.
        id: String,
        /// The size asked for.
        size: u64,
        /// The kernel's error.
        source: io::Error,
    },
    /// A block's memory cannot be replaced in place (it is the caller's memory, or the
    /// new memory's size is not the block's).
    #[error("RAM block {id:?}: its memory cannot be replaced in place: {why}")]
    NotReplaceable {
        /// The block's id.
        id: String,
        /// Why not.
        why: String,
    },
    /// Preallocating (populating) the memory failed (carries its errno).
    #[error("RAM block {id:?}: preallocating {size:#x} bytes failed: {source}")]
    Prealloc {
        /// The block's id.
        id: String,
        /// The size asked for.
        size: u64,
        /// The kernel's error.
        source: io::Error,
    },
    /// A dirty-bitmap page size that is not a power of two of at least 512 bytes.
    #[error("dirty bitmap page size {0:#x} is not a power of two of at least 0x200 bytes")]
    BadPageSize(u64),
    /// The block's own duplicate of the caller's file descriptor could not be made.
    #[error("RAM block {id:?}: duplicating fd {fd} failed: {source}")]
    DupFd {
        /// The block's id.
        id: String,
        /// The caller's descriptor.
        fd: i32,
        /// The kernel's error.
        source: io::Error,
    },
    /// A block of another list than the dirty bitmaps asked: its span there is not its own.
    #[error("RAM block {0:?} is not on the list these dirty bitmaps belong to")]
    ForeignBlock(String),
    /// A block page that should start a bitmap word (a multiple of 64) does not.
    #[error("RAM block {id:?}: page {page:#x} does not start a 64-page bitmap word")]
    UnalignedPage {
        /// The block's id.
        id: String,
        /// The page asked for.
        page: u64,
    },
    /// Opening or reading `/proc/self/pagemap` failed.
    #[error(
        "/proc/self/pagemap{}: {source}",
        id.as_ref().map(|i| format!(" (RAM block {i:?})")).unwrap_or_default()
    )]
    Pagemap {
        /// The block being scanned (`None` while opening).
        id: Option<String>,
        /// The kernel's error.
        source: io::Error,
    },
}
