//! QMP checked with a client nobody here wrote: `tests/qmp/drive.py` drives a VMM with
//! PyPI's `qemu.qmp` (installed by scripts/setup.sh) through the greeting, negotiation,
//! stop/cont and their events, bad input, a live migration between two processes watched
//! by `query-migrate` and `MIGRATION` events, a RAM hotplug and `quit` — and the same
//! script, unchanged, drives `qemu-system-x86_64`, so the protocol is QEMU's.

use minivmm_tests::{require_kvm, vmm, vmm_bin, Running, Scratch};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

fn drive(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("qmp/drive.py");
    let have_client = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_client,
        "python3 cannot import qemu.qmp: scripts/setup.sh installs it (pip install qemu.qmp)"
    );
    let child = Command::new("timeout")
        .arg(TIMEOUT.as_secs().to_string())
        .arg("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("running tests/qmp/drive.py");
    let out = String::from_utf8_lossy(&child.stdout).into_owned();
    let err = String::from_utf8_lossy(&child.stderr).into_owned();
    println!("{out}{err}");
    assert!(
        child.status.success(),
        "drive.py {args:?} failed ({}):\n{out}\n{err}",
        child.status
    );
    let kind = args[0];
    assert!(
        out.contains(&format!("qmp drive ok: {kind}")),
        "drive.py did not finish:\n{out}"
    );
}

#[test]
fn a_qemu_qmp_client_drives_vmm_through_a_migration() {
    require_kvm!();
    let dir = Scratch::new("qmp-vmm");
    drive(&[
        "vmm",
        vmm_bin().to_str().unwrap(),
        dir.path("work").to_str().unwrap(),
    ]);
}

#[test]
fn the_same_script_drives_qemu() {
    require_kvm!();
    let qemu = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .expect("sh");
    assert!(
        qemu.status.success(),
        "qemu-system-x86_64 is missing: scripts/setup.sh installs it"
    );
    let dir = Scratch::new("qmp-qemu");
    let tiny = dir.path("tiny.elf");
    let (status, _, err) =
        Running::spawn(vmm(&["tiny-kernel", tiny.to_str().unwrap()])).wait(TIMEOUT);
    assert!(status.success(), "vmm tiny-kernel: {err}");
    drive(&[
        "qemu",
        "qemu-system-x86_64",
        dir.path("work").to_str().unwrap(),
        tiny.to_str().unwrap(),
    ]);
}

/// Bad QMP input on a raw socket: broken JSON and a non-object get QMP errors and the
/// client goes on; a request that never ends within 64 KiB gets an error and is dropped;
/// the VMM runs on and answers the next client.
#[test]
fn bad_qmp_input_gets_qmp_errors_and_the_vmm_runs_on() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    require_kvm!();
    let dir = Scratch::new("qmp-bad");
    let qmp = dir.path("vmm.qmp");
    let serial = dir.path("serial");
    let mut child = vmm(&[
        "run",
        "--serial",
        &format!("file:{}", serial.display()),
        "--qmp",
        &format!("unix:{}", qmp.display()),
    ])
    .spawn()
    .expect("vmm run");
    if !qmp.exists() {
        let t0 = std::time::Instant::now();
        while !qmp.exists() && t0.elapsed() < TIMEOUT {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if !qmp.exists() {
        let _ = child.kill();
        panic!("no QMP socket");
    }
    let session = |lines: &[&[u8]]| -> Vec<serde_json::Value> {
        let mut s = UnixStream::connect(&qmp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for l in lines {
            s.write_all(l).unwrap();
        }
        let mut out = Vec::new();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            out.push(serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}")));
            if out.len() == 1 + lines.len() {
                break;
            }
        }
        out
    };
    let a = session(&[
        b"{\"execute\":\"qmp_capabilities\"}",
        b"{\"execute\": oops}\n",
        b"[1,2,3]",
        b"\xff\xfe\n",
        b"{\"execute\":\"query-status\",\"id\":7}",
    ]);
    assert!(a[0].get("QMP").is_some(), "greeting: {:?}", a[0]);
    assert_eq!(a[1]["return"], serde_json::json!({}));
    for bad in &a[2..5] {
        assert_eq!(bad["error"]["class"], "GenericError", "{bad}");
    }
    assert_eq!(a[5]["id"], 7, "{:?}", a[5]);
    assert_eq!(a[5]["return"]["running"], true);
    let huge = format!("{{\"execute\":\"{}", "x".repeat(100 << 10));
    let a = session(&[b"{\"execute\":\"qmp_capabilities\"}", huge.as_bytes()]);
    assert_eq!(a[2]["error"]["class"], "GenericError", "{a:?}");
    let a = session(&[
        b"{\"execute\":\"qmp_capabilities\"}",
        b"{\"execute\":\"query-status\"}",
    ]);
    assert_eq!(
        a[2]["return"]["running"], true,
        "the VMM after bad input: {a:?}"
    );
    let t0 = std::time::Instant::now();
    let ran = loop {
        let out = std::fs::read_to_string(&serial).unwrap_or_default();
        if out.contains("tick ") || t0.elapsed() > TIMEOUT {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(ran.contains("tick "), "the guest did not run: {ran}");
}
