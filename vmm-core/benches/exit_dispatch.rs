//! Criterion bench of vCPU exit dispatch (`cargo bench -p vmm-core --bench exit_dispatch`):
//! find the device claiming a port and hand it a one-byte write, on one thread, as a vCPU
//! does for every port-I/O exit. Side by side:
//!
//! - `qsbr`: the RCU device map read through a QSBR reader, plus the quiescent state the
//!   vCPU loop reports after each exit (what `vcpu/run.rs` does);
//! - `qsbr_lookup_only`: the same without the quiescent state (the read side alone);
//! - `read_lock`: the RCU device map under `rcu::read_lock()`;
//! - `rwlock_btreemap`: a `RwLock<BTreeMap<base, (len, device)>>`, the locked alternative.
//!
//! The device is a no-op (it counts), behind 16 claimed ranges like a small PC's. After
//! criterion, a plain timing loop (median of rounds) prints each one's ns per exit and its
//! ratio to `qsbr`.

use criterion::{criterion_group, Criterion};
use rcu::QsbrReader;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use vmm_core::devices::map::{BusDevice, DeviceMap, Space};

/// A device that only counts writes (a load and a store: no read-modify-write, which
/// would cost more than the whole dispatch; one thread writes it).
#[derive(Default)]
struct Nop(AtomicU64);

impl BusDevice for Nop {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, offset: u64, _data: &[u8]) {
        self.0.store(self.0.load(Relaxed) + offset + 1, Relaxed);
    }
}

/// The ranges both maps hold: 16 devices of 8 ports each, 0x100 apart.
const DEVICES: u64 = 16;
/// The port written: the serial-like device at 0x3f8.
const PORT: u64 = 0x3f8;

fn base(i: u64) -> u64 {
    if i == 3 {
        PORT
    } else {
        0x100 * i + 0x10
    }
}

fn rcu_map() -> DeviceMap {
    let map = DeviceMap::new();
    for i in 0..DEVICES {
        map.add(Space::Pio, base(i), 8, Arc::new(Nop::default()))
            .unwrap();
    }
    map
}

type Locked = RwLock<BTreeMap<u64, (u64, Arc<dyn BusDevice>)>>;

fn rwlock_map() -> Locked {
    let mut m: BTreeMap<u64, (u64, Arc<dyn BusDevice>)> = BTreeMap::new();
    for i in 0..DEVICES {
        m.insert(base(i), (8, Arc::new(Nop::default())));
    }
    RwLock::new(m)
}

#[inline(always)]
fn rwlock_dispatch(map: &Locked, port: u64, data: &[u8]) -> bool {
    let m = map.read().unwrap_or_else(|e| e.into_inner());
    match m.range(..=port).next_back() {
        Some((&b, (len, dev))) if port - b < *len => {
            dev.write(port - b, data);
            true
        }
        _ => false,
    }
}

/// What the four ways share: the two maps and the vCPU-like QSBR reader.
struct Ways {
    map: DeviceMap,
    locked: Locked,
    reader: QsbrReader,
}

impl Ways {
    fn qsbr(&mut self, n: u64) {
        for _ in 0..n {
            let port = black_box(PORT);
            black_box(self.map.view(&self.reader).write(Space::Pio, port, &[1]));
            self.reader.quiescent_state();
        }
    }
    fn qsbr_lookup_only(&mut self, n: u64) {
        for _ in 0..n {
            let port = black_box(PORT);
            black_box(self.map.view(&self.reader).write(Space::Pio, port, &[1]));
        }
    }
    fn read_lock(&mut self, n: u64) {
        for _ in 0..n {
            let port = black_box(PORT);
            let g = rcu::read_lock();
            black_box(self.map.view(&g).write(Space::Pio, port, &[1]));
        }
    }
    fn rwlock(&mut self, n: u64) {
        for _ in 0..n {
            black_box(rwlock_dispatch(&self.locked, black_box(PORT), &[1]));
        }
    }
}

type Way = fn(&mut Ways, u64);
const WAYS: [(&str, Way); 4] = [
    ("qsbr", Ways::qsbr),
    ("qsbr_lookup_only", Ways::qsbr_lookup_only),
    ("read_lock", Ways::read_lock),
    ("rwlock_btreemap", Ways::rwlock),
];

fn ways() -> Ways {
    Ways {
        map: rcu_map(),
        locked: rwlock_map(),
        reader: QsbrReader::register(),
    }
}

fn exit_dispatch(c: &mut Criterion) {
    let mut w = ways();
    let mut g = c.benchmark_group("exit_dispatch");
    for (name, way) in WAYS {
        g.bench_function(name, |b| b.iter(|| way(&mut w, 1)));
    }
    g.finish();
}

/// Median ns per exit over `rounds` rounds of `n` exits, the ways interleaved per round.
fn ratios() {
    const N: u64 = 2_000_000;
    const ROUNDS: usize = 15;
    let mut w = ways();
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); WAYS.len()];
    for _ in 0..ROUNDS {
        for (i, (_, way)) in WAYS.iter().enumerate() {
            let t0 = Instant::now();
            way(&mut w, N);
            ns[i].push(t0.elapsed().as_nanos() as f64 / N as f64);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let med: Vec<f64> = ns.iter_mut().map(median).collect();
    println!("\nexit dispatch, one thread, median of {ROUNDS} rounds of {N} exits:");
    for (i, (name, _)) in WAYS.iter().enumerate() {
        println!(
            "  {name:<18} {:>7.2} ns/exit  {:>6.2}x qsbr",
            med[i],
            med[i] / med[0]
        );
    }
    println!("RESULT exit.qsbr.ns {:.3}", med[0]);
    println!("RESULT exit.read_lock.ns {:.3}", med[2]);
    println!("RESULT exit.rwlock.ns {:.3}", med[3]);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = exit_dispatch
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench -- <filter>` and `--list` runs skip the table.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list" || a == "--test") {
        return;
    }
    ratios();
}
