//! Dirty-log sync plus bitmap walk for 1 GiB and 4 GiB of guest RAM, in ns per page:
//! ours ([`KvmRam::sync_dirty_log`] into a reused buffer, word-wise merge into
//! [`DirtyMemory`], clear of the dirty span only, then `take_dirty`, which skips clean
//! words) against a plain baseline (kvm-ioctls' allocating `get_dirty_log`, then a test of
//! every bit).
//!
//! KVM's log only sees guest writes, and guest code is emulated here (~10 MiB/s), so the
//! dirty case uses `KVM_DIRTY_LOG_INITIALLY_SET`: turning logging off and on (untimed)
//! makes every page dirty, which is a migration's realistic first pass. The clean case is
//! an idle guest's later passes. Both sides run in manual-protect mode, so both re-arm what
//! they took with `KVM_CLEAR_DIRTY_LOG`.

use criterion::{BenchmarkId, Criterion, Throughput};
use kvm_ioctls::{Kvm, VmFd};
use ramlist::dirty::{DirtyClient, PAGE_SIZE};
use ramlist::kvm::{clear_dirty_log, DirtyLogMode, KvmRam};
use ramlist::{RamBlockOptions, RamList};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// (pages, nanoseconds) per benchmark id, over every sample.
static TOTALS: Mutex<BTreeMap<String, (u64, u128)>> = Mutex::new(BTreeMap::new());

fn record(id: &str, pages: u64, took: Duration) {
    let mut t = TOTALS.lock().unwrap();
    let e = t.entry(id.to_string()).or_default();
    e.0 += pages;
    e.1 += took.as_nanos();
}

struct Setup {
    ram: KvmRam,
    vm: Arc<VmFd>,
    slot: u32,
    ram_addr: u64,
    size: u64,
}

impl Setup {
    fn new(size: u64) -> Setup {
        let kvm = Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let ram = KvmRam::with_mode(
            Arc::new(RamList::new()),
            vm.clone(),
            DirtyLogMode::ManualInitiallySet,
        )
        .unwrap();
        let placed = ram.add("ram", size, 0, RamBlockOptions::default()).unwrap();
        ram.set_dirty_logging("ram", DirtyClient::Migration, true)
            .unwrap();
        let s = Setup {
            ram,
            vm,
            slot: placed.slot,
            ram_addr: placed.ram_addr,
            size,
        };
        s.make_clean();
        s
    }

    fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Every page dirty in KVM's log again (INITIALLY_SET on re-enable).
    fn make_all_dirty(&self) {
        self.ram
            .set_dirty_logging("ram", DirtyClient::Migration, false)
            .unwrap();
        self.ram
            .set_dirty_logging("ram", DirtyClient::Migration, true)
            .unwrap();
    }

    /// Nothing dirty anywhere.
    fn make_clean(&self) {
        self.ram.sync_dirty_log().unwrap();
        for c in DirtyClient::ALL {
            self.ram.dirty().test_and_clear(c, 0, u64::MAX);
        }
    }

    /// Ours: sync, then walk and clear the migration bitmap.
    fn ours(&self) -> u64 {
        self.ram.sync_dirty_log().unwrap();
        let mut sum = 0u64;
        let n =
            self.ram
                .dirty()
                .take_dirty(DirtyClient::Migration, self.ram_addr, self.size, |a| {
                    sum = sum.wrapping_add(a)
                });
        black_box(sum);
        n
    }

    /// Baseline: allocating GET, CLEAR of the whole log when anything is dirty, then a
    /// test of every bit.
    fn baseline(&self) -> u64 {
        let mut log = self
            .vm
            .get_dirty_log(self.slot, self.size as usize)
            .unwrap();
        let pages = self.pages();
        if log.iter().any(|&w| w != 0) {
            clear_dirty_log(&self.vm, self.slot, 0, pages as u32, &mut log).unwrap();
        }
        let (mut n, mut sum) = (0u64, 0u64);
        for p in 0..pages {
            if log[(p / 64) as usize] >> (p % 64) & 1 != 0 {
                n += 1;
                sum = sum.wrapping_add(self.ram_addr + p * PAGE_SIZE);
            }
        }
        black_box(sum);
        n
    }
}

fn sync_walk(c: &mut Criterion) {
    for size in [GIB, 4 * GIB] {
        let s = Setup::new(size);
        let gib = size / GIB;
        let mut group = c.benchmark_group(format!("dirty_sync_{gib}GiB"));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_millis(300));
        group.throughput(Throughput::Elements(s.pages()));
        for dirty in [true, false] {
            let case = if dirty { "all_dirty" } else { "clean" };
            for (side, f) in [
                ("ours", Setup::ours as fn(&Setup) -> u64),
                ("baseline", Setup::baseline),
            ] {
                let id = format!("{gib}GiB/{case}/{side}");
                group.bench_function(BenchmarkId::new(side, case), |b| {
                    b.iter_custom(|iters| {
                        let mut took = Duration::ZERO;
                        for _ in 0..iters {
                            if dirty {
                                s.make_all_dirty();
                            }
                            let t0 = Instant::now();
                            let n = f(&s);
                            took += t0.elapsed();
                            assert_eq!(n, if dirty { s.pages() } else { 0 });
                        }
                        record(&id, iters * s.pages(), took);
                        took
                    })
                });
            }
        }
        group.finish();
    }
}

fn print_ratios() {
    let totals = TOTALS.lock().unwrap();
    let ns = |k: &str| totals.get(k).map(|&(p, t)| t as f64 / p as f64);
    println!("\ndirty-log sync + walk, ns per page (all samples):");
    for gib in [1, 4] {
        for case in ["all_dirty", "clean"] {
            let ours = ns(&format!("{gib}GiB/{case}/ours"));
            let base = ns(&format!("{gib}GiB/{case}/baseline"));
            if let (Some(o), Some(b)) = (ours, base) {
                println!(
                    "  {gib} GiB {case:9}: ours {o:7.3} ns/page  baseline {b:7.3} ns/page  \
                     speed-up {:.2}x",
                    b / o
                );
            }
        }
    }
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    sync_walk(&mut c);
    c.final_summary();
    print_ratios();
}
