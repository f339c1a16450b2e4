//! The source: [`RamSaver`] sends a [`RamList`] as the stream's RAM setup and RAM sections
//! (QEMU's `ram_save_setup`, `ram_save_iterate` and `ram_save_complete`).
//!
//! # Batches and read-side sections
//!
//! Each call of [`RamSaver::iterate`] is one RAM section and one batch: it takes
//! `rcu::read_lock()`, walks the list from where the previous batch stopped, sends the
//! dirty pages it finds, and stops after [`RamSaver::set_batch_limit`] (50 ms, as QEMU),
//! when the rate limit would make it wait, or after a whole lap found nothing dirty. Then
//! it drops the guard (so reclamation progresses) and flushes the stream outside it. The
//! block where the walk stopped (`last_seen_block`) is kept as a counted reference
//! ([`RamBlockRef`]) between batches; when [`RamList::version`] changed, the walk
//! restarts from the first block.
//!
//! # Blocks added and removed while migrating
//!
//! The saver keeps what the destination knows: every block it announced (in the setup or
//! by BLOCK_ADD), each as a counted reference. At the start of every batch it compares
//! that with the list: a block gone (or replaced by another of the same id) is sent as
//! BLOCK_DEL, a new one as BLOCK_ADD (with its guest address). A batch that announced a
//! block ends there; once its read-side section is over, the new block's first pass is
//! marked from pagemap as in the setup (the destination creates it reading as zero), and
//! its pages follow from the next batch on. A walk that meets a block not announced yet
//! ends the batch; the next one announces it. The counted references keep a removed
//! block's memory until the next batch has announced its removal. Blocks left out of
//! the setup ([`RamSaver::setup_with`]) are announced by the first batch the same way.
//!
//! # The first pass
//!
//! [`RamSaver::setup`] marks only the pages that may hold data: for private anonymous
//! blocks, pagemap says which pages were ever written, and the others (never touched, or
//! mapping the zero page) are neither read nor sent; such blocks are flagged
//! ZERO_SKIPPED in the setup, and the destination makes sure they read as zero. The
//! `select` module has the details and the ordering argument.
//!
//! # Zero pages and runs
//!
//! Each page is tested for zero where it lies and sent as a ZERO record alone when it is.
//! Consecutive pages with data go as one run (PAGE|MANY) whose bytes the writer takes
//! straight from guest memory in a vectored write; the loans end before the batch's read
//! guard does.

mod postcopy;
mod select;

pub use postcopy::{RequestError, ServeError};
pub use select::FirstPassStats;

use crate::is_zero_shared;
use crate::stream::{StreamWriter, MAX_RUN_PAGES, MAX_SETUP_BLOCKS, PAGE_SIZE};
use ramlist::dirty::RecentWrites;
use ramlist::{RamBlock, RamBlockRef, RamList};
use rcu::ReadGuard;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// QEMU's bound on one `ram_save_iterate`.
pub const DEFAULT_BATCH_LIMIT: Duration = Duration::from_millis(50);

/// Why saving stopped.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The transport failed.
    #[error("writing the migration stream failed: {0}")]
    Io(#[from] io::Error),
    /// [`RamSaver::iterate`] before [`RamSaver::setup`].
    #[error("RAM setup was not sent yet")]
    NotSetUp,
    /// [`RamSaver::setup`] twice.
    #[error("RAM setup was already sent")]
    AlreadySetUp,
    /// More blocks than the stream can carry.
    #[error("{count} RAM blocks; the stream carries at most {max}")]
    TooManyBlocks {
        /// Blocks the destination would have.
        count: usize,
        /// The layout's limit.
        max: u32,
    },
}

/// Totals since the saver was made.
#[derive(Debug, Default, Clone)]
pub struct SaveStats {
    /// Batches (RAM sections) sent.
    pub batches: u64,
    /// Pages of data sent.
    pub pages: u64,
    /// Zero pages sent as a flag.
    pub zero_pages: u64,
    /// BLOCK_ADD records sent.
    pub blocks_added: u64,
    /// BLOCK_DEL records sent.
    pub blocks_removed: u64,
    /// Walks restarted from the first block because the list changed.
    pub walk_restarts: u64,
    /// What the first pass marked and skipped.
    pub first_pass: FirstPassStats,
    /// Dirty pages found but left for a later pass because the guest had written them
    /// since the last sync ([`RamSaver::hold_back`]); a page held back twice counts
    /// twice.
    pub held_back: u64,
}

/// What one batch (or [`RamSaver::complete`]) sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Batch {
    /// Pages of data.
    pub pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Stream bytes, records and section framing included.
    pub bytes: u64,
    /// Time taken, flush included.
    pub elapsed: Duration,
    /// A whole lap over the list found nothing more to send.
    pub clean: bool,
    /// Dirty pages left marked because the guest wrote them since the last sync
    /// ([`RamSaver::hold_back`]).
    pub held_back: u64,
}

/// A block the destination knows of.
struct SentBlock {
    id: String,
    block: RamBlockRef,
}

/// Sends a RAM list: setup, then batches of dirty pages. See the module documentation.
pub struct RamSaver {
    ram: Arc<RamList>,
    sent: Vec<SentBlock>,
    /// `last_seen_block`: where the walk goes on, and the offset in it.
    last_seen: Option<RamBlockRef>,
    last_offset: u64,
    last_version: u64,
    /// Bytes walked since the last dirty page, across batches: a lap's worth means
    /// nothing is left (with the guest stopped; a live guest's new writes show in
    /// [`RamSaver::remaining_pages`] after the next dirty sync).
    clean: u64,
    batch_limit: Duration,
    setup_done: bool,
    /// The first pass's pagemap reader, kept for the blocks announced later.
    first: Option<select::FirstPass>,
    /// How many of the last entries of `sent` this batch announced: their first pass is
    /// marked once the batch's read-side section is over (a pagemap scan of a large
    /// block is no work for inside one).
    unmarked: usize,
    stats: SaveStats,
    /// Scratch for a window's page offsets.
    window: Vec<u64>,
    /// Pages not to send now: the guest wrote them since the last sync.
    hold_back: Option<RecentWrites>,
}

impl RamSaver {
    /// A saver of `ram`; nothing is sent until [`setup`](Self::setup).
    pub fn new(ram: Arc<RamList>) -> RamSaver {
        RamSaver {
            ram,
            sent: Vec::new(),
            last_seen: None,
            last_offset: 0,
            last_version: 0,
            clean: 0,
            batch_limit: DEFAULT_BATCH_LIMIT,
            setup_done: false,
            first: None,
            unmarked: 0,
            stats: SaveStats::default(),
            window: Vec::with_capacity(select::WINDOW_PAGES as usize),
            hold_back: None,
        }
    }

    /// Pages the following batches leave marked instead of sending: those `recent` shows
    /// the guest wrote since the last dirty sync (`KvmRam::peek_dirty_log`). Sending
    /// them now would send them twice, since the next sync reports them again; QEMU's
    /// first pass does, and sends a busy guest's working set twice. A window whose every
    /// dirty page is held back counts as clean, so a pass ends after a lap that found
    /// only those. `None` sends every dirty page (the default);
    /// [`complete`](Self::complete) drops it, since with the guest stopped nothing is
    /// written again.
    ///
    /// Correctness does not rest on `recent`: a held-back page's bit is set again in the
    /// Migration bitmap, so it goes in a later pass (or the final stage) whatever the
    /// next sync reports.
    pub fn hold_back(&mut self, recent: Option<RecentWrites>) {
        self.hold_back = recent;
    }

    /// How long one batch may hold its read-side section (default 50 ms).
    pub fn set_batch_limit(&mut self, limit: Duration) {
        self.batch_limit = limit;
    }

    /// Totals so far.
    pub fn stats(&self) -> &SaveStats {
        &self.stats
    }

    /// Sends the RAM setup section (every block's idstr, length and flags), then marks
    /// what the first pass sends (see the `select` module: from pagemap, only the pages
    /// that may hold data). The stream header goes before it ([`StreamWriter::header`]).
    ///
    /// Start dirty logging before calling it: a page the guest writes after the first
    /// pass looked at it must reach the Migration bitmap by a later sync.
    pub fn setup<W: Write>(&mut self, out: &mut StreamWriter<W>) -> Result<(), SaveError> {
        self.setup_with(out, |_| true)
    }

    /// [`setup`](Self::setup), listing in the RAM setup only the blocks `in_setup` takes:
    /// those the destination builds by itself (its boot RAM, from the same command line).
    /// The others (blocks hot-added before the migration) go at the start of the first
    /// batch as BLOCK_ADD records, placed at their guest address, which the destination
    /// creates through its [`BlockHotplug`](crate::load::BlockHotplug); their first pass
    /// comes from pagemap as well.
    pub fn setup_with<W: Write>(
        &mut self,
        out: &mut StreamWriter<W>,
        in_setup: impl Fn(&RamBlock) -> bool,
    ) -> Result<(), SaveError> {
        if self.setup_done {
            return Err(SaveError::AlreadySetUp);
        }
        let ram = Arc::clone(&self.ram);
        let mut first = select::FirstPass::open();
        let mut flags = Vec::new();
        {
            let guard = rcu::read_lock();
            self.last_version = ram.version();
            for b in ram.blocks(&guard).filter(|b| in_setup(b)) {
                if let Some(r) = counted(&ram, &guard, b) {
                    flags.push(first.flags(b));
                    self.sent.push(SentBlock {
                        id: b.id().to_string(),
                        block: r,
                    });
                }
            }
        }
        if self.sent.len() > MAX_SETUP_BLOCKS as usize {
            let count = self.sent.len();
            // Nothing was sent: a later setup (with fewer blocks) starts from scratch.
            self.sent.clear();
            return Err(SaveError::TooManyBlocks {
                count,
                max: MAX_SETUP_BLOCKS,
            });
        }
        out.ram_setup_flagged(
            self.sent
                .iter()
                .zip(&flags)
                .map(|(s, &f)| (s.id.as_str(), s.block.len(), f)),
        )?;
        // The destination checks its blocks while we scan ours.
        out.flush()?;
        // Counted references keep the blocks mapped: no read-side section is needed.
        for (s, &f) in self.sent.iter().zip(&flags) {
            first.mark(&ram, &s.block, f, &mut self.stats.first_pass);
        }
        self.first = Some(first);
        self.setup_done = true;
        Ok(())
    }

    /// Pages still to send in the blocks on the list now.
    pub fn remaining_pages(&self) -> u64 {
        let guard = rcu::read_lock();
        self.ram
            .blocks(&guard)
            .map(|b| select::pending(&self.ram, b))
            .sum()
    }

    /// Sends batches until a whole lap finds nothing left and no page is marked: the final
    /// stage, with the guest stopped.
    pub fn complete<W: Write>(&mut self, out: &mut StreamWriter<W>) -> Result<Batch, SaveError> {
        let mut total = Batch::default();
        // Bytes found clean before this call prove nothing: the final sync may have
        // marked pages behind the walk since. A whole new lap must pass.
        self.clean = 0;
        self.hold_back = None;
        loop {
            let b = self.iterate(out)?;
            total.pages += b.pages;
            total.zero_pages += b.zero_pages;
            total.bytes += b.bytes;
            total.elapsed += b.elapsed;
            if b.clean && self.remaining_pages() == 0 {
                total.clean = true;
                return Ok(total);
            }
        }
    }

    /// One batch: one RAM section of the pages dirty now, in one read-side section bounded
    /// in time. See the module documentation.
    pub fn iterate<W: Write>(&mut self, out: &mut StreamWriter<W>) -> Result<Batch, SaveError> {
        if !self.setup_done {
            return Err(SaveError::NotSetUp);
        }
        let start = Instant::now();
        let bytes0 = out.bytes_written();
        let mut batch = Batch::default();
        out.begin_ram()?;
        {
            let guard = rcu::read_lock();
            // A panic in the walk (a transport's, or an assertion's) must not leave pages
            // lent past the guard either: catch it, end the loans, then let it go on.
            let walked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.walk(&guard, out, start, &mut batch)
            }));
            // Pages are lent to the writer under the guard: copy what is still pending
            // before the guard (and with it the memory's protection) goes.
            out.release_lent();
            match walked {
                Ok(walked) => walked?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        self.mark_announced();
        out.eos()?;
        out.flush()?;
        self.stats.batches += 1;
        self.stats.pages += batch.pages;
        self.stats.zero_pages += batch.zero_pages;
        batch.bytes = out.bytes_written() - bytes0;
        batch.elapsed = start.elapsed();
        Ok(batch)
    }

    fn walk<W: Write>(
        &mut self,
        guard: &ReadGuard,
        out: &mut StreamWriter<W>,
        start: Instant,
        batch: &mut Batch,
    ) -> Result<(), SaveError> {
        let ram = Arc::clone(&self.ram);
        let version = ram.version();
        let changed = self.sync_blocks(guard, out)?;
        if changed || version != self.last_version {
            self.last_seen = None;
            self.last_offset = 0;
            self.last_version = version;
            self.clean = 0;
            self.stats.walk_restarts += 1;
        }
        if self.unmarked > 0 {
            // New blocks' pages are sent from the next batch on, once their first pass
            // is marked (outside this section).
            return Ok(());
        }
        let total: u64 = self.sent.iter().map(|s| s.block.len()).sum();
        loop {
            let block = match self.last_seen.take() {
                Some(b) => b,
                None => match ram.next_block_ref(guard, None) {
                    Some(b) => b,
                    None => {
                        batch.clean = true;
                        return Ok(());
                    }
                },
            };
            if !block.is_linked()
                || !self
                    .sent
                    .iter()
                    .any(|s| RamBlockRef::ptr_eq(&s.block, &block))
            {
                // The list changed under this batch: the next one announces it.
                return Ok(());
            }
            let mut offset = self.last_offset;
            while offset < block.len() {
                self.window.clear();
                let w = select::take_window(
                    &ram,
                    &block,
                    offset,
                    self.hold_back.as_ref(),
                    &mut self.window,
                );
                offset = w.next;
                self.clean += w.clean;
                self.stats.held_back += w.held_back;
                batch.held_back += w.held_back;
                if !self.window.is_empty() {
                    self.clean = 0;
                    send_pages(&block, &self.window, out, batch)?;
                }
                if self.clean >= total {
                    // The next batch walks a whole lap again before it says so.
                    self.clean = 0;
                    batch.clean = true;
                    self.last_seen = Some(block);
                    self.last_offset = offset;
                    return Ok(());
                }
                // The next window may add up to WINDOW_BYTES: end the batch now unless
                // the rate limit lets them go, so no send sleeps inside the section.
                if start.elapsed() >= self.batch_limit || out.would_wait(select::WINDOW_BYTES) {
                    self.last_seen = Some(block);
                    self.last_offset = offset;
                    return Ok(());
                }
            }
            self.last_offset = 0;
            self.last_seen = ram.next_block_ref(guard, Some(&block));
        }
    }

    /// Marks the first pass of the blocks this batch announced: the destination creates
    /// each fresh (reading as zero), so, as in the setup, only the pages pagemap shows
    /// holding data are sent. Their counted references keep them mapped: no read-side
    /// section is needed.
    fn mark_announced(&mut self) {
        let from = self.sent.len() - std::mem::take(&mut self.unmarked);
        if let Some(first) = self.first.as_mut() {
            for s in &self.sent[from..] {
                let flags = first.flags(&s.block);
                first.mark(&self.ram, &s.block, flags, &mut self.stats.first_pass);
            }
        }
    }

    /// Announces blocks removed from and added to the list since the last batch; true if
    /// any was.
    fn sync_blocks<W: Write>(
        &mut self,
        guard: &ReadGuard,
        out: &mut StreamWriter<W>,
    ) -> Result<bool, SaveError> {
        let ram = Arc::clone(&self.ram);
        let now: Vec<&RamBlock> = ram.blocks(guard).collect();
        let before = self.sent.len();
        let mut removed = 0;
        let mut i = 0;
        while i < self.sent.len() {
            if now.iter().any(|b| self.sent[i].block.is(b)) {
                i += 1;
                continue;
            }
            let gone = self.sent.remove(i);
            out.block_del(&gone.id)?;
            removed += 1;
            log::debug!("migration: block {:?} removed during migration", gone.id);
        }
        let mut added = 0;
        for b in now {
            if self.sent.iter().any(|s| s.block.is(b)) {
                continue;
            }
            if self.sent.len() >= MAX_SETUP_BLOCKS as usize {
                return Err(SaveError::TooManyBlocks {
                    count: self.sent.len() + 1,
                    max: MAX_SETUP_BLOCKS,
                });
            }
            // A block being removed right now yields no reference: skip it.
            let Some(r) = counted(&ram, guard, b) else {
                continue;
            };
            out.block_add_placed(b.id(), b.len(), b.guest_addr())?;
            self.sent.push(SentBlock {
                id: b.id().to_string(),
                block: r,
            });
            self.unmarked += 1;
            added += 1;
            log::debug!("migration: block {:?} added during migration", b.id());
        }
        self.stats.blocks_removed += removed;
        self.stats.blocks_added += added;
        Ok(before != self.sent.len() || removed + added > 0)
    }
}

/// A counted reference to `b` itself (not to a block that took its place since).
fn counted(ram: &RamList, guard: &ReadGuard, b: &RamBlock) -> Option<RamBlockRef> {
    ram.block_ref_at(guard, b.offset()).filter(|r| r.is(b))
}

/// Sends the pages at `offsets` (ascending) of `block`: a ZERO record for each zero page,
/// a PAGE record or a run (PAGE|MANY) for each stretch of consecutive pages with data.
fn send_pages<W: Write>(
    block: &RamBlockRef,
    offsets: &[u64],
    out: &mut StreamWriter<W>,
    batch: &mut Batch,
) -> io::Result<()> {
    let id = block.id();
    // The pending run: its first offset and page count.
    let mut run: Option<(u64, u16)> = None;
    let flush = |run: &mut Option<(u64, u16)>, out: &mut StreamWriter<W>| -> io::Result<()> {
        if let Some((start, count)) = run.take() {
            // SAFETY: bounds: every page of the run is one of the block's dirty pages,
            // clipped to `block.len()` by `take_window`, so the run lies inside the
            // mapping. Lifetime: the block is one the saver announced, so
            // `RamSaver::sent` holds a counted reference to it, and the batch's read guard
            // is held too; both outlive the loan, which `iterate` ends (`release_lent`)
            // before dropping the guard. Concurrency: the guest may write the pages while
            // they are read (live migration); a torn or stale read is harmless, since such
            // a write sets the page's dirty bit after the bit was cleared here, and the
            // page is sent again.
            unsafe {
                out.pages_lent(id, start, block.host().add(start as usize), count)?;
            }
        }
        Ok(())
    };
    for &off in offsets {
        debug_assert!(off + PAGE_SIZE <= block.len());
        // SAFETY: as for the run above, the page lies inside the block, which stays
        // mapped; it is page-aligned. The running guest may write it meanwhile:
        // `is_zero_shared` makes no reference to it and reads each word atomically.
        let zero = unsafe { is_zero_shared(block.host().add(off as usize), PAGE_SIZE as usize) };
        if zero {
            flush(&mut run, out)?;
            out.zero_page(id, off)?;
            batch.zero_pages += 1;
            continue;
        }
        batch.pages += 1;
        match &mut run {
            Some((start, count))
                if *start + u64::from(*count) * PAGE_SIZE == off && *count < MAX_RUN_PAGES =>
            {
                *count += 1;
            }
            _ => {
                flush(&mut run, out)?;
                run = Some((off, 1));
            }
        }
    }
    flush(&mut run, out)
}
