//! Helpers for the integration tests under `tests/tests/`, which run the workspace's
//! binaries as real child processes (so KVM resources always go away with the child):
//! finding (and building) the `vmm` binary, skipping without /dev/kvm, and reading a
//! child's output line by line with a deadline.
#![warn(missing_docs)]

pub mod netns;
pub mod tls;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Whether /dev/kvm can be opened. Tests that need it print `SKIPPED: no /dev/kvm` and
/// return when it cannot (see [`require_kvm!`]).
pub fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Returns from the calling test, printing `SKIPPED: no /dev/kvm`, when KVM is absent.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::have_kvm() {
            println!("SKIPPED: no /dev/kvm");
            return;
        }
    };
}

/// Why this process cannot open a userfaultfd that also reports the kernel's faults
/// (what a post-copy destination needs for KVM's accesses to guest RAM), or `None`.
pub fn userfaultfd_error() -> Option<std::io::Error> {
    // SAFETY: the syscall takes flags only; a descriptor it returns is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        return Some(std::io::Error::last_os_error());
    }
    // SAFETY: our own new descriptor, closed once.
    unsafe { libc::close(fd as i32) };
    None
}

/// Returns from the calling test, printing `SKIPPED: no userfaultfd (...)`, when the
/// post-copy destination's userfaultfd cannot be opened.
#[macro_export]
macro_rules! require_uffd {
    () => {
        if let Some(e) = $crate::userfaultfd_error() {
            println!("SKIPPED: no userfaultfd ({e})");
            return;
        }
    };
}

/// The directory cargo put this test executable's profile in (`target/<profile>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash>
    let deps = exe.parent().expect("the deps directory");
    deps.parent().expect("the profile directory").to_path_buf()
}

/// The `vmm` binary of this build, built first if needed: `vmm` belongs to the vmm-core
/// package, so cargo does not build it for this crate's tests on its own. One
/// `cargo build --bin vmm` per test process, in the same profile and target directory.
pub fn vmm_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let target_dir = dir.parent().expect("the target directory");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        // The test's own package variables (CARGO_PKG_*, CARGO_MANIFEST_*, ...) are not
        // the build's: build scripts that watch them (ring's) would see a change from the
        // last `cargo build` and rebuild vmm's TLS stack on every test run.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
            {
                build.env_remove(&key);
            }
        }
        let status = build
            .args([
                "build",
                "--quiet",
                "-p",
                "vmm-core",
                "--bin",
                "vmm",
                "--profile",
            ])
            .arg(&profile)
            .arg("--target-dir")
            .arg(target_dir)
            // The runtime value (cargo test and nextest set it): a helper library compiled
            // in another checkout and reused from a copied target/ would otherwise build
            // that checkout's `vmm` into ours.
            .current_dir(
                std::env::var_os("CARGO_MANIFEST_DIR")
                    .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
            )
            .status()
            .expect("running cargo build for the vmm binary");
        assert!(status.success(), "cargo build --bin vmm failed: {status}");
        let bin = dir.join("vmm");
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
}

/// A `vmm` command with the given arguments, stdin closed.
pub fn vmm(args: &[&str]) -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// A child process whose stdout is read line by line on a thread, killed when dropped.
pub struct Running {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Receiver<String>,
    stdin: Option<std::process::ChildStdin>,
}

impl Running {
    /// Spawns `cmd` with stdout and stderr piped.
    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the child");
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            // Lossy: a guest may write bytes that are not UTF-8 (the chaos probe does).
            let mut out = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match out.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']).to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().expect("piped stderr");
        let (etx, stderr) = mpsc::channel();
        thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            let _ = etx.send(s);
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            stdin,
        }
    }

    /// Writes `bytes` to the child's stdin (the command must have `Stdio::piped()` stdin).
    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("the child's stdin is piped");
        stdin.write_all(bytes).expect("writing the child's stdin");
        stdin.flush().expect("flushing the child's stdin");
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next line, up to `deadline`. `None` at the deadline or end of output.
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Reads lines until one satisfies `pred` (returned) or `timeout` passes (panics with
    /// everything seen, naming `what`).
    pub fn expect_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        while let Some(line) = self.next_line(deadline) {
            if pred(&line) {
                return line;
            }
        }
        panic!(
            "no {what} within {timeout:?}; output so far:\n{}\nstderr: {}",
            self.seen.join("\n"),
            self.stderr_if_exited()
        );
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Every stdout line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    fn stderr_if_exited(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                format!(
                    "{} (exited: {status})",
                    self.stderr.recv().unwrap_or_default()
                )
            }
            _ => "(still running)".into(),
        }
    }

    /// Waits for the child to exit by itself within `timeout`; returns its status, the
    /// rest of its stdout and its stderr. Panics (after killing it) on timeout.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the child") {
                while self
                    .next_line(Instant::now() + Duration::from_secs(5))
                    .is_some()
                {}
                let stderr = self.stderr.recv().unwrap_or_default();
                let lines = std::mem::take(&mut self.seen);
                return (status, lines, stderr);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "child still running after {timeout:?}; output:\n{}",
                    self.seen.join("\n")
                );
            }
            while self
                .next_line(Instant::now() + Duration::from_millis(20))
                .is_some()
            {}
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory for one test (`vmm-NAME-PID` in the temp directory), emptied
/// first and removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates it.
    pub fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a scratch directory");
        Scratch(d)
    }

    /// `name` inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for `p` to appear (a socket a child binds); panics after `timeout`.
pub fn wait_for_path(p: &Path, timeout: Duration) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(t0.elapsed() < timeout, "{} never appeared", p.display());
        thread::sleep(Duration::from_millis(20));
    }
}

/// `vmm status --api-socket API` through the thin client, its JSON answer (the client
/// must succeed).
pub fn vmm_status(api: &Path) -> serde_json::Value {
    let path = api.to_str().expect("a UTF-8 api socket path");
    let out = vmm(&["status", "--api-socket", path])
        .output()
        .expect("running vmm status");
    assert!(out.status.success(), "vmm status: {out:?}");
    serde_json::from_slice(&out.stdout).expect("vmm status printed JSON")
}

/// One request line on a VMM's API socket, sent from this process (no `vmm` client to
/// start: it lands microseconds after whatever the test saw last); the answer as JSON.
pub fn api_request(api: &Path, line: &str) -> serde_json::Value {
    use std::io::Write;
    let mut c = std::os::unix::net::UnixStream::connect(api)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", api.display()));
    c.write_all(line.as_bytes())
        .expect("sending an api request");
    c.write_all(b"\n").expect("sending an api request");
    let mut answer = String::new();
    BufReader::new(c)
        .read_line(&mut answer)
        .expect("reading an api answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("api answer {answer:?}: {e}"))
}

/// The numbers of the `tick N` lines among `lines`.
pub fn ticks(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The Linux guest `scripts/get-linux-guest.sh` builds under `target/guest`.
pub struct LinuxGuest {
    /// Debian's bzImage.
    pub vmlinuz: PathBuf,
    /// Its payload, an ELF with a PVH note.
    pub vmlinux: PathBuf,
    /// busybox and a tiny /init.
    pub initramfs: PathBuf,
}

/// The Linux guest, built by the project's own script on first use (idempotent, so once
/// per machine in practice). `None` (the caller prints `SKIPPED`) only where the script
/// cannot run at all (no apt-get: not a Debian-like host); a failing script panics.
pub fn linux_guest() -> Option<&'static LinuxGuest> {
    static GUEST: OnceLock<Option<LinuxGuest>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let root = std::env::var_os("CARGO_MANIFEST_DIR")
                .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
                .join("..");
            if Command::new("apt-get").arg("--version").output().is_err() {
                return None;
            }
            let out = Command::new(root.join("scripts/get-linux-guest.sh"))
                .env("GUEST_DIR", profile_dir().join("../guest"))
                .output()
                .expect("running scripts/get-linux-guest.sh");
            assert!(
                out.status.success(),
                "scripts/get-linux-guest.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let paths: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(PathBuf::from)
                .collect();
            let [vmlinuz, vmlinux, initramfs] =
                <[PathBuf; 3]>::try_from(paths).expect("get-linux-guest.sh prints three paths");
            Some(LinuxGuest {
                vmlinuz,
                vmlinux,
                initramfs,
            })
        })
        .as_ref()
}

/// Returns from the calling test, printing `SKIPPED: ...`, when the Linux guest cannot be
/// built on this host; else evaluates to it.
#[macro_export]
macro_rules! require_linux_guest {
    () => {
        match $crate::linux_guest() {
            Some(g) => g,
            None => {
                println!("SKIPPED: no apt-get to build the Linux guest with");
                return;
            }
        }
    };
}

/// The guest CPU's speed in thousands of instructions per second, measured by the tiny
/// guest (`bench=1`: a three-instruction loop timed by the PIT). Where guest code is
/// emulated this is in the hundreds; on hardware KVM in the millions.
pub fn guest_kips() -> u64 {
    static KIPS: OnceLock<u64> = OnceLock::new();
    *KIPS.get_or_init(|| {
        let guest = Running::spawn(vmm(&["run", "--cmdline", "bench=1 exit_after=1"]));
        let (status, lines, stderr) = guest.wait(Duration::from_secs(30));
        assert!(status.success(), "bench guest: {status}: {stderr}");
        lines
            .iter()
            .find_map(|l| l.strip_prefix("tiny: speed "))
            .and_then(|l| l.trim_end_matches(" kIPS").trim().parse().ok())
            .unwrap_or_else(|| panic!("no `tiny: speed` line in {lines:?}"))
    })
}

/// `kips` as MIPS for messages (one decimal).
pub fn mips(kips: u64) -> String {
    format!("{}.{}", kips / 1000, (kips % 1000) / 100)
}
