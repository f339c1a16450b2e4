//! An outside review's reproductions for `vmm snapshot --to DIR [--diff-from BASE]` and
//! `vmm run --restore DIR` (commits dcb2952, 4e86faf, a23c3fb), kept as regression tests:
//! each failed on a23c3fb, where the problem it names was found.
//!
//! 1. `--diff-from BASE --to BASE` is accepted: BASE is replaced by a diff naming itself
//!    as its parent, and can never be restored again.
//! 2. A 17th stacked diff is written (`ok`), and `--restore` then refuses it.
//! 3. A FIFO in a snapshot directory is waited on: `--restore` hangs on DIR/state or
//!    DIR/memory, and `--diff-from BASE` (BASE/state a FIFO) or a FIFO at
//!    DIR/.memory.tmp wedges the VMM's main loop (API and SIGTERM unanswered).
//! 4. A symlink planted at DIR/.memory.tmp is followed: the file it names is overwritten
//!    with guest memory, and DIR/memory becomes that symlink.
//! 5. DIR/memory (all of guest RAM) is created world-readable (0644 under umask 022),
//!    unlike a `file:` snapshot (0600).
//! 6. A failed snapshot replaces DIR/memory but not DIR/state: the old state now sits beside
//!    the new memory, and that pair restores (the guest prints `verify FAIL`).
//! 7. Another snapshot's memory of the same length under a state is restored (README:
//!    "a swapped ... snapshot is one line of error").
//! 8. A hot-added block of 512 GiB in a crafted state is mapped (ram-add refuses more than
//!    64 GiB a block, and all guest RAM beyond the host's RAM and swap).
//! 9. DIR/memory shrunk under a restored (paused) guest: `vmm snapshot` of it kills the
//!    VMM with SIGBUS (the guest is lost).

use minivmm_tests::{api_request, require_kvm, vmm, vmm_status, wait_for_path, Running, Scratch};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A guest booted with `--cmdline dirty_mb=4` on `api`, once it verified memory once.
fn boot(api: &Path) -> Running {
    let mut g = Running::spawn(vmm(&[
        "run",
        "--memory",
        "256M",
        "--cmdline",
        "dirty_mb=4",
        "--api-socket",
        s(api),
    ]));
    g.expect_line("verify ok", TIMEOUT, |l| l.contains("verify ok"));
    g
}

fn restore(dir: &Path, api: &Path) -> Running {
    let g = Running::spawn(vmm(&["run", "--restore", s(dir), "--api-socket", s(api)]));
    wait_for_path(api, TIMEOUT);
    g
}

fn snapshot(api: &Path, to: &Path, base: Option<&Path>) -> std::process::Output {
    let mut args = vec!["snapshot", "--api-socket", s(api), "--to", s(to)];
    if let Some(b) = base {
        args.extend(["--diff-from", s(b)]);
    }
    vmm(&args).output().unwrap()
}

fn quit(api: &Path, g: Running) {
    let _ = vmm(&["quit", "--api-socket", s(api)]).output();
    let _ = g.wait(Duration::from_secs(20));
}

/// A full snapshot of a freshly booted dirtying guest in `dir`.
fn full_snapshot(d: &Scratch, dir: &Path) {
    let api = d.path("boot.api");
    let g = boot(&api);
    let out = snapshot(&api, dir, None);
    assert!(out.status.success(), "{out:?}");
    quit(&api, g);
}

/// `vmm run --restore dir`: whether a guest ran (a tick or verify line within 10 s), and
/// its stdout and stderr.
fn restores(dir: &Path) -> (bool, String, String) {
    let mut g = Running::spawn(vmm(&["run", "--restore", s(dir)]));
    let ran = g
        .expect_line_opt(Instant::now() + Duration::from_secs(10))
        .is_some();
    let seen = g.seen().join("\n");
    if !ran && !g.is_running() {
        let (_, _, err) = g.wait(Duration::from_secs(5));
        return (ran, format!("{seen}{}", err.trim()), err);
    }
    drop(g);
    (ran, seen, String::new())
}

trait ExpectOpt {
    fn expect_line_opt(&mut self, deadline: Instant) -> Option<String>;
}

impl ExpectOpt for Running {
    fn expect_line_opt(&mut self, deadline: Instant) -> Option<String> {
        while let Some(l) = self.next_line(deadline) {
            if l.contains("tick") || l.contains("verify") {
                return Some(l);
            }
        }
        None
    }
}

// ---- DIR/state, as docs/stream.md gives it (enough of it to craft hostile ones) ----

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

struct State {
    head: Vec<u8>, // magic, version, page size
    id: u64,
    memory_len: u64,
    parent: (u64, String),
    blocks: Vec<(String, u64, u64, u64, u8)>,
    rest: Vec<u8>, // state count and states
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

impl State {
    fn read(dir: &Path) -> State {
        let b = std::fs::read(dir.join("state")).unwrap();
        let body = &b[..b.len() - 4];
        let plen = usize::from(u16::from_be_bytes([body[36], body[37]]));
        let pdir = String::from_utf8(body[38..38 + plen].to_vec()).unwrap();
        let mut at = 38 + plen;
        let n = u32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        let mut blocks = Vec::new();
        for _ in 0..n {
            let l = usize::from(body[at]);
            let id = String::from_utf8(body[at + 1..at + 1 + l].to_vec()).unwrap();
            at += 1 + l;
            blocks.push((
                id,
                be64(body, at),
                be64(body, at + 8),
                be64(body, at + 16),
                body[at + 24],
            ));
            at += 25;
        }
        State {
            head: body[..12].to_vec(),
            id: be64(body, 12),
            memory_len: be64(body, 20),
            parent: (be64(body, 28), pdir),
            blocks,
            rest: body[at..].to_vec(),
        }
    }

    fn write(&self, dir: &Path) {
        let mut o = self.head.clone();
        o.extend(self.id.to_be_bytes());
        o.extend(self.memory_len.to_be_bytes());
        o.extend(self.parent.0.to_be_bytes());
        o.extend((self.parent.1.len() as u16).to_be_bytes());
        o.extend(self.parent.1.as_bytes());
        o.extend((self.blocks.len() as u32).to_be_bytes());
        for (id, len, addr, off, flags) in &self.blocks {
            o.push(id.len() as u8);
            o.extend(id.as_bytes());
            o.extend(len.to_be_bytes());
            o.extend(addr.to_be_bytes());
            o.extend(off.to_be_bytes());
            o.push(*flags);
        }
        o.extend(&self.rest);
        let crc = crc32(&o);
        o.extend(crc.to_be_bytes());
        std::fs::write(dir.join("state"), o).unwrap();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["state", "memory"] {
        let st = Command::new("cp")
            .args(["--sparse=always", s(&from.join(f)), s(&to.join(f))])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

// ---- the reproductions ----

#[test]
fn review_a_diff_into_its_own_base_is_refused() {
    require_kvm!();
    let d = Scratch::new("review-snap-self-diff");
    let base = d.path("base");
    full_snapshot(&d, &base);
    let api = d.path("r.api");
    let g = restore(&base, &api);
    let out = snapshot(&api, &base, Some(&base));
    quit(&api, g);
    if out.status.success() {
        // Taken: then BASE must still be a snapshot one can restore.
        let (ran, seen, _) = restores(&base);
        assert!(
            ran,
            "`vmm snapshot --to BASE --diff-from BASE` answered {:?} and BASE no longer restores: {seen}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn review_a_seventeenth_stacked_diff_is_refused_when_taken() {
    require_kvm!();
    let d = Scratch::new("review-snap-17");
    let full = d.path("d00");
    full_snapshot(&d, &full);
    // 15 empty diffs on it (a diff with no page written: "as in the parent").
    let mut prev = full.clone();
    for k in 1..16 {
        let dir = d.path(&format!("d{k:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut st = State::read(&prev);
        st.parent = (st.id, s(&prev).to_string());
        st.id = st.id.wrapping_mul(6364136223846793005).wrapping_add(k) | 1;
        st.write(&dir);
        let m = std::fs::File::create(dir.join("memory")).unwrap();
        m.set_len(st.memory_len).unwrap();
        // The last page names the snapshot (since a23c3fb's review).
        let mut trailer = b"MVSM".to_vec();
        trailer.extend_from_slice(&st.id.to_be_bytes());
        std::os::unix::fs::FileExt::write_all_at(&m, &trailer, st.memory_len - 4096).unwrap();
        prev = dir;
    }
    let api = d.path("r.api");
    let g = restore(&prev, &api);
    let top = d.path("d16");
    let out = snapshot(&api, &top, Some(&prev));
    quit(&api, g);
    if out.status.success() {
        let (ran, seen, _) = restores(&top);
        assert!(
            ran,
            "a 17th diff was written ({}) but cannot be restored: {seen}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn review_a_fifo_in_a_snapshot_dir_is_refused_not_waited_on() {
    require_kvm!();
    let d = Scratch::new("review-snap-fifo");
    let good = d.path("good");
    full_snapshot(&d, &good);
    for f in ["state", "memory"] {
        let dir = d.path(&format!("fifo-{f}"));
        copy_dir(&good, &dir);
        std::fs::remove_file(dir.join(f)).unwrap();
        mkfifo(&dir.join(f));
        let g = Running::spawn(vmm(&["run", "--restore", s(&dir)]));
        let t0 = Instant::now();
        let (st, _, err) = {
            let mut g = g;
            while g.is_running() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                !g.is_running(),
                "vmm run --restore still waits on DIR/{f}, a FIFO, after 10 s"
            );
            g.wait(Duration::from_secs(1))
        };
        assert!(!st.success(), "{err}");
    }
}

#[test]
fn review_a_fifo_base_does_not_wedge_the_vmm() {
    require_kvm!();
    let d = Scratch::new("review-snap-fifo-base");
    let good = d.path("good");
    full_snapshot(&d, &good);
    let bad = d.path("bad");
    copy_dir(&good, &bad);
    std::fs::remove_file(bad.join("state")).unwrap();
    mkfifo(&bad.join("state"));
    let api = d.path("r.api");
    let g = restore(&good, &api);
    let client = Running::spawn(vmm(&[
        "snapshot",
        "--api-socket",
        s(&api),
        "--to",
        s(&d.path("x")),
        "--diff-from",
        s(&bad),
    ]));
    std::thread::sleep(Duration::from_secs(8));
    let mut client = client;
    let answered = !client.is_running();
    // Unblock the VMM before asserting, so the scratch can go.
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags_nonblock()
        .open(bad.join("state"));
    drop(client);
    quit(&api, g);
    assert!(
        answered,
        "`vmm snapshot --diff-from BASE` with BASE/state a FIFO: no answer in 8 s (the VMM's main loop waits in open)"
    );
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

#[test]
fn review_a_fifo_at_the_temporary_name_does_not_wedge_the_vmm() {
    require_kvm!();
    let d = Scratch::new("review-snap-fifo-tmp");
    let api = d.path("a.api");
    let g = boot(&api);
    let dir = d.path("snap");
    std::fs::create_dir_all(&dir).unwrap();
    mkfifo(&dir.join(".memory.tmp"));
    let mut client = Running::spawn(vmm(&["snapshot", "--api-socket", s(&api), "--to", s(&dir)]));
    std::thread::sleep(Duration::from_secs(8));
    let answered = !client.is_running();
    // Unblock it: a reader for the FIFO.
    let _ = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblock()
        .open(dir.join(".memory.tmp"));
    drop(client);
    quit(&api, g);
    assert!(
        answered,
        "`vmm snapshot --to DIR` with DIR/.memory.tmp a FIFO: no answer in 8 s"
    );
}

#[test]
fn review_a_planted_symlink_is_not_followed() {
    require_kvm!();
    let d = Scratch::new("review-snap-symlink");
    let victim = d.path("victim");
    std::fs::write(&victim, b"precious\n").unwrap();
    let dir = d.path("snap");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join(".memory.tmp")).unwrap();
    let api = d.path("a.api");
    let g = boot(&api);
    let out = snapshot(&api, &dir, None);
    quit(&api, g);
    let now = std::fs::read(&victim).unwrap();
    assert!(
        now == b"precious\n",
        "a symlink at DIR/.memory.tmp was followed: the file it names now holds {} bytes of guest memory (snapshot answered {:?})",
        now.len(),
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn review_snapshot_memory_is_not_world_readable() {
    require_kvm!();
    let d = Scratch::new("review-snap-mode");
    let dir = d.path("snap");
    full_snapshot(&d, &dir);
    for f in ["memory", "state"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o077,
            0,
            "DIR/{f} (guest memory and CPU state) is mode {mode:o}; a file: snapshot is 0600"
        );
    }
}

#[test]
fn review_a_failed_snapshot_replaces_nothing() {
    require_kvm!();
    let d = Scratch::new("review-snap-half");
    let dir = d.path("snap");
    let api = d.path("a.api");
    let g = boot(&api);
    assert!(snapshot(&api, &dir, None).status.success());
    let before = std::fs::read(dir.join("memory")).unwrap();
    assert!(vmm(&["resume", "--api-socket", s(&api)])
        .output()
        .unwrap()
        .status
        .success());
    std::thread::sleep(Duration::from_secs(3));
    // DIR/state cannot be replaced (immutable): the second snapshot fails at its last step.
    let chattr = |flag: &str| {
        Command::new("chattr")
            .args([flag, s(&dir.join("state"))])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !chattr("+i") {
        println!("SKIPPED: chattr +i not possible here");
        quit(&api, g);
        return;
    }
    let out = snapshot(&api, &dir, None);
    chattr("-i");
    quit(&api, g);
    assert!(!out.status.success(), "{out:?}");
    let after = std::fs::read(dir.join("memory")).unwrap();
    assert!(
        before == after,
        "the snapshot failed ({}) but DIR/memory was replaced, beside the old DIR/state",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

#[test]
fn review_another_snapshots_memory_of_the_same_length_is_refused() {
    require_kvm!();
    let d = Scratch::new("review-snap-swap");
    let (a, b) = (d.path("a"), d.path("b"));
    // Two snapshots of one layout, taken 3 s apart: their memories differ.
    let api = d.path("a.api");
    let g = boot(&api);
    assert!(snapshot(&api, &a, None).status.success());
    let _ = vmm(&["resume", "--api-socket", s(&api)]).output();
    std::thread::sleep(Duration::from_secs(3));
    assert!(snapshot(&api, &b, None).status.success());
    quit(&api, g);
    let swapped = d.path("swapped");
    std::fs::create_dir_all(&swapped).unwrap();
    std::fs::copy(b.join("state"), swapped.join("state")).unwrap();
    copy_dir(&a, &d.path("tmp"));
    std::fs::rename(d.path("tmp").join("memory"), swapped.join("memory")).unwrap();
    let (ran, seen, _) = restores(&swapped);
    assert!(
        !ran,
        "b's state over a's memory (same length) was restored: {seen}"
    );
}

#[test]
fn review_a_restored_hot_added_block_obeys_the_ram_limits() {
    require_kvm!();
    let d = Scratch::new("review-snap-huge");
    let dir = d.path("snap");
    full_snapshot(&d, &dir);
    let mut st = State::read(&dir);
    let huge = 512u64 << 30;
    let off = st.memory_len;
    st.blocks.push(("extra".into(), huge, 1 << 40, off, 1));
    st.memory_len += huge;
    st.write(&dir);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap()
        .set_len(st.memory_len)
        .unwrap();
    let api = d.path("r.api");
    let mut g = Running::spawn(vmm(&["run", "--restore", s(&dir), "--api-socket", s(&api)]));
    let t0 = Instant::now();
    while !api.exists() && g.is_running() && t0.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(20));
    }
    if g.is_running() && api.exists() {
        let st = vmm_status(&api);
        quit(&api, g);
        panic!(
            "a 512 GiB hot-added block was restored (ram-add refuses over 64 GiB): memory_bytes {}",
            st["memory_bytes"]
        );
    }
}

#[test]
fn review_a_memory_file_shrunk_under_a_restored_guest_does_not_kill_it() {
    require_kvm!();
    let d = Scratch::new("review-snap-shrunk");
    let dir = d.path("snap");
    full_snapshot(&d, &dir);
    let api = d.path("r.api");
    let mut g = restore(&dir, &api);
    let a = api_request(&api, r#"{"cmd":"pause"}"#);
    assert_eq!(a["ok"], true, "{a}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let out = snapshot(&api, &d.path("again"), None);
    std::thread::sleep(Duration::from_millis(500));
    let alive = g.is_running();
    let (status, _, err) = if alive {
        quit(&api, g);
        return;
    } else {
        g.wait(Duration::from_secs(5))
    };
    panic!(
        "the VMM died ({status:?}) when `vmm snapshot` read a restored guest whose DIR/memory shrank: {:?} {err}",
        String::from_utf8_lossy(&out.stderr)
    );
}
