//! Taking one block's dirty bits, a word at a time or a chunk at a time, as the migration
//! saver does — and staying correct while blocks are removed and added meanwhile.

use ramlist::dirty::{DirtyClient, DirtyWord};
use ramlist::{page_size, RamBlock, RamError, RamList};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const M: DirtyClient = DirtyClient::Migration;

/// Every word `take_block_word` hands out for `block` from page `from`.
fn walk(list: &RamList, block: &RamBlock, from: u64) -> Vec<DirtyWord> {
    let mut words = Vec::new();
    let mut page = from;
    while let Some(w) = list.dirty().take_block_word(M, block, page).unwrap() {
        page = w.first_page + 64;
        words.push(w);
    }
    words
}

#[test]
fn take_block_word_walks_exactly_one_block() {
    let p = page_size();
    let list = RamList::new();
    list.alloc("a", 200 * p).unwrap();
    list.alloc("b", 64 * p).unwrap();
    let g = rcu::read_lock();
    let a = list.block_by_id(&g, "a").unwrap();
    let b = list.block_by_id(&g, "b").unwrap();
    // New blocks are all dirty: 200 pages in four words, the last one partial.
    let first = walk(&list, a, 0);
    assert_eq!(
        first
            .iter()
            .map(|w| (w.first_page, w.count()))
            .collect::<Vec<_>>(),
        [(0, 64), (64, 64), (128, 64), (192, 8)]
    );
    assert!(walk(&list, a, 0).is_empty(), "taken means cleared");
    for page in [0, 63, 64, 130, 199] {
        list.dirty().mark_dirty(a.offset() + page * p, 1);
    }
    // A page past a's end, in its last word's tail (no block's), must not be taken.
    let gap = a.offset() + 200 * p;
    list.dirty().mark_dirty(gap, 1);
    let words = walk(&list, a, 0);
    assert_eq!(
        words,
        [
            DirtyWord {
                first_page: 0,
                bits: 1 | 1 << 63
            },
            DirtyWord {
                first_page: 64,
                bits: 1
            },
            DirtyWord {
                first_page: 128,
                bits: 1 << 2
            },
            DirtyWord {
                first_page: 192,
                bits: 1 << 7
            },
        ]
    );
    let pages: Vec<u64> = words.iter().flat_map(|w| w.pages()).collect();
    assert_eq!(pages, [0, 63, 64, 130, 199]);
    assert!(list.dirty().is_dirty(M, gap), "the gap's bit is left alone");
    assert_eq!(
        list.dirty().count_dirty(M, b.offset(), b.len()),
        64,
        "the next block's bits are left alone"
    );
    // Starting inside a word takes only the pages from there on.
    list.dirty().mark_dirty(a.offset(), 1);
    list.dirty().mark_dirty(a.offset() + 5 * p, 1);
    assert_eq!(
        walk(&list, a, 1),
        [DirtyWord {
            first_page: 0,
            bits: 1 << 5
        }]
    );
    assert!(list.dirty().is_dirty(M, a.offset()));
    assert!(walk(&list, a, 200).is_empty() && walk(&list, a, u64::MAX).is_empty());
}

#[test]
fn take_block_fills_a_reused_buffer_chunk_by_chunk() {
    let p = page_size();
    let list = RamList::new();
    list.alloc("a", 200 * p).unwrap();
    let g = rcu::read_lock();
    let a = list.block_by_id(&g, "a").unwrap();
    let d = list.dirty();
    let mut out = [0xdead_u64; 2];
    assert_eq!(d.take_block(M, a, 0, &mut out).unwrap(), 128);
    assert_eq!(out, [!0, !0]);
    assert_eq!(d.take_block(M, a, 128, &mut out).unwrap(), 72);
    assert_eq!(out, [!0, 0xff], "nothing past the block's end");
    assert_eq!(d.take_block(M, a, 256, &mut out).unwrap(), 0);
    assert_eq!(out, [0, 0]);
    d.mark_dirty(a.offset() + 65 * p, 1);
    d.mark_dirty(a.offset() + 200 * p, 1); // past the end
    assert_eq!(d.take_block(M, a, 128, &mut out).unwrap(), 0);
    assert_eq!(
        out,
        [0, 0],
        "page 65 is before the chunk, page 200 past the block"
    );
    assert_eq!(d.take_block(M, a, 64, &mut out).unwrap(), 1);
    assert_eq!(out, [1 << 1, 0]);
    assert!(
        d.is_dirty(M, a.offset() + 200 * p),
        "the tail's bit is left alone"
    );
    assert!(matches!(
        d.take_block(M, a, 3, &mut out),
        Err(RamError::UnalignedPage { ref id, page: 3 }) if id == "a"
    ));
}

#[test]
fn a_block_of_another_list_is_refused() {
    let p = page_size();
    let (one, two) = (RamList::new(), RamList::new());
    one.alloc("x", p).unwrap();
    two.alloc("x", p).unwrap();
    let g = rcu::read_lock();
    let x = one.block_by_id(&g, "x").unwrap();
    let e = two.dirty().take_block_word(M, x, 0).unwrap_err();
    assert!(matches!(&e, RamError::ForeignBlock(id) if id == "x"));
    assert!(e.to_string().contains("\"x\""), "{e}");
    let own = ramlist::dirty::DirtyMemory::new();
    assert!(matches!(
        own.take_block(M, x, 0, &mut [0; 1]),
        Err(RamError::ForeignBlock(_))
    ));
    assert!(
        two.dirty().is_dirty(M, x.offset()),
        "two's own block untouched"
    );
}

/// A saver holding a removed block takes its bits only, never those of a block added
/// after the removal: the new block's first copy is not lost.
#[test]
fn a_removed_block_held_by_the_saver_takes_only_its_own_bits() {
    let a = ramlist::ram_offset_align();
    let list = RamList::new();
    let old = list.alloc("old", a).unwrap();
    list.alloc("top", 2 * a).unwrap();
    let kept = {
        let g = rcu::read_lock();
        list.block_ref(&g, "old").unwrap()
    };
    assert_eq!(
        list.dirty().take_block(M, &kept, 0, &mut [0; 64]).unwrap(),
        a / page_size()
    );
    list.free("old").unwrap();
    list.dirty().mark_dirty(old + 3 * page_size(), 1); // the old block's last write
    let new = list.alloc("new", a).unwrap();
    let mut out = vec![0u64; (a / page_size() / 64) as usize];
    assert_eq!(list.dirty().take_block(M, &kept, 0, &mut out).unwrap(), 1);
    assert_eq!(out[0], 1 << 3);
    let g = rcu::read_lock();
    let n = list.block_by_id(&g, "new").unwrap();
    assert_eq!(n.offset(), new);
    let words = walk(&list, n, 0);
    assert_eq!(
        words.iter().map(|w| u64::from(w.count())).sum::<u64>(),
        a / page_size(),
        "the new block's first copy is all there"
    );
}

/// The saver's loop (batches under a read guard, a counted `last_seen_block` across them,
/// one word per step) against a writer that adds and removes blocks all along: every
/// block's pages are taken exactly once (new blocks are dirty once, nothing else writes),
/// so no batch took another block's bits and no new block lost its first copy.
#[test]
fn the_saver_takes_each_page_once_while_blocks_come_and_go() {
    let p = page_size();
    let list = RamList::new();
    // Pages taken per block id, and the size of every block ever added.
    let taken: Mutex<HashMap<String, Vec<u64>>> = Mutex::new(HashMap::new());
    let sizes: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
    let stop = AtomicBool::new(false);
    let add = |id: String, pages: u64| {
        sizes.lock().unwrap().insert(id.clone(), pages);
        list.alloc(&id, pages * p).unwrap();
    };
    for i in 0..4 {
        add(format!("base{i}"), 64 + 37 * i);
    }
    // One pass of the saver over the whole list; returns whether the walk completed.
    let pass = |deadline: Option<Instant>| {
        let mut last: Option<ramlist::RamBlockRef> = None;
        let mut page = 0;
        loop {
            let g = rcu::read_lock();
            // One batch: up to 8 words.
            for _ in 0..8 {
                let block = match &last {
                    Some(b) => b.clone(),
                    None => match list.next_block_ref(&g, None) {
                        Some(b) => b,
                        None => return,
                    },
                };
                let word = list.dirty().take_block_word(M, &block, page).unwrap();
                match word {
                    Some(w) => {
                        taken
                            .lock()
                            .unwrap()
                            .entry(block.id().to_string())
                            .or_default()
                            .extend(w.pages());
                        page = w.first_page + 64;
                        last = Some(block);
                    }
                    None => {
                        // On to the next block; a removed one ends the walk.
                        let next = list.next_block_ref(&g, Some(&block));
                        page = 0;
                        match next {
                            Some(n) => last = Some(n),
                            None => return,
                        }
                    }
                }
            }
            drop(g);
            if deadline.is_some_and(|d| Instant::now() > d) {
                return;
            }
        }
    };
    let mut adds = 0u64;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(SeqCst) {
                pass(None);
            }
        });
        let start = Instant::now();
        let mut live: Vec<String> = Vec::new();
        while start.elapsed() < Duration::from_millis(800) {
            if live.len() < 6 {
                let id = format!("hot{adds}");
                add(id.clone(), 1 + adds % 150);
                live.push(id);
                adds += 1;
            } else {
                let id = live.remove(adds as usize % live.len());
                list.free(&id).unwrap();
            }
        }
        stop.store(true, SeqCst);
    });
    // Final pass: nothing changes any more, so it takes whatever is left.
    pass(None);
    let g = rcu::read_lock();
    let linked: Vec<String> = list.blocks(&g).map(|b| b.id().to_string()).collect();
    drop(g);
    let taken = taken.into_inner().unwrap();
    let sizes = sizes.into_inner().unwrap();
    let mut checked = 0;
    for (id, pages) in &taken {
        let set: BTreeSet<u64> = pages.iter().copied().collect();
        assert_eq!(set.len(), pages.len(), "{id}: a page taken twice");
        assert!(
            set.iter().all(|&pg| pg < sizes[id]),
            "{id}: a page past its end"
        );
    }
    for id in &linked {
        let got = taken.get(id).map_or(0, |v| v.len() as u64);
        assert_eq!(got, sizes[id], "{id}: its first copy is incomplete");
        checked += 1;
    }
    println!(
        "saver: {adds} blocks added, {} taken from, {checked} complete at the end",
        taken.len()
    );
    assert!(adds > 10 && checked > 0);
}
