//! The list phase (QEMU's test-rcu-list): readers walk an [`rcu::RcuList`] while updaters
//! remove random nodes and insert new ones, and every node is accounted for.
//!
//! A node's `Drop` marks it dead and counts it reclaimed. Readers check every node they
//! walk past (and every node they keep through a [`rcu::Counted`]) is not dead: a dead node
//! under a guard means it was reclaimed before its grace period ended. At the end, once
//! the queued callbacks have run, exactly the removed nodes must have been reclaimed; after
//! the list itself is dropped, every node ever created.

use crate::harness::{ns_per_op, Flavor, Go, LibCounters, Reader, Summary};
use rand::Rng;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Nodes in the list at the start (QEMU's RCU_Q_LEN).
const INITIAL_NODES: u64 = 100;
/// Walks between a reader's checks of a counted reference kept past its section.
const COUNTED_EVERY: u64 = 256;
/// Walks between a reader's slow walks (see `slow_walk`).
const SLOW_WALK_EVERY: u64 = 4096;
/// List changes between an updater's own synchronize calls (QEMU waits after each one;
/// here reclamation goes through call_rcu, and the waits only add grace-period traffic).
const UPDATER_SYNC_EVERY: u64 = 16;
/// drain_call_rcu rounds to wait for callbacks that queue further callbacks.
const MAX_DRAINS: usize = 8;

/// Nodes whose `Drop` ran, ever (one list phase per process).
static RECLAIMED: AtomicU64 = AtomicU64::new(0);

/// A list element that notices its own reclamation.
struct Node {
    dead: AtomicBool,
}

impl Node {
    fn new() -> Node {
        Node {
            dead: AtomicBool::new(false),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.dead.store(true, Relaxed);
        RECLAIMED.fetch_add(1, Relaxed);
    }
}

#[derive(Default)]
struct ReaderCounts {
    visited: u64,
    walks: u64,
    dead_seen: u64,
}

#[derive(Default)]
struct UpdaterCounts {
    removed: u64,
    inserted: u64,
}

/// Runs the list phase for `d`.
pub fn run(d: Duration, readers: u32, updaters: u32, flavor: Flavor, summary: &mut Summary) {
    println!("== list: {readers} readers, {updaters} updaters, {INITIAL_NODES} nodes, {d:?}");
    let base = RECLAIMED.load(Relaxed);
    let reclaimed = || RECLAIMED.load(Relaxed) - base;
    let list = rcu::RcuList::new();
    {
        let mut w = list.lock();
        for _ in 0..INITIAL_NODES {
            w.push_front(Node::new());
        }
    }
    let go = Go::new((readers + updaters) as usize);
    let before = LibCounters::now();
    let (elapsed, r, u) = std::thread::scope(|s| {
        let rs: Vec<_> = (0..readers)
            .map(|_| {
                s.spawn(|| {
                    go.ready();
                    reader(&list, &go, flavor)
                })
            })
            .collect();
        let us: Vec<_> = (0..updaters)
            .map(|_| {
                s.spawn(|| {
                    go.ready();
                    updater(&list, &go)
                })
            })
            .collect();
        let elapsed = go.run_for(d);
        let mut r = ReaderCounts::default();
        for h in rs {
            let c = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            r.visited += c.visited;
            r.walks += c.walks;
            r.dead_seen += c.dead_seen;
        }
        let mut u = UpdaterCounts::default();
        for h in us {
            let c = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            u.removed += c.removed;
            u.inserted += c.inserted;
        }
        (elapsed, r, u)
    });

    // Every removed node, and only those, once the callbacks queued so far have run.
    let drains = drain_until(|| reclaimed() >= u.removed);
    let reclaimed_removed = reclaimed();
    let remaining = list.len() as u64;
    let created = INITIAL_NODES + u.inserted;
    // Then the nodes still linked, through the list's own drop.
    drop(list);
    let final_drains = drain_until(|| reclaimed() >= created);
    let reclaimed_all = reclaimed();

    let updates = u.removed + u.inserted;
    println!(
        "list: nodes read: {}  walks: {}  n_updates: {updates}  dead nodes seen: {}",
        r.visited, r.walks, r.dead_seen
    );
    println!(
        "list: ns/node read: {:.1}  ns/update: {:.1}",
        ns_per_op(elapsed, readers, r.visited),
        ns_per_op(elapsed, updaters, updates)
    );
    println!(
        "list: created: {created}  removed: {}  reclaimed: {reclaimed_removed} (after {drains} \
         drains)  left in list: {remaining}  reclaimed after drop: {reclaimed_all} (after \
         {final_drains} drains)",
        u.removed
    );
    println!("list: {}", before.report_since(elapsed));
    if r.dead_seen != 0 {
        summary.failures.push(format!(
            "list: readers saw {} reclaimed nodes under a guard",
            r.dead_seen
        ));
    }
    if reclaimed_removed != u.removed {
        summary.failures.push(format!(
            "list: {} nodes removed but {reclaimed_removed} reclaimed",
            u.removed
        ));
    }
    if remaining != created - u.removed {
        summary.failures.push(format!(
            "list: {created} created - {} removed != {remaining} left in the list",
            u.removed
        ));
    }
    if reclaimed_all != created {
        summary.failures.push(format!(
            "list: {created} nodes created but {reclaimed_all} reclaimed after dropping the list"
        ));
    }
    if r.walks == 0 || updates == 0 {
        summary.failures.push(format!(
            "list: no progress (walks {}, updates {updates})",
            r.walks
        ));
    }
    summary.reads += r.visited;
    summary.updates += updates;
    summary.list = Some((u.removed, reclaimed_removed));
}

/// Drains call_rcu at least once (so every callback queued so far has run, not merely
/// enough of them to reach a count) and again until `done` holds, since callbacks may
/// queue callbacks; at most MAX_DRAINS times. Returns how many drains it took.
fn drain_until(done: impl Fn() -> bool) -> usize {
    let mut n = 0;
    loop {
        rcu::drain_call_rcu();
        n += 1;
        if done() || n >= MAX_DRAINS {
            return n;
        }
    }
}

fn reader(list: &rcu::RcuList<Node>, go: &Go, flavor: Flavor) -> ReaderCounts {
    let mut reader = Reader::new(flavor);
    let mut c = ReaderCounts::default();
    while go.running() {
        if c.walks % SLOW_WALK_EVERY == SLOW_WALK_EVERY - 1 {
            reader.section(|guard| slow_walk(list, guard, &mut c));
            continue;
        }
        let kept = reader.section(|guard| {
            let mut kept = None;
            for (i, e) in list.iter(guard).enumerate() {
                c.visited += 1;
                if e.dead.load(Relaxed) {
                    c.dead_seen += 1;
                }
                if c.walks % COUNTED_EVERY == 0 && i as u64 == (c.walks / COUNTED_EVERY) % 64 {
                    kept = Some(e.counted());
                }
            }
            kept
        });
        c.walks += 1;
        // A counted reference outlives the section: its node must stay alive even if an
        // updater removes it meanwhile.
        if let Some(k) = kept {
            if k.dead.load(Relaxed) {
                c.dead_seen += 1;
            }
        }
    }
    c
}

/// A walk that yields the CPU at every node and keeps every entry it passed, then checks
/// them all again before leaving its section: a section long enough for updaters to
/// remove some of those nodes and for call_rcu to run batches meanwhile, so a batch that
/// did not wait for this section frees a node still held here.
fn slow_walk(list: &rcu::RcuList<Node>, guard: &rcu::ReadGuard, c: &mut ReaderCounts) {
    let mut seen = Vec::new();
    for e in list.iter(guard) {
        c.visited += 1;
        if e.dead.load(Relaxed) {
            c.dead_seen += 1;
        }
        seen.push(e);
        std::thread::yield_now();
    }
    c.dead_seen += seen.iter().filter(|e| e.dead.load(Relaxed)).count() as u64;
    c.walks += 1;
}

fn updater(list: &rcu::RcuList<Node>, go: &Go) -> UpdaterCounts {
    let mut rng = rand::rng();
    let mut c = UpdaterCounts::default();
    while go.running() {
        {
            let mut w = list.lock();
            let len = w.len();
            if len > 0 {
                let at = rng.random_range(0..len);
                let mut cur = w.cursor_front();
                for _ in 0..at {
                    cur.move_next();
                }
                if cur.remove_current() {
                    c.removed += 1;
                }
            }
            let at = rng.random_range(0..=w.len());
            let mut cur = w.cursor_front();
            for _ in 0..at {
                cur.move_next();
            }
            cur.insert_before(Node::new());
            c.inserted += 1;
        }
        if (c.removed + c.inserted) % UPDATER_SYNC_EVERY == 0 {
            rcu::synchronize();
        }
    }
    c
}
