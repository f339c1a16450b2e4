//! The saver after the switch to post-copy: the layout is held still, so the blocks the
//! destination knows are fixed. [`RamSaver::pending_runs`] says which pages it must not
//! trust, [`RamSaver::send_requested`] sends the pages a fault waits for at once, and
//! [`RamSaver::send_background`] the rest a few pages at a time, in block order from
//! the last page requested (a vCPU that faulted there is likely to go on nearby).

use super::{send_pages, Batch, RamSaver, SaveError};
use crate::stream::{BlockRuns, StreamWriter, MAX_RUN_PAGES, PAGE_SIZE};
use ramlist::dirty::DirtyClient;
use std::io::Write;
use std::time::Instant;

/// Why a page request is refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The block is not one the destination knows of.
    #[error("a request for block {id:?}, which the destination was never sent")]
    UnknownBlock {
        /// The block asked for.
        id: String,
    },
    /// The range is not whole pages inside the block.
    #[error("a request for {pages} pages at {offset:#x} of block {id:?} ({len:#x} bytes): not whole pages inside it (1..={max} pages)")]
    OutOfBlock {
        /// The block.
        id: String,
        /// Offset asked for.
        offset: u64,
        /// Pages asked for.
        pages: u32,
        /// The block's length.
        len: u64,
        /// The most pages one request may ask.
        max: u16,
    },
}

impl RamSaver {
    /// Sends a RAM section that announces the blocks added and removed since the last
    /// batch, and marks the new ones' first pass, without sending a page: the switch's
    /// layout is then the list's.
    pub fn announce_layout<W: Write>(
        &mut self,
        out: &mut StreamWriter<W>,
    ) -> Result<(), SaveError> {
        if !self.setup_done {
            return Err(SaveError::NotSetUp);
        }
        out.begin_ram()?;
        {
            let guard = rcu::read_lock();
            self.sync_blocks(&guard, out)?;
        }
        self.mark_announced();
        self.last_seen = None;
        self.last_offset = 0;
        out.eos()?;
        Ok(())
    }

    /// Every page still marked in the blocks the destination knows, as runs: what the destination must drop and get from the
    /// post-copy stream. Blocks with none are left out.
    pub fn pending_runs(&self) -> Vec<BlockRuns> {
        let dirty = self.ram.dirty();
        let mut out = Vec::new();
        for s in &self.sent {
            let (base, len) = (s.block.offset(), s.block.len());
            let end = base + len;
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut at = base;
            while let Some(p) = dirty.find_next_dirty(DirtyClient::Migration, at, end) {
                let page = (p - base) / PAGE_SIZE;
                match runs.last_mut() {
                    Some((first, n)) if *first + *n == page => *n += 1,
                    _ => runs.push((page, 1)),
                }
                at = p + PAGE_SIZE;
            }
            if !runs.is_empty() {
                out.push(BlockRuns {
                    id: s.id.clone(),
                    len,
                    runs,
                });
            }
        }
        out
    }

    /// Sends now, in one RAM section, the pages of `[offset, offset + pages × PAGE_SIZE)`
    /// of block `id` that are still marked (the others went already, and are on their
    /// way), and makes the background go on from there. Returns the pages sent.
    pub fn send_requested<W: Write>(
        &mut self,
        out: &mut StreamWriter<W>,
        id: &str,
        offset: u64,
        pages: u32,
    ) -> Result<Batch, ServeError> {
        let Some(i) = self.sent.iter().position(|s| s.id == id) else {
            return Err(ServeError::Refused(RequestError::UnknownBlock {
                id: id.into(),
            }));
        };
        let len = self.sent[i].block.len();
        let bytes = u64::from(pages) * PAGE_SIZE;
        if pages == 0
            || pages > u32::from(MAX_RUN_PAGES)
            || !offset.is_multiple_of(PAGE_SIZE)
            || offset.checked_add(bytes).is_none_or(|e| e > len)
        {
            return Err(ServeError::Refused(RequestError::OutOfBlock {
                id: id.into(),
                offset,
                pages,
                len,
                max: MAX_RUN_PAGES,
            }));
        }
        let base = self.sent[i].block.offset();
        self.window.clear();
        let ram = self.ram.clone();
        let dirty = ram.dirty();
        for p in 0..u64::from(pages) {
            let off = offset + p * PAGE_SIZE;
            if dirty.test_and_clear(DirtyClient::Migration, base + off, PAGE_SIZE) > 0 {
                self.window.push(off);
            }
        }
        let batch = self.send_window(out, i).map_err(ServeError::Save)?;
        self.last_seen = Some(self.sent[i].block.clone());
        self.last_offset = offset + bytes;
        Ok(batch)
    }

    /// Sends up to `max_pages` of the pages still marked, in one RAM section, walking on
    /// from where the last call (or request) stopped.
    pub fn send_background<W: Write>(
        &mut self,
        out: &mut StreamWriter<W>,
        max_pages: u64,
    ) -> Result<Batch, SaveError> {
        if self.sent.is_empty() {
            return Ok(Batch {
                clean: true,
                ..Batch::default()
            });
        }
        let ram = self.ram.clone();
        let dirty = ram.dirty();
        let mut i = self
            .last_seen
            .as_ref()
            .and_then(|b| {
                self.sent
                    .iter()
                    .position(|s| ramlist::RamBlockRef::ptr_eq(&s.block, b))
            })
            .unwrap_or(0);
        let mut from = if self.last_seen.is_some() {
            self.last_offset
        } else {
            0
        };
        let mut total = Batch::default();
        for _ in 0..=self.sent.len() {
            let (base, len) = (self.sent[i].block.offset(), self.sent[i].block.len());
            self.window.clear();
            let mut at = base + from.min(len);
            while (self.window.len() as u64)
                < max_pages.saturating_sub(total.pages + total.zero_pages)
            {
                let Some(p) = dirty.find_next_dirty(DirtyClient::Migration, at, base + len) else {
                    break;
                };
                if dirty.test_and_clear(DirtyClient::Migration, p, PAGE_SIZE) > 0 {
                    self.window.push(p - base);
                }
                at = p + PAGE_SIZE;
            }
            let got = self.window.len() as u64;
            if got > 0 {
                let b = self.send_window(out, i)?;
                total.pages += b.pages;
                total.zero_pages += b.zero_pages;
                total.bytes += b.bytes;
                self.last_seen = Some(self.sent[i].block.clone());
                self.last_offset = at - base;
            }
            if total.pages + total.zero_pages >= max_pages {
                return Ok(total);
            }
            i = (i + 1) % self.sent.len();
            from = 0;
        }
        total.clean = true;
        Ok(total)
    }

    /// Sends the pages in `self.window` (offsets in block `i`, ascending) as one RAM
    /// section, reading them under a read-side section.
    fn send_window<W: Write>(
        &mut self,
        out: &mut StreamWriter<W>,
        i: usize,
    ) -> Result<Batch, SaveError> {
        let mut batch = Batch::default();
        if self.window.is_empty() {
            return Ok(batch);
        }
        let start = Instant::now();
        let bytes0 = out.bytes_written();
        out.begin_ram()?;
        {
            let _guard = rcu::read_lock();
            let sent = send_pages(&self.sent[i].block, &self.window, out, &mut batch);
            // The pages are lent under the guard: copy what is pending before it goes.
            out.release_lent();
            sent?;
        }
        out.eos()?;
        self.stats.batches += 1;
        self.stats.pages += batch.pages;
        self.stats.zero_pages += batch.zero_pages;
        batch.bytes = out.bytes_written() - bytes0;
        batch.elapsed = start.elapsed();
        Ok(batch)
    }
}

/// A request that failed: refused (the destination's fault), or the send failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request itself is wrong.
    #[error(transparent)]
    Refused(RequestError),
    /// Sending the pages failed.
    #[error(transparent)]
    Save(SaveError),
}

impl RamSaver {
    /// The length of block `id`, if the destination was sent it.
    pub fn sent_block_len(&self, id: &str) -> Option<u64> {
        self.sent.iter().find(|s| s.id == id).map(|s| s.block.len())
    }

    /// Post-copy recovery: the pages to send are exactly `missing` (what the destination
    /// says it still lacks, per block), whatever was marked before (pages lost in
    /// flight come back; pages it has go no more). Every block must be one the
    /// destination knows and every run inside it. Returns the pages now marked.
    pub fn reset_pending(&mut self, missing: &[BlockRuns]) -> Result<u64, RequestError> {
        for b in missing {
            let Some(s) = self.sent.iter().find(|s| s.id == b.id) else {
                return Err(RequestError::UnknownBlock { id: b.id.clone() });
            };
            let len = s.block.len();
            for &(first, n) in &b.runs {
                let bad = first
                    .checked_add(n)
                    .and_then(|e| e.checked_mul(PAGE_SIZE))
                    .is_none_or(|end| end > len)
                    || n == 0;
                if bad {
                    return Err(RequestError::OutOfBlock {
                        id: b.id.clone(),
                        offset: first.saturating_mul(PAGE_SIZE),
                        pages: u32::try_from(n).unwrap_or(u32::MAX),
                        len,
                        max: MAX_RUN_PAGES,
                    });
                }
            }
        }
        let ram = self.ram.clone();
        let dirty = ram.dirty();
        let mut marked = 0;
        for s in &self.sent {
            dirty.test_and_clear(DirtyClient::Migration, s.block.offset(), s.block.len());
        }
        for b in missing {
            if let Some(s) = self.sent.iter().find(|s| s.id == b.id) {
                for &(first, n) in &b.runs {
                    dirty.mark_dirty_for(
                        DirtyClient::Migration,
                        s.block.offset() + first * PAGE_SIZE,
                        n * PAGE_SIZE,
                    );
                    marked += n;
                }
            }
        }
        self.last_seen = None;
        self.last_offset = 0;
        Ok(marked)
    }
}
