//! Outside review of post-copy (commits ea610b7..6608603), with real `vmm` processes:
//! reproductions of defects. Every test here FAILS on the reviewed code (6608603)
//! because of a real defect and passes once it is fixed; each says what is wrong and
//! what is right. Without /dev/kvm or userfaultfd they print SKIPPED and pass.
//!
//! Every reproduction passes since a539a48; they stay as regression tests.
#![allow(dead_code, unused_imports)] // helpers and imports shared by both halves

use minivmm_tests::{require_kvm, require_uffd, vmm, Running, Scratch};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

include!("review_postcopy/helpers.rs");

/// DEFECT (medium on these machines): `vmm pause` (QMP `stop`, `system_reset`) on a
/// destination whose post-copy is paused kicks the vCPUs, which wait in the kernel on a
/// missing page (here in KVM's instruction emulator: `__kvm_write_guest_page` →
/// `handle_userfault`). The kick cannot take such a vCPU out (the pause fails after 2 s:
/// "only 0 of 1 vCPUs paused ... the VM runs on"), and its pending signal makes every
/// later wait on the page return at once: the vCPU thread then re-faults in a loop at
/// 100% of a CPU, the fault thread reading each fault (~30% of another), until the
/// source comes back — and every re-fault adds to the waiting page's `faults`, so the
/// post-copy blocktime figure is inflated without bound
/// (migration/src/postcopy/pages.rs:281, :412). The same inability to stop a waiting vCPU
/// defeats `postcopy_failed` (vmm-core/src/live/destination.rs:514-521): `run`
/// (migration/src/postcopy/dest.rs:85-98) then unregisters the memory anyway, and the
/// vCPU goes on with zero pages where the missing ones were.
///
/// Correct: a vCPU waiting on a missing page is not kicked into a busy loop: requests
/// that need the vCPUs parked are refused while post-copy is paused (or wait for the
/// page), and the failure path makes the missing pages inaccessible (e.g. PROT_NONE)
/// rather than zero before it lets the memory go.
#[test]
fn pausing_a_postcopy_paused_destination_does_not_leave_its_vcpu_spinning() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("rv-pc-pause");
    let (_src, dst, _src_api, dst_api) = paused_postcopy(&d);
    let pid = dst.pid();
    let idle0 = thread_ticks(pid, "vcpu0");
    thread::sleep(Duration::from_secs(1));
    let idle = thread_ticks(pid, "vcpu0") - idle0;
    let paused = vmm(&["pause", "--api-socket", s(&dst_api)])
        .output()
        .unwrap();
    let (v0, f0, t0) = (
        thread_ticks(pid, "vcpu0"),
        thread_ticks(pid, "postcopy-faults"),
        Instant::now(),
    );
    thread::sleep(Duration::from_secs(2));
    let secs = t0.elapsed().as_secs_f64() * 100.0;
    let vcpu = (thread_ticks(pid, "vcpu0") - v0) as f64 / secs;
    let faults = (thread_ticks(pid, "postcopy-faults") - f0) as f64 / secs;
    assert!(
        vcpu < 0.2 && faults < 0.2,
        "after `vmm pause` ({}: {}) on a postcopy-paused destination its vCPU thread \
         burns {:.0}% of a CPU and the fault thread {:.0}% (before the pause: {idle} ticks \
         in 1 s)",
        paused.status,
        String::from_utf8_lossy(&paused.stderr).trim(),
        vcpu * 100.0,
        faults * 100.0
    );
}

/// DEFECT (medium): `vmm quit` on the source during post-copy exits at once
/// (`VmControl::quit` has no check: vmm-core/src/vmm/control.rs:229-232), destroying
/// the only copy of the pages the guest — running on the destination — still misses:
/// the destination stays postcopy-paused forever, its guest lost. Everything else that
/// would endanger the guest is refused during post-copy (resume, pause, snapshot,
/// migrate, RAM hot-plug: "must not run here again"); the one command that loses it
/// outright is not, and says nothing.
///
/// Correct: the source refuses `quit` while the destination still needs pages from it
/// (or finishes post-copy before it exits); the guest completes on the destination.
#[test]
fn quitting_the_source_during_postcopy_does_not_lose_the_guest() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("rv-pc-quit");
    let uri = format!("unix:{}", s(&d.path("mig.sock")));
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let _dst = destination(&uri, &dst_api, &[]);
    let mut src = source(&src_api);
    let client = vmm(&[
        "migrate",
        "--api-socket",
        s(&src_api),
        "--to",
        &uri,
        "--postcopy",
        "--max-bandwidth",
        "1M",
        "--json",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    wait_until("postcopy-active on the destination", || {
        stage(&dst_api) == "postcopy-active"
    });
    let quit = vmm(&["quit", "--api-socket", s(&src_api)])
        .output()
        .unwrap();
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while t0.elapsed() < Duration::from_secs(30) {
        let st = stage(&dst_api);
        if seen.last() != Some(&st) {
            seen.push(st.clone());
        }
        if st == "completed" || st == "failed" {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = client.wait_with_output();
    assert!(
        seen.last().map(String::as_str) == Some("completed"),
        "after `vmm quit` on the source (answer {:?}; source still running: {}) the \
         destination's post-copy went {seen:?}: the guest waits for pages nobody has",
        String::from_utf8_lossy(&quit.stdout).trim(),
        src.is_running()
    );
}

/// DEFECT (medium): when the link breaks, the destination re-binds its --incoming URI
/// (`DestVm::postcopy_reconnect`, vmm-core/src/live/destination.rs:491-498); if that
/// fails even once — the unix path (removed after the first accept) or the tcp port was
/// taken meanwhile by another process, e.g. a second `vmm run --incoming` on the same
/// path — it returns `None`, which `guest_side` takes as "the VMM gave up": the guest is
/// declared lost, its vCPUs stopped and the VMM ends, although the source still holds
/// every missing page and waits in postcopy-paused to be resumed.
///
/// Correct: a failure to listen again leaves post-copy paused (say why in `status`, and
/// retry, or accept a new URI); only the VMM's own end gives the guest up.
#[test]
fn a_busy_incoming_path_at_the_break_does_not_lose_the_guest() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("rv-pc-busy");
    let (front, back) = (d.path("front.sock"), d.path("mig.sock"));
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let mut dst = destination(&format!("unix:{}", s(&back)), &dst_api, &[]);
    minivmm_tests::wait_for_path(&back, TIMEOUT);
    let _src = source(&src_api);
    let cut = Arc::new(AtomicBool::new(false));
    let proxy = cutting_proxy(&front, &back, cut.clone());
    let client = vmm(&[
        "migrate",
        "--api-socket",
        s(&src_api),
        "--to",
        &format!("unix:{}", s(&front)),
        "--postcopy",
        "--max-bandwidth",
        "1M",
        "--json",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    wait_until("postcopy-active on the destination", || {
        stage(&dst_api) == "postcopy-active"
    });
    // The destination's socket file went with its first accept; someone else takes the
    // path now.
    assert!(!back.exists(), "the destination still listens on its path");
    let squatter = UnixListener::bind(&back).unwrap();
    cut.store(true, Ordering::Release);
    proxy.join().unwrap();
    let _ = client.wait_with_output();
    wait_until("the source paused", || {
        status(&src_api)["migration"]["state"] == "postcopy-paused"
    });
    thread::sleep(Duration::from_secs(3));
    let alive = dst.is_running();
    let st = stage(&dst_api);
    drop(squatter);
    if !alive {
        let (code, _, err) = dst.wait(Duration::from_secs(10));
        panic!(
            "the destination gave its guest up because its path was busy when the link \
             broke ({code}): {}",
            err.trim()
        );
    }
    assert_eq!(
        st, "postcopy-paused",
        "the destination is not waiting for the source"
    );
}
