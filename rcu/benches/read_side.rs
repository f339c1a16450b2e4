//! Criterion benches of the read side and of grace periods, for `cargo bench -p rcu --bench
//! read_side`: one read section (lock, load, unlock) of our RCU against crossbeam-epoch
//! pin+load, arc-swap load and `RwLock::read`, nested sections, a QSBR reader's load, its
//! quiescent state and its offline/online pair, an idle `synchronize`, and
//! `call_rcu` of a batch with its drain. The figures with busy threads and liburcu's side
//! are in `rcu_peers.rs` and `scripts/bench-rcu.sh`.

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_epoch::{self as epoch, Atomic};
use rcu::RcuCell;
use std::hint::black_box;
use std::sync::atomic::Ordering::Acquire;
use std::sync::RwLock;
use std::time::Duration;

fn read_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_side");
    let ours = RcuCell::new(42u64);
    g.bench_function("ours_read_lock_load", |b| {
        b.iter(|| {
            let guard = rcu::read_lock();
            black_box(*ours.load(&guard))
        })
    });
    g.bench_function("ours_nested_read_lock", |b| {
        let outer = rcu::read_lock();
        b.iter(|| {
            let guard = rcu::read_lock();
            black_box(*ours.load(&guard))
        });
        drop(outer);
    });
    // A quiescent-state reader (a vCPU's read side): a read is the load alone; the
    // quiescent state it reports between units of work is measured on its own.
    let mut qsbr = rcu::QsbrReader::register();
    g.bench_function("qsbr_load", |b| b.iter(|| black_box(*ours.load(&qsbr))));
    g.bench_function("qsbr_quiescent_state", |b| {
        b.iter(|| qsbr.quiescent_state())
    });
    g.bench_function("qsbr_load_and_quiescent_state", |b| {
        b.iter(|| {
            let v = black_box(*ours.load(&qsbr));
            qsbr.quiescent_state();
            v
        })
    });
    g.bench_function("qsbr_offline_online", |b| {
        b.iter(|| qsbr.offline_scope(|| black_box(0)))
    });
    drop(qsbr);
    let cb = Atomic::new(42u64);
    g.bench_function("crossbeam_epoch_pin_load", |b| {
        b.iter(|| {
            let guard = epoch::pin();
            let p = cb.load(Acquire, &guard);
            // SAFETY: `cb` is neither changed nor freed while the bench runs.
            black_box(*unsafe { p.deref() })
        })
    });
    // SAFETY: `cb` was never shared with another thread; it is freed once.
    drop(unsafe { cb.into_owned() });
    let arc = ArcSwap::from_pointee(42u64);
    g.bench_function("arc_swap_load", |b| b.iter(|| black_box(**arc.load())));
    let rw = RwLock::new(42u64);
    g.bench_function("rwlock_read", |b| {
        b.iter(|| black_box(*rw.read().unwrap_or_else(|e| e.into_inner())))
    });
    g.finish();
}

fn grace_periods(c: &mut Criterion) {
    let mut g = c.benchmark_group("grace_periods");
    drop(rcu::read_lock()); // a registered, idle reader: synchronize issues its barrier
    g.bench_function("synchronize_idle", |b| b.iter(rcu::synchronize));
    const BATCH: u64 = 1000;
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("call_rcu_1000_and_drain", |b| {
        b.iter(|| {
            for i in 0..BATCH {
                let obj = Box::new([i; 4]);
                rcu::call_rcu(move || drop(black_box(obj)));
            }
            rcu::drain_call_rcu();
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = read_side, grace_periods
}
criterion_main!(benches);
