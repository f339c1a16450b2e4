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
