//! What every phase shares: starting its threads together, stopping them after the
//! phase's time, and the library counters (grace periods, call_rcu) around it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Starts a phase's worker threads at once and tells them when to stop (QEMU's `goflag`).
pub struct Go {
    start: Barrier,
    stop: AtomicBool,
}

impl Go {
    /// For `workers` threads plus the controlling thread.
    pub fn new(workers: usize) -> Go {
        Go {
            start: Barrier::new(workers + 1),
            stop: AtomicBool::new(false),
        }
    }

    /// Called by each worker before its loop: returns when every worker is ready.
    pub fn ready(&self) {
        self.start.wait();
    }

    /// True until the controller says time is up.
    #[inline]
    pub fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// Controller side: releases the workers, lets them run for `d`, tells them to stop,
    /// and returns how long they actually ran.
    pub fn run_for(&self, d: Duration) -> Duration {
        self.start.wait();
        let t0 = Instant::now();
        std::thread::sleep(d);
        self.stop.store(true, Ordering::Relaxed);
        t0.elapsed()
    }
}

/// The library's counters, to report what a phase cost in grace periods and callbacks.
#[derive(Clone, Copy)]
pub struct LibCounters {
    grace_periods: u64,
    calls: rcu::CallRcuStats,
}

impl LibCounters {
    /// The counters now.
    pub fn now() -> LibCounters {
        LibCounters {
            grace_periods: rcu::grace_periods_completed(),
            calls: rcu::call_rcu_stats(),
        }
    }

    /// One line: what happened since `self` was taken, over `elapsed`.
    pub fn report_since(&self, elapsed: Duration) -> String {
        let now = LibCounters::now();
        let gps = now.grace_periods - self.grace_periods;
        let secs = elapsed.as_secs_f64().max(1e-9);
        format!(
            "grace periods: {gps} ({:.0}/s)  call_rcu: queued {} run {} batches {}",
            gps as f64 / secs,
            now.calls.queued - self.calls.queued,
            now.calls.run - self.calls.run,
            now.calls.batches - self.calls.batches,
        )
    }
}

/// Nanoseconds per operation for `threads` threads busy for `elapsed`, or NaN with no
/// operations (as QEMU prints "nan").
pub fn ns_per_op(elapsed: Duration, threads: u32, ops: u64) -> f64 {
    if ops == 0 {
        return f64::NAN;
    }
    elapsed.as_nanos() as f64 * f64::from(threads) / ops as f64
}

/// What a run found, summed over phases, for the final PASS/FAIL line.
#[derive(Default)]
pub struct Summary {
    /// Read-side operations (perf reads, stress reads, list nodes visited).
    pub reads: u64,
    /// Update-side operations (synchronize calls, stress updates, list changes).
    pub updates: u64,
    /// Stress readers that saw a slot being recycled under them.
    pub mberror: u64,
    /// Stress reads that saw an age of 2 or more: a grace period ended too early.
    pub ages_ge2: u64,
    /// List nodes unlinked by updaters, and how many of those were reclaimed.
    pub list: Option<(u64, u64)>,
    /// Why the run failed, one reason per entry.
    pub failures: Vec<String>,
}

/// How reader threads read (`--qsbr`): `read_lock` sections, or a [`rcu::QsbrReader`]
/// reporting a quiescent state every `every` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `rcu::read_lock()` around every read.
    Memb,
    /// A quiescent-state reader: reads cost nothing; a quiescent state every `every`.
    Qsbr {
        /// Reads between two quiescent states.
        every: u32,
    },
}

impl Flavor {
    /// The name printed (and checked by tests).
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Memb => "memb",
            Flavor::Qsbr { .. } => "qsbr",
        }
    }
}

/// One reader thread's read side, in either flavor. Created on the reader thread, after
/// [`Go::ready`]: a QSBR reader online at the start barrier would hold up grace periods.
pub struct Reader {
    qsbr: Option<(rcu::QsbrReader, u32)>,
    reads: u32,
}

impl Reader {
    /// The calling thread's read side.
    pub fn new(flavor: Flavor) -> Reader {
        let qsbr = match flavor {
            Flavor::Memb => None,
            Flavor::Qsbr { every } => Some((rcu::QsbrReader::register(), every.max(1))),
        };
        Reader { qsbr, reads: 0 }
    }

    /// One read: `f` under a `read_lock` section, or through the QSBR reader, which then
    /// reports a quiescent state every `every` reads (what `f` returns cannot borrow the
    /// guard, so nothing read is kept across it).
    #[inline]
    pub fn section<R>(&mut self, f: impl FnOnce(&rcu::ReadGuard) -> R) -> R {
        match &mut self.qsbr {
            None => f(&rcu::read_lock()),
            Some((r, every)) => {
                let out = f(r);
                self.reads += 1;
                if self.reads >= *every {
                    self.reads = 0;
                    r.quiescent_state();
                }
                out
            }
        }
    }

    /// Waits for a grace period from the reader thread (a QSBR reader goes offline
    /// around it).
    pub fn synchronize(&mut self) {
        match &mut self.qsbr {
            None => rcu::synchronize(),
            Some((r, _)) => r.synchronize(),
        }
    }
}
