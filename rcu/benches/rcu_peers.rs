//! The Rust half of `scripts/bench-rcu.sh`: our RCU against crossbeam-epoch, arc-swap and
//! `std::sync::RwLock`, in the figures criterion is awkward for (busy reader threads,
//! two-thread mixes), with the very loops of the C harness `scripts/bench/urcu_peer.c` so
//! that the script can put them next to liburcu's.
//!
//! Figures, each the median of several rounds:
//! - `read.ns.*`: one read section (lock, load, unlock) on one thread, ns;
//! - `qsbr.read.ns.ours`, `qsbr.readqs.ns.ours`: a QSBR reader's load, and the load plus a
//!   quiescent state, on one thread, ns (liburcu-qsbr's in scripts/bench/urcu_qsbr_peer.c);
//! - `sync.us.N.ours`: `rcu::synchronize()` latency with N busy reader threads, µs;
//! - `callrcu.per_s.ours`: `call_rcu` throughput including the final drain, callbacks/s;
//! - `mix.mops.*`: two threads looking up random keys in a 16-node list, 1% of the
//!   operations replacing a node and freeing the old one, M ops/s.
//!
//! Output: `RESULT <key> <value>` lines. Environment: `RCU_BENCH_ROUNDS` (default 7),
//! `RCU_BENCH_MIX_MS` (default 300, the length of one mix round), `RCU_BENCH_ONLY` (a
//! comma-separated subset of `read,qsbr,sync,callrcu,mix`, for profiling one figure).
//! Run: `cargo bench -p rcu --bench rcu_peers`.

use arc_swap::ArcSwap;
use crossbeam_epoch::{self as epoch, Atomic, Owned};
use rcu::{RcuCell, RcuList};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

const READ_ITERS: u64 = 20_000_000;
const SYNC_PER_ROUND: usize = 100;
const CALLRCU_PER_ROUND: usize = 200_000;
const MIX_NODES: u64 = 16;
const MIX_THREADS: usize = 2;
const MAX_ROUNDS: usize = 64;

/// Keeps the compiler from discarding `v`, at the cost of nothing but a register (the
/// C harness's `SINK`); `black_box` would spill the value to the stack.
#[inline(always)]
fn sink(v: u64) {
    // SAFETY: an empty asm statement that only takes a register input; it touches no
    // memory, stack or flags.
    unsafe { std::arch::asm!("/* {0} */", in(reg) v, options(nostack, preserves_flags)) };
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The C harness's xorshift64, so both sides draw the same kind of keys.
fn xorshift(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    x
}

/// Reads a positive integer from the environment; exits with a message naming the bad
/// value rather than panicking on it.
fn env_usize(name: &str, default: usize, max: usize) -> usize {
    match std::env::var(name) {
        Err(_) => default,
        Ok(s) => match s.trim().parse::<usize>() {
            Ok(v) if (1..=max).contains(&v) => v,
            _ => {
                eprintln!("rcu_peers: {name}={s:?} is not an integer in 1..={max}");
                std::process::exit(2);
            }
        },
    }
}

/// ns per call of `op`, `READ_ITERS` calls in a row.
#[inline(always)]
fn ns_per_op(mut op: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    for _ in 0..READ_ITERS {
        op();
    }
    t0.elapsed().as_nanos() as f64 / READ_ITERS as f64
}

fn bench_read(rounds: usize) {
    let ours = RcuCell::new(42u64);
    let cb = Atomic::new(42u64);
    let arc = ArcSwap::from_pointee(42u64);
    let rw = RwLock::new(42u64);
    let mut times: [Vec<f64>; 4] = Default::default();
    // Rounds interleave the contenders, so a drift of the machine hits them all alike.
    for _ in 0..rounds {
        times[0].push(ns_per_op(|| {
            let g = rcu::read_lock();
            sink(*ours.load(&g));
        }));
        times[1].push(ns_per_op(|| {
            let g = epoch::pin();
            let p = cb.load(Acquire, &g);
            // SAFETY: `cb` is never changed or freed while the benchmark runs.
            sink(*unsafe { p.deref() });
        }));
        times[2].push(ns_per_op(|| sink(**arc.load())));
        times[3].push(ns_per_op(|| {
            sink(*rw.read().unwrap_or_else(|e| e.into_inner()));
        }));
    }
    for (name, t) in ["ours", "crossbeam", "arcswap", "rwlock"].iter().zip(times) {
        println!("RESULT read.ns.{name} {:.3}", median(t));
    }
    // SAFETY: no other thread ever saw `cb`; it is freed exactly once.
    drop(unsafe { cb.into_owned() });
}

fn busy_reader(cell: &RcuCell<u64>, stop: &AtomicBool, running: &AtomicUsize) {
    drop(rcu::read_lock()); // register before counting as running
    running.fetch_add(1, SeqCst);
    while !stop.load(Relaxed) {
        for _ in 0..1024 {
            let g = rcu::read_lock();
            sink(*cell.load(&g));
        }
    }
}

fn bench_sync(rounds: usize, readers: usize) {
    let cell = RcuCell::new(42u64);
    let stop = AtomicBool::new(false);
    let running = AtomicUsize::new(0);
    let mut us = Vec::with_capacity(rounds * SYNC_PER_ROUND);
    std::thread::scope(|s| {
        for _ in 0..readers {
            s.spawn(|| busy_reader(&cell, &stop, &running));
        }
        // Time only grace periods that really have busy readers to wait for.
        while running.load(SeqCst) < readers {
            std::hint::spin_loop();
        }
        for _ in 0..rounds * SYNC_PER_ROUND {
            let t0 = Instant::now();
            rcu::synchronize();
            us.push(t0.elapsed().as_nanos() as f64 / 1e3);
        }
        stop.store(true, Relaxed);
    });
    println!("RESULT sync.us.{readers}.ours {:.3}", median(us));
}

fn bench_callrcu(rounds: usize) {
    let mut rate = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t0 = Instant::now();
        for i in 0..CALLRCU_PER_ROUND {
            // The C harness frees a 32-byte object with an embedded rcu_head; here the
            // closure owns the same payload.
            let obj = Box::new([i as u64; 4]);
            rcu::call_rcu(move || drop(obj));
        }
        rcu::drain_call_rcu();
        rate.push(CALLRCU_PER_ROUND as f64 / t0.elapsed().as_secs_f64());
    }
    println!("RESULT callrcu.per_s.ours {:.0}", median(rate));
}

/// A node of the read-mostly mix: readers look it up by `key`.
struct Item {
    key: u64,
    value: u64,
}

/// One contender of the mix: a lookup that walks to `key`, a replacement of the node
/// holding `key` that frees the old node.
trait MixList: Sync {
    fn lookup(&self, key: u64);
    fn replace(&self, key: u64);
}

struct OursList(RcuList<Item>);

impl MixList for OursList {
    #[inline]
    fn lookup(&self, key: u64) {
        let g = rcu::read_lock();
        if let Some(e) = self.0.iter(&g).find(|e| e.key == key) {
            sink(e.value);
        }
    }

    fn replace(&self, key: u64) {
        let mut w = self.0.lock();
        let mut c = w.cursor_front();
        while let Some(item) = c.current() {
            if item.key == key {
                let value = item.value + 1;
                c.insert_before(Item { key, value });
                c.remove_current(); // freed through call_rcu
                return;
            }
            c.move_next();
        }
    }
}

impl OursList {
    /// Reclaims the round's garbage outside the timed span, as the C harness's
    /// `rcu_barrier` does.
    fn between_rounds(&self) {
        rcu::drain_call_rcu();
    }
}

/// A singly linked list under crossbeam-epoch; writers serialized by a mutex.
struct EpochList {
    head: Atomic<EpochNode>,
    writer: Mutex<()>,
}

struct EpochNode {
    item: Item,
    next: Atomic<EpochNode>,
}

impl MixList for EpochList {
    #[inline]
    fn lookup(&self, key: u64) {
        let g = epoch::pin();
        let mut p = self.head.load(Acquire, &g);
        // SAFETY: nodes are unlinked before defer_destroy, so none reachable under a pin
        // is freed before the pin ends.
        while let Some(n) = unsafe { p.as_ref() } {
            if n.item.key == key {
                sink(n.item.value);
                break;
            }
            p = n.next.load(Acquire, &g);
        }
    }

    fn replace(&self, key: u64) {
        let g = epoch::pin();
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut link = &self.head;
        loop {
            let p = link.load(Acquire, &g);
            // SAFETY: as in `lookup`; the writer lock also keeps `p` linked.
            let Some(n) = (unsafe { p.as_ref() }) else {
                return;
            };
            if n.item.key == key {
                let next = n.next.load(Relaxed, &g);
                let fresh = Owned::new(EpochNode {
                    item: Item {
                        key,
                        value: n.item.value + 1,
                    },
                    next: Atomic::null(),
                });
                fresh.next.store(next, Relaxed);
                link.store(fresh, Release);
                // SAFETY: `p` is unlinked; only readers pinned now can still hold it.
                unsafe { g.defer_destroy(p) };
                return;
            }
            link = &n.next;
        }
    }
}

impl Drop for EpochList {
    fn drop(&mut self) {
        // SAFETY: no other thread uses the list any more; each node is freed once.
        unsafe {
            let g = epoch::unprotected();
            let mut p = self.head.load(Relaxed, g);
            while !p.is_null() {
                let next = p.deref().next.load(Relaxed, g);
                drop(p.into_owned());
                p = next;
            }
        }
    }
}

/// The lock-based baseline: a vector of boxed nodes (a pointer chase per step, like a
/// list) under a reader-writer lock. The boxes are the point: one allocation per node,
/// freed on replacement, as in the lists it is compared with.
#[allow(clippy::vec_box)]
struct RwList(RwLock<Vec<Box<Item>>>);

impl MixList for RwList {
    #[inline]
    fn lookup(&self, key: u64) {
        let v = self.0.read().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = v.iter().find(|n| n.key == key) {
            sink(n.value);
        }
    }

    fn replace(&self, key: u64) {
        let mut v = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = v.iter_mut().find(|n| n.key == key) {
            // A fresh allocation and a free, like the RCU and epoch writers.
            let fresh = Box::new(Item {
                key,
                value: n.value + 1,
            });
            *n = fresh;
        }
    }
}

/// One timed round of the mix: M ops/s over both threads.
// `%` rather than `is_multiple_of`: the workspace's rust-version is 1.80.
#[allow(clippy::manual_is_multiple_of)]
/// Generic rather than `&dyn`, so each contender's lookup inlines into the loop as the C
/// harness's does.
fn mix_round<L: MixList>(list: &L, round: usize, mix: Duration) -> f64 {
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let ops: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..MIX_THREADS)
            .map(|i| {
                let stop = &stop;
                let mut seed =
                    0x9e37_79b9_7f4a_7c15u64.wrapping_mul((round * MIX_THREADS + i + 1) as u64);
                s.spawn(move || {
                    let mut ops = 0u64;
                    while !stop.load(Relaxed) {
                        for _ in 0..256 {
                            let x = xorshift(&mut seed);
                            let key = (x >> 8) % MIX_NODES;
                            if (x >> 32) % 100 == 0 {
                                list.replace(key);
                            } else {
                                list.lookup(key);
                            }
                        }
                        ops += 256;
                    }
                    ops
                })
            })
            .collect();
        std::thread::sleep(mix);
        stop.store(true, Relaxed);
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    ops as f64 / t0.elapsed().as_secs_f64() / 1e6
}

fn bench_mix(rounds: usize, mix: Duration) {
    let ours = OursList(RcuList::new());
    {
        let mut w = ours.0.lock();
        for key in 0..MIX_NODES {
            w.push_back(Item { key, value: 0 });
        }
    }
    let epoch_list = EpochList {
        head: Atomic::null(),
        writer: Mutex::new(()),
    };
    for key in (0..MIX_NODES).rev() {
        let node = Owned::new(EpochNode {
            item: Item { key, value: 0 },
            next: Atomic::null(),
        });
        // SAFETY: single-threaded set-up; nothing is freed.
        let g = unsafe { epoch::unprotected() };
        node.next.store(epoch_list.head.load(Relaxed, g), Relaxed);
        epoch_list.head.store(node, Relaxed);
    }
    let rw = RwList(RwLock::new(
        (0..MIX_NODES)
            .map(|key| Box::new(Item { key, value: 0 }))
            .collect(),
    ));
    let names = ["ours", "crossbeam", "rwlock"];
    let mut results: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        results[0].push(mix_round(&ours, round, mix));
        ours.between_rounds();
        results[1].push(mix_round(&epoch_list, round, mix));
        results[2].push(mix_round(&rw, round, mix));
    }
    for (name, r) in names.iter().zip(results) {
        println!("RESULT mix.mops.{name} {:.2}", median(r));
    }
    // Reclamation counters, to see how well call_rcu batched under load.
    let st = rcu::call_rcu_stats();
    println!(
        "INFO call_rcu: {} callbacks in {} batches, {} grace periods",
        st.run,
        st.batches,
        rcu::grace_periods_completed()
    );
}

/// A QSBR reader's read (the load alone) and a read followed by a quiescent state,
/// against liburcu-qsbr's (scripts/bench/urcu_qsbr_peer.c).
fn bench_qsbr(rounds: usize) {
    let ours = RcuCell::new(42u64);
    let mut reader = rcu::QsbrReader::register();
    let (mut read, mut readqs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        read.push(ns_per_op(|| sink(*ours.load(&reader))));
        readqs.push(ns_per_op(|| {
            sink(*ours.load(&reader));
            reader.quiescent_state();
        }));
    }
    println!("RESULT qsbr.read.ns.ours {:.3}", median(read));
    println!("RESULT qsbr.readqs.ns.ours {:.3}", median(readqs));
}

fn main() {
    let rounds = env_usize("RCU_BENCH_ROUNDS", 7, MAX_ROUNDS);
    let mix_ms = env_usize("RCU_BENCH_MIX_MS", 300, 60_000);
    let only = std::env::var("RCU_BENCH_ONLY").unwrap_or_default();
    let wanted = |what: &str| only.is_empty() || only.split(',').any(|w| w.trim() == what);
    println!("INFO barrier_mode {:?}", rcu::barrier_mode());
    if wanted("read") {
        bench_read(rounds);
    }
    if wanted("qsbr") {
        bench_qsbr(rounds);
    }
    if wanted("sync") {
        for readers in 0..=2 {
            bench_sync(rounds, readers);
        }
    }
    if wanted("callrcu") {
        bench_callrcu(rounds);
    }
    if wanted("mix") {
        bench_mix(rounds, Duration::from_millis(mix_ms as u64));
    }
}
