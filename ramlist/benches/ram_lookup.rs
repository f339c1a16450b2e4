//! ram_addr -> host lookups per second while another thread hot-adds and removes a block
//! every millisecond: our RCU [`RamList::block_at`] under `rcu::read_lock` against
//! vm-memory's `GuestMemoryAtomic<GuestMemoryMmap>` (arc-swap) doing `memory()` +
//! `get_host_address`, with `insert_region`/`remove_region` + `lock().replace` updates.
//!
//! Both sides hold the same layout: a 1 GiB block and seven 64 MiB blocks, contiguous, plus
//! a 32 MiB block toggled at the end. Two access patterns: `uniform` (addresses uniform
//! over RAM, so ~70% hit the big block, the MRU's friend) and `spread` (a random block,
//! then a random offset in it: the MRU misses 7 times in 8). At the end the bench prints
//! lookups/s of each side and the ratio (ours / vm-memory) from every sample it ran.

use criterion::{BenchmarkId, Criterion, Throughput};
use ramlist::RamList;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestRegionMmap,
};

const MIB: u64 = 1 << 20;
const SIZES: [u64; 8] = [
    1024 * MIB,
    64 * MIB,
    64 * MIB,
    64 * MIB,
    64 * MIB,
    64 * MIB,
    64 * MIB,
    64 * MIB,
];
const HOT: u64 = 32 * MIB;
const ADDRS: usize = 1 << 14;

/// (lookups, nanoseconds) per benchmark id, summed over every sample.
static TOTALS: Mutex<BTreeMap<String, (u64, u128)>> = Mutex::new(BTreeMap::new());

fn record(id: &str, ops: u64, took: Duration) {
    let mut t = TOTALS.lock().unwrap();
    let e = t.entry(id.to_string()).or_default();
    e.0 += ops;
    e.1 += took.as_nanos();
}

/// Addresses for one thread: `spread` picks a block first, `uniform` an address.
fn addresses(seed: u64, spread: bool) -> Vec<u64> {
    let total: u64 = SIZES.iter().sum();
    let starts: Vec<u64> = SIZES
        .iter()
        .scan(0, |at, s| {
            let start = *at;
            *at += s;
            Some(start)
        })
        .collect();
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..ADDRS)
        .map(|_| {
            if spread {
                let b = (next() % SIZES.len() as u64) as usize;
                starts[b] + next() % SIZES[b]
            } else {
                next() % total
            }
        })
        .collect()
}

/// Something both sides can look up in and hot-plug.
trait Subject: Send + Sync + 'static {
    fn lookup(&self, addr: u64) -> *mut u8;
    fn hot_add(&self);
    fn hot_remove(&self);
}

struct Ours {
    ram: RamList,
}

impl Ours {
    fn new() -> Ours {
        let ram = RamList::new();
        for (i, &s) in SIZES.iter().enumerate() {
            ram.alloc(&format!("b{i}"), s).unwrap();
        }
        Ours { ram }
    }
}

impl Subject for Ours {
    #[inline]
    fn lookup(&self, addr: u64) -> *mut u8 {
        let guard = rcu::read_lock();
        match self.ram.block_at(&guard, addr) {
            Some(b) => b.host().wrapping_add((addr - b.offset()) as usize),
            None => std::ptr::null_mut(),
        }
    }
    fn hot_add(&self) {
        self.ram.alloc("hot", HOT).unwrap();
    }
    fn hot_remove(&self) {
        self.ram.free("hot").unwrap();
    }
}

struct VmMemory {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    hot_at: u64,
}

impl VmMemory {
    fn new() -> VmMemory {
        let mut ranges = Vec::new();
        let mut at = 0;
        for &s in &SIZES {
            ranges.push((GuestAddress(at), s as usize));
            at += s;
        }
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        VmMemory {
            mem: GuestMemoryAtomic::new(mem),
            hot_at: at,
        }
    }
}

impl Subject for VmMemory {
    #[inline]
    fn lookup(&self, addr: u64) -> *mut u8 {
        self.mem
            .memory()
            .get_host_address(GuestAddress(addr))
            .unwrap_or(std::ptr::null_mut())
    }
    fn hot_add(&self) {
        let region = GuestRegionMmap::from_range(GuestAddress(self.hot_at), HOT as usize, None);
        let lock = self.mem.lock().unwrap();
        let next = self
            .mem
            .memory()
            .insert_region(Arc::new(region.unwrap()))
            .unwrap();
        lock.replace(next);
    }
    fn hot_remove(&self) {
        let lock = self.mem.lock().unwrap();
        let (next, _old) = self
            .mem
            .memory()
            .remove_region(GuestAddress(self.hot_at), HOT)
            .unwrap();
        lock.replace(next);
    }
}

/// `threads` threads do `iters` lookups each while an updater toggles the hot block every
/// millisecond; returns the wall time of the lookups.
fn run<S: Subject>(s: &Arc<S>, threads: usize, iters: u64, addrs: &[Arc<Vec<u64>>]) -> Duration {
    let stop = Arc::new(AtomicBool::new(false));
    let updater = {
        let (s, stop) = (s.clone(), stop.clone());
        thread::spawn(move || {
            let mut present = false;
            while !stop.load(Ordering::Relaxed) {
                if present {
                    s.hot_remove();
                } else {
                    s.hot_add();
                }
                present = !present;
                thread::sleep(Duration::from_millis(1));
            }
            if present {
                s.hot_remove();
            }
        })
    };
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (s, start, addrs) = (s.clone(), start.clone(), addrs[t].clone());
            thread::spawn(move || {
                start.wait();
                let mut acc = 0usize;
                for i in 0..iters as usize {
                    acc ^= s.lookup(addrs[i % ADDRS]) as usize;
                }
                black_box(acc);
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    for w in workers {
        w.join().unwrap();
    }
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    updater.join().unwrap();
    took
}

fn lookups(c: &mut Criterion) {
    let ours = Arc::new(Ours::new());
    let theirs = Arc::new(VmMemory::new());
    for spread in [false, true] {
        let pattern = if spread { "spread" } else { "uniform" };
        let mut group = c.benchmark_group(format!("ram_lookup_{pattern}"));
        group.measurement_time(Duration::from_secs(2));
        group.warm_up_time(Duration::from_millis(500));
        group.sample_size(20);
        for threads in [1usize, 2] {
            let addrs: Vec<Arc<Vec<u64>>> = (0..threads)
                .map(|t| Arc::new(addresses(0x9e37_79b9 + t as u64, spread)))
                .collect();
            group.throughput(Throughput::Elements(threads as u64));
            let id = format!("{pattern}/ramlist/{threads}");
            group.bench_function(BenchmarkId::new("ramlist_rcu", threads), |b| {
                b.iter_custom(|iters| {
                    let took = run(&ours, threads, iters, &addrs);
                    record(&id, iters * threads as u64, took);
                    took
                })
            });
            let id = format!("{pattern}/vm-memory/{threads}");
            group.bench_function(BenchmarkId::new("vm_memory_arcswap", threads), |b| {
                b.iter_custom(|iters| {
                    let took = run(&theirs, threads, iters, &addrs);
                    record(&id, iters * threads as u64, took);
                    took
                })
            });
        }
        group.finish();
    }
}

fn print_ratios() {
    let totals = TOTALS.lock().unwrap();
    let rate = |k: &str| {
        totals
            .get(k)
            .map(|&(ops, ns)| ops as f64 / (ns as f64 / 1e9))
    };
    println!("\nram_addr -> host lookups/s with a hot add/remove every 1 ms (all samples):");
    for pattern in ["uniform", "spread"] {
        for threads in [1, 2] {
            let ours = rate(&format!("{pattern}/ramlist/{threads}"));
            let theirs = rate(&format!("{pattern}/vm-memory/{threads}"));
            if let (Some(o), Some(t)) = (ours, theirs) {
                println!(
                    "  {pattern:7} {threads} thread(s): ramlist {:8.1} M/s  vm-memory {:8.1} M/s  ratio {:.2}x",
                    o / 1e6,
                    t / 1e6,
                    o / t
                );
            }
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    lookups(&mut c);
    c.final_summary();
    print_ratios();
}
