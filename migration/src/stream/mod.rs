//! The migration stream: its byte layout, and the buffered [`StreamWriter`] and bounded
//! [`StreamReader`] that put it on and take it off a transport.
//!
//! QEMU's shape, our bytes. Every integer is big-endian. A string (`idstr`) is one length
//! byte `n` (1..=[`MAX_ID_LEN`]) followed by `n` bytes of UTF-8 holding no NUL.
//!
//! ```text
//! stream   := header section* END
//! header   := MAGIC "MVMS" (4 bytes) | VERSION u32 (= 1)
//! section  := kind u8, then by kind:
//!   0x01 RAM_SETUP  page_size u32 (= 4096) | count u32 (<= MAX_SETUP_BLOCKS)
//!                   | count × (idstr | length u64 = length | block flags)
//!   0x02 RAM        record* , the last one with EOS
//!   0x03 STATE      name idstr | length u32 (<= the loader's cap) | length bytes
//!   0x04 END        (nothing follows; the loader returns without waiting for more)
//! record   := word u64 = value | flags   (flags: the low 12 bits, below the page size)
//!   ZERO  [CONTINUE]   value = offset in the block; idstr follows unless CONTINUE;
//!                      the page is all zeros, no data
//!   PAGE  [CONTINUE]   value = offset in the block; idstr follows unless CONTINUE;
//!                      then PAGE_SIZE bytes of data
//!   PAGE|MANY [CONTINUE]  value = offset of the first page; idstr unless CONTINUE;
//!                      count u16 (2..=MAX_RUN_PAGES); count × PAGE_SIZE bytes of data
//!                      for the pages at offset, offset + PAGE_SIZE, ...
//!   BLOCK_ADD [PLACED] value = the new block's length; idstr follows; with PLACED
//!                      then its guest-physical address u64 (page-aligned)
//!   BLOCK_DEL          value = 0; idstr follows
//!   EOS                value = 0; ends the section
//! ```
//!
//! Flags are ZERO = 0x01, PAGE = 0x02, CONTINUE = 0x04, EOS = 0x08, BLOCK_ADD = 0x10,
//! BLOCK_DEL = 0x20, MANY = 0x40, PLACED = 0x80; a record has exactly one of ZERO, PAGE,
//! EOS, BLOCK_ADD and BLOCK_DEL, CONTINUE only beside ZERO or PAGE, MANY only beside PAGE,
//! PLACED only beside BLOCK_ADD, and no other bit. Runs (MANY) let the destination read
//! page data straight into guest memory instead of through its buffer. CONTINUE means
//! "the same block as the previous page record of this section"; a section's first page
//! record, and the first after a BLOCK_ADD or BLOCK_DEL, names its block.
//!
//! A setup entry's block flags (its low 12 bits, [`BlockFlags`]) are ZERO_SKIPPED = 0x01
//! (the source sends nothing for the block's pages it knows are zero: the destination's
//! block must read as zero where no page arrives) and no other bit.
//!
//! Sections come in this order: one RAM_SETUP (every block the source has, with its
//! length, but those it announces by BLOCK_ADD), any number of RAM sections (the first
//! pass, the iterations and the final stage: each one batch of the saver), any number of
//! STATE sections (opaque vCPU and device blobs, keyed by component name, each name
//! once), then END.
//!
//! Blocks added or removed on the source while it migrates travel inside RAM sections:
//! BLOCK_DEL names a block the destination drops, BLOCK_ADD one it creates (through the
//! VMM's [`BlockHotplug`](crate::load::BlockHotplug)) before its pages arrive, at the
//! guest-physical address PLACED gives. A block re-created under the same id is a
//! BLOCK_DEL followed by a BLOCK_ADD. Blocks the VMM hot-added before the migration
//! started go the same way (a BLOCK_ADD at the start of the first RAM section), since a
//! destination started from the same command line does not have them; the RAM setup
//! lists the blocks both sides build by themselves.
//!
//! `docs/stream.md` at the repository root has the same layout with a worked example.

mod format;
mod lent;
mod rate;
mod reader;
mod writer;

pub use format::{
    BlockFlags, BlockRuns, Flags, PageRecord, SectionKind, WordError, MAGIC, MAX_RUN_PAGES,
    MAX_SETUP_BLOCKS, PAGE_SIZE, VERSION,
};
pub use rate::RateLimiter;
pub use reader::{ReadError, StreamReader};
pub use writer::{StreamWriter, DEFAULT_BUFFER};

/// The longest idstr the stream carries (ramlist's own limit, QEMU's `idstr[256]`).
pub use ramlist::MAX_ID_LEN;
