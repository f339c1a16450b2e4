//! Bad `vmm run` input ends with one clear line on stderr and a non-zero status, never a
//! panic; and nothing a guest does (garbage on ports, the serial line, MMIO anywhere)
//! brings the VMM down.

use minivmm_tests::{require_kvm, require_linux_guest, vmm, Running};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `vmm` with `args`; asserts a failure with one `vmm: ` line containing `expect`.
fn refused(args: &[&str], expect: &str) {
    refused_cmd(vmm(args), args, expect);
}

/// [`refused`] for a prepared command.
fn refused_cmd(cmd: std::process::Command, args: &[&str], expect: &str) {
    let (status, lines, stderr) = Running::spawn(cmd).wait(TIMEOUT);
    assert!(!status.success(), "{args:?} succeeded; output {lines:?}");
    assert_eq!(
        status.code(),
        Some(1),
        "{args:?}: {status}; stderr: {stderr}"
    );
    let errs: Vec<&str> = stderr.lines().collect();
    assert_eq!(errs.len(), 1, "{args:?}: stderr not one line: {stderr}");
    assert!(errs[0].starts_with("vmm: "), "{stderr}");
    assert!(
        errs[0].contains(expect),
        "{args:?}: {stderr:?} lacks {expect:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_sizes_and_counts() {
    refused(&["run", "--memory", "lots"], "bad size \"lots\"");
    refused(&["run", "--memory", "1M"], "bad memory size");
    refused(&["run", "--memory", "12345"], "bad memory size");
    refused(&["run", "--vcpus", "0"], "bad vCPU count 0");
    refused(&["run", "--vcpus", "300"], "bad vCPU count 300");
    refused(&["run", "--vcpus", "two"], "bad vCPU count two");
    refused(&["run", "--serial", "tty"], "bad serial output");
    let migrate = |bw| {
        [
            "migrate",
            "--api-socket",
            "/nonexistent",
            "--to",
            "unix:/x",
            "--max-bandwidth",
            bw,
        ]
    };
    refused(&migrate("1Q"), "--max-bandwidth: bad size \"1Q\"");
    // A size suffix is a bandwidth too: that one gets as far as the missing socket.
    refused(
        &migrate("100M"),
        "cannot connect to api socket /nonexistent",
    );
}

#[test]
fn bad_kernels() {
    require_kvm!();
    refused(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel /nonexistent/vmlinux",
    );
    let dir = std::env::temp_dir().join(format!("vmm-bad-kernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    refused(
        &["run", "--kernel", junk.to_str().unwrap()],
        "is neither an ELF vmlinux nor a bzImage",
    );
    let tiny = dir.join("tiny.elf");
    let (status, _, _) =
        Running::spawn(vmm(&["tiny-kernel", tiny.to_str().unwrap()])).wait(TIMEOUT);
    assert!(status.success());
    let elf = std::fs::read(&tiny).unwrap();
    let truncated = dir.join("truncated.elf");
    std::fs::write(&truncated, &elf[..elf.len() / 3]).unwrap();
    refused(
        &["run", "--kernel", truncated.to_str().unwrap()],
        "cannot load kernel",
    );
    // The same ELF with its PVH note's type changed: loadable, but no entry to use.
    let mut no_note = elf.clone();
    let at = find_pvh_note_type(&no_note).expect("the tiny guest has a PVH note");
    no_note[at] = 17;
    let no_note_path = dir.join("no-pvh-note.elf");
    std::fs::write(&no_note_path, &no_note).unwrap();
    refused(
        &["run", "--kernel", no_note_path.to_str().unwrap()],
        "has no PVH entry note",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unwritable_tiny_kernel_path() {
    refused(
        &["tiny-kernel", "/nonexistent/dir/tiny.elf"],
        "cannot write",
    );
}

/// Offset of the type word of the first "Xen" note with type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
fn find_pvh_note_type(elf: &[u8]) -> Option<usize> {
    // namesz 4, descsz 4, type 18, "Xen\0"
    let needle = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    elf.windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + 8)
}

/// A scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, data: &[u8]) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, data).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bzImage setup header (boot protocol 2.15, 64-bit entry) promising `payload` bytes
/// of protected-mode code that are not there.
fn fake_bzimage(payload: u32) -> Vec<u8> {
    let mut image = vec![0u8; 0x400];
    image[0x1f1] = 1; // setup_sects
    image[0x1f4..0x1f8].copy_from_slice(&(payload / 16).to_le_bytes()); // syssize
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 1; // loadflags: LOADED_HIGH
    image[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    image
}

#[test]
fn bad_kernel_files() {
    require_kvm!();
    let dir = Scratch::new("bad-kernel-files");
    refused(
        &["run", "--kernel", &dir.file("empty", b"")],
        "is neither an ELF vmlinux nor a bzImage",
    );
    refused(
        &[
            "run",
            "--kernel",
            &dir.file("text", b"#!/bin/sh\necho hi\n"),
        ],
        "is neither an ELF vmlinux nor a bzImage",
    );
    refused(
        &[
            "run",
            "--kernel",
            &dir.file("short.bz", &fake_bzimage(1 << 20)),
        ],
        "the bzImage is truncated",
    );
    refused(
        &["run", "--kernel", dir.0.to_str().unwrap()],
        "cannot read kernel",
    );
}

#[test]
fn linux_kernels_too_big_or_cut_short() {
    require_kvm!();
    let guest = require_linux_guest!();
    let dir = Scratch::new("linux-bad");
    for kernel in [&guest.vmlinux, &guest.vmlinuz] {
        refused(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "32M",
            ],
            "MiB of guest RAM",
        );
    }
    let vmlinuz = std::fs::read(&guest.vmlinuz).unwrap();
    let cut = dir.file("vmlinuz.cut", &vmlinuz[..vmlinuz.len() / 2]);
    refused(&["run", "--kernel", &cut], "the bzImage is truncated");
    let vmlinux = std::fs::read(&guest.vmlinux).unwrap();
    let cut = dir.file("vmlinux.cut", &vmlinux[..vmlinux.len() / 2]);
    refused(&["run", "--kernel", &cut], "cannot load kernel");
}

#[test]
fn initrds_missing_empty_or_too_big() {
    require_kvm!();
    let dir = Scratch::new("bad-initrd");
    refused(
        &["run", "--initrd", "/nonexistent/initrd"],
        "cannot read initrd /nonexistent/initrd",
    );
    refused(
        &["run", "--initrd", &dir.file("empty", b"")],
        "cannot read initrd",
    );
    let big = dir.file("big", &vec![0u8; 9 << 20]);
    refused(
        &["run", "--memory", "8M", "--initrd", &big],
        "does not fit in guest RAM",
    );
    // The same initrd fits in more RAM: the tiny guest boots with it.
    let (status, _, stderr) = Running::spawn(vmm(&[
        "run",
        "--memory",
        "32M",
        "--initrd",
        &big,
        "--cmdline",
        "exit_after=1",
    ]))
    .wait(TIMEOUT);
    assert!(status.success(), "{status}: {stderr}");
}

#[test]
fn more_memory_than_the_host_is_refused_at_once() {
    require_kvm!();
    let start = Instant::now();
    refused(&["run", "--memory", "1T"], "more than this host can give");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn no_kvm_device() {
    let mut cmd = vmm(&["run"]);
    cmd.env("VMM_KVM_DEVICE", "/nonexistent/kvm");
    refused_cmd(cmd, &["run"], "cannot open /nonexistent/kvm");
    let mut cmd = vmm(&["run"]);
    cmd.env("VMM_KVM_DEVICE", "/dev/null");
    refused_cmd(cmd, &["run"], "/dev/null is not a KVM device");
}

#[test]
fn no_kvm_in_a_mount_namespace_without_it() {
    require_kvm!();
    // Hide /dev/kvm behind /dev/null in a private mount namespace (needs unshare and the
    // right to create one; skipped where either is missing).
    let script = format!(
        "mount --bind /dev/null /dev/kvm && exec {} run",
        minivmm_tests::vmm_bin().display()
    );
    let probe = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .output();
    if !matches!(probe, Ok(ref o) if o.status.success()) {
        println!("SKIPPED: cannot create a mount namespace (unshare -m)");
        return;
    }
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(std::process::Stdio::null());
    refused_cmd(cmd, &["run"], "/dev/kvm is not a KVM device");
}

#[test]
fn guest_garbage_does_not_bring_the_vmm_down() {
    require_kvm!();
    let guest = Running::spawn(vmm(&["run", "--cmdline", "chaos=20000 exit_after=3"]));
    let (status, lines, stderr) = guest.wait(Duration::from_secs(120));
    assert!(status.success(), "{status}; stderr: {stderr}");
    // The guest goes on after the garbage: it ticks (the ticks it missed while poking
    // are skipped) and resets, which ends the VMM with status 0.
    let done = lines
        .iter()
        .position(|l| l.starts_with("tiny: chaos done"))
        .unwrap_or_else(|| panic!("no `tiny: chaos done` in {lines:?}"));
    assert!(
        lines[done..].iter().any(|l| l.starts_with("tick ")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "tiny: reset"), "{lines:?}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
}
