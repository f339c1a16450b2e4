//! The read side of [`RamList`]: lookups by ram_addr (MRU block first), by host address
//! and by id, walks, and [`RamBlockRef`] for a block kept across read sections.

use crate::block::RamBlock;
use crate::list::RamList;
use crate::mru;
use crate::RamError;
use rcu::{Counted, ReadGuard};
use std::fmt;
use std::ptr;

/// A counted reference to a block, taken under a read guard and usable after it — QEMU's
/// refcount-plus-RCU pattern, for migration's `last_seen_block`. The block (and its memory)
/// lives while a reference does, even after it is freed from the list.
#[derive(Clone)]
pub struct RamBlockRef(Counted<RamBlock>);

impl RamBlockRef {
    /// Whether the block is still on its list (a snapshot): once false, a walker that
    /// kept this reference must find its place again.
    pub fn is_linked(&self) -> bool {
        self.0.is_linked()
    }

    /// True if both refer to the same block.
    pub fn ptr_eq(a: &RamBlockRef, b: &RamBlockRef) -> bool {
        Counted::ptr_eq(&a.0, &b.0)
    }

    /// Whether this is the block `b` (found under some guard).
    pub fn is(&self, b: &RamBlock) -> bool {
        ptr::eq(&*self.0, b)
    }
}

impl std::ops::Deref for RamBlockRef {
    type Target = RamBlock;
    fn deref(&self) -> &RamBlock {
        &self.0
    }
}

impl fmt::Debug for RamBlockRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RamBlockRef").field(&*self.0).finish()
    }
}

impl RamList {
    /// The block holding `ram_addr`: this thread's MRU block if it does, else found in
    /// the sorted address table (and made the MRU block).
    #[inline]
    pub fn block_at<'g>(&self, guard: &'g ReadGuard, ram_addr: u64) -> Option<&'g RamBlock> {
        let version = self.version();
        // SAFETY: under `guard`, with the version just loaded; the result borrows `guard`.
        if let Some(b) = unsafe { mru::recall(self.id, version) } {
            if b.contains(ram_addr) {
                return Some(b);
            }
        }
        let found = self.table.load(guard).find(ram_addr)?;
        mru::remember(self.id, version, found);
        Some(found)
    }

    /// The host address of `ram_addr` (QEMU's `qemu_map_ram_ptr`), valid under `guard`.
    pub fn host_ptr(&self, guard: &ReadGuard, ram_addr: u64) -> Result<*mut u8, RamError> {
        let b = self
            .block_at(guard, ram_addr)
            .ok_or(RamError::UnknownRamAddr(ram_addr))?;
        Ok(b.host().wrapping_add((ram_addr - b.offset()) as usize))
    }

    /// The block whose memory holds host address `host`, and the offset inside it (QEMU's
    /// `qemu_ram_block_from_host`); the MRU block first.
    pub fn block_from_host<'g>(
        &self,
        guard: &'g ReadGuard,
        host: *const u8,
    ) -> Result<(&'g RamBlock, u64), RamError> {
        let version = self.version();
        // SAFETY: under `guard`, with the version just loaded; the result borrows `guard`.
        if let Some(b) = unsafe { mru::recall(self.id, version) } {
            if let Some(off) = b.host_offset(host) {
                return Ok((b, off));
            }
        }
        let (b, off) = self
            .blocks
            .iter(guard)
            .find_map(|e| Some((e.get(), e.host_offset(host)?)))
            .ok_or(RamError::UnknownHostAddr(host as usize))?;
        mru::remember(self.id, version, b);
        Ok((b, off))
    }

    /// The ram_addr of host address `host` (QEMU's `qemu_ram_addr_from_host`).
    pub fn ram_addr_from_host(&self, guard: &ReadGuard, host: *const u8) -> Result<u64, RamError> {
        self.block_from_host(guard, host)
            .map(|(b, off)| b.offset() + off)
    }

    /// The block named `id`.
    pub fn block_by_id<'g>(&self, guard: &'g ReadGuard, id: &str) -> Option<&'g RamBlock> {
        self.blocks
            .iter(guard)
            .find(|b| b.id() == id)
            .map(|e| e.get())
    }

    /// The blocks, biggest first.
    pub fn blocks<'g>(&self, guard: &'g ReadGuard) -> impl Iterator<Item = &'g RamBlock> + 'g {
        self.blocks.iter(guard).map(|e| e.get())
    }

    /// Calls `f` on every block, biggest first, in one read section of its own (QEMU's
    /// `qemu_ram_foreach_block`); stops at the first error.
    pub fn foreach<E>(&self, f: impl FnMut(&RamBlock) -> Result<(), E>) -> Result<(), E> {
        let guard = rcu::read_lock();
        let result = self.blocks(&guard).try_for_each(f);
        result
    }

    /// A counted reference to the block named `id`.
    pub fn block_ref(&self, guard: &ReadGuard, id: &str) -> Option<RamBlockRef> {
        let e = self.blocks.iter(guard).find(|b| b.id() == id)?;
        Some(RamBlockRef(e.counted()))
    }

    /// A counted reference to the block holding `ram_addr`.
    pub fn block_ref_at(&self, guard: &ReadGuard, ram_addr: u64) -> Option<RamBlockRef> {
        let e = self.blocks.iter(guard).find(|b| b.contains(ram_addr))?;
        Some(RamBlockRef(e.counted()))
    }

    /// The block after `current` in list order (biggest first), or the first block when
    /// `current` is `None` — how migration walks on from its `last_seen_block`. A block no
    /// longer on the list yields `None`: the walker restarts.
    pub fn next_block_ref(
        &self,
        guard: &ReadGuard,
        current: Option<&RamBlockRef>,
    ) -> Option<RamBlockRef> {
        let mut it = self.blocks.iter(guard);
        if let Some(cur) = current {
            it.by_ref().find(|e| cur.is(e.get()))?;
        }
        it.next().map(|e| RamBlockRef(e.counted()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_size;

    /// This thread's MRU block for `list`, if its tag is current.
    fn mru_id(list: &RamList) -> Option<String> {
        let _g = rcu::read_lock();
        // SAFETY: under a guard, version just loaded, result used within the section.
        unsafe { mru::recall(list.id, list.version()) }.map(|b| b.id().to_string())
    }

    #[test]
    fn lookups_move_this_threads_mru_block() {
        let p = page_size();
        let list = RamList::new();
        let a = list.alloc("a", p).unwrap();
        let b = list.alloc("b", 2 * p).unwrap();
        assert_eq!(mru_id(&list), None);
        {
            let g = rcu::read_lock();
            list.block_at(&g, a).unwrap();
        }
        assert_eq!(mru_id(&list).as_deref(), Some("a"));
        {
            let g = rcu::read_lock();
            let host = list.block_by_id(&g, "b").unwrap().host();
            list.block_from_host(&g, host).unwrap();
        }
        assert_eq!(mru_id(&list).as_deref(), Some("b"));
        // Another thread's lookups move its own MRU block, not ours.
        std::thread::scope(|s| {
            s.spawn(|| {
                let g = rcu::read_lock();
                list.block_at(&g, a).unwrap();
                drop(g);
                assert_eq!(mru_id(&list).as_deref(), Some("a"));
            });
        });
        assert_eq!(mru_id(&list).as_deref(), Some("b"));
        {
            let g = rcu::read_lock();
            assert_eq!(list.block_at(&g, b + p).unwrap().id(), "b");
        }
        list.free("b").unwrap();
        assert_eq!(
            mru_id(&list),
            None,
            "a change to the list retires every MRU entry"
        );
    }

    /// The lookup that the MRU's removed check is for: a host lookup that walks the list
    /// between a free's version bump and its unlink finds the block with the new version
    /// loaded; remembered, it would be the MRU block of a later section, after the free.
    #[test]
    fn a_lookup_during_a_free_does_not_remember_the_block() {
        use crate::list::test_hooks;
        use std::cell::Cell;
        use std::rc::Rc;
        let p = page_size();
        let list = RamList::new();
        list.alloc("other", p).unwrap();
        list.alloc("victim", 2 * p).unwrap();
        let (kept, host) = {
            let g = rcu::read_lock();
            let k = list.block_ref(&g, "victim").unwrap();
            let h = k.host();
            (k, h)
        };
        let found_removed = Rc::new(Cell::new(false));
        let f = Rc::clone(&found_removed);
        test_hooks::set_after_free_bump(move |l| {
            let g = rcu::read_lock();
            let (b, _) = l.block_from_host(&g, host).unwrap();
            f.set(b.is_removed());
        });
        list.free("victim").unwrap();
        test_hooks::clear();
        assert!(found_removed.get(), "the hook ran inside the free's window");
        // A section that begins after the free: the block is unlinked (and held alive by
        // `kept`, so a stale entry would show as a wrong answer, not a use after free).
        let g = rcu::read_lock();
        assert!(
            list.block_from_host(&g, host).is_err(),
            "a freed block found through the MRU entry"
        );
        assert!(list.block_at(&g, kept.offset()).is_none());
        drop(g);
        drop(kept);
        assert_eq!(list.drain_reclaim(), 0);
    }

    #[test]
    fn a_freed_block_is_never_found_through_the_mru() {
        let p = page_size();
        let list = RamList::new();
        let a = list.alloc("a", p).unwrap();
        let g = rcu::read_lock();
        assert_eq!(list.block_at(&g, a).unwrap().id(), "a");
        // Another thread frees the block while we still stand on it.
        std::thread::scope(|s| s.spawn(|| list.free("a").unwrap()).join().unwrap());
        assert!(list.block_at(&g, a).is_none(), "found a freed block");
        drop(g);
        assert_eq!(list.drain_reclaim(), 0);
        let g = rcu::read_lock();
        assert!(list.block_at(&g, a).is_none());
    }
}
