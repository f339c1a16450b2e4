//! Readers look up random ram_addrs and host addresses and touch block memory while a
//! writer adds and frees blocks; the reclaim notifier proves that no block is unmapped
//! while a reader (or a counted reference) is still inside it, and the mapping counter
//! proves the munmaps happen. A use after unmap would also fault outright.
//!
//! Every lookup is also checked against the frees that had completed when its read
//! section began: such a block is unlinked and must not be found (this is what goes wrong
//! when the MRU entry remembers a block that is being freed — see tests/mru.rs).
//!
//! One test in this binary: it checks the process-wide mapping counter.

use ramlist::{mapped_blocks, page_size, RamBlock, RamList};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RUN_FOR: Duration = Duration::from_millis(1500);
const READERS: usize = 2;

/// What the test knows about one block (ids are never reused).
#[derive(Default)]
struct Track {
    /// Readers (and counted-reference holders) using the block right now.
    inside: AtomicUsize,
    /// Set by the reclaim notifier, just before the munmap.
    reclaimed: AtomicBool,
    /// The writer's count of completed frees once this block's free returned (0: linked).
    freed_seq: AtomicU64,
}

#[derive(Default)]
struct Registry {
    tracks: Mutex<HashMap<String, Arc<Track>>>,
    /// Blocks reclaimed while someone was inside.
    unmapped_in_use: AtomicUsize,
    /// Blocks a reader reached after their reclamation.
    used_after_reclaim: AtomicUsize,
    reclaimed: AtomicUsize,
    /// Frees completed so far (set after the block's `freed_seq`).
    frees_done: AtomicU64,
    /// Lookups that found a block whose free had completed before their section began.
    found_after_free: AtomicUsize,
}

impl Registry {
    fn track(&self, id: &str) -> Arc<Track> {
        let mut t = self.tracks.lock().unwrap();
        Arc::clone(t.entry(id.to_string()).or_default())
    }

    /// Called by the writer once `free(id)` returned.
    fn on_freed(&self, id: &str) {
        let n = self.frees_done.load(SeqCst) + 1;
        self.track(id).freed_seq.store(n, SeqCst);
        self.frees_done.store(n, SeqCst);
    }

    fn on_reclaim(&self, b: &RamBlock) {
        let t = self.track(b.id());
        t.reclaimed.store(true, SeqCst);
        if t.inside.load(SeqCst) != 0 {
            self.unmapped_in_use.fetch_add(1, SeqCst);
        }
        self.reclaimed.fetch_add(1, SeqCst);
    }
}

/// Enters `b` on behalf of a reader whose read section began when `frees_done` was
/// `frees_before`: counts it inside and checks it is neither reclaimed nor freed before.
fn enter(
    reg: &Registry,
    cache: &mut HashMap<String, Arc<Track>>,
    b: &RamBlock,
    frees_before: u64,
) -> Arc<Track> {
    let t = Arc::clone(
        cache
            .entry(b.id().to_string())
            .or_insert_with(|| reg.track(b.id())),
    );
    t.inside.fetch_add(1, SeqCst);
    if t.reclaimed.load(SeqCst) {
        reg.used_after_reclaim.fetch_add(1, SeqCst);
    }
    let freed = t.freed_seq.load(SeqCst);
    if freed != 0 && freed <= frees_before {
        reg.found_after_free.fetch_add(1, SeqCst);
    }
    t
}

/// Reads and writes the word at `ram_addr` of block `b` (faults if it is unmapped).
fn touch(b: &RamBlock, ram_addr: u64) {
    let off = (ram_addr - b.offset()) & !7;
    // SAFETY: `off` lies inside the block, whose memory the caller's guard or counted
    // reference keeps mapped; concurrent touches go through atomics.
    let word = unsafe { &*(b.host().add(off as usize) as *const AtomicU64) };
    word.fetch_add(1, SeqCst);
    assert_ne!(word.load(SeqCst), 0);
}

#[derive(Default, Debug)]
struct ReaderCounts {
    lookups: u64,
    hits: u64,
    kept_refs: u64,
    host_hits: u64,
}

fn reader(list: &RamList, reg: &Registry, stop: &AtomicBool) -> ReaderCounts {
    let mut rng = rand::rng();
    let mut cache = HashMap::new();
    let mut n = ReaderCounts::default();
    let mut top = list.last_ram_offset().max(1);
    // A host address seen in an earlier section, looked up again by host (a list walk when
    // the MRU block misses); kept while it leads to a block being freed.
    let mut last_host = 0usize;
    while !stop.load(SeqCst) {
        if n.lookups % 256 == 0 {
            top = list.last_ram_offset().max(1);
        }
        let frees_before = reg.frees_done.load(SeqCst);
        if last_host != 0 {
            let g = rcu::read_lock();
            let found = list.block_from_host(&g, last_host as *const u8);
            n.lookups += 1;
            match found {
                Ok((b, off)) => {
                    n.host_hits += 1;
                    let t = enter(reg, &mut cache, b, frees_before);
                    touch(b, b.offset() + off);
                    t.inside.fetch_sub(1, SeqCst);
                    if !b.is_removed() {
                        last_host = 0;
                    }
                }
                Err(_) => last_host = 0,
            }
            continue;
        }
        let addr = rng.random_range(0..top);
        n.lookups += 1;
        if rng.random_ratio(1, 64) {
            // Migration's way: a counted reference used after the read section.
            let kept = {
                let g = rcu::read_lock();
                list.block_ref_at(&g, addr)
            };
            if let Some(kept) = kept {
                let t = enter(reg, &mut cache, &kept, 0);
                touch(&kept, addr);
                t.inside.fetch_sub(1, SeqCst);
                n.kept_refs += 1;
            }
            continue;
        }
        let g = rcu::read_lock();
        let Some(b) = list.block_at(&g, addr) else {
            continue;
        };
        n.hits += 1;
        let t = enter(reg, &mut cache, b, frees_before);
        assert!(b.contains(addr), "{b:?} does not hold {addr:#x}");
        touch(b, addr);
        let host = b.host().wrapping_add((addr - b.offset()) as usize);
        last_host = host as usize;
        // A freed block is no longer on the list, so the reverse lookup may miss it.
        if let Ok(back) = list.ram_addr_from_host(&g, host) {
            assert_eq!(back, addr);
        }
        t.inside.fetch_sub(1, SeqCst);
    }
    n
}

#[test]
fn readers_never_see_an_unmapped_block() {
    let p = page_size();
    let list = RamList::new();
    let reg = Arc::new(Registry::default());
    let r = Arc::clone(&reg);
    list.set_reclaim_notifier(Some(Arc::new(move |b| r.on_reclaim(b))));
    let (maps_before, _) = mapped_blocks();
    let stop = AtomicBool::new(false);
    let (mut adds, mut removes) = (0u64, 0u64);
    let counts: Vec<ReaderCounts> = std::thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|_| s.spawn(|| reader(&list, &reg, &stop)))
            .collect();
        let mut rng = rand::rng();
        let mut live: Vec<String> = Vec::new();
        let start = Instant::now();
        while start.elapsed() < RUN_FOR {
            if live.len() < 2 || (live.len() < 12 && rng.random_bool(0.5)) {
                let id = format!("blk{adds}");
                list.alloc(&id, rng.random_range(1..=32) * p).unwrap();
                live.push(id);
                adds += 1;
            } else {
                let id = live.swap_remove(rng.random_range(0..live.len()));
                list.free(&id).unwrap();
                reg.on_freed(&id);
                removes += 1;
                if removes % 4 == 0 {
                    // Leave the list unchanged for a moment: readers' lookups then meet
                    // it as it is after the free, with no newer version to hide a stale
                    // MRU entry.
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        stop.store(true, SeqCst);
        for id in live.drain(..) {
            list.free(&id).unwrap();
            removes += 1;
        }
        readers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(list.drain_reclaim(), 0, "every freed block reclaimed");
    let lookups: u64 = counts.iter().map(|c| c.lookups).sum();
    let hits: u64 = counts.iter().map(|c| c.hits).sum();
    let kept: u64 = counts.iter().map(|c| c.kept_refs).sum();
    let host_hits: u64 = counts.iter().map(|c| c.host_hits).sum();
    println!(
        "stress: {lookups} lookups ({hits} hits, {host_hits} by host, {kept} counted refs) \
         by {READERS} readers; \
         {adds} adds, {removes} removes; {} blocks reclaimed; {} grace periods",
        reg.reclaimed.load(SeqCst),
        rcu::grace_periods_completed()
    );
    assert_eq!(
        reg.unmapped_in_use.load(SeqCst),
        0,
        "a block was unmapped under a reader"
    );
    assert_eq!(
        reg.used_after_reclaim.load(SeqCst),
        0,
        "a reader reached a reclaimed block"
    );
    assert_eq!(
        reg.found_after_free.load(SeqCst),
        0,
        "a lookup found a block freed before its read section began"
    );
    assert_eq!(adds, removes);
    assert_eq!(
        reg.reclaimed.load(SeqCst) as u64,
        adds,
        "each block reclaimed once"
    );
    assert!(list.is_empty() && list.total_bytes() == 0);
    assert_eq!(
        mapped_blocks(),
        (maps_before, 0),
        "every mapping really unmapped"
    );
    assert!(hits > 0 && adds > 0, "the readers and the writer did run");
}
