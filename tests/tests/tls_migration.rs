//! `tcp:` migrations nobody else can join, between real `vmm` processes: over mutual TLS
//! the dirtying tiny guest moves and verifies ok; a source with another CA's certificate,
//! one whose name `--tls-authz` does not allow, and a plain-TCP source are each refused
//! (the destination keeps listening, and says so in `status`), each source's guest runs
//! on, and the right source then moves it; a proxy flipping a byte inside the TLS stream
//! breaks the migration: the source runs on and the destination never runs the guest;
//! peers that stall their handshakes do not keep the right source out.

use minivmm_tests::tls::Ca;
use minivmm_tests::{require_kvm, ticks, vmm, vmm_status, Running, Scratch};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);
const SOURCE_NAME: &str = "source.example";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `dir/good` (the destination's and the right source's), `dir/other-ca` (a source from
/// another CA) and `dir/intruder` (the right CA, another name).
fn credentials(d: &Scratch) {
    let ca = Ca::new("minivmm test CA").unwrap();
    ca.write_all(&d.path("good"), &["localhost", "127.0.0.1"], SOURCE_NAME)
        .unwrap();
    let other = Ca::new("another CA").unwrap();
    ca.write_ca(&d.path("other-ca")).unwrap();
    other
        .write_client(&d.path("other-ca"), SOURCE_NAME)
        .unwrap();
    ca.write_ca(&d.path("intruder")).unwrap();
    ca.write_client(&d.path("intruder"), "intruder.example")
        .unwrap();
}

fn guest(args: &mut Vec<String>, dirty: bool) {
    args.extend(["--memory", "256M"].map(String::from));
    if dirty {
        args.extend(["--cmdline", "dirty_mb=4"].map(String::from));
    }
}

fn source(d: &Scratch, dirty: bool) -> Running {
    let mut args = vec!["run".to_string()];
    guest(&mut args, dirty);
    args.extend(["--api-socket".into(), s(&d.path("src.api")).into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut src = Running::spawn(vmm(&args));
    let first = if dirty { "verify ok" } else { "tick " };
    src.expect_line("the source guest running", TIMEOUT, |l| l.contains(first));
    src
}

fn destination(d: &Scratch, port: u16, dirty: bool) -> Running {
    let mut args = vec!["run".to_string()];
    guest(&mut args, dirty);
    let uri = format!("tcp:127.0.0.1:{port}");
    args.extend(
        [
            "--api-socket",
            s(&d.path("dst.api")),
            "--incoming",
            &uri,
            "--tls-creds",
            s(&d.path("good")),
            "--tls-authz",
            SOURCE_NAME,
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dst = Running::spawn(vmm(&args));
    minivmm_tests::wait_for_path(&d.path("dst.api"), TIMEOUT);
    dst
}

fn migrate(d: &Scratch, port: u16, creds: Option<&str>) -> Output {
    let uri = format!("tcp:127.0.0.1:{port}");
    let api = d.path("src.api");
    let mut args = vec!["migrate", "--api-socket", s(&api), "--to", &uri, "--json"];
    let dir;
    if let Some(c) = creds {
        dir = d.path(c);
        args.extend(["--tls-creds", s(&dir)]);
    }
    vmm(&args).output().unwrap()
}

fn stats(out: &Output) -> Value {
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
        .unwrap_or_else(|_| panic!("not one JSON object: {out:?}"))
}

#[test]
fn the_dirtying_guest_moves_over_mutual_tls_and_verifies_ok() {
    require_kvm!();
    let d = Scratch::new("tls-move");
    credentials(&d);
    let port = free_port();
    let mut dst = destination(&d, port, true);
    let src = source(&d, true);
    let out = migrate(&d, port, Some("good"));
    assert!(out.status.success(), "vmm migrate over TLS failed: {out:?}");
    assert_eq!(stats(&out)["status"], "completed");
    let (st, src_lines, err) = src.wait(Duration::from_secs(10));
    assert!(st.success(), "the source exited with {st}: {err}");
    let last_src = *ticks(&src_lines).last().expect("source ticks");
    let first = dst.expect_line("a tick on the destination", TIMEOUT, |l| {
        l.starts_with("tick ")
    });
    let first_dst: u64 = first[5..].trim().parse().unwrap();
    assert!(
        first_dst > last_src,
        "ticks went back: {last_src} -> {first_dst}"
    );
    dst.expect_line("verify ok after the move", TIMEOUT, |l| {
        l.contains("verify ok")
    });
    assert!(dst.seen().iter().all(|l| !l.contains("verify FAIL")));
}

/// Each wrong source fails with a clear error and its guest runs on; the destination
/// refuses it before reading a byte of its stream and keeps listening; the right source
/// then moves the guest.
#[test]
fn wrong_sources_are_refused_and_the_destination_waits_for_the_right_one() {
    require_kvm!();
    let d = Scratch::new("tls-refuse");
    credentials(&d);
    let port = free_port();
    let dst = destination(&d, port, false);
    let src = source(&d, false);
    for (creds, what) in [
        (Some("other-ca"), "another CA's certificate"),
        (Some("intruder"), "a name --tls-authz does not allow"),
        (None, "plain tcp"),
    ] {
        let out = migrate(&d, port, creds);
        assert!(!out.status.success(), "{what}: the migration went through");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("migration failed"), "{what}: {err}");
        if creds.is_some() {
            // Said in the handshake, before the stream: not a broken pipe later.
            assert!(err.contains("TLS"), "{what}: not a TLS refusal: {err}");
        }
        assert_eq!(stats(&out)["status"], "failed", "{what}");
        let st = vmm_status(&d.path("src.api"));
        assert_eq!(
            st["state"], "running",
            "{what}: the source's guest stopped: {st}"
        );
        let dst_st = vmm_status(&d.path("dst.api"));
        assert_eq!(dst_st["state"], "inmigrate", "{what}: {dst_st}");
        assert_eq!(dst_st["incoming"]["stage"], "listening", "{what}: {dst_st}");
        println!("{what}: {}", err.trim());
    }
    // The destination counts a refusal when its handshake thread ends, which may be a
    // moment after the source gave up.
    let t0 = Instant::now();
    let mut dst_st = vmm_status(&d.path("dst.api"));
    while dst_st["incoming"]["refused"] != 3 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        dst_st = vmm_status(&d.path("dst.api"));
    }
    assert_eq!(dst_st["incoming"]["refused"], 3, "{dst_st}");
    let reasons = dst_st["incoming"]["refusals"].to_string();
    assert!(reasons.contains("UnknownIssuer"), "{reasons}");
    assert!(reasons.contains("--tls-authz"), "{reasons}");
    println!("destination: {reasons}");

    let out = migrate(&d, port, Some("good"));
    assert!(out.status.success(), "the right source: {out:?}");
    let (st, _, err) = src.wait(Duration::from_secs(10));
    assert!(st.success(), "{err}");
    let t0 = Instant::now();
    while vmm_status(&d.path("dst.api"))["state"] != "running" {
        assert!(t0.elapsed() < TIMEOUT, "the destination never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = vmm(&["quit", "--api-socket", s(&d.path("dst.api"))]).output();
    let (st, _, err) = dst.wait(Duration::from_secs(10));
    assert!(st.success(), "{err}");
}

/// Peers that connect and say nothing, or trickle a TLS record a byte at a time, do not
/// keep the right source out: each handshake runs on its own, within its deadline.
#[test]
fn stalled_peers_do_not_keep_the_right_source_out() {
    require_kvm!();
    let d = Scratch::new("tls-stall");
    credentials(&d);
    let port = free_port();
    let dst = destination(&d, port, false);
    let src = source(&d, false);
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut trickle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // A TLS record header, then one byte at a time.
    trickle.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    let dripping = std::thread::spawn(move || {
        for _ in 0..40 {
            if trickle.write_all(&[0x01]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let out = migrate(&d, port, Some("good"));
    let took = t0.elapsed();
    // Serial handshakes would keep it waiting past its own 10 s handshake deadline.
    assert!(
        out.status.success(),
        "the right source was kept out: {out:?}"
    );
    println!("migrated in {took:?} with 3 silent peers and a trickling one");
    let (st, _, err) = src.wait(Duration::from_secs(10));
    assert!(st.success(), "{err}");
    let _ = vmm(&["quit", "--api-socket", s(&d.path("dst.api"))]).output();
    let (st, _, err) = dst.wait(Duration::from_secs(20));
    assert!(st.success(), "{err}");
    drop(silent);
    let _ = dripping.join();
}

/// A proxy between the two flips one byte of the TLS records the source sends, past the
/// handshake: the destination's record check fails, the migration fails, the source's
/// guest runs on, and the destination ends with an error, its guest never started.
#[test]
fn a_byte_flipped_inside_the_tls_stream_is_detected() {
    require_kvm!();
    let d = Scratch::new("tls-mitm");
    credentials(&d);
    let port = free_port();
    let dst = destination(&d, port, false);
    let src = source(&d, false);
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((mut from_src, _)) = proxy.accept() else {
            return;
        };
        let Ok(mut to_dst) = TcpStream::connect(("127.0.0.1", port)) else {
            return;
        };
        let (mut back_from, mut back_to) =
            (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
        });
        let (mut seen, mut flipped) = (0usize, false);
        let mut buf = [0u8; 4096];
        loop {
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Past the handshake (a few KiB), inside the stream's first records.
            if !flipped && seen + n > 16 << 10 {
                let at = (16usize << 10).saturating_sub(seen).min(n - 1);
                buf[at] ^= 0x01;
                flipped = true;
            }
            seen += n;
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let t0 = Instant::now();
    let out = migrate(&d, proxy_port, Some("good"));
    println!("vmm migrate ended after {:?}", t0.elapsed());
    assert!(
        !out.status.success(),
        "a tampered stream completed: {out:?}"
    );
    println!("source: {}", String::from_utf8_lossy(&out.stderr).trim());
    let st = vmm_status(&d.path("src.api"));
    assert_eq!(st["state"], "running", "the source's guest stopped: {st}");
    let (st, lines, err) = dst.wait(TIMEOUT);
    println!("the destination ended after {:?}", t0.elapsed());
    assert!(
        !st.success(),
        "the destination went on with a tampered stream"
    );
    assert!(err.contains("incoming migration failed"), "{err}");
    assert!(
        ticks(&lines).is_empty(),
        "the destination ran the guest: {lines:?}"
    );
    println!("destination: {}", err.trim());
    let _ = vmm(&["quit", "--api-socket", s(&d.path("src.api"))]).output();
    let _ = src.wait(Duration::from_secs(10));
}
