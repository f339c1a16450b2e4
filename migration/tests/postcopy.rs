//! Post-copy between two threads over a real unix socket, with a real userfaultfd on the
//! destination: a guest thread dirties the source's RAM faster than a rate-limited link
//! carries it, the migration switches after the first pass, and a "vCPU" thread on the
//! destination reads every page as soon as the guest runs there — each read of a
//! missing page waits for the page the source sends on request; what it reads is the
//! source's final content, never a stale or zero page. A destination that fails before
//! running the guest leaves the source running; one that dies after leaves the source
//! paused with the guest declared lost; hostile return paths (a block never sent, a page
//! outside its block, a flood) are refused with a clear error. Where userfaultfd cannot
//! be opened the tests print `SKIPPED: no userfaultfd`.

#[macro_use]
mod common;
#[path = "common/fake_vm.rs"]
mod fake_vm;

use common::read_block;
use fake_vm::{FakeDest, FakeVm, GuestLoad};
use migration::live::{
    incoming, migrate_to_uri, IncomingError, IncomingOptions, IncomingStats, MigratableVm,
    MigrateOptions, MigrationError, MigrationProgress, MigrationState, Reply,
};
use migration::load::{AnonymousHotplug, IncomingLoad, LoadOptions};
use migration::stream::PAGE_SIZE;
use migration::transport::{listen, MigrationUri};
use ramlist::RamList;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const P: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;

fn path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mvm-postcopy-{}-{name}", std::process::id()))
}

fn list(ram: u64) -> Arc<RamList> {
    let l = Arc::new(RamList::new());
    l.alloc("ram", ram).unwrap();
    l.alloc("vga", MIB).unwrap();
    l
}

/// Reads every page of block "ram" of `ram` word by word (atomically: the memory is
/// filled behind the thread's back), returning a copy of it.
fn read_all_pages(ram: &RamList) -> Vec<u64> {
    let g = rcu::read_lock();
    let b = ram.block_by_id(&g, "ram").unwrap();
    let words = (b.len() / 8) as usize;
    let base = b.host() as *const AtomicU64;
    (0..words)
        // SAFETY: inside the block, which the guard keeps mapped; 8-aligned (the block is
        // page-aligned). A missing page makes the load wait for its fill (userfaultfd).
        .map(|i| unsafe { &*base.add(i) }.load(Ordering::Relaxed))
        .collect()
}

/// What the destination's driver returned, and what its reader saw (if the guest ran).
type DestOutcome = (Result<IncomingStats, IncomingError>, Option<Vec<u64>>);

/// A destination on a thread whose resume starts a "vCPU" that reads all of "ram".
fn spawn_dest(
    dst: Arc<RamList>,
    uri: &MigrationUri,
    refuse_restore: Option<&'static str>,
) -> thread::JoinHandle<DestOutcome> {
    let listener = listen(uri).unwrap();
    thread::spawn(move || {
        let mut vm = FakeDest::new(dst.clone());
        vm.refuse_restore = refuse_restore;
        let seen: Arc<Mutex<Option<thread::JoinHandle<Vec<u64>>>>> = Arc::default();
        let s = seen.clone();
        vm.on_resume = Some(Box::new(move || {
            let ram = dst.clone();
            *s.lock().unwrap() = Some(thread::spawn(move || read_all_pages(&ram)));
            Ok(())
        }));
        let conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
        let r = incoming(&mut vm, conn, &IncomingOptions::default());
        let reader = seen.lock().unwrap().take();
        (r, reader.map(|h| h.join().unwrap()))
    })
}

fn as_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn a_dirtying_guest_moves_by_postcopy_and_the_destination_reads_only_final_pages() {
    require_uffd!();
    moves_by_postcopy("ok", Some(1));
}

#[test]
fn postcopy_from_the_start_sends_every_page_after_the_switch() {
    require_uffd!();
    let stats = moves_by_postcopy("at-once", Some(0));
    // No pass before the switch: everything the guest wrote was missing there.
    assert_eq!(stats.iterations, 1, "{stats:?}");
    assert_eq!(stats.per_iteration[0].stage, "postcopy-switch");
    assert!(stats.postcopy.unwrap().postcopy_missing_pages >= 16 * MIB / P);
}

/// Moves a guest that dirties all of its 16 MiB by post-copy, switching after
/// `after` iterations; checks memory, the reader's view and the figures.
fn moves_by_postcopy(name: &str, after: Option<u32>) -> migration::live::MigrationStats {
    let src = list(16 * MIB);
    let dst = list(16 * MIB);
    let pages = 16 * MIB / P;
    let vm = FakeVm::new(
        src.clone(),
        Some(GuestLoad {
            pages,
            first: 0,
            working_set: pages,
            pages_per_sec: 0,
        }),
    );
    vm.prefill(0..pages);
    assert!(vm.wait_for_writes(1000, Duration::from_secs(10)));
    let uri = MigrationUri::Unix(path(name));
    let dest = spawn_dest(dst.clone(), &uri, None);
    let opts = MigrateOptions {
        // Slower than the guest dirties: the first pass leaves much behind.
        max_bandwidth: Some(40 * MIB),
        postcopy_after: after,
        ..MigrateOptions::default()
    };
    let progress = MigrationProgress::new();
    let stats = migrate_to_uri(&vm, &uri, &opts, &progress).expect("post-copy migration");
    let (r, seen) = dest.join().unwrap();
    let dstats = r.expect("incoming post-copy");
    let pc = stats
        .postcopy
        .as_ref()
        .expect("the migration switched to post-copy");
    assert!(pc.postcopy_missing_pages > 0, "{stats:?}");
    let figures = dstats.postcopy.expect("destination post-copy figures");
    assert_eq!(figures.missing_pages, pc.postcopy_missing_pages);
    assert_eq!(
        figures.placed_pages + figures.placed_zero_pages,
        figures.missing_pages
    );
    assert!(
        figures.requests > 0,
        "the reader faulted on no missing page: {figures:?}"
    );
    assert_eq!(pc.postcopy_requests, figures.requests);
    assert!(figures.fault_p99_ms >= figures.fault_p50_ms);
    assert_eq!(progress.state(), MigrationState::Completed);
    // The source stays paused: the guest lives on the destination now.
    assert!(vm.is_paused());
    let calls = vm.calls();
    let paused_at = calls.iter().rposition(|c| *c == "pause").unwrap();
    assert!(!calls[paused_at..].contains(&"resume"), "{calls:?}");
    // Memory equal on both sides, and what the destination's reader saw was the final
    // content (the source stopped at the switch): no stale pre-copy page, no zeros.
    let want = read_block(&src, "ram");
    assert!(
        read_block(&dst, "ram") == want,
        "RAM differs after post-copy"
    );
    assert!(read_block(&dst, "vga") == read_block(&src, "vga"));
    let seen = seen.expect("the reader ran");
    assert!(
        seen == as_words(&want),
        "the destination's reader saw a page that is not final"
    );
    let json = serde_json::to_value(&stats).unwrap();
    for k in [
        "postcopy_requests",
        "postcopy_blocktime_ms",
        "postcopy_fault_p50_ms",
        "postcopy_fault_p99_ms",
    ] {
        assert!(json.get(k).is_some(), "{k} missing from {json}");
    }
    stats
}

#[test]
fn a_destination_that_fails_before_running_the_guest_leaves_the_source_running() {
    require_uffd!();
    let src = list(4 * MIB);
    let vm = FakeVm::new(
        src.clone(),
        Some(GuestLoad {
            pages: 1024,
            first: 0,
            working_set: 1024,
            pages_per_sec: 0,
        }),
    );
    vm.prefill(0..1024);
    let uri = MigrationUri::Unix(path("refuse"));
    let dest = spawn_dest(list(4 * MIB), &uri, Some("no such cpu model"));
    let opts = MigrateOptions {
        postcopy_after: Some(1),
        max_bandwidth: Some(20 * MIB),
        ..MigrateOptions::default()
    };
    let err = migrate_to_uri(&vm, &uri, &opts, &MigrationProgress::new()).unwrap_err();
    assert!(
        matches!(&err, MigrationError::DestinationFailed { message, .. } if message.contains("no such cpu model")),
        "{err}"
    );
    assert!(!vm.is_paused(), "the source must run on");
    assert!(vm.wait_for_writes(100, Duration::from_secs(10)));
    let (r, seen) = dest.join().unwrap();
    assert!(matches!(r, Err(IncomingError::Restore(_))), "{r:?}");
    assert!(seen.is_none(), "the guest never ran on the destination");
}

/// A destination that loads up to the switch with the public loader, says its guest
/// runs, then does `then` with its return path.
fn hostile_dest(
    uri: &MigrationUri,
    then: impl FnOnce(&mut dyn Write) + Send + 'static,
) -> thread::JoinHandle<()> {
    let listener = listen(uri).unwrap();
    thread::spawn(move || {
        let dst = list(4 * MIB);
        let conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
        let (mut reader, mut writer) = conn.into_split();
        let opts = LoadOptions::default();
        let mut load = IncomingLoad::new(&dst, &mut reader, &opts);
        let runs = load.load_until_switch(&mut AnonymousHotplug).unwrap();
        assert!(runs.is_some(), "the source did not switch");
        Reply::PostcopyRunning(1).write_to(&mut *writer).unwrap();
        then(&mut *writer);
        // Keep the connection until the source gave up.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader, &mut sink);
    })
}

fn postcopy_against(uri: &MigrationUri, write_timeout: Duration) -> (FakeVm, MigrationError) {
    let vm = FakeVm::new(
        list(4 * MIB),
        Some(GuestLoad {
            pages: 1024,
            first: 0,
            working_set: 1024,
            pages_per_sec: 0,
        }),
    );
    vm.prefill(0..1024);
    let opts = MigrateOptions {
        postcopy_after: Some(1),
        max_bandwidth: Some(20 * MIB),
        // Never converged: it always switches.
        downtime_limit: Duration::from_micros(1),
        write_timeout,
        ..MigrateOptions::default()
    };
    let err = migrate_to_uri(&vm, uri, &opts, &MigrationProgress::new()).unwrap_err();
    (vm, err)
}

#[test]
fn requests_for_pages_outside_every_block_are_refused_and_the_guest_is_not_run_twice() {
    let cases: [(&str, Reply, &str); 3] = [
        (
            "unknown",
            Reply::PageRequest {
                id: "nope".into(),
                offset: 0,
                pages: 1,
            },
            "never sent",
        ),
        (
            "past",
            Reply::PageRequest {
                id: "ram".into(),
                offset: 4 * MIB,
                pages: 1,
            },
            "not whole pages inside it",
        ),
        (
            "unaligned",
            Reply::PageRequest {
                id: "vga".into(),
                offset: 12,
                pages: 1,
            },
            "not whole pages inside it",
        ),
    ];
    for (name, req, why) in cases {
        let uri = MigrationUri::Unix(path(name));
        let dest = hostile_dest(&uri, move |w| req.write_to(w).unwrap());
        let (vm, err) = postcopy_against(&uri, Duration::from_secs(10));
        let msg = err.to_string();
        assert!(
            matches!(err, MigrationError::PostcopyLost { .. }),
            "{name}: {msg}"
        );
        assert!(
            msg.contains(why) && msg.contains("guest is lost"),
            "{name}: {msg}"
        );
        assert!(
            vm.is_paused(),
            "{name}: the source must not run the guest again"
        );
        dest.join().unwrap();
    }
}

#[test]
fn a_flood_of_requests_is_cut_off() {
    let uri = MigrationUri::Unix(path("flood"));
    let dest = hostile_dest(&uri, |w| {
        // Never reads what the source sends: its writes stall while requests pile up.
        let req = Reply::PageRequest {
            id: "ram".into(),
            offset: 0,
            pages: 1,
        };
        for _ in 0..200_000 {
            if req.write_to(w).is_err() {
                break;
            }
        }
    });
    let (vm, err) = postcopy_against(&uri, Duration::from_secs(2));
    let msg = err.to_string();
    assert!(
        msg.contains("pages it was missing") || msg.contains("messages pending on the return path"),
        "{msg}"
    );
    assert!(vm.is_paused());
    dest.join().unwrap();
}

#[test]
fn a_destination_gone_after_the_switch_pauses_the_source_which_never_resumes_the_guest() {
    let uri = MigrationUri::Unix(path("gone"));
    let listener = listen(&uri).unwrap();
    let d = thread::spawn(move || {
        let dst = list(4 * MIB);
        let conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
        let (mut reader, mut writer) = conn.into_split();
        let opts = LoadOptions::default();
        let mut load = IncomingLoad::new(&dst, &mut reader, &opts);
        load.load_until_switch(&mut AnonymousHotplug).unwrap();
        Reply::PostcopyRunning(1).write_to(&mut *writer).unwrap();
        // Killed: both halves closed.
    });
    let vm = Arc::new(busy_vm(4 * MIB));
    let progress = Arc::new(MigrationProgress::new());
    let m = {
        let (vm, progress, uri) = (vm.clone(), progress.clone(), uri.clone());
        thread::spawn(move || {
            migrate_to_uri(&*vm, &uri, &switching(Duration::from_secs(5)), &progress)
        })
    };
    d.join().unwrap();
    wait_state(&progress, MigrationState::PostcopyPaused);
    let snap = progress.snapshot();
    assert!(
        snap.error
            .as_deref()
            .is_some_and(|e| e.contains("closed the connection")),
        "{snap:?}"
    );
    assert!(
        vm.is_paused(),
        "the guest runs on the destination: never here"
    );
    // A resume to a place where nobody listens fails and leaves it paused.
    let nobody = MigrationUri::Unix(path("nobody"));
    assert_eq!(progress.resume_postcopy(nobody).unwrap(), 0);
    let t0 = std::time::Instant::now();
    while progress.snapshot().postcopy_resume_attempts == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the resume never ended"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let snap = progress.snapshot();
    assert_eq!(snap.state, MigrationState::PostcopyPaused, "{snap:?}");
    assert!(
        snap.error
            .as_deref()
            .is_some_and(|e| e.contains("resuming on")),
        "{snap:?}"
    );
    // Giving up: the guest is lost, and still never resumed here.
    progress.cancel();
    let err = m.join().unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, MigrationError::PostcopyLost { .. }), "{msg}");
    assert!(msg.contains("guest is lost"), "{msg}");
    assert!(vm.is_paused());
    assert!(!vm.calls().ends_with(&["resume"]));
}

/// A source VM whose guest rewrites all of its `ram` bytes as fast as it can.
fn busy_vm(ram: u64) -> FakeVm {
    let pages = ram / P;
    let vm = FakeVm::new(
        list(ram),
        Some(GuestLoad {
            pages,
            first: 0,
            working_set: pages,
            pages_per_sec: 0,
        }),
    );
    vm.prefill(0..pages);
    vm
}

/// Options that always switch after the first pass.
fn switching(write_timeout: Duration) -> MigrateOptions {
    MigrateOptions {
        postcopy_after: Some(1),
        max_bandwidth: Some(20 * MIB),
        downtime_limit: Duration::from_micros(1),
        write_timeout,
        ..MigrateOptions::default()
    }
}

fn wait_state(progress: &MigrationProgress, state: MigrationState) {
    let t0 = std::time::Instant::now();
    while progress.state() != state {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never {state:?}: {:?}",
            progress.snapshot()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// Forwards one connection from `front` to `back`, both ways, until `cut` is set; then
/// shuts both sides down (a link that broke, as each end sees it).
fn cutting_proxy(
    front: PathBuf,
    back: PathBuf,
    cut: Arc<std::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<()> {
    let _ = std::fs::remove_file(&front);
    let l = std::os::unix::net::UnixListener::bind(&front).unwrap();
    thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = std::os::unix::net::UnixStream::connect(&back).unwrap();
        let pump = |mut from: std::os::unix::net::UnixStream,
                    mut to: std::os::unix::net::UnixStream| {
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match std::io::Read::read(&mut from, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
        };
        let t1 = pump(a.try_clone().unwrap(), b.try_clone().unwrap());
        let t2 = pump(b.try_clone().unwrap(), a.try_clone().unwrap());
        while !cut.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(1));
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
        let _ = (t1.join(), t2.join());
    })
}

#[test]
fn a_link_cut_after_the_switch_pauses_both_sides_and_resume_finishes_the_move() {
    require_uffd!();
    let dst = list(16 * MIB);
    let vm = Arc::new(busy_vm(16 * MIB));
    let (front, back, again) = (path("cut-front"), path("cut-back"), path("cut-again"));
    // The destination: its first connection through the proxy, its second straight on.
    let listener = listen(&MigrationUri::Unix(back.clone())).unwrap();
    let again_listener = listen(&MigrationUri::Unix(again.clone())).unwrap();
    let paused_here = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dest = {
        let (dst, paused_here) = (dst.clone(), paused_here.clone());
        thread::spawn(move || {
            let mut vm = FakeDest::new(dst.clone());
            let seen: Arc<Mutex<Option<thread::JoinHandle<Vec<u64>>>>> = Arc::default();
            let s = seen.clone();
            vm.on_resume = Some(Box::new(move || {
                let ram = dst.clone();
                *s.lock().unwrap() = Some(thread::spawn(move || read_all_pages(&ram)));
                Ok(())
            }));
            vm.on_pause = Some(Box::new(move || paused_here.store(true, Ordering::Release)));
            vm.reconnect = Some(again_listener);
            let conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
            let r = incoming(&mut vm, conn, &IncomingOptions::default());
            let reader = seen.lock().unwrap().take();
            (r, reader.map(|h| h.join().unwrap()))
        })
    };
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = cutting_proxy(front.clone(), back, cut.clone());
    let progress = Arc::new(MigrationProgress::new());
    let m = {
        let (vm, progress) = (vm.clone(), progress.clone());
        let opts = MigrateOptions {
            // The background crawls: the cut comes while pages are still missing.
            max_bandwidth: Some(4 * MIB),
            ..switching(Duration::from_secs(5))
        };
        thread::spawn(move || migrate_to_uri(&*vm, &MigrationUri::Unix(front), &opts, &progress))
    };
    wait_state(&progress, MigrationState::PostcopyActive);
    cut.store(true, Ordering::Release);
    proxy.join().unwrap();
    wait_state(&progress, MigrationState::PostcopyPaused);
    let t0 = std::time::Instant::now();
    while !paused_here.load(Ordering::Acquire) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the destination never paused"
        );
        thread::sleep(Duration::from_millis(2));
    }
    assert!(vm.is_paused());
    // A resume with the wrong token is refused by the destination, which waits on; the
    // right one goes on. (The driver's own token is the right one: check the refusal
    // with a raw connection first.)
    {
        let mut c = std::os::unix::net::UnixStream::connect(&again).unwrap();
        c.write_all(b"MVMP\0\0\0\0\0\0\0\x01").unwrap();
        let r = Reply::read_from(&mut c).unwrap();
        assert!(
            matches!(&r, Reply::Failed(m) if m.contains("token")),
            "{r:?}"
        );
    }
    progress.resume_postcopy(MigrationUri::Unix(again)).unwrap();
    let stats = m.join().unwrap().expect("post-copy resumed to its end");
    let (r, seen) = dest.join().unwrap();
    let figures = r.expect("incoming post-copy").postcopy.unwrap();
    assert_eq!(
        figures.placed_pages + figures.placed_zero_pages,
        figures.missing_pages
    );
    let snap = progress.snapshot();
    assert_eq!(snap.postcopy_pauses, 1, "{snap:?}");
    assert_eq!(snap.postcopy_resume_attempts, 1, "{snap:?}");
    assert!(stats.postcopy.is_some());
    let want = read_block(&vm.ram(), "ram");
    assert!(
        read_block(&dst, "ram") == want,
        "RAM differs after a resumed post-copy"
    );
    assert!(
        seen.unwrap() == as_words(&want),
        "the reader saw a page that is not final"
    );
}

#[test]
fn postcopy_to_a_file_is_refused_before_anything_is_sent() {
    let file = path("snap");
    let vm = FakeVm::new(list(4 * MIB), None);
    let opts = MigrateOptions {
        postcopy_after: Some(1),
        ..MigrateOptions::default()
    };
    let err = migrate_to_uri(
        &vm,
        &MigrationUri::File(file.clone()),
        &opts,
        &MigrationProgress::new(),
    )
    .unwrap_err();
    assert!(
        matches!(err, MigrationError::PostcopyNeedsDuplex { .. }),
        "{err}"
    );
    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
    let _ = std::fs::remove_file(file);
}
