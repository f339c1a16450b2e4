//! The destination: [`load`] reads a migration stream into a [`RamList`], checking every
//! value that comes off the wire before it acts on it.
//!
//! # What is checked, before anything is written
//!
//! - the header's magic and version; each section's kind and its place in the order
//!   (setup first, RAM sections, state sections, end);
//! - the RAM setup: the page size, the block count (at most
//!   [`MAX_SETUP_BLOCKS`]), every idstr (length 1..=[`MAX_ID_LEN`], UTF-8, no NUL, known to
//!   the destination: else "unknown ramblock"), every length (equal to the destination
//!   block's: else "length mismatch", naming both), no block twice;
//! - every record word: no unknown flag, exactly one record kind, CONTINUE only on pages
//!   and only after a page of the same section named its block;
//! - every page and run: its block declared by the stream and present on the destination
//!   with the declared length, a run's count in 2..=[`MAX_RUN_PAGES`](crate::stream::MAX_RUN_PAGES), and
//!   `offset + count × PAGE_SIZE <= len` (offsets are page-aligned by the layout: the bits
//!   below the page size are the flags);
//! - blocks added by the source: an id neither the stream nor the destination has, a
//!   non-zero length of whole pages of at most [`LoadOptions::max_new_block`]; the
//!   destination creates them through the VMM's [`BlockHotplug`], and the loader checks
//!   the result before using it;
//! - state blobs: a valid name, sent once, at most [`LoadOptions::max_state_len`] bytes
//!   each and [`LoadOptions::max_state_total`] in all, allocated only as bytes arrive.
//!
//! Destination blocks the setup does not list are left as they are (and logged), as in
//! QEMU; a page for one is refused as an unknown ramblock.
//!
//! Every read is bounded by the value being read; the end of the stream anywhere is a
//! [`ReadError::Eof`](crate::stream::ReadError::Eof) naming the offset and the value. A
//! truncated stream may leave some pages written: all inside their blocks.
//!
//! # Read-side sections
//!
//! The loader reads under `rcu::read_lock()`, as QEMU's `ram_load`: lookups of blocks by
//! id take the guard it holds. It drops the guard at every EOS, every
//! [`LoadOptions::pages_per_read_section`] pages, and around hotplug calls, so that grace
//! periods (and reclamation) on the destination progress during a long load (a source
//! that stalls mid-section holds them up until the transport's read timeout, which the
//! caller sets on the connection). The block
//! it is writing to is held by a counted reference ([`ramlist::RamBlockRef`]) across those
//! drops, so its memory stays mapped.
//!
//! # Blocks whose zero pages were skipped
//!
//! A setup entry flagged ZERO_SKIPPED ([`BlockFlags`]) gets no record for the pages the
//! source knows are zero. After the whole setup is checked, and before any RAM section,
//! the loader makes such a block read as zero: pagemap shows which pages of a fresh
//! anonymous block have anything behind them (none, for the fresh process the
//! destination is), only those are read, and any that is not zero is cleared (counted in
//! [`LoadSummary::stale_pages_cleared`]). A block pagemap cannot answer for is read whole.
//!
//! # Zero pages
//!
//! A zero page is written only if the destination page is not zero already: the loader
//! reads it first, and for blocks it created itself (fresh anonymous memory) it keeps a
//! bitmap of the pages it wrote and skips the others without touching them.

mod error;
mod fresh;
mod hotplug;
mod ram;

pub use error::{HotplugError, LoadError};
pub use hotplug::{AnonymousHotplug, BlockHotplug, NoHotplug};

use crate::stream::{
    BlockFlags, SectionKind, StreamReader, MAGIC, MAX_ID_LEN, MAX_SETUP_BLOCKS, PAGE_SIZE, VERSION,
};
use ramlist::{RamBlockRef, RamList};
use rcu::ReadGuard;
use std::collections::HashMap;
use std::io::Read;

/// Limits on what a stream may ask of the destination.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Largest single state blob (default 16 MiB).
    pub max_state_len: u32,
    /// Largest sum of state blobs (default 64 MiB).
    pub max_state_total: u64,
    /// Largest block the source may add during migration (default 64 GiB).
    pub max_new_block: u64,
    /// Pages written between two drops of the read-side section (default 16 Ki pages,
    /// 64 MiB).
    pub pages_per_read_section: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_state_len: 16 << 20,
            max_state_total: 64 << 20,
            max_new_block: 64 << 30,
            pages_per_read_section: 16 << 10,
        }
    }
}

/// One component's state, as the source sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentState {
    /// The component's name.
    pub name: String,
    /// Its opaque state.
    pub data: Vec<u8>,
}

/// What a successful load did.
#[derive(Debug, Default, Clone)]
pub struct LoadSummary {
    /// Stream bytes read, end marker included.
    pub bytes: u64,
    /// RAM sections read.
    pub ram_sections: u64,
    /// Pages of data written.
    pub pages: u64,
    /// Zero-page records read.
    pub zero_pages: u64,
    /// Zero-page records that had to clear a non-zero destination page.
    pub zero_pages_written: u64,
    /// Pages of ZERO_SKIPPED blocks (see [`BlockFlags`]) that held data on the
    /// destination before the load and were cleared: zero for a fresh destination.
    pub stale_pages_cleared: u64,
    /// Pages of ZERO_SKIPPED blocks read to check them (the ones the destination's
    /// pagemap showed as possibly holding data, or every page where it could not say).
    pub fresh_check_pages: u64,
    /// Blocks created for the source's hot-added blocks, in order.
    pub blocks_added: Vec<String>,
    /// Blocks dropped for the source's hot-removed blocks, in order.
    pub blocks_removed: Vec<String>,
    /// The state sections, in stream order.
    pub states: Vec<ComponentState>,
}

/// Reads a whole stream (header to end marker) from `input` into `ram`, creating and
/// dropping blocks through `hotplug` as the source did. On error, nothing outside the
/// blocks was written; pages of the blocks may have been.
pub fn load<R: Read>(
    ram: &RamList,
    input: R,
    hotplug: &mut dyn BlockHotplug,
    opts: &LoadOptions,
) -> Result<LoadSummary, LoadError> {
    load_inner(ram, input, hotplug, opts, false)
}

/// [`load`] for a stream that must carry no page at all: a local migration's, whose
/// memory was handed over and is shared with the source. A RAM section, or a setup
/// entry flagged ZERO_SKIPPED (which would make the loader clear the block), is refused
/// before anything is written; nothing of guest memory is read or written.
pub fn load_without_pages<R: Read>(
    ram: &RamList,
    input: R,
    opts: &LoadOptions,
) -> Result<LoadSummary, LoadError> {
    load_inner(ram, input, &mut NoHotplug, opts, true)
}

fn load_inner<R: Read>(
    ram: &RamList,
    input: R,
    hotplug: &mut dyn BlockHotplug,
    opts: &LoadOptions,
    no_pages: bool,
) -> Result<LoadSummary, LoadError> {
    let mut l = Loader::new(ram, input, opts, no_pages, false);
    l.run(hotplug)?;
    l.summary.bytes = l.rd.offset();
    Ok(l.summary)
}

/// The pages the destination must not trust at the switch to post-copy, as the source
/// sent them: per block, runs of (first page, page count), ascending and apart, each
/// checked against the block's length.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiscardRuns {
    /// What the source shows when it resumes this post-copy on a new connection.
    pub token: u64,
    /// (block id, runs), in stream order; blocks with no run are not listed.
    pub blocks: Vec<(String, Vec<(u64, u64)>)>,
}

impl DiscardRuns {
    /// Pages in all runs.
    pub fn pages(&self) -> u64 {
        self.blocks
            .iter()
            .flat_map(|(_, r)| r.iter().map(|&(_, n)| n))
            .sum()
    }
}

/// Where pages go after the switch to post-copy: filled through userfaultfd by whoever
/// serves the destination's faults, never written in place (a write to a missing page
/// would itself fault, and wait for the loader).
pub trait PagePlacer {
    /// Fills `data.len() / PAGE_SIZE` pages at `offset` of `block` with `data` (`None`:
    /// one zero page). The loader checked the range against the block.
    fn place(&self, block: &RamBlockRef, offset: u64, data: Option<&[u8]>) -> Result<(), String>;
}

/// An incoming stream that may switch to post-copy: [`load_until_switch`] reads it as
/// [`load`] does up to its end, or up to the end of the switch package (the discard
/// runs and the states); [`load_postcopy`] then reads the rest of RAM, placing each page
/// through a [`PagePlacer`], up to the final end.
///
/// [`load_until_switch`]: IncomingLoad::load_until_switch
/// [`load_postcopy`]: IncomingLoad::load_postcopy
pub struct IncomingLoad<'a, R: Read> {
    l: Loader<'a, R>,
}

impl<'a, R: Read> IncomingLoad<'a, R> {
    /// A load of `input` into `ram`.
    pub fn new(ram: &'a RamList, input: R, opts: &'a LoadOptions) -> Self {
        IncomingLoad {
            l: Loader::new(ram, input, opts, false, true),
        }
    }

    /// Reads up to the stream's end (`Ok(None)`: a pre-copy migration, complete) or up
    /// to the end of a post-copy switch package (`Ok(Some(runs))`: the states are in
    /// [`summary`](Self::summary), and the pages in `runs` are still to come), creating
    /// and dropping blocks through `hotplug` as the source did.
    pub fn load_until_switch(
        &mut self,
        hotplug: &mut dyn BlockHotplug,
    ) -> Result<Option<DiscardRuns>, LoadError> {
        self.l.run(hotplug)?;
        self.l.summary.bytes = self.l.rd.offset();
        Ok(self.l.switch.clone())
    }

    /// After a switch: RAM sections up to the final end, each page placed by `placer`.
    /// Blocks may no longer be added or removed, nor states sent.
    pub fn load_postcopy(&mut self, placer: &dyn PagePlacer) -> Result<(), LoadError> {
        let r = self.l.run_postcopy(placer);
        // A section cut short leaves the guard taken: never hold it across the wait for
        // a source that reconnects.
        self.l.quiesce();
        self.l.summary.bytes = self.l.resumed_at + self.l.rd.offset();
        r
    }

    /// The figures so far.
    pub fn summary(&self) -> &LoadSummary {
        &self.l.summary
    }

    /// Post-copy recovery: reads on from `input` (a new connection) instead. A section
    /// cut short on the old one is gone; the next must name its block.
    pub fn replace_input(&mut self, input: R) {
        let offset = self.l.rd.offset();
        self.l.rd = StreamReader::new(input);
        self.l.resumed_at += offset;
        self.l.current = None;
        self.l.quiesce();
    }
}

/// A block the stream declared (in setup or by BLOCK_ADD) and the destination has.
struct Known {
    len: u64,
    /// For blocks the loader created: the pages it wrote (one bit each); the others are
    /// still the fresh mapping's zeros. Lent to [`Current`] while it is the current block.
    fresh: Option<Box<[u64]>>,
}

/// The block of the previous page record of this section.
struct Current {
    id: String,
    block: RamBlockRef,
    fresh: Option<Box<[u64]>>,
}

/// Where the stream is in its section order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Ram,
    State,
}

struct Loader<'a, R: Read> {
    ram: &'a RamList,
    rd: StreamReader<R>,
    opts: &'a LoadOptions,
    /// The stream may carry no page ([`load_without_pages`]).
    no_pages: bool,
    guard: Option<ReadGuard>,
    known: HashMap<String, Known>,
    current: Option<Current>,
    since_quiesce: u64,
    summary: LoadSummary,
    /// The stream may switch to post-copy ([`IncomingLoad`]).
    allow_postcopy: bool,
    /// The switch's discard runs, once read.
    switch: Option<DiscardRuns>,
    /// Pages read for the placer, after the switch.
    scratch: Vec<u8>,
    /// Stream bytes read on connections before the current one.
    resumed_at: u64,
}

impl<'a, R: Read> Loader<'a, R> {
    fn new(
        ram: &'a RamList,
        input: R,
        opts: &'a LoadOptions,
        no_pages: bool,
        allow_postcopy: bool,
    ) -> Self {
        Loader {
            ram,
            rd: StreamReader::new(input),
            opts,
            no_pages,
            guard: None,
            known: HashMap::new(),
            current: None,
            since_quiesce: 0,
            summary: LoadSummary::default(),
            allow_postcopy,
            switch: None,
            scratch: Vec::new(),
            resumed_at: 0,
        }
    }
}

impl<R: Read> Loader<'_, R> {
    fn run(&mut self, hotplug: &mut dyn BlockHotplug) -> Result<(), LoadError> {
        self.header()?;
        let mut phase = Phase::Setup;
        loop {
            let at = self.rd.offset();
            let b = self.rd.read_u8("section kind")?;
            let kind = SectionKind::from_u8(b).ok_or(LoadError::UnknownSection {
                offset: at,
                kind: b,
            })?;
            let unexpected = |after| LoadError::UnexpectedSection {
                offset: at,
                kind,
                after,
            };
            match (phase, kind) {
                (Phase::Setup, SectionKind::RamSetup) => {
                    self.setup()?;
                    phase = Phase::Ram;
                }
                (Phase::Setup, _) => return Err(unexpected("before the RAM setup")),
                (_, SectionKind::RamSetup) => return Err(unexpected("twice")),
                (_, SectionKind::Ram) if self.no_pages => {
                    return Err(unexpected(
                        "in a stream that carries no page (local migration)",
                    ))
                }
                (Phase::Ram, SectionKind::Ram) => self.ram_section(ram::Into::Memory(hotplug))?,
                (Phase::State, SectionKind::Ram) => return Err(unexpected("after state")),
                (_, SectionKind::Postcopy) if !self.allow_postcopy || self.no_pages => {
                    return Err(unexpected("in a stream loaded without post-copy"))
                }
                (Phase::State, SectionKind::Postcopy) => return Err(unexpected("after state")),
                (Phase::Ram, SectionKind::Postcopy) => {
                    self.switch = Some(self.discard_runs()?);
                    phase = Phase::State;
                }
                (_, SectionKind::State) => {
                    phase = Phase::State;
                    self.state()?;
                }
                (_, SectionKind::End) => break,
            }
        }
        self.quiesce();
        Ok(())
    }

    /// After the switch: RAM sections, placed through `placer`, up to the end.
    fn run_postcopy(&mut self, placer: &dyn PagePlacer) -> Result<(), LoadError> {
        if self.switch.is_none() {
            return Err(LoadError::Postcopy {
                offset: self.rd.offset(),
                why: "the stream did not switch to post-copy".into(),
            });
        }
        loop {
            let at = self.rd.offset();
            let b = self.rd.read_u8("section kind")?;
            let kind = SectionKind::from_u8(b).ok_or(LoadError::UnknownSection {
                offset: at,
                kind: b,
            })?;
            match kind {
                SectionKind::Ram => self.ram_section(ram::Into::Placer(placer))?,
                SectionKind::End => break,
                _ => {
                    return Err(LoadError::UnexpectedSection {
                        offset: at,
                        kind,
                        after: "after the switch to post-copy",
                    })
                }
            }
        }
        self.quiesce();
        Ok(())
    }

    /// A POSTCOPY section's discard runs, every value checked against the blocks the
    /// stream declared.
    fn discard_runs(&mut self) -> Result<DiscardRuns, LoadError> {
        let token = self.rd.read_u64("post-copy token")?;
        let at = self.rd.offset();
        let count = self.rd.read_u32("post-copy block count")?;
        if count as usize > self.known.len() {
            return Err(LoadError::Postcopy {
                offset: at,
                why: format!(
                    "{count} blocks, but the stream declared {}",
                    self.known.len()
                ),
            });
        }
        let mut out = DiscardRuns {
            token,
            ..DiscardRuns::default()
        };
        for _ in 0..count {
            let (id_at, id) = self.read_id("post-copy block idstr")?;
            let Some(len) = self.known.get(&id).map(|k| k.len) else {
                return Err(LoadError::UnknownBlock { offset: id_at, id });
            };
            if out.blocks.iter().any(|(b, _)| *b == id) {
                return Err(LoadError::Postcopy {
                    offset: id_at,
                    why: format!("block {id:?} listed twice"),
                });
            }
            let pages = len / PAGE_SIZE;
            let runs_at = self.rd.offset();
            let n = u64::from(self.rd.read_u32("post-copy run count")?);
            if n > pages.div_ceil(2).max(1) {
                return Err(LoadError::Postcopy {
                    offset: runs_at,
                    why: format!("{n} runs in block {id:?} of {pages} pages"),
                });
            }
            let mut runs = Vec::with_capacity(n as usize);
            let mut next = 0u64;
            for _ in 0..n {
                let run_at = self.rd.offset();
                let first = self.rd.read_u64("run's first page")?;
                let count = self.rd.read_u64("run's page count")?;
                if first < next || count == 0 || first.checked_add(count).is_none_or(|e| e > pages)
                {
                    return Err(LoadError::Postcopy {
                        offset: run_at,
                        why: format!(
                            "a run of {count} pages at page {first} of block {id:?} ({pages} \
                             pages; runs must be ascending, apart and inside it)"
                        ),
                    });
                }
                next = first + count;
                runs.push((first, count));
            }
            out.blocks.push((id, runs));
        }
        Ok(out)
    }

    /// The guard the loader reads under, taken if it was dropped.
    fn guard(&mut self) -> &ReadGuard {
        self.guard.get_or_insert_with(rcu::read_lock)
    }

    /// Ends the read-side section (the current block stays held by its counted reference).
    fn quiesce(&mut self) {
        self.guard = None;
        self.since_quiesce = 0;
    }

    fn header(&mut self) -> Result<(), LoadError> {
        let magic = self.rd.read_u32("magic")?;
        if magic != MAGIC {
            return Err(LoadError::BadMagic {
                offset: 0,
                found: magic,
            });
        }
        let version = self.rd.read_u32("version")?;
        if version != VERSION {
            return Err(LoadError::BadVersion {
                offset: 4,
                found: version,
                supported: VERSION,
            });
        }
        Ok(())
    }

    /// An idstr: its offset and its checked text.
    fn read_id(&mut self, what: &'static str) -> Result<(u64, String), LoadError> {
        let at = self.rd.offset();
        let len = self.rd.read_u8("idstr length")?;
        if len == 0 || len as usize > MAX_ID_LEN {
            return Err(LoadError::BadIdLen {
                offset: at,
                len,
                max: MAX_ID_LEN,
            });
        }
        let raw = self.rd.read_str(len, what)?;
        let bad = |why| LoadError::BadId {
            offset: at,
            id: String::from_utf8_lossy(raw.as_bytes()).into_owned(),
            why,
        };
        let s = std::str::from_utf8(raw.as_bytes()).map_err(|_| bad("not UTF-8"))?;
        if s.contains('\0') {
            return Err(bad("holding a NUL byte"));
        }
        Ok((at, s.to_string()))
    }

    fn setup(&mut self) -> Result<(), LoadError> {
        let at = self.rd.offset();
        let page = self.rd.read_u32("page size")?;
        if u64::from(page) != PAGE_SIZE {
            return Err(LoadError::PageSizeMismatch {
                offset: at,
                stream: page,
                ours: PAGE_SIZE,
            });
        }
        let at = self.rd.offset();
        let count = self.rd.read_u32("block count")?;
        if count > MAX_SETUP_BLOCKS {
            return Err(LoadError::TooManyBlocks {
                offset: at,
                count: count.into(),
                max: MAX_SETUP_BLOCKS,
            });
        }
        let mut zero_skipped = Vec::new();
        for _ in 0..count {
            let (id_at, id) = self.read_id("block idstr")?;
            let len_at = self.rd.offset();
            let (len, flags) = BlockFlags::split(self.rd.read_u64("block length")?);
            let zero_skipped_here = self.no_pages && flags.contains(BlockFlags::ZERO_SKIPPED);
            if flags.0 & !BlockFlags::KNOWN.0 != 0 || zero_skipped_here {
                return Err(LoadError::BadBlockFlags {
                    offset: len_at,
                    id,
                    flags: flags.0,
                });
            }
            if self.known.contains_key(&id) {
                return Err(LoadError::DuplicateBlock { offset: id_at, id });
            }
            let ram = self.ram;
            let ours = ram.block_by_id(self.guard(), &id).map(|b| b.len());
            match ours {
                None => return Err(LoadError::UnknownBlock { offset: id_at, id }),
                Some(ours) if ours != len => {
                    return Err(LoadError::LengthMismatch {
                        offset: len_at,
                        id,
                        stream: len,
                        ours,
                    })
                }
                Some(_) => {}
            }
            if flags.contains(BlockFlags::ZERO_SKIPPED) {
                zero_skipped.push(id.clone());
            }
            self.known.insert(id, Known { len, fresh: None });
        }
        let ram = self.ram;
        let guard = self.guard.get_or_insert_with(rcu::read_lock);
        for b in ram.blocks(guard) {
            if !self.known.contains_key(b.id()) {
                log::warn!(
                    "migration: destination block {:?} is not in the stream; left as it is",
                    b.id()
                );
            }
        }
        // Every value is checked: now make the ZERO_SKIPPED blocks read as zero, each
        // held by a counted reference, outside the read-side section (a block that is
        // not fresh is read whole).
        let blocks: Vec<RamBlockRef> = zero_skipped
            .iter()
            .filter_map(|id| ram.block_ref(guard, id))
            .collect();
        self.quiesce();
        let mut check = fresh::FreshCheck::default();
        for b in &blocks {
            let c = check.ensure_zero(b);
            self.summary.fresh_check_pages += c.read;
            self.summary.stale_pages_cleared += c.cleared;
            if c.cleared > 0 {
                log::warn!(
                    "migration: destination block {:?} was not fresh: {} page(s) cleared",
                    b.id(),
                    c.cleared
                );
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<(), LoadError> {
        let (at, name) = self.read_id("state name")?;
        if self.summary.states.iter().any(|s| s.name == name) {
            return Err(LoadError::DuplicateState { offset: at, name });
        }
        let len_at = self.rd.offset();
        let len = u64::from(self.rd.read_u32("state length")?);
        let total: u64 = self
            .summary
            .states
            .iter()
            .map(|s| s.data.len() as u64)
            .sum();
        let max = u64::from(self.opts.max_state_len);
        let too_large = |max| LoadError::StateTooLarge {
            offset: len_at,
            name: name.clone(),
            len,
            max,
        };
        if len > max {
            return Err(too_large(max));
        }
        if total + len > self.opts.max_state_total {
            return Err(too_large(self.opts.max_state_total));
        }
        // The guest's memory is not touched while a blob arrives: no section is needed.
        self.quiesce();
        let data = self.rd.read_blob(len as usize, "state data")?;
        self.summary.states.push(ComponentState { name, data });
        Ok(())
    }
}
