//! Outside review of post-copy (commits ea610b7..6608603): reproductions of defects.
//! Every test here FAILS on the reviewed code (6608603) because of a real defect, and
//! passes once it is fixed; each says what is wrong and what the correct behaviour is.
//! File:line references are to 6608603 unless they say otherwise.
//!
//! Every reproduction passes since a539a48; they stay as regression tests.
//!
//! The destinations are the crate's real `incoming` over real unix sockets with a real
//! userfaultfd; the sources are either the real driver (`migrate_to_uri` with a FakeVm)
//! or a hostile source written with the public `StreamWriter`. Without userfaultfd the
//! tests print `SKIPPED: no userfaultfd` and pass.
#![allow(dead_code, unused_imports)] // helpers and imports shared by both halves

#[macro_use]
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

include!("review_postcopy/helpers.rs");

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
