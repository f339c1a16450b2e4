//! An outside review of ramlist, written as its users would use it (the VMM, the
//! migration saver), against the public API only. Each test names the defect it caught;
//! all of them failed before the fix next to them (see the commit message).

mod kvm_guest;

use ramlist::dirty::DirtyClient;
use ramlist::guest::GuestRam;
use ramlist::kvm::KvmRam;
use ramlist::{page_size, RamBlock, RamBlockOptions, RamList};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

const M: DirtyClient = DirtyClient::Migration;

/// Counts the blocks of `list` about to be unmapped.
fn reclaimed(list: &RamList) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&n);
    list.set_reclaim_notifier(Some(Arc::new(move |_: &RamBlock| {
        seen.fetch_add(1, SeqCst);
    })));
    n
}

/// `take_block` computed `block offset + first_page` unchecked: a `first_page` near 2^64
/// panicked in debug builds ("attempt to add with overflow") and, in release builds,
/// wrapped around to another block's bitmap words and took (cleared) that block's bits —
/// a saver would then never send those pages.
#[test]
fn take_block_with_a_huge_first_page_takes_nothing_from_other_blocks() {
    let p = page_size();
    let list = RamList::new();
    list.alloc("low", 64 * p).unwrap();
    list.alloc("high", 64 * p).unwrap();
    let g = rcu::read_lock();
    let low = list.block_by_id(&g, "low").unwrap();
    let high = list.block_by_id(&g, "high").unwrap();
    let (low, high) = if low.offset() < high.offset() {
        (low, high)
    } else {
        (high, low)
    };
    // Page numbers of the bitmap: `high` starts at `h`, `low` at `l`; `first_page` is
    // chosen so that h + first_page wraps to l.
    let (h, l) = (high.offset() / p, low.offset() / p);
    let first_page = (u64::MAX - h + 1).wrapping_add(l);
    assert_eq!(first_page % 64, 0);
    let mut out = [0u64; 2];
    let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        list.dirty().take_block(M, high, first_page, &mut out)
    }));
    let taken = taken.expect("take_block panicked on a large first_page");
    assert_eq!(
        taken.unwrap(),
        0,
        "pages past the block's end are not its own"
    );
    assert_eq!(out, [0, 0]);
    assert_eq!(
        list.dirty().count_dirty(M, low.offset(), low.len()),
        64,
        "another block's dirty bits were taken"
    );
}

/// `GuestRam::snapshot` walked the list, then looked each placed block up again *by id*:
/// with a block freed and another of the same id placed meanwhile, a region paired one
/// block's guest address with the other block's memory (writes to guest address A landed
/// in the block the guest sees at B), and one walk could hold both the freed block and
/// its successor, overlapping. Now each region holds the very block it saw, and a walk
/// that raced with a change is taken again.
#[test]
fn a_guest_ram_snapshot_pairs_each_region_with_its_own_block() {
    let p = page_size();
    let list = Arc::new(RamList::new());
    // Many placed blocks make each walk long; "x" alternates between the head of the
    // list (4 pages, biggest) and its tail (1 page), over the same guest range.
    for i in 0..64u64 {
        let opts = RamBlockOptions {
            guest_addr: Some(i * 4 * p),
            ..Default::default()
        };
        list.alloc_with(&format!("other{i}"), 2 * p, opts).unwrap();
    }
    let x_gpa = 1u64 << 30;
    let place = move |n: u64| RamBlockOptions {
        guest_addr: Some(if n % 4 < 2 { x_gpa } else { x_gpa + 16 * p }),
        ..Default::default()
    };
    list.alloc_with("x", 4 * p, place(0)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (list, stop) = (Arc::clone(&list), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 1u64;
            while !stop.load(SeqCst) {
                list.free("x").unwrap();
                let size = if n.is_multiple_of(2) { 4 * p } else { p };
                list.alloc_with("x", size, place(n)).unwrap();
                n += 1;
                if n.is_multiple_of(64) {
                    list.drain_reclaim();
                }
            }
        })
    };
    let start = Instant::now();
    let mut bad = None;
    while bad.is_none() && start.elapsed() < Duration::from_secs(3) {
        let snap = GuestRam::snapshot(&list);
        let regions: Vec<_> = snap.iter().collect();
        for r in &regions {
            if r.block().guest_addr() != Some(r.start_addr().0) {
                bad = Some(format!("{r:?} holds a block placed at {:?}", r.block()));
            }
        }
        for w in regions.windows(2) {
            if w[0].start_addr().0 + w[0].len() > w[1].start_addr().0 {
                bad = Some(format!("overlapping regions {:?} and {:?}", w[0], w[1]));
            }
        }
    }
    stop.store(true, SeqCst);
    churn.join().unwrap();
    assert_eq!(bad, None);
}

/// `KvmRam::add` took the slot table and then waited for the RAM list's writer lock,
/// while every other `KvmRam` method takes the slot table: a thread holding the writer
/// lock (the VMM's big lock) that asked `placed()` — or synced the dirty log — while
/// another thread was inside `add` deadlocked both (ABBA). The documented rule only
/// forbade calling `add`/`remove` under the writer lock. Now `add`/`remove` take the
/// writer lock first.
#[test]
fn a_writer_lock_holder_may_query_kvm_ram_while_another_thread_adds() {
    let Some(vm) = kvm_guest::vm() else { return };
    let p = page_size();
    let list = Arc::new(RamList::new());
    let ram = Arc::new(KvmRam::new(Arc::clone(&list), vm).unwrap());
    ram.add("a", 16 * p, 0, RamBlockOptions::default()).unwrap();
    let (tx, rx) = mpsc::channel();
    {
        let (list, ram) = (Arc::clone(&list), Arc::clone(&ram));
        // Left running if it deadlocks: the test reports it and the process ends.
        std::thread::spawn(move || {
            let writer = list.lock();
            let adder = {
                let ram = Arc::clone(&ram);
                std::thread::spawn(move || {
                    ram.add("b", 16 * p, 1 << 20, RamBlockOptions::default())
                        .map(|_| ())
                })
            };
            // Let the adder reach its wait for our writer lock.
            std::thread::sleep(Duration::from_millis(200));
            let placed = ram.placed().len();
            let synced = ram.sync_dirty_log().is_ok();
            drop(writer);
            let added = adder.join().unwrap().is_ok();
            tx.send((placed, synced, added)).unwrap();
        });
    }
    let got = rx.recv_timeout(Duration::from_secs(10));
    assert_eq!(got, Ok((1, true, true)), "deadlock between add and placed");
    assert_eq!(ram.placed().len(), 2);
}

// ----------------------------------------------------------------------------------
// Orders that held up (kept as regression checks).
// ----------------------------------------------------------------------------------

/// A placed block freed behind `KvmRam`'s back, then the `KvmRam` dropped with no call in
/// between: the slot goes with the `KvmRam`, and only then is the block reclaimed.
#[test]
fn free_behind_the_back_then_drop_kvm_ram_reclaims_after_the_slot() {
    let Some(vm) = kvm_guest::vm() else { return };
    let p = page_size();
    let list = Arc::new(RamList::new());
    let gone = reclaimed(&list);
    let ram = KvmRam::new(Arc::clone(&list), vm).unwrap();
    ram.add("a", 16 * p, 0, RamBlockOptions::default()).unwrap();
    list.free("a").unwrap();
    assert_eq!(list.drain_reclaim(), 1, "the slot keeps it mapped");
    assert_eq!(gone.load(SeqCst), 0);
    drop(ram);
    assert_eq!(list.drain_reclaim(), 0);
    assert_eq!(gone.load(SeqCst), 1);
}

/// A counted reference outlives its list: the block stays mapped until it is dropped.
#[test]
fn a_counted_ref_outlives_its_list() {
    let p = page_size();
    let list = RamList::new();
    let gone = reclaimed(&list);
    list.alloc("a", p).unwrap();
    list.alloc("b", p).unwrap();
    let kept = {
        let g = rcu::read_lock();
        list.block_ref(&g, "a").unwrap()
    };
    drop(list);
    for _ in 0..4 {
        rcu::drain_call_rcu();
    }
    assert_eq!(gone.load(SeqCst), 1, "only the unreferenced block went");
    // SAFETY: the reference keeps the block's page mapped.
    unsafe { kept.host().write_volatile(7) };
    drop(kept);
    for _ in 0..4 {
        rcu::drain_call_rcu();
    }
    assert_eq!(gone.load(SeqCst), 2);
}

/// Reclamation never needs the list's writer lock: draining while holding it returns.
#[test]
fn drain_reclaim_under_the_writer_lock_returns() {
    let p = page_size();
    let list = RamList::new();
    let gone = reclaimed(&list);
    list.alloc("a", p).unwrap();
    let mut writer = list.lock();
    writer.free("a").unwrap();
    assert_eq!(list.drain_reclaim(), 0);
    drop(writer);
    assert_eq!(gone.load(SeqCst), 1);
}
