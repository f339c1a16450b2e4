//! Outside review of post-copy (commits ea610b7..6608603): reproductions of defects.
//! Every test here FAILS on the reviewed code (6608603) because of a real defect, and
//! passes once it is fixed; each says what is wrong and what the correct behaviour is.
//! File:line references are to 6608603 unless they say otherwise.
//!
//! Status at bcb436c (fixes landed while this review ran): sections 1-7 pass there
//! (kept as regression tests: 7 fixed by 08c3d2b, the others by bcb436c); sections 8
//! and 9 still fail.
//!
//! The destinations are the crate's real `incoming` over real unix sockets with a real
//! userfaultfd; the sources are either the real driver (`migrate_to_uri` with a FakeVm)
//! or a hostile source written with the public `StreamWriter`. Without userfaultfd the
//! tests print `SKIPPED: no userfaultfd` and pass.

mod common;
#[path = "common/fake_vm.rs"]
mod fake_vm;

use common::read_block;
use fake_vm::{FakeVm, GuestLoad};
use migration::live::{
    incoming, migrate_to_uri, ComponentState, IncomingError, IncomingOptions, IncomingStats,
    MigrateOptions, MigrationError, MigrationProgress, MigrationState, Reply, RestorableVm,
    VmError,
};
use migration::load::{AnonymousHotplug, BlockHotplug, IncomingLoad, LoadOptions};
use migration::postcopy::uffd::Userfaultfd;
use migration::stream::{BlockRuns, StreamWriter, PAGE_SIZE};
use migration::transport::{listen, Listener, MigrationUri};
use ramlist::RamList;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const P: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;

macro_rules! require_uffd {
    () => {
        if let Err(e) = Userfaultfd::open() {
            println!("SKIPPED: no userfaultfd ({e})");
            return;
        }
    };
}

fn path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mvm-review-pc-{}-{name}", std::process::id()))
}

fn list(ram: u64) -> Arc<RamList> {
    let l = Arc::new(RamList::new());
    l.alloc("ram", ram).unwrap();
    l
}

/// A destination VM that records what the driver did with it.
struct ReviewDest {
    ram: Arc<RamList>,
    hotplug: AnonymousHotplug,
    /// Its vCPUs were released (`resume`).
    resumed: Arc<AtomicBool>,
    /// `postcopy_failed` was called (the VMM stops the guest and ends).
    failed: Arc<AtomicBool>,
    on_pause: Option<Box<dyn FnMut() + Send>>,
    /// Where a source may reconnect, and how long one wait lasts.
    reconnect: Option<Listener>,
    reconnect_wait: Duration,
}

impl ReviewDest {
    fn new(ram: Arc<RamList>) -> ReviewDest {
        ReviewDest {
            ram,
            hotplug: AnonymousHotplug,
            resumed: Arc::default(),
            failed: Arc::default(),
            on_pause: None,
            reconnect: None,
            reconnect_wait: Duration::from_secs(20),
        }
    }
}

impl RestorableVm for ReviewDest {
    fn ram(&self) -> Arc<RamList> {
        self.ram.clone()
    }
    fn hotplug(&mut self) -> &mut dyn BlockHotplug {
        &mut self.hotplug
    }
    fn restore_state(&mut self, _: &[ComponentState]) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.resumed.store(true, Ordering::Release);
        Ok(())
    }
    fn postcopy_paused(&mut self, _why: &str) {
        if let Some(h) = self.on_pause.as_mut() {
            h();
        }
    }
    fn postcopy_reconnect(&mut self) -> Option<migration::transport::Connection> {
        let l = self.reconnect.as_ref()?;
        l.accept_timeout(self.reconnect_wait).ok()
    }
    fn postcopy_failed(&mut self) {
        self.failed.store(true, Ordering::Release);
    }
}

type DestResult = Result<IncomingStats, IncomingError>;

/// `incoming` on a thread, on the first connection to `uri`.
fn spawn_incoming(mut vm: ReviewDest, uri: &MigrationUri) -> thread::JoinHandle<DestResult> {
    let listener = listen(uri).unwrap();
    thread::spawn(move || {
        let conn = listener.accept_timeout(Duration::from_secs(20)).unwrap();
        incoming(&mut vm, conn, &IncomingOptions::default())
    })
}

/// The content a hostile source sends for page `p` of "ram".
fn page_data(p: u64) -> Vec<u8> {
    vec![(p as u8).wrapping_mul(7) | 1; P as usize]
}

const PAGES: u64 = 32;
/// The pages the hostile source says are missing at the switch.
const MISSING: (u64, u64) = (8, 16);

/// A hostile (but, up to the switch, well-formed) source on `path`: pre-copy sends every
/// page of "ram" (PAGES pages) except the MISSING run, then the switch package; it waits
/// for the destination's `postcopy-running` and returns the socket.
fn switch_then_wait_running(path: &std::path::Path) -> (UnixStream, StreamWriter<UnixStream>) {
    let t0 = Instant::now();
    let sock = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    let mut w = StreamWriter::new(sock.try_clone().unwrap());
    w.header().unwrap();
    w.ram_setup([("ram", PAGES * P)].into_iter()).unwrap();
    w.begin_ram().unwrap();
    for p in (0..PAGES).filter(|p| !(MISSING.0..MISSING.0 + MISSING.1).contains(p)) {
        w.page("ram", p * P, &page_data(p)).unwrap();
    }
    w.eos().unwrap();
    w.postcopy_switch(
        0x1234,
        &[BlockRuns {
            id: "ram".into(),
            len: PAGES * P,
            runs: vec![MISSING],
        }],
    )
    .unwrap();
    w.state("cpu0", b"{}").unwrap();
    w.end().unwrap();
    w.flush().unwrap();
    let mut r = sock.try_clone().unwrap();
    r.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let reply = Reply::read_from(&mut r).unwrap();
    assert!(
        matches!(reply, Reply::PostcopyRunning(_)),
        "the destination did not run the guest: {reply:?}"
    );
    (sock, w)
}

/// The missing pages, in one post-copy RAM section.
fn send_missing(w: &mut StreamWriter<UnixStream>) {
    w.begin_ram().unwrap();
    for p in MISSING.0..MISSING.0 + MISSING.1 {
        w.page("ram", p * P, &page_data(p)).unwrap();
    }
    w.eos().unwrap();
}

fn expected_ram() -> Vec<u8> {
    (0..PAGES).flat_map(page_data).collect()
}

// ---------------------------------------------------------------------------------------
// 1. A destination that has every page kills the guest when the source is gone at the end.
// ---------------------------------------------------------------------------------------

/// (Fixed by bcb436c; passes there.)
/// DEFECT (high): the source sends every missing page and the stream's end, then is gone
/// (killed, host lost, or only its return path broke) before the destination's
/// `postcopy-done` goes out. The destination has the whole guest, and the source never
/// runs it again (it handed it over at `postcopy-running`) — yet
/// `postcopy::dest::run` (migration/src/postcopy/dest.rs:75-77) turns the failed write of
/// `PostcopyDone` into `IncomingError::Confirm`, which vmm-core's `receive`
/// (vmm-core/src/live/destination.rs:563-569) answers by pausing the vCPUs and ending the
/// VMM: the only complete copy of the guest is destroyed.
///
/// Correct: once every page is in place, the post-copy destination keeps the guest; a
/// `postcopy-done` that cannot be delivered is a warning, and `incoming` returns Ok.
#[test]
fn a_whole_guest_survives_a_source_gone_after_the_stream_end() {
    require_uffd!();
    let uri = MigrationUri::Unix(path("done-epipe"));
    let dst = list(PAGES * P);
    let vm = ReviewDest::new(dst.clone());
    let failed = vm.failed.clone();
    let dest = spawn_incoming(vm, &uri);
    let MigrationUri::Unix(p) = &uri else {
        unreachable!()
    };
    let (sock, mut w) = switch_then_wait_running(p);
    // The return path breaks (as it does for a source that is gone): the destination's
    // next write fails with EPIPE. The stream itself is whole.
    sock.shutdown(std::net::Shutdown::Read).unwrap();
    send_missing(&mut w);
    w.end().unwrap();
    w.flush().unwrap();
    let r = dest.join().unwrap();
    assert_eq!(
        read_block(&dst, "ram"),
        expected_ram(),
        "the destination does have the whole guest"
    );
    assert!(
        r.is_ok() && !failed.load(Ordering::Acquire),
        "a destination holding every page gave its guest up ({r:?}; postcopy_failed called: \
         {}) because the source could not be told it is done",
        failed.load(Ordering::Acquire)
    );
}

/// (Fixed by bcb436c; passes there.)
/// DEFECT (high): as above, but the link breaks after the last missing page and before
/// the end marker. `guest_side` (migration/src/postcopy/dest.rs:120-146) pauses only when
/// `pages.left() > 0`; with nothing left it returns `PostcopyLost`, `run` calls
/// `vm.postcopy_failed()` (stops the vCPUs) and the VMM ends — though not a byte of the
/// guest is missing.
///
/// Correct: with every page in place, a transport error before the end marker completes
/// post-copy (with a warning); the guest runs on.
#[test]
fn a_whole_guest_survives_a_link_cut_after_the_last_page() {
    require_uffd!();
    let uri = MigrationUri::Unix(path("cut-last"));
    let dst = list(PAGES * P);
    let vm = ReviewDest::new(dst.clone());
    let failed = vm.failed.clone();
    let dest = spawn_incoming(vm, &uri);
    let MigrationUri::Unix(p) = &uri else {
        unreachable!()
    };
    let (sock, mut w) = switch_then_wait_running(p);
    send_missing(&mut w);
    w.flush().unwrap();
    // The source dies here: no end marker.
    drop(w);
    drop(sock);
    let r = dest.join().unwrap();
    assert_eq!(read_block(&dst, "ram"), expected_ram());
    assert!(
        r.is_ok() && !failed.load(Ordering::Acquire),
        "a destination holding every page stopped its guest: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. The guest runs on both sides.
// ---------------------------------------------------------------------------------------

/// Forwards one connection from `front` to `back`; in the destination-to-source
/// direction, the first chunk holding the bytes `cut_on` is not forwarded: both sides are
/// shut down instead (the link broke just as that reply was on its way).
fn proxy_cutting_on(
    front: PathBuf,
    back: PathBuf,
    cut_on: &'static [u8],
) -> thread::JoinHandle<()> {
    let _ = std::fs::remove_file(&front);
    let l = UnixListener::bind(&front).unwrap();
    thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = UnixStream::connect(&back).unwrap();
        let (mut a_in, mut b_out) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let fwd = thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = a_in.read(&mut buf) {
                if n == 0 || b_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let (mut b_in, mut a_out) = (b.try_clone().unwrap(), a.try_clone().unwrap());
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = b_in.read(&mut buf) {
            if n == 0 {
                break;
            }
            if buf[..n].windows(cut_on.len()).any(|w| w == cut_on) {
                break;
            }
            if a_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
        let _ = fwd.join();
    })
}

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

fn switching() -> MigrateOptions {
    MigrateOptions {
        postcopy_after: Some(1),
        max_bandwidth: Some(20 * MIB),
        downtime_limit: Duration::from_micros(1),
        write_timeout: Duration::from_secs(5),
        ..MigrateOptions::default()
    }
}

/// (Fixed by bcb436c; passes there.)
/// DEFECT (high): split brain. The destination releases its vCPUs (`vm.resume()`,
/// migration/src/postcopy/dest.rs:110) and only then tells the source
/// (`PostcopyRunning`, :115). If that reply is lost — the link breaks, or the source's
/// confirmation timeout fires first — the source still believes the guest never ran
/// there and resumes its own copy (`Run::fail` with `guest_elsewhere` false,
/// migration/src/live/source.rs:601-617, reached from `serve`'s `st.started.is_none()`
/// paths in migration/src/live/source/postcopy.rs:391-410,530): the guest now runs on
/// both sides. The destination keeps its guest (postcopy-paused in the VMM, vCPUs
/// running until they touch a missing page) waiting for a source that will never come.
///
/// Correct: the two must never both run the guest. Either the destination starts its
/// vCPUs only after the source acknowledged (as local migration's `ready`/`go` does), or
/// the source, once the switch package may have arrived, never resumes the guest by
/// itself (QEMU's rule once the package is sent: postcopy-paused, the user decides).
#[test]
fn a_lost_postcopy_running_reply_does_not_run_the_guest_on_both_sides() {
    require_uffd!();
    let (front, back) = (path("sb-front"), path("sb-back"));
    let dst = list(4 * MIB);
    let vm_dst = ReviewDest::new(dst);
    let resumed_there = vm_dst.resumed.clone();
    let dest = spawn_incoming(vm_dst, &MigrationUri::Unix(back.clone()));
    // Status 5: postcopy-running.
    let proxy = proxy_cutting_on(front.clone(), back, b"MVMR\x05");
    let vm = Arc::new(busy_vm(4 * MIB));
    let progress = Arc::new(MigrationProgress::new());
    let m = {
        let (vm, progress) = (vm.clone(), progress.clone());
        thread::spawn(move || {
            migrate_to_uri(&*vm, &MigrationUri::Unix(front), &switching(), &progress)
        })
    };
    // A source that cannot tell whether the guest runs there may pause (the correct
    // outcome): then give the guest up, which never runs it here.
    let t0 = Instant::now();
    while !m.is_finished() && t0.elapsed() < Duration::from_secs(30) {
        if progress.state() == MigrationState::PostcopyPaused {
            progress.cancel();
        }
        thread::sleep(Duration::from_millis(5));
    }
    let r = m.join().unwrap();
    proxy.join().unwrap();
    let _ = dest.join().unwrap();
    let ran_there = resumed_there.load(Ordering::Acquire);
    let runs_here = !vm.is_paused();
    assert!(
        !(ran_there && runs_here),
        "the guest ran on the destination AND was resumed on the source (source: {:?})",
        r.map(|_| ()).map_err(|e| e.to_string())
    );
}

// ---------------------------------------------------------------------------------------
// 3. An RCU read-side section held for as long as post-copy is paused.
// ---------------------------------------------------------------------------------------

/// (Fixed by bcb436c; passes there.)
/// DEFECT (medium): the post-copy loader takes its RCU read guard when a RAM record
/// names its block (`select_block`, migration/src/load/ram.rs:118) and its placer path
/// returns before the `since_quiesce` accounting (ram.rs:161-173); when the transport
/// fails mid-section, `ram_section` returns through `?` without `quiesce()`, so the
/// guard stays in `Loader::guard` while `guest_side` pauses and waits for the source to
/// reconnect (migration/src/postcopy/dest.rs:123-132) — minutes, or forever. Every grace
/// period of the destination process waits that long: `rcu::synchronize`,
/// `drain_call_rcu`, reclamation of freed RAM blocks and of every `call_rcu` callback.
/// The VMM's `postcopy_paused`/`postcopy_reconnect` hooks also run inside that read
/// section (a hook that synchronizes would panic). DESIGN.md: "Migration holds a read
/// section for one batch (bounded in time)".
///
/// Correct: no read-side section is held across a blocking wait; the loader quiesces
/// before any read that may block for long, and on every error path.
#[test]
fn a_paused_postcopy_does_not_hold_a_grace_period() {
    require_uffd!();
    let uri = MigrationUri::Unix(path("rcu"));
    let mut vm = ReviewDest::new(list(PAGES * P));
    // Nobody reconnects: the destination waits 8 s before it gives the guest up.
    vm.reconnect = Some(listen(&MigrationUri::Unix(path("rcu-again"))).unwrap());
    vm.reconnect_wait = Duration::from_secs(8);
    let (tx, rx) = mpsc::channel::<Duration>();
    let tx = Mutex::new(Some(tx));
    vm.on_pause = Some(Box::new(move || {
        // Another thread (outside any read section) asks for a grace period.
        if let Some(tx) = tx.lock().unwrap().take() {
            thread::spawn(move || {
                let t0 = Instant::now();
                rcu::synchronize();
                let _ = tx.send(t0.elapsed());
            });
        }
    }));
    let dest = spawn_incoming(vm, &uri);
    let MigrationUri::Unix(p) = &uri else {
        unreachable!()
    };
    let (sock, mut w) = switch_then_wait_running(p);
    // One RAM section cut short: a PAGE record's word and idstr, no data; then gone.
    w.begin_ram().unwrap();
    w.flush().unwrap();
    let mut raw = sock.try_clone().unwrap();
    // (A complete section here instead — the EOS word 8 — passes: the section's end
    // quiesces.)
    raw.write_all(&((MISSING.0 * P) | 0x02).to_be_bytes())
        .unwrap();
    raw.write_all(b"\x03ram").unwrap();
    raw.write_all(&[0u8; 100]).unwrap();
    drop(w);
    drop(raw);
    drop(sock);
    let waited = rx.recv_timeout(Duration::from_secs(3));
    let _ = dest.join();
    assert!(
        waited.is_ok(),
        "a grace period requested while post-copy was paused did not end within 3 s: \
         the loader holds an RCU read-side section while it waits for the source"
    );
}

// ---------------------------------------------------------------------------------------
// 4. A hostile destination's list of missing pages on resume.
// ---------------------------------------------------------------------------------------

/// (Fixed by bcb436c; passes there.)
/// DEFECT (low): on resume the source takes the destination's list of missing pages
/// with only a per-run bounds check (`RamSaver::reset_pending`,
/// migration/src/save/postcopy.rs:247-291; `Run::reconnect`,
/// migration/src/live/source/postcopy.rs:286-306 accepts up to `missing + 4096`
/// messages of 100 runs each). Overlapping, repeated and unsorted runs are accepted, so
/// a destination may list every page of a block thousands of times: the source keeps
/// every run in memory (up to 1.6 KB per page that was missing), marks the block that
/// many times, and counts the sum as `missing_now`, which then loosens the request-flood
/// bound (`asked > missing_now.max(missing) + 4096`) by the same factor.
///
/// Correct: the runs of a block are ascending and apart (what `missing_runs` sends) and
/// inside the pages missing at the switch; anything else refuses the resume
/// (BadReturnPath), leaving post-copy paused.
#[test]
fn a_resume_listing_the_same_pages_over_and_over_is_refused() {
    let (first, again) = (path("hr-first"), path("hr-again"));
    let l1 = listen(&MigrationUri::Unix(first.clone())).unwrap();
    let l2 = listen(&MigrationUri::Unix(again.clone())).unwrap();
    let hostile = thread::spawn(move || {
        let dst = list(4 * MIB);
        {
            let conn = l1.accept_timeout(Duration::from_secs(20)).unwrap();
            let (mut reader, mut writer) = conn.into_split();
            let opts = LoadOptions::default();
            let mut load = IncomingLoad::new(&dst, &mut reader, &opts);
            assert!(load
                .load_until_switch(&mut AnonymousHotplug)
                .unwrap()
                .is_some());
            Reply::PostcopyRunning(1).write_to(&mut *writer).unwrap();
            // Then the link breaks.
        }
        let conn = l2.accept_timeout(Duration::from_secs(20)).unwrap();
        let (mut reader, mut writer) = conn.into_split();
        let mut hello = [0u8; 12];
        reader.read_exact(&mut hello).unwrap();
        let whole = (0u64, 4 * MIB / P);
        for _ in 0..200 {
            let r = Reply::PostcopyMissing {
                id: "ram".into(),
                runs: vec![whole; 100],
            };
            if r.write_to(&mut *writer).is_err() {
                return;
            }
        }
        let _ = Reply::PostcopyResumeReady.write_to(&mut *writer);
        // Take what comes for a moment, then break the link again.
        let _ = reader.read(&mut [0u8; 1 << 16]);
        thread::sleep(Duration::from_millis(500));
    });
    let vm = Arc::new(busy_vm(4 * MIB));
    let progress = Arc::new(MigrationProgress::new());
    let m = {
        let (vm, progress) = (vm.clone(), progress.clone());
        thread::spawn(move || {
            migrate_to_uri(&*vm, &MigrationUri::Unix(first), &switching(), &progress)
        })
    };
    wait_state(&progress, MigrationState::PostcopyPaused);
    progress.resume_postcopy(MigrationUri::Unix(again)).unwrap();
    let t0 = Instant::now();
    while progress.snapshot().postcopy_resume_attempts == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the resume never ended"
        );
        thread::sleep(Duration::from_millis(2));
    }
    let snap = progress.snapshot();
    progress.cancel();
    let _ = hostile.join();
    let _ = m.join();
    assert!(
        snap.state == MigrationState::PostcopyPaused,
        "a list of 20000 copies of the whole block (the destination cannot miss more pages \
         than the block has) was taken as the pages to send: {snap:?}"
    );
}

fn wait_state(progress: &MigrationProgress, state: MigrationState) {
    let t0 = Instant::now();
    while progress.state() != state {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never {state:?}: {:?}",
            progress.snapshot()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------------------
// 5. A cancel that "has no effect" in post-copy makes a later link break fatal.
// ---------------------------------------------------------------------------------------

/// Forwards one connection from `front` to `back` until `cut` is set, then shuts both
/// sides down.
fn cutting_proxy(front: PathBuf, back: PathBuf, cut: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let _ = std::fs::remove_file(&front);
    let l = UnixListener::bind(&front).unwrap();
    thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = UnixStream::connect(&back).unwrap();
        let pump = |mut from: UnixStream, mut to: UnixStream| {
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
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

/// A real source and destination through a cutting proxy; the destination reconnects
/// on `again`. Returns once both sides are in post-copy (active).
struct Paused {
    /// The source VM (kept alive while its migration runs).
    _vm: Arc<FakeVm>,
    progress: Arc<MigrationProgress>,
    m: thread::JoinHandle<Result<migration::live::MigrationStats, MigrationError>>,
    dest: thread::JoinHandle<DestResult>,
    cut: Arc<AtomicBool>,
    proxy: thread::JoinHandle<()>,
    paused_there: Arc<AtomicBool>,
    again: PathBuf,
}

fn postcopy_through_proxy(name: &str) -> Paused {
    let (front, back, again) = (
        path(&format!("{name}-front")),
        path(&format!("{name}-back")),
        path(&format!("{name}-again")),
    );
    let mut vm_dst = ReviewDest::new(list(16 * MIB));
    vm_dst.reconnect = Some(listen(&MigrationUri::Unix(again.clone())).unwrap());
    vm_dst.reconnect_wait = Duration::from_secs(30);
    let paused_there = Arc::new(AtomicBool::new(false));
    let p = paused_there.clone();
    vm_dst.on_pause = Some(Box::new(move || p.store(true, Ordering::Release)));
    let dest = spawn_incoming(vm_dst, &MigrationUri::Unix(back.clone()));
    let cut = Arc::new(AtomicBool::new(false));
    let proxy = cutting_proxy(front.clone(), back, cut.clone());
    let vm = Arc::new(busy_vm(16 * MIB));
    let progress = Arc::new(MigrationProgress::new());
    let m = {
        let (vm, progress) = (vm.clone(), progress.clone());
        let opts = MigrateOptions {
            // The background crawls: post-copy lasts seconds.
            max_bandwidth: Some(2 * MIB),
            ..switching()
        };
        thread::spawn(move || migrate_to_uri(&*vm, &MigrationUri::Unix(front), &opts, &progress))
    };
    wait_state(&progress, MigrationState::PostcopyActive);
    Paused {
        _vm: vm,
        progress,
        m,
        dest,
        cut,
        proxy,
        paused_there,
        again,
    }
}

impl Paused {
    fn cut_and_wait_paused(&mut self) {
        self.cut.store(true, Ordering::Release);
        let t0 = Instant::now();
        while !self.paused_there.load(Ordering::Acquire) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the destination never paused"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Resumes (if still paused) and waits for both ends.
    fn finish(
        self,
    ) -> (
        Result<migration::live::MigrationStats, MigrationError>,
        DestResult,
    ) {
        let _ = self.proxy.join();
        if self.progress.state() == MigrationState::PostcopyPaused {
            let _ = self
                .progress
                .resume_postcopy(MigrationUri::Unix(self.again.clone()));
        }
        let r = self.m.join().unwrap();
        (r, self.dest.join().unwrap())
    }
}

/// (Fixed by bcb436c; passes there.)
/// DEFECT (low): `MigrationProgress::cancel` says it has no effect once the guest is
/// paused for the final stage, and post-copy's `serve` never looks at it — but the flag
/// stays set, and the next link break is answered by `wait_resume`
/// (migration/src/live/progress.rs, `if self.is_cancelled() { return None }`) at once:
/// the source never enters postcopy-paused and declares the guest lost, though the
/// destination waits for it. In the VMM the API refuses a cancel in postcopy-active, but
/// its check and the switch race (`MigrationSlot::cancel` reads the state, then sets the
/// flag; the driver checks the flag once, at the start of the switch).
///
/// Correct: a cancel that did nothing does not outlive the state it was refused in (clear
/// it at the switch, or refuse it), so a later break pauses and can be resumed.
#[test]
fn a_cancel_ignored_during_postcopy_does_not_make_a_later_break_fatal() {
    require_uffd!();
    let mut run = postcopy_through_proxy("cancel");
    // Refused by the VMM's API in this state; the library takes it silently.
    run.progress.cancel();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        run.progress.state(),
        MigrationState::PostcopyActive,
        "a cancel in post-copy had an effect at once"
    );
    run.cut_and_wait_paused();
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while t0.elapsed() < Duration::from_secs(3) {
        let s = run.progress.state();
        if seen.last() != Some(&s) {
            seen.push(s);
        }
        if s == MigrationState::PostcopyPaused || s == MigrationState::Failed {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let paused = run.progress.state() == MigrationState::PostcopyPaused;
    let (r, _) = run.finish();
    assert!(
        paused,
        "after a link break the source gave the guest up at once (states {seen:?}, result \
         {:?}) because of a cancel that had been ignored earlier",
        r.err().map(|e| e.to_string())
    );
}

// ---------------------------------------------------------------------------------------
// 6. A peer that connects and says nothing delays (or defeats) the resume.
// ---------------------------------------------------------------------------------------

/// (Fixed by bcb436c (2 s hello timeout); passes there.)
/// DEFECT (medium): `reconnect`/`handshake` (migration/src/postcopy/dest.rs:161-219)
/// take one connection at a time and wait up to the stall timeout (10 s) for its 12-byte
/// hello. Anyone who can connect to the incoming URI (for tcp:, anyone on the network)
/// and sends nothing holds the real source out for 10 s per connection; the source's own
/// read of the reply times out after its confirmation timeout (10 s), so its resume fails
/// and post-copy stays paused — repeatedly, as long as the peer keeps connecting. (The
/// VMM's `DestVm::postcopy_reconnect` also drops and re-binds the listener after every
/// refused peer, resetting a source that was queued behind it:
/// vmm-core/src/live/destination.rs:466-488.) The TLS accept path was hardened against
/// exactly this (handshakes in parallel, "so peers that stall or trickle cannot keep the
/// right source out"); the resume path was not.
///
/// Correct: hellos are read in parallel (or with a short deadline of their own), so a
/// silent peer does not delay the source that shows the right token.
#[test]
fn a_silent_peer_does_not_hold_the_resuming_source_out() {
    require_uffd!();
    let mut run = postcopy_through_proxy("silent");
    run.cut_and_wait_paused();
    wait_state(&run.progress, MigrationState::PostcopyPaused);
    let silent = UnixStream::connect(&run.again).unwrap();
    thread::sleep(Duration::from_millis(100));
    run.progress
        .resume_postcopy(MigrationUri::Unix(run.again.clone()))
        .unwrap();
    let t0 = Instant::now();
    while run.progress.state() != MigrationState::PostcopyActive
        && run.progress.state() != MigrationState::Completed
        && t0.elapsed() < Duration::from_secs(5)
    {
        thread::sleep(Duration::from_millis(5));
    }
    let took = t0.elapsed();
    let snap = run.progress.snapshot();
    drop(silent);
    let (r, d) = run.finish();
    println!("finished: {:?} / {:?}", r.map(|_| ()), d.map(|_| ()));
    assert!(
        took < Duration::from_secs(5),
        "with one silent peer connected first, the right source was not back in post-copy \
         5 s after its resume: {snap:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. Post-copy from a file.
// ---------------------------------------------------------------------------------------

/// (Fixed by 08c3d2b; passes there.)
/// DEFECT (medium): the source refuses post-copy on anything but a plain socket
/// (`PostcopyNeedsDuplex`), and the module documentation says post-copy needs both
/// halves of a connection — but the destination accepts a POSTCOPY section from any
/// input: `incoming` (migration/src/live/dest.rs:104-137) runs post-copy on a `file:`
/// snapshot (no return path: page requests go nowhere) and on TLS. A snapshot file that
/// carries a switch (crafted, or cut short) starts the guest with pages missing; when the
/// file ends the destination "pauses" and asks the VMM for a reconnecting source — and
/// the VMM's `postcopy_reconnect` re-opens the same file (`listen(file:)` + accept), whose
/// handshake is refused ("not a plain socket"), and `reconnect` loops on it forever: a
/// busy loop with the guest half-loaded (vmm-core/src/live/destination.rs:466-488,
/// migration/src/postcopy/dest.rs:167-173).
///
/// Correct: a POSTCOPY section on an input that is not a duplex socket is a load error,
/// before the guest runs (the source is told, as for any bad stream).
#[test]
fn a_postcopy_switch_in_a_snapshot_file_is_refused_before_the_guest_runs() {
    require_uffd!();
    let file = path("pc.snap");
    {
        let f = std::fs::File::create(&file).unwrap();
        let mut w = StreamWriter::new(f);
        w.header().unwrap();
        w.ram_setup([("ram", PAGES * P)].into_iter()).unwrap();
        w.begin_ram().unwrap();
        for p in 0..MISSING.0 {
            w.page("ram", p * P, &page_data(p)).unwrap();
        }
        w.eos().unwrap();
        w.postcopy_switch(
            7,
            &[BlockRuns {
                id: "ram".into(),
                len: PAGES * P,
                runs: vec![MISSING],
            }],
        )
        .unwrap();
        w.state("cpu0", b"{}").unwrap();
        w.end().unwrap();
        // Cut short: the post-copy pages never come.
        w.flush().unwrap();
    }
    let listener = listen(&MigrationUri::File(file.clone())).unwrap();
    let conn = listener.accept().unwrap();
    let mut vm = ReviewDest::new(list(PAGES * P));
    let resumed = vm.resumed.clone();
    let r = incoming(&mut vm, conn, &IncomingOptions::default());
    let _ = std::fs::remove_file(&file);
    assert!(
        !resumed.load(Ordering::Acquire),
        "the guest was started in post-copy from a snapshot file (result {:?})",
        r.map(|_| ())
    );
    assert!(r.is_err());
}

// ---------------------------------------------------------------------------------------
// 8. Refusing post-copy to a file destroys the file first.
// ---------------------------------------------------------------------------------------

/// STILL OPEN at bcb436c (references to bcb436c).
/// DEFECT (low, data loss): `migrate` opens the destination before it checks that
/// post-copy can run on it (`migrate_to_uri` → `connect(uri)`,
/// migration/src/live/source.rs:94, then `PostcopyNeedsDuplex` at :151-162); for
/// `file:PATH`, `connect` is `create_snapshot`, which creates and truncates PATH
/// (migration/src/transport/mod.rs:707-714). So `vmm migrate --postcopy --to file:PATH`
/// (or `--resume --to file:PATH`, through `Run::reconnect`,
/// migration/src/live/source/postcopy.rs:273-279) is refused — after emptying PATH: an
/// existing snapshot given by mistake is destroyed, and the refusal says nothing about it.
///
/// Correct: a post-copy (or resume) to a URI that cannot carry it is refused from the URI
/// alone, before anything is opened; the file is left as it was.
#[test]
fn refusing_postcopy_to_a_file_leaves_the_file_alone() {
    let file = path("precious.snap");
    std::fs::write(&file, b"yesterday's snapshot").unwrap();
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
    let left = std::fs::read(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    assert!(
        matches!(err, MigrationError::PostcopyNeedsDuplex { .. }),
        "{err}"
    );
    assert_eq!(
        left, b"yesterday's snapshot",
        "the refused post-copy emptied the file it was pointed at"
    );
}

// ---------------------------------------------------------------------------------------
// 9. A resume's list of missing pages: unknown blocks piled up, not refused.
// ---------------------------------------------------------------------------------------

/// STILL OPEN at bcb436c (references to bcb436c).
/// DEFECT (low-medium, memory on the source): on resume, `Run::reconnect`
/// (migration/src/live/source/postcopy.rs:296-345) keeps every `PostcopyMissing` message
/// until `PostcopyResumeReady` — up to `missing + 4096` of them — and only then
/// (`reset_pending`) looks at their block ids. A message for an unknown block is up to
/// 4 KiB of id (`parse_missing` takes any length: migration/src/live/reply.rs:154-184), and
/// each starts a new entry, so a destination (or anything answering on its URI with the
/// token) makes the source — the process that holds the only copy of the guest's missing
/// pages — allocate about 4 KiB per page that was missing at the switch (a guest with
/// 1 M pages missing: ~4 GiB), and wait out its read timeout, before it says no.
///
/// Correct: each message is checked as it arrives (a block the destination was sent,
/// an id no longer than an idstr, runs inside it); the first bad one refuses the resume.
#[test]
fn a_resume_naming_an_unknown_block_is_refused_at_once() {
    let (first, again) = (path("ub-first"), path("ub-again"));
    let l1 = listen(&MigrationUri::Unix(first.clone())).unwrap();
    let l2 = listen(&MigrationUri::Unix(again.clone())).unwrap();
    let hostile = thread::spawn(move || {
        let dst = list(4 * MIB);
        {
            let conn = l1.accept_timeout(Duration::from_secs(20)).unwrap();
            let (mut reader, mut writer) = conn.into_split();
            let opts = LoadOptions::default();
            let mut load = IncomingLoad::new(&dst, &mut reader, &opts);
            assert!(load
                .load_until_switch(&mut AnonymousHotplug)
                .unwrap()
                .is_some());
            Reply::PostcopyRunning(1).write_to(&mut *writer).unwrap();
        }
        let conn = l2.accept_timeout(Duration::from_secs(20)).unwrap();
        let (mut reader, mut writer) = conn.into_split();
        let mut hello = [0u8; 12];
        reader.read_exact(&mut hello).unwrap();
        let r = Reply::PostcopyMissing {
            id: "x".repeat(4000),
            runs: vec![(0, 1)],
        };
        let _ = r.write_to(&mut *writer);
        // Then nothing more for a while (the connection stays open).
        thread::sleep(Duration::from_secs(12));
    });
    let vm = Arc::new(busy_vm(4 * MIB));
    let progress = Arc::new(MigrationProgress::new());
    let m = {
        let (vm, progress) = (vm.clone(), progress.clone());
        thread::spawn(move || {
            migrate_to_uri(&*vm, &MigrationUri::Unix(first), &switching(), &progress)
        })
    };
    wait_state(&progress, MigrationState::PostcopyPaused);
    progress.resume_postcopy(MigrationUri::Unix(again)).unwrap();
    let t0 = Instant::now();
    while progress.snapshot().postcopy_resume_attempts == 0 && t0.elapsed() < Duration::from_secs(3)
    {
        thread::sleep(Duration::from_millis(5));
    }
    let snap = progress.snapshot();
    progress.cancel();
    let _ = hostile.join();
    let _ = m.join();
    assert!(
        snap.postcopy_resume_attempts == 1
            && snap
                .error
                .as_deref()
                .is_some_and(|e| e.contains("resuming on")),
        "3 s after a missing-pages message for a block it never sent, the source still \
         waited for more instead of refusing the resume: {:?}",
        snap.error
    );
}
