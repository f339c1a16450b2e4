//! The built-in tiny guest under our VMM: it boots, ticks, verifies the memory it dirties
//! and ends the process cleanly when it resets the machine.

use minivmm_tests::{require_kvm, ticks, vmm, Running};
use std::time::Duration;

/// Guest code is emulated on these machines (~1000x slower than native); boots take
/// milliseconds, but a loaded CI host may stall a child for seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn boots_and_ticks() {
    require_kvm!();
    let mut guest = Running::spawn(vmm(&["run"]));
    guest.expect_line("`tiny: boot`", BOOT_TIMEOUT, |l| l.contains("tiny: boot"));
    let mut last = None;
    for _ in 0..3 {
        let line = guest.expect_line("a tick", BOOT_TIMEOUT, |l| l.starts_with("tick "));
        let n: u64 = line["tick ".len()..].trim().parse().expect("a tick number");
        if let Some(prev) = last {
            assert!(n > prev, "tick {n} after tick {prev}");
        }
        last = Some(n);
    }
}

#[test]
fn reset_ends_the_process_with_status_0() {
    require_kvm!();
    let guest = Running::spawn(vmm(&["run", "--cmdline", "exit_after=3"]));
    let (status, lines, stderr) = guest.wait(BOOT_TIMEOUT);
    assert!(
        status.success(),
        "{status}; stderr: {stderr}; output: {lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("tiny: boot")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("tiny: reset")), "{lines:?}");
    let t = ticks(&lines);
    assert_eq!(t, vec![1, 2, 3], "{lines:?}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
}

#[test]
fn command_line_and_memory_reach_the_guest() {
    require_kvm!();
    let guest = Running::spawn(vmm(&[
        "run",
        "--memory",
        "64M",
        "--cmdline",
        "exit_after=1 hello=world",
    ]));
    let (status, lines, stderr) = guest.wait(BOOT_TIMEOUT);
    assert!(status.success(), "{status}; stderr: {stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("tiny: cmdline: exit_after=1 hello=world")),
        "{lines:?}"
    );
    // 64 MiB less the legacy hole between 640 KiB and 1 MiB.
    assert!(
        lines.iter().any(|l| l == "tiny: memory 63 MiB"),
        "{lines:?}"
    );
}

#[test]
fn dirty_memory_verifies() {
    require_kvm!();
    let mut guest = Running::spawn(vmm(&["run", "--cmdline", "dirty_mb=2"]));
    guest.expect_line("`tiny: boot`", BOOT_TIMEOUT, |l| l.contains("tiny: boot"));
    guest.expect_line("`tiny: dirtying 2 MiB`", BOOT_TIMEOUT, |l| {
        l.contains("tiny: dirtying 2 MiB")
    });
    // A round writes and reads 2 MiB at the emulated 10-17 MiB/s: well under a second.
    let line = guest.expect_line("a verify line", Duration::from_secs(60), |l| {
        l.starts_with("verify ")
    });
    assert!(line.starts_with("verify ok round=1"), "{line}");
    let line = guest.expect_line("a second verify line", Duration::from_secs(60), |l| {
        l.starts_with("verify ")
    });
    assert!(line.starts_with("verify ok round=2"), "{line}");
    // The work is sliced: ticks keep coming while the guest dirties memory.
    guest.expect_line("a tick while dirtying", BOOT_TIMEOUT, |l| {
        l.starts_with("tick ")
    });
    assert!(
        !guest.seen().iter().any(|l| l.contains("FAIL")),
        "{:?}",
        guest.seen()
    );
}

#[test]
fn serial_to_a_file() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("vmm-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("console.log");
    let serial = format!("file:{}", file.display());
    let guest = Running::spawn(vmm(&[
        "run",
        "--serial",
        &serial,
        "--cmdline",
        "exit_after=1",
    ]));
    let (status, lines, stderr) = guest.wait(BOOT_TIMEOUT);
    assert!(status.success(), "{status}; stderr: {stderr}");
    assert!(lines.is_empty(), "console went to stdout: {lines:?}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("tiny: boot") && text.contains("tick 1"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_crashed_guest_is_reported() {
    require_kvm!();
    let guest = Running::spawn(vmm(&["run", "--cmdline", "crash_after=1"]));
    let (status, lines, stderr) = guest.wait(BOOT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{status}; output {lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("tiny: triple fault")),
        "{lines:?}"
    );
    // Hardware KVM reports a triple fault (KVM_EXIT_SHUTDOWN); where guest code is
    // emulated, the emulator gives up on the exception instead.
    assert!(
        stderr.starts_with("vmm: ")
            && (stderr.contains("triple fault") || stderr.contains("KVM internal error"))
            && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn boots_the_written_out_kernel_from_a_file() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("vmm-kernel-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = dir.join("tiny.elf");
    let (status, _, stderr) =
        Running::spawn(vmm(&["tiny-kernel", elf.to_str().unwrap()])).wait(BOOT_TIMEOUT);
    assert!(status.success(), "{stderr}");
    let guest = Running::spawn(vmm(&[
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "exit_after=1",
        "--vcpus",
        "2",
    ]));
    let (status, lines, stderr) = guest.wait(BOOT_TIMEOUT);
    assert!(status.success(), "{status}; stderr: {stderr}");
    assert!(lines.iter().any(|l| l.contains("tiny: boot")), "{lines:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
