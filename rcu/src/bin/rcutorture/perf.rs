//! Performance phases (QEMU's `rperf`, `uperf` and `perf`): readers that only enter and
//! leave sections, updaters that only wait for grace periods, then both at once.

use crate::harness::{ns_per_op, Flavor, Go, LibCounters, Reader, Summary};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Sections per check of the stop flag, so the flag's load stays out of the measurement.
const READ_RUN: u64 = 1000;

/// Runs the three sub-phases, a third of `total` each.
pub fn run(total: Duration, readers: u32, updaters: u32, flavor: Flavor, summary: &mut Summary) {
    let each = total / 3;
    println!("== perf: {readers} readers, {updaters} updaters, {each:?} per sub-phase");
    sub_phase("rperf", each, readers, 0, flavor, summary);
    sub_phase("uperf", each, 0, updaters, flavor, summary);
    sub_phase("perf", each, readers, updaters, flavor, summary);
}

fn sub_phase(
    name: &str,
    d: Duration,
    readers: u32,
    updaters: u32,
    flavor: Flavor,
    summary: &mut Summary,
) {
    let n_reads = AtomicU64::new(0);
    let n_updates = AtomicU64::new(0);
    let go = Go::new((readers + updaters) as usize);
    let before = LibCounters::now();
    let elapsed = std::thread::scope(|s| {
        for _ in 0..readers {
            s.spawn(|| {
                go.ready();
                let mut reader = Reader::new(flavor);
                let mut local = 0u64;
                while go.running() {
                    for _ in 0..READ_RUN {
                        reader.section(|g| {
                            std::hint::black_box(g);
                        });
                    }
                    local += READ_RUN;
                }
                n_reads.fetch_add(local, Relaxed);
            });
        }
        for _ in 0..updaters {
            s.spawn(|| {
                go.ready();
                let mut local = 0u64;
                while go.running() {
                    rcu::synchronize();
                    local += 1;
                }
                n_updates.fetch_add(local, Relaxed);
            });
        }
        go.run_for(d)
    });
    let (reads, updates) = (n_reads.into_inner(), n_updates.into_inner());
    println!(
        "{name}: n_reads: {reads}  n_updates: {updates}  nreaders: {readers}  nupdaters: \
         {updaters}  duration: {:.3} s",
        elapsed.as_secs_f64()
    );
    println!(
        "{name}: ns/read: {:.3}  ns/update: {:.1}",
        ns_per_op(elapsed, readers, reads),
        ns_per_op(elapsed, updaters, updates)
    );
    println!("{name}: {}", before.report_since(elapsed));
    if readers > 0 && reads == 0 {
        summary
            .failures
            .push(format!("{name}: {readers} readers made no progress"));
    }
    if updaters > 0 && updates == 0 {
        summary.failures.push(format!(
            "{name}: {updaters} updaters completed no grace period"
        ));
    }
    summary.reads += reads;
    summary.updates += updates;
}
