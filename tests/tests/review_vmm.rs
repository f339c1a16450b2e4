//! A user's attacks on live migration and snapshots, run against real `vmm` processes:
//! a `file:` target that would block forever (a FIFO nobody reads), who may read a
//! snapshot (it holds all of guest memory), a paused guest migrated (QEMU keeps it paused
//! on the destination), and a second destination started on the unix socket path a first
//! one still listens on.

use minivmm_tests::{api_request, require_kvm, vmm, Running, Scratch};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Guest code is emulated here; a loaded host may stall a child for seconds.
const TIMEOUT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 scratch path")
}

/// The tiny guest (idle) serving its API at `api`, once it ticks.
fn guest(api: &Path) -> Running {
    let mut g = Running::spawn(vmm(&["run", "--memory", "64M", "--api-socket", s(api)]));
    g.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    g
}

/// A destination for `guest` waiting on `uri`.
fn destination(uri: &str, api: &Path) -> Running {
    Running::spawn(vmm(&[
        "run",
        "--memory",
        "64M",
        "--api-socket",
        s(api),
        "--incoming",
        uri,
    ]))
}

fn state(api: &Path) -> Value {
    api_request(api, r#"{"cmd":"status"}"#)["state"].clone()
}

/// Polls `api`'s status until `pred` holds for it; returns it.
fn wait_status(api: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        if api.exists() {
            let st = api_request(api, r#"{"cmd":"status"}"#);
            if pred(&st) {
                return st;
            }
            assert!(t0.elapsed() < TIMEOUT, "never {what}: {st}");
        } else {
            assert!(t0.elapsed() < TIMEOUT, "never {what}: no {}", api.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vmm migrate --to file:FIFO` with nobody reading the FIFO: opening it for writing would
/// block forever, wedging the migration slot (every later `migrate` refused "already under
/// way", `status` showing `migrating`). It must fail at once, and the guest run on.
#[test]
fn a_snapshot_to_a_fifo_nobody_reads_fails_instead_of_hanging() {
    require_kvm!();
    let dir = Scratch::new("rv-fifo");
    let api = dir.path("api");
    let fifo = dir.path("fifo");
    let c = std::ffi::CString::new(s(&fifo)).expect("no NUL in the path");
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let _g = guest(&api);
    let uri = format!("file:{}", s(&fifo));
    let client = Running::spawn(vmm(&["migrate", "--api-socket", s(&api), "--to", &uri]));
    let (status, _, stderr) = client.wait(Duration::from_secs(8));
    assert!(
        !status.success(),
        "a snapshot into a FIFO nobody reads: {stderr}"
    );
    assert!(
        stderr.contains(s(&fifo)),
        "the error names the path: {stderr}"
    );
    assert_eq!(state(&api), "running", "the guest runs on");
    // The slot is free: a snapshot to a regular file goes through.
    let snap = dir.path("snap");
    let out = vmm(&["migrate", "--api-socket", s(&api), "--to"])
        .arg(format!("file:{}", s(&snap)))
        .output()
        .expect("running vmm migrate");
    assert!(out.status.success(), "{out:?}");
}

/// A snapshot holds every byte of guest memory: like the API socket (0600) it is for its
/// owner only, not world-readable as a plain `File::create` under umask 022 makes it.
#[test]
fn a_snapshot_file_is_readable_by_its_owner_only() {
    require_kvm!();
    let dir = Scratch::new("rv-mode");
    let api = dir.path("api");
    let snap = dir.path("snap");
    let _g = guest(&api);
    let out = vmm(&["migrate", "--api-socket", s(&api), "--to"])
        .arg(format!("file:{}", s(&snap)))
        .output()
        .expect("running vmm migrate");
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&snap)
        .expect("the snapshot exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "snapshot mode {:o}", mode & 0o777);
}

/// QEMU carries the run state: a guest paused on the source stays paused on the
/// destination, and `vmm resume` there lets it run on.
#[test]
fn a_paused_guest_migrates_and_stays_paused() {
    require_kvm!();
    let dir = Scratch::new("rv-paused");
    let api = dir.path("api");
    let dapi = dir.path("dapi");
    let sock = dir.path("mig");
    let _g = guest(&api);
    assert_eq!(
        api_request(&api, r#"{"cmd":"pause"}"#)["state"],
        "paused",
        "pause"
    );
    let uri = format!("unix:{}", s(&sock));
    let mut d = destination(&uri, &dapi);
    minivmm_tests::wait_for_path(&sock, TIMEOUT);
    let out = vmm(&["migrate", "--api-socket", s(&api), "--to", &uri])
        .output()
        .expect("running vmm migrate");
    assert!(out.status.success(), "{out:?}");
    let st = wait_status(&dapi, "the guest started", |st| {
        st["incoming"]["stage"] == "completed"
    });
    assert_eq!(
        st["state"], "paused",
        "destination after a paused source: {st}"
    );
    // Paused means paused: no tick comes (the guest ticks every 100 ms) ...
    let quiet = std::time::Instant::now() + Duration::from_millis(700);
    while let Some(l) = d.next_line(quiet) {
        assert!(!l.starts_with("tick "), "a paused guest ticked: {l}");
    }
    // ... until `resume` lets it run on.
    assert_eq!(
        api_request(&dapi, r#"{"cmd":"resume"}"#)["state"],
        "running"
    );
    d.expect_line("a tick after resume", TIMEOUT, |l| l.starts_with("tick "));
}

/// A second destination started on the unix socket path a first one listens on: the API
/// socket refuses a live path ("in use"), but `--incoming unix:` unlinked it and bound
/// its own, orphaning the first destination (waiting forever, unreachable), and removed
/// the path on exit. It must be refused, and the first destination still receive.
#[test]
fn a_second_destination_on_a_listening_unix_path_is_refused() {
    require_kvm!();
    let dir = Scratch::new("rv-inuse");
    let api = dir.path("api");
    let sock = dir.path("mig");
    let uri = format!("unix:{}", s(&sock));
    let _first = destination(&uri, &dir.path("dapi1"));
    minivmm_tests::wait_for_path(&sock, TIMEOUT);
    let second = destination(&uri, &dir.path("dapi2"));
    let (status, _, stderr) = second.wait(Duration::from_secs(8));
    assert!(!status.success(), "the second destination: {stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(
        sock.exists(),
        "the first destination's socket is still there"
    );
    let _g = guest(&api);
    let out = vmm(&["migrate", "--api-socket", s(&api), "--to", &uri])
        .output()
        .expect("running vmm migrate");
    assert!(
        out.status.success(),
        "the first destination received: {out:?}"
    );
}

/// `vmm status | head -3`: the reader leaves before the client writes all of its answer.
/// The client panicked ("failed printing to stdout: Broken pipe", a backtrace, exit 101);
/// a reader that left is no error: the answer was had, nothing is printed on stderr.
#[test]
fn a_client_whose_reader_left_exits_quietly() {
    require_kvm!();
    let dir = Scratch::new("rv-pipe");
    let api = dir.path("api");
    let _g = guest(&api);
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: pipe(2) just returned these two descriptors, owned by nothing else.
    let (read_end, write_end) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(read_end);
    let out = vmm(&["status", "--api-socket", s(&api)])
        .stdout(std::process::Stdio::from(write_end))
        .output()
        .expect("running vmm status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

/// Source and destination started with different `--vcpus`: the destination fails (the
/// source runs on), saying so, not "unknown state component \"cpu1\"" / "no state for
/// component \"cpu1\"", which leaves a user to guess.
#[test]
fn a_vcpu_count_mismatch_is_named_as_such() {
    require_kvm!();
    for (src_vcpus, dst_vcpus) in [("2", "1"), ("1", "2")] {
        let dir = Scratch::new(&format!("rv-vcpus{src_vcpus}"));
        let api = dir.path("api");
        let sock = dir.path("mig");
        let mut g = Running::spawn(vmm(&[
            "run",
            "--memory",
            "64M",
            "--vcpus",
            src_vcpus,
            "--api-socket",
            s(&api),
        ]));
        g.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
        let uri = format!("unix:{}", s(&sock));
        let d = Running::spawn(vmm(&[
            "run",
            "--memory",
            "64M",
            "--vcpus",
            dst_vcpus,
            "--incoming",
            &uri,
        ]));
        minivmm_tests::wait_for_path(&sock, TIMEOUT);
        let out = vmm(&["migrate", "--api-socket", s(&api), "--to", &uri])
            .output()
            .expect("running vmm migrate");
        assert!(!out.status.success(), "{out:?}");
        let (status, _, stderr) = d.wait(TIMEOUT);
        assert!(!status.success(), "{stderr}");
        let want = format!("the state has {src_vcpus} vCPUs, the VM {dst_vcpus}");
        assert!(stderr.contains(&want), "{stderr}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&want),
            "{out:?}"
        );
        assert_eq!(state(&api), "running", "the source runs on");
    }
}

/// A migration of a paused guest that fails: the guest stays paused (the user paused it),
/// and the source's log must say so rather than "the guest runs on".
#[test]
fn a_failed_migration_of_a_paused_guest_says_it_stays_paused() {
    require_kvm!();
    let dir = Scratch::new("rv-pausedfail");
    let api = dir.path("api");
    let g = guest(&api);
    assert_eq!(api_request(&api, r#"{"cmd":"pause"}"#)["state"], "paused");
    let nobody = format!("unix:{}", s(&dir.path("nobody")));
    let out = vmm(&["migrate", "--api-socket", s(&api), "--to", &nobody])
        .output()
        .expect("running vmm migrate");
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(state(&api), "paused");
    assert_eq!(api_request(&api, r#"{"cmd":"quit"}"#)["ok"], true);
    let (_, _, stderr) = g.wait(TIMEOUT);
    let line = stderr
        .lines()
        .find(|l| l.contains("failed") && l.contains(&nobody))
        .unwrap_or_else(|| panic!("no failure line: {stderr}"));
    assert!(line.ends_with("the guest stays paused"), "{line}");
}

/// `ram-add` of a block larger than a migration destination accepts (64 GiB) was taken,
/// and the VM then could not move: `vmm migrate --to file:` even wrote a snapshot that
/// no destination restores ("over the limit of 0x1000000000"). The source refuses it.
#[test]
fn a_block_no_destination_accepts_is_refused_at_ram_add() {
    require_kvm!();
    let dir = Scratch::new("rv-huge");
    let api = dir.path("api");
    let _g = guest(&api);
    let a = api_request(&api, r#"{"cmd":"ram-add","id":"huge","size":"1T"}"#);
    assert_eq!(a["ok"], false, "{a}");
    assert_eq!(a["class"], "bad-size", "{a}");
    let st = api_request(&api, r#"{"cmd":"status"}"#);
    let blocks = st["blocks"].as_array().expect("a block list");
    assert!(blocks.iter().all(|b| b["id"] != "huge"), "{st}");
}

/// `vmm migrate --to file:snap` run in one directory against a VMM started in another:
/// `--api-socket` is taken from the client's directory, and so must `--to` be (as `cp`
/// would), not from the VMM's, where the snapshot silently landed.
#[test]
fn a_relative_snapshot_path_is_the_clients() {
    require_kvm!();
    let dir = Scratch::new("rv-rel");
    let (vmm_dir, client_dir) = (dir.path("vmm"), dir.path("client"));
    for d in [&vmm_dir, &client_dir] {
        std::fs::create_dir(d).expect("creating a directory");
    }
    let api = dir.path("api");
    let mut cmd = vmm(&["run", "--memory", "64M", "--api-socket", s(&api)]);
    cmd.current_dir(&vmm_dir);
    let mut g = Running::spawn(cmd);
    g.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    let out = vmm(&["migrate", "--api-socket", s(&api), "--to", "file:snap"])
        .current_dir(&client_dir)
        .output()
        .expect("running vmm migrate");
    assert!(out.status.success(), "{out:?}");
    assert!(
        client_dir.join("snap").exists(),
        "not in the client's directory"
    );
    assert!(!vmm_dir.join("snap").exists(), "in the VMM's directory");
}
