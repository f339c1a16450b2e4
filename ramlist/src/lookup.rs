//! The read side of [`RamList`]: lookups by ram_addr (MRU block first), by host address
//! and by id, walks, and [`RamBlockRef`] for a block kept across read sections.

use crate::block::RamBlock;
use crate::list::RamList;
use crate::RamError;
use rcu::{Counted, ReadGuard};
use std::fmt;
use std::ptr;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

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
    /// The block holding `ram_addr`: the MRU block if it does, else found in the
    /// sorted address table (and made the MRU block).
    pub fn block_at<'g>(&self, guard: &'g ReadGuard, ram_addr: u64) -> Option<&'g RamBlock> {
        if let Some(b) = self.mru(guard) {
            if b.contains(ram_addr) {
                return Some(b);
            }
        }
        let found = self.table.load(guard).find(ram_addr)?;
        Some(self.remember(found))
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
        if let Some(b) = self.mru(guard) {
            if let Some(off) = b.host_offset(host) {
                return Ok((b, off));
            }
        }
        self.blocks
            .iter(guard)
            .find_map(|e| Some((e.get(), e.host_offset(host)?)))
            .map(|(b, off)| (self.remember(b), off))
            .ok_or(RamError::UnknownHostAddr(host as usize))
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

    /// The MRU block, unless it was freed meanwhile.
    fn mru<'g>(&self, _guard: &'g ReadGuard) -> Option<&'g RamBlock> {
        let p = self.shared.mru.load(Acquire);
        // SAFETY: the MRU only ever holds null or a block that was linked on this list.
        // A freed block is cleared from it before its count is dropped, with a grace
        // period between the last possible store and that drop and another between the
        // clear and the drop (see the concurrency rules in list.rs); `_guard` keeps this
        // section from spanning the second one, so the block is alive for 'g.
        let b = unsafe { p.as_ref() }?;
        (!b.is_removed()).then_some(b)
    }

    /// Makes `b`, just found by a walk under a guard, the MRU block.
    fn remember<'g>(&self, b: &'g RamBlock) -> &'g RamBlock {
        let p = ptr::from_ref(b).cast_mut();
        // Skipping the store when nothing changes keeps the MRU's cache line shared
        // between reader CPUs.
        if self.shared.mru.load(Relaxed) != p && !b.is_removed() {
            self.shared.mru.store(p, Release);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_size;

    fn mru_id(list: &RamList) -> Option<String> {
        let g = rcu::read_lock();
        list.mru(&g).map(|b| b.id().to_string())
    }

    #[test]
    fn lookups_move_the_mru_block() {
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
        {
            let g = rcu::read_lock();
            assert_eq!(list.block_at(&g, b + p).unwrap().id(), "b");
        }
        list.free("b").unwrap();
        assert!(
            list.shared.mru.load(Acquire).is_null(),
            "free clears the MRU at once"
        );
    }

    #[test]
    fn a_stale_mru_store_is_cleared_before_reclaim() {
        let p = page_size();
        let list = RamList::new();
        let a = list.alloc("a", p).unwrap();
        let g = rcu::read_lock();
        let blk = list.block_at(&g, a).unwrap();
        // Another thread frees the block while we still stand on it...
        std::thread::scope(|s| s.spawn(|| list.free("a").unwrap()).join().unwrap());
        // ...and we store it in the MRU afterwards, as a reader that found it in the walk
        // just before the unlink may do.
        list.shared
            .mru
            .store(ptr::from_ref(blk).cast_mut(), Release);
        // A lookup never returns the freed block through the stale MRU.
        {
            let g2 = rcu::read_lock();
            assert!(list.block_at(&g2, a).is_none());
        }
        drop(g);
        assert_eq!(list.drain_reclaim(), 0);
        assert!(
            list.shared.mru.load(Acquire).is_null(),
            "cleared before the unmap"
        );
    }
}
