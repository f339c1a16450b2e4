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
#[test]
fn readers_walk_while_an_updater_replaces_elements() {
    let drops = Arc::new(AtomicUsize::new(0));
    let list = Arc::new(rcu::RcuList::new());
    for k in 0..16 {
        list.lock().push_back(item(k, &drops));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(3));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (list, stop, errors, start) =
                (list.clone(), stop.clone(), errors.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut walks = 0u64;
                while !stop.load(SeqCst) {
                    let g = rcu::read_lock();
                    let mut n = 0;
                    for e in list.iter(&g) {
                        if e.dead.load(SeqCst) {
                            errors.fetch_add(1, SeqCst);
                        }
                        n += 1;
                    }
                    // Exactly 16 stay linked at all times; a walk may also see the one
                    // being replaced, and never more than 17.
                    if !(15..=17).contains(&n) {
                        errors.fetch_add(1, SeqCst);
                    }
                    walks += 1;
                }
                walks
            })
        })
        .collect();
    start.wait();
    let mut removed = 0;
    for round in 0..3000u32 {
        let victim = (round * 7) % 16;
        let mut w = list.lock();
        let mut c = w.cursor_front();
        for _ in 0..victim {
            c.move_next();
        }
        c.insert_after(item(100 + round, &drops));
        assert!(c.remove_current());
        removed += 1;
    }
    stop.store(true, SeqCst);
    let walks: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(walks > 0);
    assert_eq!(
        errors.load(SeqCst),
        0,
        "a reader saw a freed element or a broken list"
    );
    rcu::drain_call_rcu();
    assert_eq!(drops.load(SeqCst), removed, "removed != reclaimed");
    assert_eq!(list.len(), 16);
}
