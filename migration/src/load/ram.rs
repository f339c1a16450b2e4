//! The loader's RAM sections: record words, block switches, block hotplug, and the page
//! writes themselves (the only `unsafe` of the loader).

use super::{BlockHotplug, Current, Known, LoadError, Loader, PagePlacer};
use crate::is_zero;
use crate::stream::{PageRecord, MAX_RUN_PAGES, MAX_SETUP_BLOCKS, PAGE_SIZE};
use std::io::Read;

/// The hotplug of a section written into memory; after the switch to post-copy the
/// layout is fixed, and a block record (at stream offset `at`) is refused.
fn hotplug<'a>(into: &'a mut Into<'_>, at: u64) -> Result<&'a mut dyn BlockHotplug, LoadError> {
    match into {
        Into::Memory(h) => Ok(&mut **h),
        Into::Placer(_) => Err(LoadError::Postcopy {
            offset: at,
            why: "a block added or removed after the switch".into(),
        }),
    }
}

/// The word and bit of the page at `offset` in a fresh block's written-pages bitmap.
fn fresh_bit(offset: u64) -> (usize, u64) {
    let page = offset / PAGE_SIZE;
    ((page / 64) as usize, 1u64 << (page % 64))
}

/// Where a RAM section's pages go.
pub(super) enum Into<'h> {
    /// Written into the blocks; blocks are added and removed through the hotplug.
    Memory(&'h mut dyn BlockHotplug),
    /// After the switch to post-copy: placed through the placer; no block comes or goes.
    Placer(&'h dyn PagePlacer),
}

impl<R: Read> Loader<'_, R> {
    /// Records up to EOS.
    pub(super) fn ram_section(&mut self, mut into: Into<'_>) -> Result<(), LoadError> {
        let placer = match &into {
            Into::Placer(p) => Some(*p),
            Into::Memory(_) => None,
        };
        self.summary.ram_sections += 1;
        self.drop_current();
        loop {
            let at = self.rd.offset();
            let word = self.rd.read_u64("record word")?;
            let rec = PageRecord::decode(word).map_err(|e| LoadError::BadRecord {
                offset: at,
                word,
                why: e.to_string(),
            })?;
            match rec {
                PageRecord::Eos => break,
                PageRecord::Zero { offset, cont } => {
                    self.select_block(at, cont)?;
                    self.pages(at, offset, 1, false, placer)?;
                }
                PageRecord::Page { offset, cont } => {
                    self.select_block(at, cont)?;
                    self.pages(at, offset, 1, true, placer)?;
                }
                PageRecord::Run { offset, cont } => {
                    self.select_block(at, cont)?;
                    let count_at = self.rd.offset();
                    let count = self.rd.read_u16("run length")?;
                    if !(2..=MAX_RUN_PAGES).contains(&count) {
                        return Err(LoadError::BadRunLength {
                            offset: count_at,
                            count,
                            max: MAX_RUN_PAGES,
                        });
                    }
                    self.pages(at, offset, count.into(), true, placer)?;
                }
                PageRecord::BlockAdd { len } => {
                    self.block_add(hotplug(&mut into, at)?, len, false)?
                }
                PageRecord::BlockAddPlaced { len } => {
                    self.block_add(hotplug(&mut into, at)?, len, true)?
                }
                PageRecord::BlockDel => self.block_del(hotplug(&mut into, at)?)?,
            }
        }
        self.drop_current();
        self.quiesce();
        Ok(())
    }

    /// Gives the current block's fresh-page bitmap back to its entry and forgets it.
    fn drop_current(&mut self) {
        if let Some(cur) = self.current.take() {
            if let Some(k) = self.known.get_mut(&cur.id) {
                k.fresh = cur.fresh;
            }
        }
    }

    /// Makes the record's block current: the previous one for CONTINUE, else the one
    /// whose idstr follows.
    fn select_block(&mut self, at: u64, cont: bool) -> Result<(), LoadError> {
        if cont {
            return match self.current {
                Some(_) => Ok(()),
                None => Err(LoadError::ContinueWithoutBlock { offset: at }),
            };
        }
        let (id_at, id) = self.read_id("block idstr")?;
        if self.current.as_ref().is_some_and(|c| c.id == id) {
            return Ok(());
        }
        self.drop_current();
        let Some(known) = self.known.get_mut(&id) else {
            return Err(LoadError::UnknownBlock { offset: id_at, id });
        };
        let len = known.len;
        let fresh = known.fresh.take();
        let ram = self.ram;
        let guard = self.guard.get_or_insert_with(rcu::read_lock);
        let block = ram.block_ref(guard, &id);
        let block = match block {
            // The destination dropped it behind the loader's back.
            None => return Err(LoadError::UnknownBlock { offset: id_at, id }),
            Some(b) if b.len() != len => {
                return Err(LoadError::LengthMismatch {
                    offset: id_at,
                    id,
                    stream: len,
                    ours: b.len(),
                })
            }
            Some(b) => b,
        };
        self.current = Some(Current { id, block, fresh });
        Ok(())
    }

    /// A ZERO record (`data` false, `count` 1), a PAGE record (`count` 1) or a run, at
    /// `offset` of the current block.
    fn pages(
        &mut self,
        at: u64,
        offset: u64,
        count: u64,
        data: bool,
        placer: Option<&dyn PagePlacer>,
    ) -> Result<(), LoadError> {
        let Some(cur) = self.current.as_mut() else {
            return Err(LoadError::ContinueWithoutBlock { offset: at });
        };
        let len = cur.block.len();
        let bytes = count * PAGE_SIZE;
        if offset.checked_add(bytes).is_none_or(|end| end > len) {
            return Err(LoadError::OffsetOutOfBlock {
                offset: at,
                id: cur.id.clone(),
                page_offset: offset,
                pages: count,
                len,
            });
        }
        if let Some(placer) = placer {
            let block = cur.block.clone();
            let placed = if data {
                self.scratch.resize(bytes as usize, 0);
                self.rd.read_exact(&mut self.scratch, "page data")?;
                self.summary.pages += count;
                placer.place(&block, offset, Some(&self.scratch))
            } else {
                self.summary.zero_pages += 1;
                placer.place(&block, offset, None)
            };
            return placed.map_err(|why| LoadError::Postcopy { offset: at, why });
        }
        // SAFETY: bounds: `offset + bytes <= len` was checked just above against the
        // block's own length, so the pages lie inside its mapping. Lifetime: the counted
        // reference in `cur` keeps the block, and its mapping, alive while the slice
        // lives (this function's end). Aliasing: on the destination the guest is stopped
        // and the loader is the only writer of guest RAM while it loads, so no other
        // reference to these bytes is in use.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(cur.block.host().add(offset as usize), bytes as usize)
        };
        if data {
            if count == 1 {
                self.rd.read_exact(dst, "page data")?;
            } else {
                self.rd.read_exact_direct(dst, "page data")?;
            }
            if let Some(f) = cur.fresh.as_mut() {
                for page in 0..count {
                    let (word, bit) = fresh_bit(offset + page * PAGE_SIZE);
                    f[word] |= bit;
                }
            }
            self.summary.pages += count;
        } else {
            self.summary.zero_pages += 1;
            let (word, bit) = fresh_bit(offset);
            let untouched = cur.fresh.as_ref().is_some_and(|f| f[word] & bit == 0);
            if !untouched && !is_zero(dst) {
                dst.fill(0);
                self.summary.zero_pages_written += 1;
            }
        }
        self.since_quiesce += count;
        if self.since_quiesce >= self.opts.pages_per_read_section {
            self.quiesce();
        }
        Ok(())
    }

    fn block_add(
        &mut self,
        hotplug: &mut dyn BlockHotplug,
        len: u64,
        placed: bool,
    ) -> Result<(), LoadError> {
        self.drop_current();
        let (at, id) = self.read_id("block idstr")?;
        let guest_addr = if placed {
            Some(self.rd.read_u64("block guest address")?)
        } else {
            None
        };
        let ram = self.ram;
        let exists = self.known.contains_key(&id) || {
            let guard = self.guard.get_or_insert_with(rcu::read_lock);
            ram.block_by_id(guard, &id).is_some()
        };
        if exists {
            return Err(LoadError::BlockExists { offset: at, id });
        }
        let host_page = ramlist::page_size().max(PAGE_SIZE);
        let why = if len == 0 {
            Some("no pages".to_string())
        } else if !len.is_multiple_of(host_page) {
            Some(format!("not a multiple of the page size {host_page:#x}"))
        } else if len > self.opts.max_new_block {
            Some(format!("over the limit of {:#x}", self.opts.max_new_block))
        } else if self.known.len() >= MAX_SETUP_BLOCKS as usize {
            Some(format!("more than {MAX_SETUP_BLOCKS} blocks"))
        } else {
            match guest_addr {
                Some(a) if !a.is_multiple_of(host_page) => {
                    Some(format!("guest address {a:#x} is not page-aligned"))
                }
                Some(a) if a.checked_add(len).is_none() => {
                    Some(format!("guest address {a:#x} + length is past 2^64"))
                }
                _ => None,
            }
        };
        if let Some(why) = why {
            return Err(LoadError::BadNewBlock {
                offset: at,
                id,
                len,
                why,
            });
        }
        // The VMM may register the block with KVM or wait for grace periods: not inside
        // a read-side section.
        self.quiesce();
        let hotplug_err = |source| LoadError::Hotplug {
            offset: at,
            what: "adding",
            id: id.clone(),
            source,
        };
        hotplug
            .add_block_placed(ram, &id, len, guest_addr)
            .map_err(hotplug_err)?;
        let got = ram
            .block_by_id(self.guard(), &id)
            .map(|b| (b.len(), b.guest_addr()));
        let wrong = match got {
            None => Some("the VMM reported success but made no block".to_string()),
            Some((l, _)) if l != len => Some(format!("the VMM made a block of {l:#x} bytes")),
            Some((_, Some(at))) if guest_addr.is_some_and(|want| want != at) => {
                Some(format!("the VMM placed it at guest {at:#x}"))
            }
            Some(_) => None,
        };
        if let Some(msg) = wrong {
            return Err(hotplug_err(msg.into()));
        }
        // The source sends nothing for the pages it knows are zero: make sure the VMM's
        // new block reads as zero (pagemap shows nothing behind fresh memory, so this
        // reads nothing), as for a ZERO_SKIPPED setup block.
        if let Some(b) = ram.block_ref(self.guard(), &id) {
            self.quiesce();
            let c = super::fresh::FreshCheck::default().ensure_zero(&b);
            self.summary.fresh_check_pages += c.read;
            self.summary.stale_pages_cleared += c.cleared;
            if c.cleared > 0 {
                log::warn!(
                    "migration: the block {id:?} the VMM added was not fresh: {} page(s) \
                     cleared",
                    c.cleared
                );
            }
        }
        let words = (len / PAGE_SIZE).div_ceil(64) as usize;
        let fresh = Some(vec![0u64; words].into_boxed_slice());
        self.known.insert(id.clone(), Known { len, fresh });
        self.summary.blocks_added.push(id);
        Ok(())
    }

    fn block_del(&mut self, hotplug: &mut dyn BlockHotplug) -> Result<(), LoadError> {
        self.drop_current();
        let (at, id) = self.read_id("block idstr")?;
        if !self.known.contains_key(&id) {
            return Err(LoadError::UnknownBlock { offset: at, id });
        }
        self.quiesce();
        let ram = self.ram;
        hotplug
            .remove_block(ram, &id)
            .map_err(|source| LoadError::Hotplug {
                offset: at,
                what: "removing",
                id: id.clone(),
                source,
            })?;
        self.known.remove(&id);
        self.summary.blocks_removed.push(id);
        Ok(())
    }
}
