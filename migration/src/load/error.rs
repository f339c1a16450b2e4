//! [`LoadError`]: every way the loader refuses a stream, each naming the bad value and the
//! stream byte offset where it starts.

use crate::stream::{ReadError, SectionKind};
use std::error::Error as StdError;

/// The error a [`BlockHotplug`](super::BlockHotplug) returns, passed on as it is.
pub type HotplugError = Box<dyn StdError + Send + Sync>;

/// Why a stream was refused. `offset` is always the stream byte offset at which the bad
/// value (or the value that could not be read) starts.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The stream ended early, or the transport failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Not a migration stream.
    #[error("byte {offset}: bad magic {found:#010x}, not a minivmm migration stream")]
    BadMagic {
        /// Stream offset.
        offset: u64,
        /// The four bytes found, big-endian.
        found: u32,
    },
    /// A stream of another layout version.
    #[error("byte {offset}: stream version {found}, this loader reads version {supported}")]
    BadVersion {
        /// Stream offset.
        offset: u64,
        /// The version found.
        found: u32,
        /// The version understood.
        supported: u32,
    },
    /// A section kind byte no layout defines.
    #[error("byte {offset}: unknown section kind {kind:#04x}")]
    UnknownSection {
        /// Stream offset.
        offset: u64,
        /// The byte found.
        kind: u8,
    },
    /// Something of the post-copy switch or stream was wrong (the message says what).
    #[error("byte {offset}: post-copy: {why}")]
    Postcopy {
        /// Stream offset.
        offset: u64,
        /// What was wrong.
        why: String,
    },
    /// A section where the layout does not allow it.
    #[error("byte {offset}: a {} section cannot come {after}", kind.name())]
    UnexpectedSection {
        /// Stream offset.
        offset: u64,
        /// The section found.
        kind: SectionKind,
        /// Where it came ("first", "after the RAM setup", ...).
        after: &'static str,
    },
    /// The stream's page size is not ours.
    #[error("byte {offset}: stream page size {stream}, this loader uses {ours}")]
    PageSizeMismatch {
        /// Stream offset.
        offset: u64,
        /// The stream's page size.
        stream: u32,
        /// Ours.
        ours: u64,
    },
    /// More blocks than the layout allows.
    #[error("byte {offset}: {count} RAM blocks, at most {max} are allowed")]
    TooManyBlocks {
        /// Stream offset.
        offset: u64,
        /// How many the stream declares.
        count: u64,
        /// The limit.
        max: u32,
    },
    /// An idstr length of zero or over the limit.
    #[error("byte {offset}: idstr length {len} is out of range 1..={max}")]
    BadIdLen {
        /// Stream offset.
        offset: u64,
        /// The length byte.
        len: u8,
        /// The longest id.
        max: usize,
    },
    /// An idstr that is not UTF-8 or holds a NUL.
    #[error("byte {offset}: idstr {id:?} is {why}")]
    BadId {
        /// Stream offset.
        offset: u64,
        /// The bytes, lossily shown.
        id: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// QEMU's "Unknown ramblock": the destination has no such block (or the stream never
    /// declared it).
    #[error("byte {offset}: unknown ramblock {id:?}")]
    UnknownBlock {
        /// Stream offset.
        offset: u64,
        /// The idstr.
        id: String,
    },
    /// QEMU's "Length mismatch".
    #[error("byte {offset}: length mismatch for ramblock {id:?}: stream {stream:#x}, destination {ours:#x}")]
    LengthMismatch {
        /// Stream offset.
        offset: u64,
        /// The block.
        id: String,
        /// The length the stream says.
        stream: u64,
        /// The destination block's length.
        ours: u64,
    },
    /// A RAM setup entry with block flags the layout does not define.
    #[error("byte {offset}: ramblock {id:?}: unknown setup flags {flags:#x}")]
    BadBlockFlags {
        /// Stream offset.
        offset: u64,
        /// The block.
        id: String,
        /// The flag bits found.
        flags: u64,
    },
    /// A block listed twice in the RAM setup.
    #[error("byte {offset}: ramblock {id:?} is listed twice")]
    DuplicateBlock {
        /// Stream offset.
        offset: u64,
        /// The block.
        id: String,
    },
    /// A record word with unknown flags or a combination the layout does not allow.
    #[error("byte {offset}: bad record word {word:#018x}: {why}")]
    BadRecord {
        /// Stream offset.
        offset: u64,
        /// The word.
        word: u64,
        /// What is wrong with it.
        why: String,
    },
    /// CONTINUE on a section's first page record, or right after a block was added or
    /// removed.
    #[error("byte {offset}: CONTINUE with no previous block in this section")]
    ContinueWithoutBlock {
        /// Stream offset.
        offset: u64,
    },
    /// A page (or a run of `pages` pages) that does not lie inside its block.
    #[error(
        "byte {offset}: {pages} page(s) at {page_offset:#x} run past the end of ramblock \
         {id:?} of {len:#x} bytes"
    )]
    OffsetOutOfBlock {
        /// Stream offset.
        offset: u64,
        /// The block.
        id: String,
        /// The (first) page's offset in the block.
        page_offset: u64,
        /// How many pages.
        pages: u64,
        /// The block's length.
        len: u64,
    },
    /// A PAGE|MANY record whose count is under 2 or over the limit.
    #[error("byte {offset}: a run of {count} pages (2..={max} allowed)")]
    BadRunLength {
        /// Stream offset.
        offset: u64,
        /// The count.
        count: u16,
        /// The limit.
        max: u16,
    },
    /// BLOCK_ADD for an id the destination or the stream already has.
    #[error("byte {offset}: cannot add ramblock {id:?}: it already exists")]
    BlockExists {
        /// Stream offset.
        offset: u64,
        /// The block.
        id: String,
    },
    /// BLOCK_ADD with a length that is zero, not whole pages, or over the limit.
    #[error("byte {offset}: cannot add ramblock {id:?} of {len:#x} bytes ({why})")]
    BadNewBlock {
        /// Stream offset.
        offset: u64,
        /// The block.
        id: String,
        /// The length asked for.
        len: u64,
        /// What is wrong with it.
        why: String,
    },
    /// The VMM's hotplug callback failed, or did not do what it was asked.
    #[error("byte {offset}: {what} ramblock {id:?} failed: {source}")]
    Hotplug {
        /// Stream offset.
        offset: u64,
        /// "adding" or "removing".
        what: &'static str,
        /// The block.
        id: String,
        /// The callback's error.
        source: HotplugError,
    },
    /// A state blob larger than the cap.
    #[error("byte {offset}: state {name:?} of {len} bytes exceeds the limit of {max}")]
    StateTooLarge {
        /// Stream offset.
        offset: u64,
        /// The component.
        name: String,
        /// Its declared length.
        len: u64,
        /// The limit (one blob, or all together).
        max: u64,
    },
    /// A component's state sent twice.
    #[error("byte {offset}: state of {name:?} is sent twice")]
    DuplicateState {
        /// Stream offset.
        offset: u64,
        /// The component.
        name: String,
    },
}

impl LoadError {
    /// Whether the stream stopped because the transport did (ended, broke, stalled),
    /// not because of what it said.
    pub fn is_transport(&self) -> bool {
        matches!(self, LoadError::Read(_))
    }

    /// The stream byte offset the error is about.
    pub fn offset(&self) -> u64 {
        use LoadError::*;
        match self {
            Read(e) => e.offset(),
            BadMagic { offset, .. }
            | BadVersion { offset, .. }
            | UnknownSection { offset, .. }
            | UnexpectedSection { offset, .. }
            | Postcopy { offset, .. }
            | PageSizeMismatch { offset, .. }
            | TooManyBlocks { offset, .. }
            | BadIdLen { offset, .. }
            | BadId { offset, .. }
            | UnknownBlock { offset, .. }
            | LengthMismatch { offset, .. }
            | BadBlockFlags { offset, .. }
            | DuplicateBlock { offset, .. }
            | BadRecord { offset, .. }
            | ContinueWithoutBlock { offset }
            | OffsetOutOfBlock { offset, .. }
            | BadRunLength { offset, .. }
            | BlockExists { offset, .. }
            | BadNewBlock { offset, .. }
            | Hotplug { offset, .. }
            | StateTooLarge { offset, .. }
            | DuplicateState { offset, .. } => *offset,
        }
    }
}
