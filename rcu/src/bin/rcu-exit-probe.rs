//! `rcu-exit-probe`: a child process for `rcu/tests/process_exit.rs` and
//! `rcu/tests/lifecycle.rs`, checking that RCU never holds up process exit, and that read
//! sections, thread exit, thread-local destructors and `fork` fit together.
//!
//! ```text
//! rcu-exit-probe pending-callbacks   # return from main with callbacks still queued
//! rcu-exit-probe thread-exit         # a reader thread exits while a grace period waits
//! rcu-exit-probe leaked-guard-exit   # a thread leaks a guard and exits: must abort
//! rcu-exit-probe late-tls-leak       # a late thread-local destructor leaks a guard: abort
//! rcu-exit-probe guard-in-tls        # a guard dropped by a late thread-local destructor
//! rcu-exit-probe late-tls-section    # sections that start in thread-exit destructors
//! rcu-exit-probe fork-idle           # fork after RCU use: the child's RCU works
//! rcu-exit-probe fork-busy           # fork amid readers, a grace period, pending callbacks
//! ```
//!
//! Exit status 0 means the scenario ran to its end; 3 means the library misbehaved (the
//! reason is on stderr); 2 is a usage error. A hang is what the test's timeout catches;
//! the two scenarios that must abort do so in the library, with a message on stderr.

// A binary's root is its directory's module root, so the submodule needs its path.
#[path = "rcu-exit-probe/lifecycle.rs"]
mod lifecycle;

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// Callbacks that have run.
static RAN: AtomicU64 = AtomicU64::new(0);

/// How long `thread-exit` checks that synchronize does *not* return while a reader is
/// inside its section. Only a correct library passes however slow the machine is.
const MUST_WAIT: Duration = Duration::from_millis(200);

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    let result = match arg.as_deref() {
        Some("pending-callbacks") => pending_callbacks(),
        Some("thread-exit") => reader_exits_during_grace_period(),
        Some("leaked-guard-exit") => lifecycle::leaked_guard_exit(),
        Some("late-tls-leak") => lifecycle::late_tls_leak(),
        Some("guard-in-tls") => lifecycle::guard_in_tls(),
        Some("late-tls-section") => lifecycle::late_tls_section(),
        Some("fork-idle") => lifecycle::fork_idle(),
        Some("fork-busy") => lifecycle::fork_busy(),
        other => {
            eprintln!(
                "rcu-exit-probe: unknown scenario {other:?}; use pending-callbacks, \
                 thread-exit, leaked-guard-exit, late-tls-leak, guard-in-tls, \
                 late-tls-section, fork-idle or fork-busy"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("rcu-exit-probe: {why}");
            ExitCode::from(3)
        }
    }
}

/// Queues `n` callbacks; every tenth queues one more. Returns how many will run in all.
fn queue_callbacks(n: u64) -> u64 {
    for i in 0..n {
        rcu::call_rcu(move || {
            RAN.fetch_add(1, Relaxed);
            if i % 10 == 0 {
                rcu::call_rcu(|| {
                    RAN.fetch_add(1, Relaxed);
                });
            }
        });
    }
    n + n.div_ceil(10)
}

fn pending_callbacks() -> Result<(), String> {
    // First show that callbacks (and the ones they queue) do run, so that "pending at
    // exit" below is not just "never run".
    let expected = queue_callbacks(1000);
    for _ in 0..4 {
        if RAN.load(Relaxed) >= expected {
            break;
        }
        rcu::drain_call_rcu();
    }
    let ran = RAN.load(Relaxed);
    if ran != expected {
        return Err(format!("{ran} callbacks ran, expected {expected}"));
    }
    println!("probe: {ran} callbacks ran");

    // Busy readers, and one that stays inside its section until the process ends, so
    // no grace period can complete from here on.
    for _ in 0..2 {
        std::thread::spawn(|| loop {
            let g = rcu::read_lock();
            black_box(&g);
        });
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _section = rcu::read_lock();
        let _ = tx.send(());
        loop {
            std::thread::park();
        }
    });
    rx.recv()
        .map_err(|_| "the holding reader died".to_string())?;

    queue_callbacks(5000);
    let stats = rcu::call_rcu_stats();
    let pending = stats.queued - stats.run;
    if pending == 0 {
        return Err("no callback pending although a reader blocks grace periods".into());
    }
    println!("probe: returning from main with {pending} callbacks pending");
    Ok(())
}

/// A reader thread sits in a section; a grace period starts and must wait for it; the
/// thread then drops its guard and exits, and the grace period must end. (A thread that
/// exits with its guard leaked aborts the process instead: `leaked-guard-exit`.)
fn reader_exits_during_grace_period() -> Result<(), String> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (exit_tx, exit_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let guard = rcu::read_lock();
        let _ = ready_tx.send(());
        let _ = exit_rx.recv();
        drop(guard);
    });
    ready_rx
        .recv()
        .map_err(|_| "the reader died before entering its section".to_string())?;

    let (done_tx, done_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        rcu::synchronize();
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(MUST_WAIT) {
        Ok(()) => return Err("synchronize returned while a reader was inside its section".into()),
        Err(RecvTimeoutError::Disconnected) => return Err("the synchronize thread died".into()),
        Err(RecvTimeoutError::Timeout) => {}
    }
    let _ = exit_tx.send(());
    reader
        .join()
        .map_err(|_| "the reader thread panicked".to_string())?;
    done_rx
        .recv()
        .map_err(|_| "the synchronize thread died".to_string())?;
    waiter
        .join()
        .map_err(|_| "the synchronize thread panicked".to_string())?;
    println!("probe: grace period ended after the reader exited");
    Ok(())
}
