//! Debian's Linux under our VMM, from the files `scripts/get-linux-guest.sh` builds.
//!
//! Guest code is emulated on these machines (DESIGN.md, "These machines' KVM is slow"), so
//! each test measures the guest CPU first (the tiny guest's `bench=1`) and sizes its
//! timeout from it, or prints `SKIPPED: guest CPU too slow (N MIPS)`. Measured here
//! (2026-11-27, bench 226 kIPS): the vmlinux banner, command line and e820 map after
//! 47 s alone (66 s with another guest running), the bzImage decompressor's first line
//! after 10 s; the busybox prompt lies minutes beyond.

use minivmm_tests::{guest_kips, mips, require_kvm, require_linux_guest, vmm, Running};
use std::time::{Duration, Instant};

/// Guest work to the vmlinux banner and e820 map, in thousands of instructions at the
/// bench's rate: 47 s at 226 kIPS.
const BANNER_WORK: u64 = 47 * 226;
/// Guest work to the bzImage decompressor's first line: 10 s at 226 kIPS.
const BZIMAGE_WORK: u64 = 10 * 226;
/// Guest work to the busybox prompt, a generous guess: about 50 times the banner's (on
/// hardware KVM the whole boot takes about a second).
const PROMPT_WORK: u64 = 50 * BANNER_WORK;
/// Longest guest work a test takes on (the estimate from the measured speed).
const MAX_ESTIMATE: Duration = Duration::from_secs(120);
/// Longest a test waits for a line.
const MAX_WAIT: Duration = Duration::from_secs(180);

/// The timeout for `work` at the measured speed: 2.5 times the estimate (a busy host,
/// other guests on the same CPUs), 30 s to [`MAX_WAIT`]; `None` when the estimate
/// exceeds [`MAX_ESTIMATE`].
fn timeout_for(work: u64, kips: u64) -> Option<Duration> {
    let estimate = Duration::from_secs_f64(work as f64 / kips.max(1) as f64);
    let timeout = (estimate * 5 / 2).clamp(Duration::from_secs(30), MAX_WAIT);
    println!(
        "guest CPU {} MIPS (bench): expecting ~{:.0?}, waiting up to {:.0?}",
        mips(kips),
        estimate,
        timeout
    );
    (estimate <= MAX_ESTIMATE).then_some(timeout)
}

macro_rules! timeout_or_skip {
    ($work:expr) => {{
        let kips = guest_kips();
        match timeout_for($work, kips) {
            Some(t) => t,
            None => {
                println!("SKIPPED: guest CPU too slow ({} MIPS)", mips(kips));
                return;
            }
        }
    }};
}

/// The e820 line Linux prints for RAM from 1 MiB to the end of `memory` (below 3 GiB).
fn e820_line(memory: u64) -> String {
    format!(
        "BIOS-e820: [mem 0x0000000000100000-0x{:016x}] usable",
        memory - 1
    )
}

#[test]
fn vmlinux_prints_banner_cmdline_and_e820() {
    require_kvm!();
    let guest = require_linux_guest!();
    let timeout = timeout_or_skip!(BANNER_WORK);
    let memory = 256u64 << 20;
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 minivmm=banner";
    let start = Instant::now();
    let mut vm = Running::spawn(vmm(&[
        "run",
        "--kernel",
        guest.vmlinux.to_str().unwrap(),
        "--initrd",
        guest.initramfs.to_str().unwrap(),
        "--memory",
        "256M",
        "--cmdline",
        cmdline,
    ]));
    let banner = vm.expect_line("the Linux banner", timeout, |l| {
        l.contains("Linux version ")
    });
    println!("{:>6.1?}  {banner}", start.elapsed());
    let line = vm.expect_line("our command line", timeout, |l| {
        l.contains("Command line: ")
    });
    println!("{:>6.1?}  {line}", start.elapsed());
    assert!(
        line.ends_with(&format!("Command line: {cmdline}")),
        "{line}"
    );
    let want = e820_line(memory);
    let line = vm.expect_line("the e820 map", timeout, |l| l.contains(&want));
    println!("{:>6.1?}  {line}", start.elapsed());
    let e820: Vec<&String> = vm
        .seen()
        .iter()
        .filter(|l| l.contains("BIOS-e820"))
        .collect();
    assert!(
        e820.iter()
            .any(|l| l.contains("[mem 0x0000000000000000-0x000000000009ffff] usable")),
        "{e820:?}"
    );
}

#[test]
fn bzimage_reaches_its_first_output() {
    require_kvm!();
    let guest = require_linux_guest!();
    let timeout = timeout_or_skip!(BZIMAGE_WORK);
    // The decompressor prints on the early serial console only what it warns about;
    // `nokaslr` makes it say so before it decompresses (which takes minutes here).
    let start = Instant::now();
    let mut vm = Running::spawn(vmm(&[
        "run",
        "--kernel",
        guest.vmlinuz.to_str().unwrap(),
        "--initrd",
        guest.initramfs.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 earlyprintk=serial,ttyS0 nokaslr reboot=k panic=1",
    ]));
    let line = vm.expect_line("the decompressor's first line", timeout, |l| {
        l.contains("KASLR disabled: 'nokaslr' on cmdline.")
    });
    println!("{:>6.1?}  {line}", start.elapsed());
}

#[test]
fn busybox_prompt_answers() {
    require_kvm!();
    let guest = require_linux_guest!();
    let timeout = timeout_or_skip!(PROMPT_WORK);
    let mut cmd = vmm(&[
        "run",
        "--kernel",
        guest.vmlinux.to_str().unwrap(),
        "--initrd",
        guest.initramfs.to_str().unwrap(),
        "--memory",
        "256M",
    ]);
    cmd.stdin(std::process::Stdio::piped());
    let mut vm = Running::spawn(cmd);
    vm.expect_line("the initramfs's /init", timeout, |l| {
        l.contains("minivmm-init: ")
    });
    vm.send(b"echo answer=$((6*7))\n");
    vm.expect_line("the shell's answer", timeout, |l| l.contains("answer=42"));
    vm.send(b"reboot -f\n");
    let (status, _, stderr) = vm.wait(timeout);
    assert!(status.success(), "{status}: {stderr}");
}
