//! The stress phase (QEMU's `stresstest`): pipelines of ten slots that updaters recycle
//! one grace period at a time while readers check they never see a slot recycled.
//!
//! An updater takes its pipeline's next slot, resets it (`mbtest` 0, `age` 0, `mbtest` 1),
//! publishes it, ages every other slot by one, and waits for a grace period. A reader that
//! found a slot current inside its section may see that slot aged once (the updater
//! replaced it meanwhile) but never twice: the second ageing happens after the grace
//! period that must wait for the reader. So:
//! - an age of 2 or more means a grace period ended while a reader was still inside;
//! - `mbtest == 0` means the reader saw a slot that was being recycled under it, or the
//!   publication did not order the slot's initialisation before the pointer.
//!
//! With several updaters each has its own pipeline (readers rotate among them), so their
//! synchronize calls overlap and share grace periods; readers also call synchronize every
//! 0x1000 reads, outside their sections.

use crate::harness::{ns_per_op, Flavor, Go, LibCounters, Reader, Summary};
use std::hint::black_box;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{fence, AtomicU32, AtomicUsize};
use std::sync::Mutex;
use std::time::Duration;

/// Slots per pipeline (QEMU's RCU_STRESS_PIPE_LEN); also the histogram's overflow bucket.
pub const PIPE_LEN: usize = 10;

/// Reads between a reader's own synchronize calls.
const READER_SYNC_EVERY: u64 = 0x1000;

#[derive(Default)]
struct Slot {
    /// Updates since this slot stopped being current.
    age: AtomicU32,
    /// 1 once the slot is initialised for publication; 0 while it is being recycled.
    mbtest: AtomicU32,
}

/// One updater's slots. `current` is the RCU-protected pointer, published with release
/// and loaded with acquire under a read guard; it holds an index into `slots`, which live
/// as long as the phase, so a late reader reads wrong ages rather than freed memory.
struct Pipeline {
    slots: [Slot; PIPE_LEN],
    current: AtomicUsize,
}

impl Pipeline {
    fn new() -> Pipeline {
        let p = Pipeline {
            slots: Default::default(),
            current: AtomicUsize::new(0),
        };
        p.slots[0].mbtest.store(1, Relaxed);
        p
    }
}

/// Totals of the readers, merged under a mutex at the end.
#[derive(Default)]
struct Counts {
    reads: u64,
    mberror: u64,
    reader_syncs: u64,
    hist: [u64; PIPE_LEN + 1],
}

/// Runs the stress phase for `d`; `skip_sync` makes updaters skip their grace period,
/// which must be caught (the checker's self-test).
pub fn run(
    d: Duration,
    readers: u32,
    updaters: u32,
    skip_sync: bool,
    flavor: Flavor,
    summary: &mut Summary,
) {
    println!(
        "== stress: {readers} readers, {updaters} updaters (one {PIPE_LEN}-slot pipeline \
         each), {d:?}{}",
        if skip_sync {
            "  [INJECTED FAULT: updaters skip synchronize]"
        } else {
            ""
        }
    );
    let pipes: Vec<Pipeline> = (0..updaters).map(|_| Pipeline::new()).collect();
    let totals = Mutex::new(Counts::default());
    let n_updates = AtomicUsize::new(0);
    let go = Go::new((readers + updaters) as usize);
    let before = LibCounters::now();
    let elapsed = std::thread::scope(|s| {
        for r in 0..readers as usize {
            let (pipes, go, totals) = (&pipes, &go, &totals);
            s.spawn(move || {
                go.ready();
                let c = reader(pipes, r, go, flavor);
                let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                t.reads += c.reads;
                t.mberror += c.mberror;
                t.reader_syncs += c.reader_syncs;
                for (sum, n) in t.hist.iter_mut().zip(c.hist) {
                    *sum += n;
                }
            });
        }
        for pipe in &pipes {
            let (go, n_updates) = (&go, &n_updates);
            s.spawn(move || {
                go.ready();
                let n = updater(pipe, go, skip_sync);
                n_updates.fetch_add(n, Relaxed);
            });
        }
        go.run_for(d)
    });
    let c = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    let updates = n_updates.into_inner() as u64;
    let ages_ge2: u64 = c.hist[2..].iter().sum();
    println!(
        "stress: n_reads: {}  n_updates: {updates}  n_mberror: {}  reader synchronizes: {}",
        c.reads, c.mberror, c.reader_syncs
    );
    let hist: Vec<String> = c.hist.iter().map(u64::to_string).collect();
    println!(
        "stress: rcu_stress_count (age 0..={PIPE_LEN}): {}",
        hist.join(" ")
    );
    println!(
        "stress: ns/read: {:.1}  ns/update: {:.1}",
        ns_per_op(elapsed, readers, c.reads),
        ns_per_op(elapsed, updaters, updates)
    );
    println!("stress: {}", before.report_since(elapsed));
    if c.mberror != 0 {
        summary.failures.push(format!(
            "stress: {} reads saw a slot being recycled (n_mberror)",
            c.mberror
        ));
    }
    if ages_ge2 != 0 {
        summary.failures.push(format!(
            "stress: {ages_ge2} reads saw a slot aged 2 or more (a grace period ended early)"
        ));
    }
    if c.reads == 0 || updates == 0 {
        summary.failures.push(format!(
            "stress: no progress (reads {}, updates {updates})",
            c.reads
        ));
    }
    summary.reads += c.reads;
    summary.updates += updates;
    summary.mberror += c.mberror;
    summary.ages_ge2 += ages_ge2;
}

fn reader(pipes: &[Pipeline], first: usize, go: &crate::harness::Go, flavor: Flavor) -> Counts {
    let mut reader = Reader::new(flavor);
    let mut c = Counts::default();
    let mut which = first;
    while go.running() {
        let p = &pipes[which % pipes.len()];
        which = which.wrapping_add(1);
        let (age, mberror) = reader.section(|_section| {
            let slot = &p.slots[p.current.load(Acquire)];
            let mberror = slot.mbtest.load(Relaxed) == 0;
            {
                // A nested section, long enough for an updater to get ahead.
                let _nested = rcu::read_lock();
                let mut garbage = 0u32;
                for _ in 0..100 {
                    garbage = black_box(garbage + 1);
                }
            }
            (slot.age.load(Relaxed), mberror)
        });
        c.mberror += u64::from(mberror);
        c.hist[(age as usize).min(PIPE_LEN)] += 1;
        c.reads += 1;
        if c.reads % READER_SYNC_EVERY == 0 {
            reader.synchronize();
            c.reader_syncs += 1;
        }
    }
    c
}

fn updater(p: &Pipeline, go: &crate::harness::Go, skip_sync: bool) -> usize {
    let mut current = p.current.load(Relaxed);
    let mut n = 0;
    while go.running() {
        let next = (current + 1) % PIPE_LEN;
        let slot = &p.slots[next];
        slot.mbtest.store(0, Relaxed);
        fence(SeqCst);
        slot.age.store(0, Relaxed);
        slot.mbtest.store(1, Relaxed);
        p.current.store(next, Release);
        current = next;
        // Only this thread writes the ages, so load-then-store is an increment.
        for (i, s) in p.slots.iter().enumerate() {
            if i != next {
                s.age.store(s.age.load(Relaxed) + 1, Relaxed);
            }
        }
        if !skip_sync {
            rcu::synchronize();
        }
        n += 1;
    }
    n
}
