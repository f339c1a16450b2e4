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

/// (Fixed by bcb436c; passes there.)
/// DEFECT (high): a post-copy destination that has received every page and the
/// stream's end marker gives its guest up when `postcopy-done` cannot be delivered
/// (the source died right after its last byte, or the return path broke). The write
/// fails in `migration::postcopy::dest::run` (migration/src/postcopy/dest.rs:75-77) →
/// `IncomingError::Confirm` → vmm-core's `receive` (vmm-core/src/live/destination.rs:
/// 560-566) pauses the vCPUs ("the source may have resumed its copy" — false in post-copy:
/// the source handed the guest over at `postcopy-running` and never runs it again) and
/// ends the VMM. The only complete copy of the guest is lost.
///
/// Correct: the destination keeps running the complete guest (status `completed`), and
/// only warns that the source could not be told.
#[test]
fn a_complete_postcopy_guest_survives_its_source_dying_after_the_end_marker() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("rv-pc-done");
    let (front, back) = (d.path("front.sock"), d.path("mig.sock"));
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let mut dst = destination(&format!("unix:{}", s(&back)), &dst_api, &[]);
    minivmm_tests::wait_for_path(&back, TIMEOUT);
    let _src = source(&src_api);
    let proxy = proxy_source_gone_after_end(front.clone(), back, Duration::from_millis(1500));
    let client = vmm(&[
        "migrate",
        "--api-socket",
        s(&src_api),
        "--to",
        &format!("unix:{}", s(&front)),
        "--postcopy",
        "--max-bandwidth",
        "8M",
        "--json",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let fired = proxy.join().unwrap();
    assert!(
        fired,
        "the proxy never saw the source go quiet after its end marker"
    );
    let _ = client.wait_with_output();
    // Give the destination a moment to decide.
    thread::sleep(Duration::from_secs(3));
    let st = try_status(&dst_api);
    let complete = st
        .as_ref()
        .is_some_and(|v| v["incoming"]["stage"] == "completed");
    if !(dst.is_running() && complete) {
        let (code, _, err) = dst.wait(Duration::from_secs(10));
        let tail: Vec<&str> = err.lines().rev().take(4).collect();
        panic!(
            "the destination gave up a guest it had whole: it exited with {code}, status \
             before {st:?}; its last words: {tail:?}"
        );
    }
}

/// (Fixed by 08c3d2b; passes there.)
/// DEFECT (medium): the destination's QMP `MIGRATION` event says `completed` when the
/// post-copy guest *starts* — `DestVm::resume` advances the slot to `Completed`
/// (vmm-core/src/live/destination.rs:515-519, whose `advance` emits "completed") before
/// `postcopy_running` moves it to postcopy-active — and nothing is emitted when post-copy
/// really completes (`IncomingSlot::completed` sends no event). No `postcopy-active`
/// event is sent either. A management layer that watches the destination (as libvirt
/// does) takes the migration as done while the guest still depends on every page the
/// source holds, and may tear the source down: the guest is lost.
///
/// Correct (QEMU's sequence): `active`, `postcopy-active` at the switch, `completed` only
/// once the last page is in place.
#[test]
fn the_destination_says_completed_only_when_postcopy_is_complete() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("rv-pc-qmp");
    let uri = format!("unix:{}", s(&d.path("mig.sock")));
    let (src_api, dst_api, qmp) = (d.path("src.api"), d.path("dst.api"), d.path("dst.qmp"));
    let _dst = destination(&uri, &dst_api, &["--qmp", &format!("unix:{}", s(&qmp))]);
    minivmm_tests::wait_for_path(&qmp, TIMEOUT);
    let (tx, rx) = std::sync::mpsc::channel();
    qmp_events(qmp, tx);
    let _src = source(&src_api);
    thread::sleep(Duration::from_millis(300));
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
    .spawn()
    .unwrap();
    let mut events = Vec::new();
    let mut stage_at_completed = None;
    let t0 = Instant::now();
    while t0.elapsed() < TIMEOUT {
        let Ok((_, ev)) = rx.recv_timeout(Duration::from_millis(200)) else {
            if stage(&dst_api) == "completed" && stage_at_completed.is_some() {
                break;
            }
            continue;
        };
        if ev["event"] == "MIGRATION" {
            let st = ev["data"]["status"].as_str().unwrap_or("").to_string();
            if st == "completed" && stage_at_completed.is_none() {
                stage_at_completed = Some(stage(&dst_api));
            }
            events.push(st);
        }
    }
    let _ = client.wait_with_output();
    println!("destination MIGRATION events: {events:?}");
    assert_eq!(
        stage_at_completed.as_deref(),
        Some("completed"),
        "the destination emitted MIGRATION completed while its incoming stage was \
         {stage_at_completed:?} (events {events:?})"
    );
}

/// DEFECT (medium): after the link broke, the destination listens on its --incoming URI
/// for the source; the first peer that connects is taken, the listener is dropped (the
/// socket file removed: `DestVm::postcopy_reconnect`,
/// vmm-core/src/live/destination.rs:490-512) and its 12-byte hello is awaited
/// (`handshake`, migration/src/postcopy/dest.rs:205-218: the stall timeout, 10 s, at
/// 6608603; 2 s since bcb436c) with nobody listening. A peer that
/// connects and says nothing — a port scanner, a health check, anyone on a tcp: URI —
/// thus makes `vmm migrate --resume` of the real source fail (nobody listens, or its
/// connection is dropped with the re-bound listener), and post-copy stays paused with the
/// guest waiting on the destination.
///
/// Correct: the resume handshake of a silent or wrong peer does not keep the listener
/// closed or hold the right source out (read hellos in parallel, with their own short
/// deadline, keeping the listener open), so `vmm migrate --resume` succeeds.
#[test]
fn a_silent_peer_on_the_incoming_socket_does_not_defeat_migrate_resume() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("rv-pc-silent");
    let (_src, _dst, src_api, _) = paused_postcopy(&d);
    let back = d.path("mig.sock");
    let uri = format!("unix:{}", s(&back));
    minivmm_tests::wait_for_path(&back, TIMEOUT);
    // Someone connects and says nothing.
    let silent = UnixStream::connect(&back).unwrap();
    thread::sleep(Duration::from_millis(300));
    let out = vmm(&[
        "migrate",
        "--api-socket",
        s(&src_api),
        "--resume",
        "--to",
        &uri,
        "--json",
    ])
    .output()
    .unwrap();
    drop(silent);
    assert!(
        out.status.success(),
        "vmm migrate --resume failed because a silent peer had connected first: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (Fixed by 08c3d2b; passes there.)
/// DEFECT (medium): `vmm run --incoming file:SNAPSHOT` accepts a post-copy switch in
/// the file (the loader allows one on any input: migration/src/live/dest.rs:104-137,
/// migration/src/load/mod.rs:355-365), starts the guest with pages missing, and when the
/// file ends "pauses" and waits for the source to reconnect: `DestVm::postcopy_reconnect`
/// re-opens the same file as the "new connection", `handshake` refuses it (not a
/// socket), and `reconnect` (migration/src/postcopy/dest.rs:161-174) asks again at once —
/// forever: a busy loop burning a CPU, the guest's vCPUs stuck on their missing pages.
/// DESIGN.md: "a bad stream is a clear error, never ... a hang".
///
/// Correct: a POSTCOPY section is refused on an input that is not a duplex socket, before
/// the guest runs (the VMM fails the restore with a clear error).
#[test]
fn a_snapshot_file_with_a_postcopy_switch_is_refused_not_spun_on() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("rv-pc-file");
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let (snap, bad) = (d.path("pre.snap"), d.path("post.snap"));
    {
        let _src = source(&src_api);
        let out = vmm(&[
            "migrate",
            "--api-socket",
            s(&src_api),
            "--to",
            &format!("file:{}", s(&snap)),
            "--json",
        ])
        .output()
        .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let bytes = std::fs::read(&snap).unwrap();
    let at = first_state(&bytes);
    let block = "ram-below-4g";
    // The switch: the first 16 MiB of guest RAM (code, stacks, dirtied pages) missing.
    let mut pc = vec![0x05u8];
    pc.extend_from_slice(&0x5eed_u64.to_be_bytes());
    pc.extend_from_slice(&1u32.to_be_bytes());
    pc.push(block.len() as u8);
    pc.extend_from_slice(block.as_bytes());
    pc.extend_from_slice(&1u32.to_be_bytes());
    pc.extend_from_slice(&0u64.to_be_bytes());
    pc.extend_from_slice(&4096u64.to_be_bytes());
    let mut out = bytes[..at].to_vec();
    out.extend_from_slice(&pc);
    // The states and the switch's end marker; then the file ends (no post-copy pages).
    out.extend_from_slice(&bytes[at..]);
    std::fs::write(&bad, &out).unwrap();

    // Not `destination()`: a VMM that refuses the file may end before its API socket.
    let mut args = vec!["run"];
    args.extend(GUEST);
    let bad_uri = format!("file:{}", s(&bad));
    args.extend(["--api-socket", s(&dst_api), "--incoming", &bad_uri]);
    let mut dst = Running::spawn(vmm(&args));
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while t0.elapsed() < Duration::from_secs(10) && dst.is_running() {
        let st = stage(&dst_api);
        if !st.is_empty() && seen.last() != Some(&st) {
            seen.push(st);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let running = dst.is_running();
    let mut cpu = 0.0;
    if running {
        let (c0, t) = (cpu_ticks(dst.pid()), Instant::now());
        thread::sleep(Duration::from_secs(2));
        cpu = (cpu_ticks(dst.pid()) - c0) as f64 / 100.0 / t.elapsed().as_secs_f64();
        let _ = vmm(&["quit", "--api-socket", s(&dst_api)]).output();
    }
    let (code, _, err) = dst.wait(Duration::from_secs(30));
    println!("the destination ended with {code}: {}", err.trim());
    let postcopy = seen.iter().any(|s| s.starts_with("postcopy"));
    assert!(
        !postcopy,
        "a snapshot file with a post-copy switch was taken for post-copy (stages {seen:?}; \
         still running after 10 s: {running}; its migration thread busy {:.0}% of a CPU \
         while 'paused')",
        cpu * 100.0
    );
}
