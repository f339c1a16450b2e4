//! An outside review's reproductions for `vmm migrate --local`, kept as regression tests: each
//! failed on fd8d3af, where the problem it names was found.
//!
//! 1. QMP `system_reset` on a source that handed its guest over is accepted: it loads the
//!    kernel again into the memory the destination's guest now runs on (the destination's
//!    guest triple-faults).
//! 2. `resume` on the source while a local migration waits for the destination's `ready`
//!    (the guest paused by the migration, its state already sent) is accepted: the source's
//!    guest runs on after its state was taken, and after `go` too.

use minivmm_tests::{api_request, require_kvm, ticks, vmm, wait_for_path, Running, Scratch};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let mut q = Qmp(BufReader::new(UnixStream::connect(path).unwrap()));
        let mut greeting = String::new();
        q.0.read_line(&mut greeting).unwrap();
        q.cmd("qmp_capabilities");
        q
    }

    fn cmd(&mut self, name: &str) -> serde_json::Value {
        writeln!(self.0.get_mut(), r#"{{"execute":"{name}"}}"#).unwrap();
        loop {
            let mut l = String::new();
            self.0.read_line(&mut l).unwrap();
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

#[test]
fn review_system_reset_on_a_source_that_handed_its_guest_over_is_refused() {
    require_kvm!();
    let d = Scratch::new("review-local-reset");
    let (src_api, src_qmp, dst_api, mig) = (
        d.path("src.api"),
        d.path("src.qmp"),
        d.path("dst.api"),
        d.path("mig.sock"),
    );
    let uri = format!("unix:{}", s(&mig));
    let mut dst = Running::spawn(vmm(&[
        "run",
        "--memory",
        "64M",
        "--cmdline",
        "dirty_mb=4",
        "--api-socket",
        s(&dst_api),
        "--incoming",
        &uri,
    ]));
    let mut src = Running::spawn(vmm(&[
        "run",
        "--memory",
        "64M",
        "--cmdline",
        "dirty_mb=4",
        "--memory-backend",
        "memfd",
        "--api-socket",
        s(&src_api),
        "--qmp",
        &format!("unix:{}", s(&src_qmp)),
        "--serial",
        "stdio",
    ]));
    src.expect_line("verify ok", TIMEOUT, |l| l.contains("verify ok"));
    wait_for_path(&mig, TIMEOUT);
    let mut q = Qmp::connect(&src_qmp);
    let r = api_request(
        &src_api,
        &format!(r#"{{"cmd":"migrate","uri":"{uri}","local":true}}"#),
    );
    assert_eq!(r["ok"], true, "{r}");
    let t0 = Instant::now();
    loop {
        let m = q.cmd("query-migrate");
        if m["return"]["status"] == "completed" {
            break;
        }
        assert!(t0.elapsed() < TIMEOUT, "{m}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The guest is the destination's now: the source must not write its memory.
    let reset = q.cmd("system_reset");
    std::thread::sleep(Duration::from_secs(3));
    let alive = dst.is_running();
    let _ = vmm(&["quit", "--api-socket", s(&dst_api)]).output();
    let (_, _, err) = dst.wait(Duration::from_secs(20));
    assert!(
        reset.get("error").is_some(),
        "system_reset accepted on a source that handed its guest over: {reset}; \
         destination alive: {alive}; its stderr: {err}"
    );
    assert!(alive, "the destination died: {err}");
}

#[test]
fn review_resume_is_refused_while_a_local_migration_waits_for_ready() {
    require_kvm!();
    let d = Scratch::new("review-local-resume");
    let src_api = d.path("src.api");
    let mut src = Running::spawn(vmm(&[
        "run",
        "--memory",
        "64M",
        "--memory-backend",
        "memfd",
        "--api-socket",
        s(&src_api),
        "--serial",
        "stdio",
    ]));
    src.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    // A destination that is slow to say ready (mapped at once; ready after 3 s; then
    // running after go), as a loaded host's would be.
    let fake = d.path("fake.sock");
    let listener = UnixListener::bind(&fake).unwrap();
    let (tx, ready_due) = std::sync::mpsc::channel();
    let dest = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 65536];
        let mut drain = |c: &mut UnixStream| {
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 {
                    break;
                }
            }
        };
        drain(&mut c);
        c.write_all(b"MVMR\x02\x00\x00").unwrap(); // mapped
        drain(&mut c);
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(3));
        c.write_all(b"MVMR\x03\x00\x00").unwrap(); // ready
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut go = [0u8; 4];
        c.read_exact(&mut go).unwrap();
        c.write_all(b"MVMR\x00\x00\x00").unwrap(); // running
        go
    });
    let r = api_request(
        &src_api,
        &format!(
            r#"{{"cmd":"migrate","uri":"unix:{}","local":true}}"#,
            s(&fake)
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    ready_due.recv_timeout(TIMEOUT).unwrap();
    // Every line the paused guest printed so far.
    let deadline = Instant::now() + Duration::from_millis(300);
    while src.next_line(deadline).is_some() {}
    let n = ticks(src.seen()).len();
    let resumed = api_request(&src_api, r#"{"cmd":"resume"}"#);
    let go = dest.join().unwrap();
    assert_eq!(&go, b"MVMG");
    let deadline = Instant::now() + Duration::from_secs(2);
    while src.next_line(deadline).is_some() {}
    let after = ticks(src.seen())[n..].to_vec();
    assert_eq!(
        resumed["ok"], false,
        "resume accepted while the source waited for ready: {resumed}; the source's guest \
         then ticked {after:?} (and go was sent after it ran)"
    );
}
