//! Bad `vmm run` input ends with one clear line on stderr and a non-zero status, never a
//! panic.

use minivmm_tests::{require_kvm, vmm, Running};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `vmm` with `args`; asserts a failure with one `vmm: ` line containing `expect`.
fn refused(args: &[&str], expect: &str) {
    let (status, lines, stderr) = Running::spawn(vmm(args)).wait(TIMEOUT);
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
