//! The control API of a running `vmm run --api-socket PATH`, through the thin clients
//! (`vmm status|pause|resume|quit|ram-add|ram-remove`) and raw on the socket: every
//! command, every bad request, hostile clients, and that the guest ticks on throughout.

use minivmm_tests::{have_kvm, require_kvm, ticks, vmm, Running};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Guest code is emulated here; a loaded host may stall a child for seconds.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A scratch directory for one test's socket, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("vmm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("api")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A booted guest serving its API at `socket`.
fn boot(socket: &Path, env: &[(&str, &str)]) -> Running {
    let mut cmd = vmm(&["run", "--memory", "128M", "--api-socket"]);
    cmd.arg(socket);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut guest = Running::spawn(cmd);
    guest.expect_line("`tiny: boot`", TIMEOUT, |l| l.contains("tiny: boot"));
    guest
}

/// `vmm ARGS --api-socket SOCKET`: (exit success, stdout, stderr).
fn client(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let out = vmm(args)
        .arg("--api-socket")
        .arg(socket)
        .output()
        .expect("running the vmm client");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The answer of a client that must succeed.
fn ok(socket: &Path, args: &[&str]) -> Value {
    let (success, out, err) = client(socket, args);
    assert!(success, "vmm {args:?} failed: {err}");
    assert!(err.is_empty(), "vmm {args:?} wrote to stderr: {err}");
    let v: Value = serde_json::from_str(&out).expect("the answer is JSON");
    assert_eq!(v["ok"], true, "{v}");
    v
}

/// A client that must be refused: one `vmm: ` line on stderr containing `expect`.
fn refused(socket: &Path, args: &[&str], expect: &str) {
    let (success, out, err) = client(socket, args);
    assert!(!success, "vmm {args:?} succeeded: {out}");
    assert!(out.is_empty(), "vmm {args:?} printed {out}");
    assert_eq!(err.lines().count(), 1, "vmm {args:?}: {err}");
    assert!(
        err.starts_with("vmm: ") && err.contains(expect),
        "{args:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A raw connection to the socket.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(socket: &Path) -> Raw {
        let stream = UnixStream::connect(socket).expect("connecting to the api socket");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Raw {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    /// The next answer line, parsed; None at the end of the stream.
    fn answer(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("an answer is JSON")),
        }
    }

    fn ask(&mut self, bytes: &[u8]) -> Value {
        self.stream.write_all(bytes).unwrap();
        self.answer().expect("an answer")
    }
}

fn error_class(v: &Value) -> &str {
    assert_eq!(v["ok"], false, "{v}");
    assert!(!v["error"].as_str().unwrap_or("").is_empty(), "{v}");
    v["class"].as_str().unwrap_or("")
}

/// Waits for the guest's next tick: it still runs.
fn ticks_on(guest: &mut Running) -> u64 {
    let line = guest.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    line["tick ".len()..].trim().parse().expect("a tick number")
}

#[test]
fn status_pause_resume_quit() {
    require_kvm!();
    let dir = Scratch::new("cmds");
    let sock = dir.socket();
    let mut guest = boot(&sock, &[]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let st = ok(&sock, &["status"]);
    assert_eq!(st["state"], "running");
    assert_eq!(st["vcpus"], 1);
    assert_eq!(st["memory_bytes"], 128u64 << 20);
    assert_eq!(st["blocks"][0]["id"], "ram-below-4g");
    assert_eq!(st["blocks"][0]["size"], 128u64 << 20);

    ticks_on(&mut guest);
    assert_eq!(ok(&sock, &["pause"])["state"], "paused");
    assert_eq!(ok(&sock, &["status"])["state"], "paused");
    // A tick already on its way may still arrive; after that, silence.
    while guest
        .next_line(Instant::now() + Duration::from_millis(300))
        .is_some()
    {}
    let before = ticks(guest.seen()).last().copied();
    let quiet = guest.next_line(Instant::now() + Duration::from_millis(1500));
    assert_eq!(quiet, None, "the guest printed while paused");
    assert_eq!(
        ok(&sock, &["pause"])["state"],
        "paused",
        "pause is idempotent"
    );

    assert_eq!(ok(&sock, &["resume"])["state"], "running");
    assert_eq!(ok(&sock, &["status"])["state"], "running");
    let after = ticks_on(&mut guest);
    assert!(Some(after) > before, "tick {after} after {before:?}");

    assert_eq!(ok(&sock, &["quit"])["ok"], true);
    let (status, _, stderr) = guest.wait(TIMEOUT);
    assert!(status.success(), "{status}: {stderr}");
    assert!(!sock.exists(), "the socket file stays after quit");
    refused(&sock, &["status"], "cannot connect to api socket");
}

#[test]
fn two_vcpus_pause_and_quit_while_paused() {
    require_kvm!();
    let dir = Scratch::new("quit-paused");
    let sock = dir.socket();
    let mut cmd = vmm(&["run", "--vcpus", "2", "--api-socket"]);
    cmd.arg(&sock);
    let mut guest = Running::spawn(cmd);
    guest.expect_line("`tiny: boot`", TIMEOUT, |l| l.contains("tiny: boot"));
    ticks_on(&mut guest);
    assert_eq!(ok(&sock, &["pause"])["state"], "paused");
    assert_eq!(ok(&sock, &["status"])["vcpus"], 2);
    assert_eq!(ok(&sock, &["quit"])["state"], "stopping");
    let (status, _, stderr) = guest.wait(TIMEOUT);
    assert!(status.success(), "{status}: {stderr}");
}

#[test]
fn ram_hot_add_and_remove_give_memory_back() {
    require_kvm!();
    let dir = Scratch::new("ram");
    let sock = dir.socket();
    let mut guest = boot(&sock, &[]);
    for (id, size) in [("a", "16M"), ("b", "32M")] {
        let v = ok(&sock, &["ram-add", "--id", id, "--size", size]);
        assert_eq!(v["id"], id);
        assert!(v["guest_addr"].as_u64().unwrap() >= 1 << 32, "{v}");
    }
    ok(&sock, &["ram-add", "--id", "big", "--size", "1G"]);
    let st = ok(&sock, &["status"]);
    let sizes: Vec<(String, u64)> = st["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap().to_string(),
                b["size"].as_u64().unwrap(),
            )
        })
        .collect();
    for want in [("big", 1u64 << 30), ("a", 16 << 20), ("b", 32 << 20)] {
        assert!(sizes.contains(&(want.0.to_string(), want.1)), "{sizes:?}");
    }
    assert_eq!(st["memory_bytes"], (128u64 + 16 + 32 + 1024) << 20);

    let guest_pid = guest.pid();
    let vm_size = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", guest_pid)).unwrap();
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        kb.expect("VmSize in /proc/PID/status")
    };
    let before = vm_size();
    ok(&sock, &["ram-remove", "--id", "big"]);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut dropped_mib = 0;
    while Instant::now() < deadline {
        dropped_mib = before.saturating_sub(vm_size()) / 1024;
        if dropped_mib >= 1000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        dropped_mib >= 1000,
        "VmSize fell by only {dropped_mib} MiB in 3 s"
    );
    ok(&sock, &["ram-remove", "--id", "a"]);
    let ids: Vec<String> = ok(&sock, &["status"])["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["ram-below-4g", "b"]);
    // The id is free again, and the guest ran on throughout.
    ok(&sock, &["ram-add", "--id", "big", "--size", "64M"]);
    let t = ticks_on(&mut guest);
    assert!(ticks_on(&mut guest) > t);
}

#[test]
fn bad_requests_are_refused_and_the_guest_runs_on() {
    require_kvm!();
    let dir = Scratch::new("bad");
    let sock = dir.socket();
    let mut guest = boot(&sock, &[]);
    ok(&sock, &["ram-add", "--id", "dup", "--size", "4096"]);
    refused(
        &sock,
        &["ram-add", "--id", "dup", "--size", "8K"],
        "already in use",
    );
    refused(
        &sock,
        &["ram-add", "--id", "z", "--size", "0"],
        "size is zero",
    );
    refused(
        &sock,
        &["ram-add", "--id", "u", "--size", "4097"],
        "not a multiple of the page size",
    );
    refused(
        &sock,
        &["ram-add", "--id", "x", "--size", "12X"],
        "bad size",
    );
    refused(&sock, &["ram-remove", "--id", "nosuch"], "nosuch");
    refused(
        &sock,
        &["ram-remove", "--id", "ram-below-4g"],
        "boot RAM and cannot be removed",
    );
    refused(
        &sock,
        &["ram-add", "--id", "ram-above-4g", "--size", "4096"],
        "reserved",
    );

    let mut raw = Raw::connect(&sock);
    assert_eq!(
        error_class(&raw.ask(b"{\"cmd\": \"ram-add\", \"id\": \n")),
        "malformed-json"
    );
    assert_eq!(
        error_class(&raw.ask(b"{\"cmd\":\"reboot\"}\n")),
        "unknown-command"
    );
    assert_eq!(error_class(&raw.ask(b"[\"status\"]\n")), "not-a-request");
    assert_eq!(
        error_class(&raw.ask(b"{\"cmd\":\"ram-add\",\"id\":\"s\",\"size\":-4096}\n")),
        "bad-argument"
    );
    assert_eq!(
        error_class(&raw.ask(b"{\"cmd\":\"ram-add\",\"id\":\"dup\",\"size\":4096}\n")),
        "duplicate-id"
    );
    assert_eq!(
        error_class(&raw.ask(b"{\"cmd\":\"ram-remove\",\"id\":\"nosuch\"}\n")),
        "unknown-id"
    );
    // The same connection still works after all of that.
    assert_eq!(raw.ask(b"{\"cmd\":\"status\"}\n")["ok"], true);

    // An oversized line: an error, then the connection is dropped.
    let mut long = Raw::connect(&sock);
    let mut line = vec![b' '; 100 << 10];
    line.push(b'\n');
    // The server may close while we still send; a broken pipe is expected then.
    let _ = long.stream.write_all(&line);
    assert_eq!(error_class(&long.answer().unwrap()), "line-too-long");
    assert!(long.answer().is_none(), "the client was not dropped");

    assert_eq!(ok(&sock, &["status"])["state"], "running");
    ticks_on(&mut guest);
    assert!(guest.is_running());
}

#[test]
fn a_silent_client_blocks_nobody_and_is_dropped() {
    require_kvm!();
    let dir = Scratch::new("silent");
    let sock = dir.socket();
    let mut guest = boot(&sock, &[("VMM_API_IDLE_TIMEOUT_MS", "1000")]);
    let mut silent = Raw::connect(&sock);
    silent.stream.write_all(b"{\"cmd\":").unwrap();
    let mut mute = Raw::connect(&sock);
    // Others are served meanwhile.
    for _ in 0..3 {
        assert_eq!(ok(&sock, &["status"])["state"], "running");
    }
    assert_eq!(error_class(&silent.answer().unwrap()), "idle-timeout");
    assert!(silent.answer().is_none());
    assert_eq!(error_class(&mute.answer().unwrap()), "idle-timeout");
    assert!(mute.answer().is_none());
    ticks_on(&mut guest);
}

#[test]
fn thirty_two_clients_at_once() {
    require_kvm!();
    let dir = Scratch::new("many");
    let sock = dir.socket();
    let mut guest = boot(&sock, &[]);
    // All connected before any asks, then all ask at once.
    let conns: Vec<Raw> = (0..32).map(|_| Raw::connect(&sock)).collect();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(32));
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let req = format!("{{\"cmd\":\"ram-add\",\"id\":\"c{i}\",\"size\":\"1M\"}}\n");
                assert_eq!(c.ask(req.as_bytes())["ok"], true);
                assert_eq!(c.ask(b"{\"cmd\":\"status\"}\n")["ok"], true);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread failed");
    }
    let st = ok(&sock, &["status"]);
    assert_eq!(st["blocks"].as_array().unwrap().len(), 33, "{st}");
    ticks_on(&mut guest);
}

#[test]
fn a_second_vmm_on_the_same_socket_is_refused() {
    require_kvm!();
    let dir = Scratch::new("twice");
    let sock = dir.socket();
    let mut guest = boot(&sock, &[]);
    let mut cmd = vmm(&["run", "--api-socket"]);
    cmd.arg(&sock);
    let (status, lines, stderr) = Running::spawn(cmd).wait(TIMEOUT);
    assert_eq!(status.code(), Some(1), "{status}: {lines:?}");
    assert_eq!(
        stderr.trim_end(),
        format!("vmm: api socket {} is in use", sock.display())
    );
    assert!(!lines.iter().any(|l| l.contains("tiny: boot")), "{lines:?}");
    // The first one still serves its socket and runs.
    assert_eq!(ok(&sock, &["status"])["state"], "running");
    ticks_on(&mut guest);
}

#[test]
fn a_stale_socket_is_replaced() {
    require_kvm!();
    let dir = Scratch::new("stale");
    let sock = dir.socket();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let _guest = boot(&sock, &[]);
    assert_eq!(ok(&sock, &["status"])["state"], "running");
}

#[test]
fn clients_without_a_vmm_fail_with_one_line() {
    let dir = Scratch::new("none");
    let sock = dir.socket();
    for args in [
        &["status"][..],
        &["pause"],
        &["resume"],
        &["quit"],
        &["ram-add", "--id", "a", "--size", "1M"],
        &["ram-remove", "--id", "a"],
    ] {
        refused(&sock, args, "cannot connect to api socket");
    }
    // Not a socket at all: refused by `vmm run` too, and left alone.
    std::fs::write(&sock, b"x").unwrap();
    if have_kvm() {
        let mut cmd = vmm(&["run", "--api-socket"]);
        cmd.arg(&sock);
        let (status, _, stderr) = Running::spawn(cmd).wait(TIMEOUT);
        assert_eq!(status.code(), Some(1));
        assert!(stderr.contains("exists and is not a socket"), "{stderr}");
        assert_eq!(std::fs::read(&sock).unwrap(), b"x");
    }
}

/// Hot-added RAM stops where the host's RAM and swap do, as `--memory` does: each KVM
/// slot costs the host kernel tracking memory in proportion to its size, so blocks of
/// 32 GiB added one after another once OOM-killed the VMM. The refusal is one line, class
/// `host-limit`, and the guest runs on.
#[test]
fn hot_added_ram_stops_at_what_the_host_has() {
    require_kvm!();
    let d = Scratch::new("host-limit");
    let sock = d.socket();
    let mut guest = boot(&sock, &[]);
    let mut refusal = None;
    for n in 0..64 {
        let id = format!("big{n}");
        let (success, out, err) = client(&sock, &["ram-add", "--id", &id, "--size", "32G"]);
        if !success {
            refusal = Some((n, out, err));
            break;
        }
    }
    let (n, out, err) = refusal.expect("64 blocks of 32 GiB were all taken");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("RAM and swap"), "block {n}: {err}");
    println!("refused at block {n}: {}", err.trim());
    let raw = Raw::connect(&sock).ask(b"{\"cmd\":\"ram-add\",\"id\":\"again\",\"size\":\"32G\"}\n");
    assert_eq!(error_class(&raw), "host-limit", "{raw}");
    ticks_on(&mut guest);
    let st = ok(&sock, &["status"]);
    assert_eq!(st["state"], "running", "{st}");
    ok(&sock, &["quit"]);
}
