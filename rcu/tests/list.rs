//! Tests of RcuList: writer operations keep order, readers walk through concurrent
//! changes, removed elements are reclaimed exactly once and only when uncounted.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

struct Item {
    key: u32,
    drops: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
}

impl Drop for Item {
    fn drop(&mut self) {
        self.dead.store(true, SeqCst);
        self.drops.fetch_add(1, SeqCst);
    }
}

fn item(key: u32, drops: &Arc<AtomicUsize>) -> Item {
    Item {
        key,
        drops: drops.clone(),
        dead: Arc::new(AtomicBool::new(false)),
    }
}

fn keys(list: &rcu::RcuList<Item>) -> Vec<u32> {
    let g = rcu::read_lock();
    list.iter(&g).map(|e| e.key).collect()
}

#[test]
fn writer_operations_keep_order() {
    let drops = Arc::new(AtomicUsize::new(0));
    let list = rcu::RcuList::new();
    {
        let mut w = list.lock();
        w.push_back(item(2, &drops));
        w.push_front(item(1, &drops));
        w.push_back(item(4, &drops));
        w.insert_before_first(|i| i.key > 2, item(3, &drops));
        w.insert_before_first(|i| i.key > 100, item(9, &drops));
        let mut c = w.cursor_front();
        c.move_next(); // at 2
        c.insert_after(item(25, &drops));
        c.insert_before(item(15, &drops));
        assert_eq!(c.current().map(|i| i.key), Some(2));
    }
    assert_eq!(keys(&list), vec![1, 15, 2, 25, 3, 4, 9]);
    assert_eq!(list.len(), 7);
    {
        let mut w = list.lock();
        assert!(w.remove_first(|i| i.key == 25));
        assert!(!w.remove_first(|i| i.key == 25));
        w.retain(|i| i.key % 2 == 1 || i.key == 4);
        assert_eq!(
            w.iter().map(|i| i.key).collect::<Vec<_>>(),
            vec![1, 15, 3, 4, 9]
        );
        // Removing the head and tail keeps both ends right.
        assert!(w.remove_first(|i| i.key == 1));
        assert!(w.remove_first(|i| i.key == 9));
        w.push_back(item(10, &drops));
        w.push_front(item(0, &drops));
    }
    assert_eq!(keys(&list), vec![0, 15, 3, 4, 10]);
    rcu::drain_call_rcu();
    assert_eq!(drops.load(SeqCst), 4);
    drop(list);
    rcu::drain_call_rcu();
    assert_eq!(drops.load(SeqCst), 9);
}

#[test]
fn a_removed_element_stays_alive_for_readers_and_counted_references() {
    let drops = Arc::new(AtomicUsize::new(0));
    let list = rcu::RcuList::new();
    list.lock().push_back(item(1, &drops));
    list.lock().push_back(item(2, &drops));
    let g = rcu::read_lock();
    let mut it = list.iter(&g);
    let first = it.next().unwrap();
    let kept = first.counted();
    assert!(kept.is_linked());
    list.lock().remove_first(|i| i.key == 1);
    assert!(!kept.is_linked());
    // A reader standing on the removed element walks on into the list.
    assert_eq!(it.next().map(|e| e.key), Some(2));
    assert_eq!(first.key, 1);
    drop(g);
    rcu::drain_call_rcu();
    assert_eq!(
        drops.load(SeqCst),
        0,
        "freed while a counted reference exists"
    );
    assert_eq!(kept.key, 1);
    let twin = kept.clone();
    drop(kept);
    rcu::drain_call_rcu();
    assert_eq!(drops.load(SeqCst), 0);
    drop(twin);
    rcu::drain_call_rcu();
    assert_eq!(drops.load(SeqCst), 1);
}

#[test]
fn remove_by_counted_reference_only_in_its_own_list() {
    let drops = Arc::new(AtomicUsize::new(0));
    let a = rcu::RcuList::new();
    let b = rcu::RcuList::new();
    a.lock().push_back(item(1, &drops));
    b.lock().push_back(item(1, &drops));
    let from_a = a.lock().cursor_front().counted().unwrap();
    assert!(!b.lock().remove(&from_a), "removed another list's element");
    assert!(a.lock().remove(&from_a));
    assert!(!a.lock().remove(&from_a), "removed twice");
    assert_eq!((a.len(), b.len()), (0, 1));
}

/// QEMU's test-rcu-list, in small: readers walk while an updater replaces random elements.
///
/// Each round replaces the element at one position: the new one is linked after the
/// victim, then the victim is unlinked (its `next` left pointing at the new one). A walk
/// therefore sees at least one element per position, never one twice, and never a
/// reclaimed one; but it is not bounded by 17. A reader that stands on an unlinked element
/// while later rounds replace its successor at the same position again and again follows
/// the whole chain of replacements (each unlinked one still points at the next, and none
/// is reclaimed while the walk's section lasts): a walk spanning k rounds may see up to
/// 16 + k elements. That happens whenever a reader is preempted or slowed mid-walk (a walk
/// took ~3000 rounds on these 2-CPU hosts under `--test-threads=1`, seeing 201 elements),
/// so the bound is taken from the rounds that overlapped the walk.
#[test]
fn readers_walk_while_an_updater_replaces_elements() {
    const LEN: usize = 16;
    const ROUNDS: u32 = 3000;
    const MIN_WALKS: usize = 100;
    let drops = Arc::new(AtomicUsize::new(0));
    let list = Arc::new(rcu::RcuList::new());
    for k in 0..LEN as u32 {
        list.lock().push_back(item(k, &drops));
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Rounds begun (before the new element is linked) and finished (after the victim is
    // unlinked): a walk overlaps at most `begun at its end - finished at its start` rounds.
    let begun = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    // Walks each reader has done: the updater goes on past ROUNDS until both have walked
    // MIN_WALKS times, so that walks overlap updates however the threads are scheduled.
    let walked: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let start = Arc::new(Barrier::new(3));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (list, stop, start) = (list.clone(), stop.clone(), start.clone());
            let (begun, finished, walked) = (begun.clone(), finished.clone(), walked.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut keys = Vec::with_capacity(LEN + 1);
                while !stop.load(SeqCst) {
                    let done_before = finished.load(SeqCst);
                    let g = rcu::read_lock();
                    keys.clear();
                    for e in list.iter(&g) {
                        assert!(!e.dead.load(SeqCst), "walked onto a reclaimed element");
                        keys.push(e.key);
                    }
                    drop(g);
                    let overlapping = begun.load(SeqCst) - done_before;
                    let n = keys.len();
                    assert!(
                        (LEN..=LEN + overlapping).contains(&n),
                        "a walk overlapping {overlapping} rounds saw {n} elements: {keys:?}"
                    );
                    keys.sort_unstable();
                    keys.dedup();
                    assert_eq!(keys.len(), n, "a walk saw an element twice");
                    walked[r].fetch_add(1, SeqCst);
                }
            })
        })
        .collect();
    start.wait();
    let mut round = 0;
    while round < ROUNDS || walked.iter().any(|w| w.load(SeqCst) < MIN_WALKS) {
        let victim = (round * 7) % LEN as u32;
        let mut w = list.lock();
        let mut c = w.cursor_front();
        for _ in 0..victim {
            c.move_next();
        }
        begun.fetch_add(1, SeqCst);
        c.insert_after(item(100 + round, &drops));
        assert!(c.remove_current());
        finished.fetch_add(1, SeqCst);
        round += 1;
    }
    stop.store(true, SeqCst);
    for r in readers {
        r.join().unwrap();
    }
    rcu::drain_call_rcu();
    assert_eq!(drops.load(SeqCst), round as usize, "removed != reclaimed");
    assert_eq!(list.len(), LEN);
}
