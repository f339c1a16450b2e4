//! `vmm snapshot --to DIR` and `vmm run --restore DIR`: the dirtying tiny guest (with a
//! hot-added block) is snapshotted, paused; `DIR/memory` is sparse (its allocated size is
//! what the guest wrote, not its RAM); the restore maps it copy-on-write, and the guest
//! verifies ok and ticks on from where it was, with and without `--restore-prefault`; the
//! restored guest then live-migrates (its private copies of pages go along) and verifies
//! ok again; a truncated memory file, a bit-flipped, missing or swapped state are refused
//! with one clear line, before any guest runs.

use minivmm_tests::{require_kvm, ticks, vmm, vmm_status, wait_for_path, Running, Scratch};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn verified_after(guest: &mut Running, what: &str) {
    let seen = guest.seen().len();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let line = guest
            .next_line(deadline)
            .unwrap_or_else(|| panic!("no verify ok {what}: {:?}", guest.seen()));
        assert!(!line.contains("verify FAIL"), "{what}: {line}");
        if line.contains("verify ok") && guest.seen().len() > seen {
            return;
        }
    }
}

fn quit(api: &Path, guest: Running) {
    let _ = vmm(&["quit", "--api-socket", s(api)]).output();
    let (st, _, err) = guest.wait(Duration::from_secs(20));
    assert!(st.success(), "{err}");
}

/// Boots the dirtying guest with a hot-added block, snapshots it into `dir`; returns the
/// last tick it printed.
fn take_snapshot(d: &Scratch, dir: &Path) -> u64 {
    let api = d.path("src.api");
    let mut src = Running::spawn(vmm(&[
        "run",
        "--memory",
        "256M",
        "--cmdline",
        "dirty_mb=4",
        "--api-socket",
        s(&api),
    ]));
    verified_after(&mut src, "on the source");
    let out = vmm(&[
        "ram-add",
        "--api-socket",
        s(&api),
        "--id",
        "extra",
        "--size",
        "64M",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = vmm(&["snapshot", "--api-socket", s(&api), "--to", s(dir)])
        .output()
        .unwrap();
    assert!(out.status.success(), "vmm snapshot: {out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("snapshot: {stats}");
    assert_eq!(stats["blocks"], 2, "{stats}");
    assert_eq!(vmm_status(&api)["state"], "paused");
    let len = std::fs::metadata(dir.join("memory")).unwrap().len();
    assert!(len >= 320 << 20, "memory file of {len} bytes");
    // Sparse: what the guest wrote (4 MiB of pattern, the kernel, page tables), not RAM.
    let allocated = std::fs::metadata(dir.join("memory")).unwrap().blocks() * 512;
    assert!(
        (4 << 20..32 << 20).contains(&allocated),
        "{allocated} bytes allocated for a guest that wrote about 4 MiB"
    );
    // As reported (the file system may settle its allocation a little after the write).
    let reported = stats["allocated_bytes"].as_u64().unwrap();
    assert!(
        reported.abs_diff(allocated) <= 1 << 20,
        "{stats} vs {allocated}"
    );
    let last = ticks(src.seen()).last().copied().unwrap_or(0);
    quit(&api, src);
    last
}

/// A directory on /dev/shm, removed when dropped.
struct ShmDir(std::path::PathBuf);

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn restore(dir: &Path, api: &Path, extra: &[&str]) -> Running {
    let mut args = vec!["run", "--restore", s(dir), "--api-socket", s(api)];
    args.extend(extra);
    // The RAM list's debug lines tell how the boot RAM was made.
    let mut cmd = vmm(&args);
    cmd.env("VMM_LOG", "debug");
    Running::spawn(cmd)
}

#[test]
fn a_snapshot_restored_by_mapping_ticks_on_verifies_and_migrates() {
    require_kvm!();
    let d = Scratch::new("snap-restore");
    // On tmpfs: the memory file's holes are answered by SEEK_DATA there, and must not be
    // taken for the restored guest's pages (its writes are private copies).
    let shm = ShmDir(std::path::PathBuf::from(format!(
        "/dev/shm/vmm-snap-restore-{}",
        std::process::id()
    )));
    let dir = shm.0.clone();
    let last = take_snapshot(&d, &dir);
    for prefault in [false, true] {
        let api = d.path(&format!("restored-{prefault}.api"));
        let extra: &[&str] = if prefault {
            &["--restore-prefault"]
        } else {
            &[]
        };
        let mut g = restore(&dir, &api, extra);
        g.expect_line("a tick after the restore", TIMEOUT, |l| {
            l.starts_with("tick ")
        });
        verified_after(&mut g, "after the restore");
        let t = ticks(g.seen());
        assert!(
            t.first().is_some_and(|&f| f > last),
            "ticks {t:?} after {last}"
        );
        assert!(t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
        // Guest RAM is DIR/memory, mapped private: nothing of it was copied in.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", g.pid())).unwrap();
        let mapped: Vec<_> = maps
            .lines()
            .filter(|l| l.ends_with(&format!("{}/memory", dir.display())))
            .collect();
        assert_eq!(mapped.len(), 2, "{maps}");
        assert!(mapped.iter().all(|l| l.contains(" rw-p ")), "{mapped:?}");
        let st = vmm_status(&api);
        assert_eq!(st["state"], "running", "{st}");
        assert!(st["blocks"].to_string().contains("extra"), "{st}");
        if prefault {
            let _ = vmm(&["quit", "--api-socket", s(&api)]).output();
            let (st, _, err) = g.wait(Duration::from_secs(20));
            assert!(st.success(), "{err}");
            // The boot RAM was built from DIR/memory at once: one block made, none
            // freed (no anonymous RAM made, given a slot, and replaced).
            let made = err.matches("ramlist: added \"ram-below-4g\"").count();
            let freed = err.matches("ramlist: freed \"ram-below-4g\"").count();
            assert_eq!((made, freed), (1, 0), "{err}");
            continue;
        }
        // The restored guest's own writes live in private copies: a live migration must
        // carry them (the file's holes do not tell which pages it wrote).
        let (dst_api, mig) = (d.path("dst.api"), d.path("mig.sock"));
        let uri = format!("unix:{}", s(&mig));
        let mut dst = Running::spawn(vmm(&[
            "run",
            "--memory",
            "256M",
            "--api-socket",
            s(&dst_api),
            "--incoming",
            &uri,
        ]));
        wait_for_path(&mig, TIMEOUT);
        let out = vmm(&["migrate", "--api-socket", s(&api), "--to", &uri, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "migrate of a restored guest: {out:?}");
        let (st, _, err) = g.wait(Duration::from_secs(20));
        assert!(st.success(), "{err}");
        verified_after(&mut dst, "after migrating the restored guest");
        quit(&dst_api, dst);
    }
}

/// `vmm run --restore dir` fails with one line containing `want`, and no guest ran.
fn refused(dir: &Path, want: &str) {
    let out = vmm(&["run", "--restore", s(dir)]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restored {}: {err}", dir.display());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(want), "{want}: {err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("tick"), "a guest ran: {stdout}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["state", "memory"] {
        let st = std::process::Command::new("cp")
            .args(["--sparse=always", s(&from.join(f)), s(&to.join(f))])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

#[test]
fn truncated_bit_flipped_missing_and_swapped_snapshots_are_refused() {
    require_kvm!();
    let d = Scratch::new("snap-hostile");
    let good = d.path("good");
    take_snapshot(&d, &good);

    let cut = d.path("cut");
    copy_dir(&good, &cut);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(cut.join("memory"))
        .unwrap();
    f.set_len(f.metadata().unwrap().len() - 4096).unwrap();
    refused(&cut, "truncated or not this snapshot's memory");

    let flipped = d.path("flipped");
    copy_dir(&good, &flipped);
    let mut state = std::fs::read(flipped.join("state")).unwrap();
    let at = state.len() / 2;
    state[at] ^= 0x10;
    std::fs::write(flipped.join("state"), &state).unwrap();
    refused(&flipped, "checksum does not match");

    let cut_state = d.path("cut-state");
    copy_dir(&good, &cut_state);
    let state = std::fs::read(cut_state.join("state")).unwrap();
    std::fs::write(cut_state.join("state"), &state[..state.len() - 9]).unwrap();
    refused(&cut_state, "checksum");

    let missing = d.path("missing");
    copy_dir(&good, &missing);
    std::fs::remove_file(missing.join("state")).unwrap();
    refused(&missing, "opening");

    // Another snapshot's memory under this state: another length.
    let swapped = d.path("swapped");
    copy_dir(&good, &swapped);
    let other = std::fs::File::create(swapped.join("memory")).unwrap();
    other.set_len(256 << 20).unwrap();
    refused(&swapped, "holds 268435456 bytes");

    let junk = d.path("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("state"), b"MVMS\0\0\0\x01".repeat(8)).unwrap();
    std::fs::write(junk.join("memory"), b"").unwrap();
    refused(&junk, "not a snapshot state");
}

/// `vmm snapshot --diff-from BASE` on `api` into `dir`: its figures.
fn diff_snapshot(api: &Path, dir: &Path, base: &Path) -> serde_json::Value {
    let out = vmm(&[
        "snapshot",
        "--api-socket",
        s(api),
        "--to",
        s(dir),
        "--diff-from",
        s(base),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "vmm snapshot --diff-from: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn diff_snapshots_of_a_restored_guest_stack_and_restore_verified() {
    require_kvm!();
    let d = Scratch::new("snap-diff");
    let full = d.path("full");
    take_snapshot(&d, &full);
    let mut base = full.clone();
    let mut last_tick = 0;
    // Restore, run, diff; restore the stack, run, diff again; restore the three.
    for level in 1..=3 {
        let api = d.path(&format!("l{level}.api"));
        let mut g = restore(&base, &api, &[]);
        verified_after(&mut g, &format!("restored at level {level}"));
        let t = ticks(g.seen());
        assert!(
            t.first().is_some_and(|&f| f > last_tick),
            "{t:?} after {last_tick}"
        );
        last_tick = t.last().copied().unwrap_or(0);
        if level == 3 {
            quit(&api, g);
            break;
        }
        let diff = d.path(&format!("diff{level}"));
        let stats = diff_snapshot(&api, &diff, &base);
        println!("diff {level}: {stats}");
        assert_eq!(stats["diff"], true, "{stats}");
        let written = stats["pages_written"].as_u64().unwrap();
        // The pattern it rewrites (4 MiB), its stack and counters: not its 320 MiB.
        assert!((16..8192).contains(&written), "{written} pages in a diff");
        last_tick = ticks(g.seen()).last().copied().unwrap_or(last_tick);
        quit(&api, g);
        base = diff;
    }
}

#[test]
fn a_diff_needs_a_guest_restored_from_its_base() {
    require_kvm!();
    let d = Scratch::new("snap-diff-refused");
    let full = d.path("full");
    take_snapshot(&d, &full);
    // A guest that booted: no base it was restored from.
    let api = d.path("booted.api");
    let mut g = Running::spawn(vmm(&["run", "--api-socket", s(&api)]));
    g.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    let out = vmm(&[
        "snapshot",
        "--api-socket",
        s(&api),
        "--to",
        s(&d.path("diff")),
        "--diff-from",
        s(&full),
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("was not restored from that snapshot"), "{err}");
    assert_eq!(vmm_status(&api)["state"], "running");
    quit(&api, g);
    // A diff whose base was replaced since is refused at restore.
    let api = d.path("restored.api");
    let mut g = restore(&full, &api, &[]);
    g.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    let diff = d.path("diff");
    diff_snapshot(&api, &diff, &full);
    quit(&api, g);
    take_snapshot(&d, &full);
    refused(&diff, "it was replaced since");
}
