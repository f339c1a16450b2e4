//! The guest `vmm tiny-kernel` writes boots under QEMU too (`-kernel` with its PVH entry),
//! and its clock ticks and its memory verifier runs there as under our VMM.

use minivmm_tests::{require_kvm, vmm, Running};
use std::process::Command;
use std::time::Duration;

fn qemu() -> &'static str {
    let found = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "qemu-system-x86_64 is missing: scripts/setup.sh installs it (apt-get install qemu-system-x86)"
    );
    "qemu-system-x86_64"
}

#[test]
fn tiny_kernel_boots_under_qemu_microvm() {
    require_kvm!();
    let qemu = qemu();
    let dir = std::env::temp_dir().join(format!("vmm-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = dir.join("tiny.elf");
    let (status, _, stderr) =
        Running::spawn(vmm(&["tiny-kernel", elf.to_str().unwrap()])).wait(Duration::from_secs(30));
    assert!(status.success(), "vmm tiny-kernel: {stderr}");

    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "microvm", "-enable-kvm", "-m", "128M"])
        // QEMU 7.2 on AMD hosts cannot set IA32_ARCH_CAPABILITIES; harmless on Intel.
        .args(["-cpu", "host,-arch-capabilities"])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&elf)
        .args(["-append", "dirty_mb=1"])
        .stdin(std::process::Stdio::null());
    let mut guest = Running::spawn(cmd);
    let timeout = Duration::from_secs(60);
    guest.expect_line("`tiny: boot`", timeout, |l| l.contains("tiny: boot"));
    for want in 1..=3u64 {
        let line = guest.expect_line("a tick", timeout, |l| l.starts_with("tick "));
        assert_eq!(line.trim(), format!("tick {want}"));
    }
    let verified = |l: &str| l.starts_with("verify ok");
    if !guest.seen().iter().any(|l| verified(l)) {
        guest.expect_line("`verify ok`", timeout, verified);
    }
    assert!(
        !guest.seen().iter().any(|l| l.contains("FAIL")),
        "{:?}",
        guest.seen()
    );
    drop(guest);
    std::fs::remove_dir_all(&dir).unwrap();
}
