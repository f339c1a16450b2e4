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
