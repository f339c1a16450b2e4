//! Quiescent-state readers ([`rcu::QsbrReader`]) against real threads: grace periods wait
//! for an online reader until its quiescent state and never for an offline one, a reader
//! may wait for a grace period only offline, drop and thread exit unregister, a leaked
//! online reader aborts at thread exit, and a fork child keeps only the forking thread's
//! readers. (The loom models are in loom_qsbr.rs; the compile-time rules are doctests.)

use rcu::{QsbrReader, RcuCell, RcuList};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Long enough that a grace period that should be blocked would have ended meanwhile.
const BLOCKED: Duration = Duration::from_millis(100);

/// Serializes the tests that count registered readers or fork (the harness may run this
/// file's tests as threads of one process).
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts `synchronize` on another thread; the receiver gets `()` when it returns.
fn synchronize_in_background() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        rcu::synchronize();
        let _ = tx.send(());
    });
    rx
}

#[test]
fn reads_through_the_reader_see_published_values() {
    let cell = RcuCell::new(String::from("one"));
    let list = RcuList::new();
    list.lock().push_back(7u32);
    let mut r = QsbrReader::register();
    assert_eq!(cell.load(&r), "one");
    assert_eq!(cell.load(r.read()), "one");
    assert_eq!(list.iter(&r).map(|e| *e).sum::<u32>(), 7);
    cell.store(String::from("two"));
    r.quiescent_state();
    assert_eq!(cell.load(&r), "two");
}

#[test]
fn a_grace_period_waits_for_an_online_reader_until_its_quiescent_state() {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (qs_tx, qs_rx) = mpsc::channel::<()>();
    let reader = thread::spawn(move || {
        let mut r = QsbrReader::register();
        ready_tx.send(()).unwrap();
        qs_rx.recv().unwrap();
        r.quiescent_state();
        // Online at the new counter, until the test ends.
        let _ = qs_rx.recv();
    });
    ready_rx.recv().unwrap();
    let done = synchronize_in_background();
    assert!(
        done.recv_timeout(BLOCKED).is_err(),
        "a grace period ended while an online reader had not reported a quiescent state"
    );
    qs_tx.send(()).unwrap();
    done.recv_timeout(Duration::from_secs(10))
        .expect("the quiescent state did not end the grace period");
    drop(qs_tx);
    reader.join().unwrap();
}

#[test]
fn an_offline_reader_is_not_waited_for() {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let reader = thread::spawn(move || {
        let mut r = QsbrReader::register();
        r.offline_scope(|| {
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap(); // blocked, as in KVM_RUN
        });
        r.offline().online().quiescent_state();
    });
    ready_rx.recv().unwrap();
    for _ in 0..3 {
        rcu::synchronize();
    }
    go_tx.send(()).unwrap();
    reader.join().unwrap();
}

#[test]
fn a_reader_offline_by_value_is_not_waited_for_and_comes_back() {
    let cell = RcuCell::new(1u32);
    let off = QsbrReader::register().offline();
    rcu::synchronize(); // on this very thread: allowed, the reader is offline
    cell.store(2);
    rcu::drain_call_rcu();
    let r = off.online();
    assert_eq!(*cell.load(&r), 2);
}

#[test]
fn synchronize_on_an_online_thread_panics_clearly() {
    let mut r = QsbrReader::register();
    for (what, f) in [
        ("rcu::synchronize()", rcu::synchronize as fn()),
        ("rcu::drain_call_rcu()", rcu::drain_call_rcu as fn()),
    ] {
        let err = catch_unwind(f).expect_err(what);
        let msg = err
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or("");
        assert!(
            msg.starts_with(what) && msg.contains("QsbrReader is online"),
            "{msg}"
        );
    }
    // The reader's own synchronize goes offline around the wait.
    let before = rcu::grace_periods_completed();
    r.synchronize();
    assert!(rcu::grace_periods_completed() > before);
    r.offline_scope(rcu::drain_call_rcu);
}

#[test]
fn a_panic_inside_offline_scope_leaves_the_reader_online() {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (qs_tx, qs_rx) = mpsc::channel::<()>();
    let reader = thread::spawn(move || {
        let mut r = QsbrReader::register();
        let caught = catch_unwind(AssertUnwindSafe(|| r.offline_scope(|| panic!("inside"))));
        assert!(caught.is_err());
        // Online again: waiting for a grace period here is refused...
        assert!(catch_unwind(rcu::synchronize).is_err());
        ready_tx.send(()).unwrap();
        // ... and grace periods wait for us.
        qs_rx.recv().unwrap();
        r.quiescent_state();
    });
    ready_rx.recv().unwrap();
    let done = synchronize_in_background();
    assert!(
        done.recv_timeout(BLOCKED).is_err(),
        "the reader was not online"
    );
    qs_tx.send(()).unwrap();
    done.recv_timeout(Duration::from_secs(10)).unwrap();
    reader.join().unwrap();
}

#[test]
fn drop_and_thread_exit_unregister() {
    let _serial = serial();
    let base = rcu::registered_readers();
    let r = QsbrReader::register();
    assert_eq!(rcu::registered_readers(), base + 1);
    drop(r);
    assert_eq!(rcu::registered_readers(), base);
    // A thread that ends with its reader online (dropped as its closure returns).
    thread::spawn(|| {
        let _r = QsbrReader::register();
    })
    .join()
    .unwrap();
    assert_eq!(rcu::registered_readers(), base);
    let t0 = Instant::now();
    rcu::synchronize();
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn qsbr_and_read_lock_readers_share_grace_periods() {
    let cell = Arc::new(RcuCell::new(0u64));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for qsbr in [true, false] {
        let (cell, stop) = (Arc::clone(&cell), Arc::clone(&stop));
        threads.push(thread::spawn(move || {
            let mut r = qsbr.then(QsbrReader::register);
            let mut last = 0;
            while !stop.load(SeqCst) {
                let v = match &mut r {
                    Some(r) => {
                        let v = *cell.load(r);
                        r.quiescent_state();
                        v
                    }
                    None => *cell.load(&rcu::read_lock()),
                };
                assert!(v >= last, "went back from {last} to {v}");
                last = v;
            }
        }));
    }
    for i in 1..=200 {
        cell.store(i);
        if i % 50 == 0 {
            rcu::synchronize();
        }
    }
    stop.store(true, SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    rcu::drain_call_rcu();
}

/// The child half of the leak test: a thread leaks an online reader and exits.
const LEAK_CHILD: &str = "RCU_QSBR_LEAK_CHILD";

#[test]
fn a_thread_that_exits_with_a_leaked_online_reader_aborts() {
    if std::env::var_os(LEAK_CHILD).is_some() {
        thread::Builder::new()
            .name("leaky".into())
            .spawn(|| std::mem::forget(QsbrReader::register()))
            .unwrap()
            .join()
            .unwrap();
        // Not reached: the thread's exit aborts the process.
        std::process::exit(0);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_thread_that_exits_with_a_leaked_online_reader_aborts",
            "--nocapture",
        ])
        .env(LEAK_CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("thread 'leaky'") && stderr.contains("online QsbrReader"),
        "{stderr}"
    );
}

#[test]
fn a_fork_child_keeps_only_the_forking_threads_readers() {
    let _serial = serial();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel::<()>();
    // Another thread's reader, online and never reporting: it blocks the parent's grace
    // periods, but does not exist in the child.
    let other = thread::spawn(move || {
        let _r = QsbrReader::register();
        ready_tx.send(()).unwrap();
        end_rx.recv().unwrap();
    });
    ready_rx.recv().unwrap();
    let mut mine = QsbrReader::register();
    // SAFETY: the child only calls async-signal-safe functions besides the RCU crate's own
    // fork-aware paths (whose locks the atfork handlers hold across the fork), then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: alarm only arms a timer: a hang kills the child.
        unsafe { libc::alarm(10) };
        mine.synchronize();
        // Only the forking thread's readers are left: this one, and its own read_lock
        // registration if the harness thread ever had one.
        let kept = rcu::registered_readers();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(if (1..=2).contains(&kept) { 0 } else { 3 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    end_tx.send(()).unwrap();
    other.join().unwrap();
    mine.synchronize();
}
