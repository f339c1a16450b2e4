//! The stream's constants (magic, version, section kinds, record flags) and the decoding of
//! a record's 64-bit word into what it means, refusing every combination the layout does
//! not allow.

use std::fmt;

/// The first four bytes of every stream: "MVMS" (minivmm stream).
pub const MAGIC: u32 = u32::from_be_bytes(*b"MVMS");
/// The layout described in this module's parent; a loader refuses any other.
pub const VERSION: u32 = 1;
/// The unit of the stream's pages, and of the dirty bitmaps (4 KiB, the page KVM logs
/// in). Record flags live in the bits below it.
pub const PAGE_SIZE: u64 = ramlist::dirty::PAGE_SIZE;
/// The most pages one PAGE|MANY record carries (1 MiB of data).
pub const MAX_RUN_PAGES: u16 = 256;
/// The most blocks a RAM_SETUP section may list: far above any VM, small enough that the
/// loader's bookkeeping for them is a few hundred KiB at most.
pub const MAX_SETUP_BLOCKS: u32 = 4096;

// A string's length is one byte: the id limit must fit in it.
const _: () = assert!(ramlist::MAX_ID_LEN <= u8::MAX as usize);
const _: () = assert!(PAGE_SIZE.is_power_of_two() && PAGE_SIZE >= 64);

/// What follows a section's kind byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SectionKind {
    /// Every block's idstr and length.
    RamSetup = 0x01,
    /// Page records up to EOS.
    Ram = 0x02,
    /// One component's opaque state.
    State = 0x03,
    /// The end of the stream (or, after [`SectionKind::Postcopy`], of the switch
    /// package: post-copy RAM sections and a second end follow).
    End = 0x04,
    /// The switch to post-copy: the pages the destination must not trust, as runs per
    /// block; the states and an end follow, then the rest of RAM.
    Postcopy = 0x05,
}

impl SectionKind {
    /// The kind a byte stands for, if any.
    pub fn from_u8(b: u8) -> Option<SectionKind> {
        Some(match b {
            0x01 => SectionKind::RamSetup,
            0x02 => SectionKind::Ram,
            0x03 => SectionKind::State,
            0x04 => SectionKind::End,
            0x05 => SectionKind::Postcopy,
            _ => return None,
        })
    }

    /// How the section is called in messages.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::RamSetup => "RAM setup",
            SectionKind::Ram => "RAM",
            SectionKind::State => "state",
            SectionKind::End => "end",
            SectionKind::Postcopy => "post-copy switch",
        }
    }
}

/// One block's entry in a post-copy switch: the runs of pages, as (first page, page
/// count), ascending and apart, that the destination must not trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRuns {
    /// The block's idstr.
    pub id: String,
    /// The block's length in bytes.
    pub len: u64,
    /// The runs.
    pub runs: Vec<(u64, u64)>,
}

/// The flag bits of a record's word (its bits below [`PAGE_SIZE`]).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u64);

impl Flags {
    /// The page is all zeros; no data follows.
    pub const ZERO: Flags = Flags(0x01);
    /// [`PAGE_SIZE`] bytes of data follow.
    pub const PAGE: Flags = Flags(0x02);
    /// Same block as the previous page record; no idstr follows.
    pub const CONTINUE: Flags = Flags(0x04);
    /// End of section.
    pub const EOS: Flags = Flags(0x08);
    /// The source added a block (the word's value is its length); its idstr follows.
    pub const BLOCK_ADD: Flags = Flags(0x10);
    /// The source removed a block; its idstr follows.
    pub const BLOCK_DEL: Flags = Flags(0x20);
    /// With PAGE: a run of consecutive pages; a u16 count (2..=[`MAX_RUN_PAGES`]) follows
    /// the idstr, then that many pages of data (QEMU's multifd batches pages the same way,
    /// so the destination can read them straight into guest memory).
    pub const MANY: Flags = Flags(0x40);
    /// With BLOCK_ADD: the block has a guest-physical address, a u64 that follows the
    /// idstr (so the destination places it where the guest saw it on the source).
    pub const PLACED: Flags = Flags(0x80);
    /// Every bit the layout defines.
    pub const KNOWN: Flags = Flags(0xff);
    /// Every bit a word may use for flags.
    pub const MASK: u64 = PAGE_SIZE - 1;

    /// Whether every bit of `other` is set here.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Flags::ZERO, "ZERO"),
            (Flags::PAGE, "PAGE"),
            (Flags::CONTINUE, "CONTINUE"),
            (Flags::EOS, "EOS"),
            (Flags::BLOCK_ADD, "BLOCK_ADD"),
            (Flags::BLOCK_DEL, "BLOCK_DEL"),
            (Flags::MANY, "MANY"),
            (Flags::PLACED, "PLACED"),
        ];
        let mut first = true;
        for (flag, name) in names {
            if self.contains(flag) {
                write!(f, "{}{name}", if first { "" } else { "|" })?;
                first = false;
            }
        }
        let rest = self.0 & !Flags::KNOWN.0;
        if rest != 0 || first {
            write!(f, "{}{rest:#x}", if first { "" } else { "|" })?;
        }
        Ok(())
    }
}

/// The flag bits of a RAM_SETUP entry: the low bits of its length word (a block length
/// is a whole number of pages, so the bits below [`PAGE_SIZE`] are free, as in record
/// words).
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct BlockFlags(pub u64);

impl BlockFlags {
    /// No flag: every page of the block that may differ from the destination's is sent.
    pub const NONE: BlockFlags = BlockFlags(0);
    /// The source sends no record for pages it knows read as zero (never touched, or
    /// mapping the shared zero page): the destination block must read as zero wherever
    /// no page arrives. The loader makes sure of it before the first RAM section.
    pub const ZERO_SKIPPED: BlockFlags = BlockFlags(0x01);
    /// Every bit the layout defines.
    pub const KNOWN: BlockFlags = BlockFlags(0x01);

    /// Whether every bit of `other` is set here.
    pub fn contains(self, other: BlockFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Splits a setup entry's length word into the length and its flags.
    pub fn split(word: u64) -> (u64, BlockFlags) {
        (word & !Flags::MASK, BlockFlags(word & Flags::MASK))
    }
}

/// One record of a RAM section, decoded from its word (what follows the word is read by
/// the loader according to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRecord {
    /// A zero page at `offset` of the named (or, with `cont`, the previous) block.
    Zero {
        /// Offset in the block (page-aligned by construction).
        offset: u64,
        /// CONTINUE was set.
        cont: bool,
    },
    /// A page of data at `offset`.
    Page {
        /// Offset in the block (page-aligned by construction).
        offset: u64,
        /// CONTINUE was set.
        cont: bool,
    },
    /// A run of pages of data from `offset` (their count follows).
    Run {
        /// Offset in the block of the first page (page-aligned by construction).
        offset: u64,
        /// CONTINUE was set.
        cont: bool,
    },
    /// A block the source added, `len` bytes long.
    BlockAdd {
        /// The word's value: the block length (a multiple of the page size).
        len: u64,
    },
    /// A block the source added, `len` bytes long, at a guest-physical address that
    /// follows its idstr (BLOCK_ADD|PLACED).
    BlockAddPlaced {
        /// The word's value: the block length (a multiple of the page size).
        len: u64,
    },
    /// A block the source removed.
    BlockDel,
    /// End of section.
    Eos,
}

/// Why a record's word is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WordError {
    /// Bits outside [`Flags::KNOWN`] are set.
    UnknownFlags(Flags),
    /// A combination the layout does not allow (the message says which).
    BadCombination(Flags, &'static str),
    /// EOS or BLOCK_DEL carried a non-zero value.
    NonZeroValue(Flags),
}

impl fmt::Display for WordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WordError::UnknownFlags(fl) => write!(f, "unknown flags {fl:?}"),
            WordError::BadCombination(fl, why) => write!(f, "flags {fl:?}: {why}"),
            WordError::NonZeroValue(fl) => write!(f, "flags {fl:?} with a non-zero value"),
        }
    }
}

impl PageRecord {
    /// Splits a word into value and flags and checks the combination.
    pub fn decode(word: u64) -> Result<PageRecord, WordError> {
        let flags = Flags(word & Flags::MASK);
        let value = word & !Flags::MASK;
        if flags.0 & !Flags::KNOWN.0 != 0 {
            return Err(WordError::UnknownFlags(flags));
        }
        let cont = flags.contains(Flags::CONTINUE);
        let many = flags.contains(Flags::MANY);
        let placed = flags.contains(Flags::PLACED);
        let kinds = flags.0 & !(Flags::CONTINUE.0 | Flags::MANY.0 | Flags::PLACED.0);
        if kinds.count_ones() != 1 {
            let why = if kinds == 0 {
                "no record kind"
            } else {
                "more than one record kind"
            };
            return Err(WordError::BadCombination(flags, why));
        }
        let kind = Flags(kinds);
        if cont && kind != Flags::ZERO && kind != Flags::PAGE {
            return Err(WordError::BadCombination(
                flags,
                "CONTINUE only goes with ZERO or PAGE",
            ));
        }
        if many && kind != Flags::PAGE {
            return Err(WordError::BadCombination(flags, "MANY only goes with PAGE"));
        }
        if placed && kind != Flags::BLOCK_ADD {
            return Err(WordError::BadCombination(
                flags,
                "PLACED only goes with BLOCK_ADD",
            ));
        }
        Ok(match kind {
            Flags::PAGE if many => PageRecord::Run {
                offset: value,
                cont,
            },
            Flags::ZERO => PageRecord::Zero {
                offset: value,
                cont,
            },
            Flags::PAGE => PageRecord::Page {
                offset: value,
                cont,
            },
            Flags::BLOCK_ADD if placed => PageRecord::BlockAddPlaced { len: value },
            Flags::BLOCK_ADD => PageRecord::BlockAdd { len: value },
            _ if value != 0 => return Err(WordError::NonZeroValue(flags)),
            Flags::BLOCK_DEL => PageRecord::BlockDel,
            _ => PageRecord::Eos,
        })
    }

    /// The word that stands for this record (the inverse of [`decode`](Self::decode) for
    /// page-aligned values).
    pub fn encode(self) -> u64 {
        let c = |cont: bool| if cont { Flags::CONTINUE.0 } else { 0 };
        match self {
            PageRecord::Zero { offset, cont } => offset | Flags::ZERO.0 | c(cont),
            PageRecord::Page { offset, cont } => offset | Flags::PAGE.0 | c(cont),
            PageRecord::Run { offset, cont } => offset | Flags::PAGE.0 | Flags::MANY.0 | c(cont),
            PageRecord::BlockAdd { len } => len | Flags::BLOCK_ADD.0,
            PageRecord::BlockAddPlaced { len } => len | Flags::BLOCK_ADD.0 | Flags::PLACED.0,
            PageRecord::BlockDel => Flags::BLOCK_DEL.0,
            PageRecord::Eos => Flags::EOS.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let recs = [
            PageRecord::Zero {
                offset: 0,
                cont: false,
            },
            PageRecord::Zero {
                offset: 7 * PAGE_SIZE,
                cont: true,
            },
            PageRecord::Page {
                offset: 1 << 40,
                cont: false,
            },
            PageRecord::Page {
                offset: PAGE_SIZE,
                cont: true,
            },
            PageRecord::Run {
                offset: 3 * PAGE_SIZE,
                cont: true,
            },
            PageRecord::BlockAdd { len: 1 << 30 },
            PageRecord::BlockAddPlaced { len: 1 << 30 },
            PageRecord::BlockDel,
            PageRecord::Eos,
        ];
        for r in recs {
            assert_eq!(PageRecord::decode(r.encode()), Ok(r));
        }
    }

    #[test]
    fn bad_words_are_refused() {
        use WordError::*;
        let bad = |w: u64| PageRecord::decode(w).unwrap_err();
        assert!(matches!(bad(0x100), UnknownFlags(_)));
        assert!(matches!(bad(0x80), BadCombination(..)));
        assert!(matches!(bad(0x80 | 0x02), BadCombination(..)));
        assert!(matches!(bad(0x80 | 0x20), BadCombination(..)));
        assert!(matches!(bad(0x40 | 0x01), BadCombination(..)));
        assert!(matches!(bad(0x40), BadCombination(..)));
        assert!(matches!(bad(0x800 | 0x02), UnknownFlags(_)));
        assert!(matches!(bad(0), BadCombination(..)));
        assert!(matches!(bad(0x04), BadCombination(..)));
        assert!(matches!(bad(0x03), BadCombination(..)));
        assert!(matches!(bad(0x08 | 0x04), BadCombination(..)));
        assert!(matches!(bad(0x10 | 0x04), BadCombination(..)));
        assert!(matches!(bad(0x1000 | 0x08), NonZeroValue(_)));
        assert!(matches!(bad(0x1000 | 0x20), NonZeroValue(_)));
        assert_eq!(format!("{:?}", Flags(0x105)), "ZERO|CONTINUE|0x100");
        assert_eq!(format!("{:?}", Flags(0x90)), "BLOCK_ADD|PLACED");
    }
}
