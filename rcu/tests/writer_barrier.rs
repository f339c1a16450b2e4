//! Tests that fail when a grace period's barrier is missing: a read section's entry racing
//! an update, store-buffering style.
//!
//! A reader entering its outermost section stores its counter word, then loads the RCU
//! pointer; a grace period swaps the pointer, then reads that word. On x86 (TSO) a store
//! may wait in the store buffer while later loads of the same thread complete, so without a
//! full barrier between the reader's store and its load the grace period can read the word
//! as "outside" while the reader already holds the old pointer, and `synchronize()` returns
//! under it. In membarrier mode the reader has only a compiler barrier and the writer's
//! `membarrier(PRIVATE_EXPEDITED)` puts a full barrier there; in fence mode the reader
//! fences itself. Each scenario fails within seconds with its barrier removed (membarrier
//! made a no-op; the reader's fence made a compiler barrier), where the rest of the suite,
//! rcutorture included, still passes.
//!
//! Each round lines the two threads up (pinned to two CPUs) with a spin barrier that tells
//! both when it opened; each then sets off at that instant plus a lead plus its share of a
//! random offset, so the reader's entry sweeps across the writer's update:
//! - the writer evicts a block of scratch cache lines, publishes the next value
//!   ([`rcu::RcuCell::replace`]), waits for a grace period, and poisons the old value;
//! - the reader stores to those scratch lines (misses: its counter store then queues
//!   behind them in the store buffer, as a busy reader's would), enters a section, loads
//!   the value and checks, over a short window, that it is not poisoned.
//!
//! The writer steers the offset so that the reader loads the old value in about half the
//! rounds, so the race straddles the swap whatever this host's and build's speed. Values
//! are three static slots that the writer rotates, and the cell's boxes are leaked rather
//! than freed, so a value "reclaimed" too early is still valid memory: a missed section
//! fails an assertion, never undefined behaviour.
//!
//! `RCU_WRITER_BARRIER_SECS` sets each scenario's run (default [`DEFAULT_SECS`]); a failure
//! ends it at once. A correct implementation runs the whole time.

use rcu::{BarrierMode, RcuCell};
use std::process::Command;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

/// How long each scenario runs when nothing goes wrong, unless `RCU_WRITER_BARRIER_SECS`
/// says otherwise.
const DEFAULT_SECS: f64 = 10.0;

const LIVE: u64 = 0x1111_1111_1111_1111;
const POISON: u64 = 0xdead_dead_dead_dead;

/// The random part of the offset between the two threads' starts, either way.
const JITTER_NS: i64 = 120;
/// How far the steering moves the offset's centre, and how far it may take it.
const STEER_NS: i64 = JITTER_NS / 4 + 1;
const MAX_BIAS_NS: i64 = 40 * JITTER_NS;
/// Time from the barrier's opening to the earliest start: both threads must have seen it.
const LEAD_NS: u64 = 3_000;
/// A thread that sets off later than this after its start time was preempted meanwhile.
const IN_STEP_NS: u64 = 1_000;
/// Scratch lines the reader stores to just before it enters its section.
const DIRTY_LINES: usize = 40;
/// Loads of the value the reader checks within its section.
const WINDOW: u32 = 400;

fn duration() -> Duration {
    let secs = std::env::var("RCU_WRITER_BARRIER_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(DEFAULT_SECS);
    Duration::from_secs_f64(secs)
}

/// A published value, alone on its cache line.
#[repr(align(128))]
struct Slot {
    value: AtomicU64,
}

static SLOTS: [Slot; 3] = [
    Slot {
        value: AtomicU64::new(LIVE),
    },
    Slot {
        value: AtomicU64::new(LIVE),
    },
    Slot {
        value: AtomicU64::new(LIVE),
    },
];

/// One cache line of scratch.
#[repr(align(64))]
struct Line(AtomicU64);

/// A two-party barrier that spins (yielding now and then, for oversubscribed CPUs) and
/// tells both parties when the last one arrived, in nanoseconds since `start`.
struct SpinBarrier {
    start: Instant,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    released_at: AtomicU64,
}

impl SpinBarrier {
    fn new(start: Instant) -> SpinBarrier {
        SpinBarrier {
            start,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            released_at: AtomicU64::new(0),
        }
    }

    fn wait(&self) -> u64 {
        let gen = self.generation.load(Acquire);
        if self.arrived.fetch_add(1, Relaxed) == 1 {
            let now = self.start.elapsed().as_nanos() as u64;
            self.released_at.store(now, Relaxed);
            self.arrived.store(0, Relaxed);
            self.generation.store(gen + 1, Release);
            return now;
        }
        let mut spins = 0u32;
        while self.generation.load(Acquire) == gen {
            spins += 1;
            if spins.is_multiple_of(4096) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        self.released_at.load(Relaxed)
    }
}

/// xorshift64: random delays without a library call in the timed path.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 {
            0
        } else {
            self.0 % n
        }
    }
}

/// Pins the calling thread to the `nth` CPU it may run on (if there is one), so that the
/// reader and the writer spin on different CPUs instead of taking turns on one.
fn pin_to_nth_cpu(nth: usize) {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity and sched_setaffinity read and
    // write only the set passed by pointer, with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut set) != 0 {
            return;
        }
        let Some(cpu) = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .nth(nth)
        else {
            return;
        };
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size, &set);
    }
}

/// Spins until `ns` nanoseconds after `start`; returns how late it noticed (a thread that
/// was preempted meanwhile notices late).
fn wait_until(start: Instant, ns: u64) -> u64 {
    loop {
        let now = start.elapsed().as_nanos() as u64;
        if now >= ns {
            return now - ns;
        }
    }
}

/// What a run saw.
struct Report {
    rounds: u64,
    /// Rounds in which both threads left the start barrier together.
    in_step: u64,
    /// Of those, rounds in which the reader entered early enough to load the old value.
    saw_old: u64,
    failed_at: Option<(u64, Duration)>,
}

/// Makes the next accesses to `line` miss every cache (x86-64 only; elsewhere a no-op).
fn evict(line: &Line) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: clflush takes any mapped address and changes no memory contents; `line` is a
    // live reference.
    unsafe {
        std::arch::x86_64::_mm_clflush(line as *const Line as *const u8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = line;
}

/// Runs rounds until `limit` has passed or the reader saw a poisoned value.
///
/// The writer steers the race: each round it picks a random offset around `bias` and
/// delays one side by it (positive: the reader), and every 16 rounds it moves `bias` so
/// that the reader loads the old value in about half the rounds. Rounds in which a thread
/// set off late (it was preempted: these hosts are shared) say nothing about the offset
/// and do not move it.
fn race(limit: Duration) -> Report {
    let cell = Arc::new(RcuCell::new(&SLOTS[0]));
    let scratch: Arc<Vec<Line>> =
        Arc::new((0..DIRTY_LINES).map(|_| Line(AtomicU64::new(0))).collect());
    let start = Instant::now();
    let barrier = Arc::new(SpinBarrier::new(start));
    let stop = Arc::new(AtomicBool::new(false));
    // Written by the writer before the round's first barrier, read by the reader after:
    // how long after `lead` past the barrier the reader sets off, in nanoseconds.
    let reader_go = Arc::new(AtomicU64::new(0));
    // Written by the reader before the round's second barrier, read by the writer after.
    let saw_old = Arc::new(AtomicBool::new(false));
    let reader_late = Arc::new(AtomicU64::new(0));
    let poisoned = Arc::new(AtomicBool::new(false));
    let reader = {
        let (cell, scratch, barrier, stop) =
            (cell.clone(), scratch.clone(), barrier.clone(), stop.clone());
        let (reader_go, saw_old, reader_late, poisoned) = (
            reader_go.clone(),
            saw_old.clone(),
            reader_late.clone(),
            poisoned.clone(),
        );
        std::thread::spawn(move || {
            pin_to_nth_cpu(0);
            let mut round = 0u64;
            loop {
                let released = barrier.wait();
                if stop.load(Relaxed) {
                    return;
                }
                let late = wait_until(start, released + LEAD_NS + reader_go.load(Relaxed));
                // Stores that miss (the writer evicted these lines): the counter store in
                // read_lock queues behind them.
                for line in scratch.iter() {
                    line.0.store(round, Relaxed);
                }
                let g = rcu::read_lock();
                let slot: &Slot = cell.load(&g);
                saw_old.store(std::ptr::eq(slot, &SLOTS[round as usize % 3]), Relaxed);
                for _ in 0..WINDOW {
                    if slot.value.load(Relaxed) == POISON {
                        poisoned.store(true, Relaxed);
                        break;
                    }
                }
                drop(g);
                reader_late.store(late, Relaxed);
                barrier.wait();
                round += 1;
            }
        })
    };
    // The writer runs on a thread of its own too, so that pinning it leaves the test
    // harness's thread alone.
    let writer = std::thread::spawn(move || {
        pin_to_nth_cpu(1);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut bias, mut batch, mut old_in_batch) = (0i64, 0, 0);
        let mut report = Report {
            rounds: 0,
            in_step: 0,
            saw_old: 0,
            failed_at: None,
        };
        loop {
            let round = report.rounds;
            for line in scratch.iter() {
                line.0.store(round, Relaxed);
                evict(line);
            }
            let offset = bias + rng.below(2 * JITTER_NS as u64 + 1) as i64 - JITTER_NS;
            reader_go.store(offset.max(0) as u64, Relaxed);
            let done = report.failed_at.is_some() || start.elapsed() >= limit;
            stop.store(done, Relaxed);
            let released = barrier.wait();
            if done {
                break;
            }
            let late = wait_until(start, released + LEAD_NS + (-offset).max(0) as u64);
            let new = &SLOTS[(round as usize + 1) % 3];
            new.value.store(LIVE, Relaxed);
            let retired = cell.replace(new);
            rcu::synchronize();
            // The cell's box around the old reference is leaked, not freed: a reader that
            // a broken grace period let through must find the poison below, not
            // reallocated memory.
            std::mem::forget(retired);
            let old = &SLOTS[round as usize % 3];
            old.value.store(POISON, Relaxed);
            barrier.wait();
            report.rounds += 1;
            if poisoned.load(Relaxed) {
                report.failed_at = Some((round, start.elapsed()));
            }
            if late.max(reader_late.load(Relaxed)) > IN_STEP_NS {
                continue;
            }
            report.in_step += 1;
            batch += 1;
            if saw_old.load(Relaxed) {
                report.saw_old += 1;
                old_in_batch += 1;
            }
            if batch == 16 {
                // Reader mostly early: delay it more; mostly late: delay the writer more.
                if old_in_batch > 10 {
                    bias += STEER_NS;
                } else if old_in_batch < 6 {
                    bias -= STEER_NS;
                }
                bias = bias.clamp(-MAX_BIAS_NS, MAX_BIAS_NS);
                (batch, old_in_batch) = (0, 0);
            }
        }
        report
    });
    let report = writer.join().unwrap();
    reader.join().unwrap();
    eprintln!(
        "rounds {} in step {} reader saw old {}",
        report.rounds, report.in_step, report.saw_old
    );
    report
}

fn check(mode: &str) {
    let limit = duration();
    let report = race(limit);
    if let Some((round, after)) = report.failed_at {
        panic!(
            "{mode}: round {round}: a reader saw a value poisoned after synchronize() returned \
             ({after:?} into the run): a grace period missed a section's entry"
        );
    }
    eprintln!(
        "{mode}: {} rounds in {limit:?}, no reader saw a reclaimed value",
        report.rounds
    );
}

/// Membarrier mode: the reader has only a compiler barrier; the writer's membarrier is
/// what orders its counter store before its pointer load.
#[test]
fn a_section_entry_racing_an_update_with_membarrier() {
    if rcu::barrier_mode() != BarrierMode::Membarrier {
        println!(
            "SKIPPED: membarrier(PRIVATE_EXPEDITED) is unavailable here (or \
             RCU_NO_MEMBARRIER is set): the writer's membarrier cannot be tested"
        );
        return;
    }
    check("membarrier mode");
}

const FENCE_CHILD: &str = "fence_mode_child";

/// Fence mode: the same race, with `RCU_NO_MEMBARRIER=1` in a child process (the mode is
/// fixed per process); the reader's own fence is what must hold.
#[test]
fn a_section_entry_racing_an_update_with_fences() {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        FENCE_CHILD,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("RCU_NO_MEMBARRIER", "1");
    let out = common::run_with_timeout(cmd, duration() + Duration::from_secs(60));
    assert!(out.status.success(), "{}", out.dump());
    assert!(
        out.stderr.contains("fence mode: ") && !out.stdout.contains("SKIPPED"),
        "the child did not run the race:\n{}",
        out.dump()
    );
}

/// Run by [`a_section_entry_racing_an_update_with_fences`] in a child process.
#[test]
#[ignore = "run in a child process by a_section_entry_racing_an_update_with_fences"]
fn fence_mode_child() {
    if rcu::barrier_mode() != BarrierMode::Fences {
        println!("SKIPPED: needs RCU_NO_MEMBARRIER=1 (a_section_entry_racing_an_update_with_fences sets it)");
        return;
    }
    check("fence mode");
}
