//! The console on a terminal: stdin reaches the guest's serial port, the terminal is raw
//! while the VMM runs (Ctrl-C goes to the guest) and comes back as it was on every way
//! out; SIGTERM, SIGINT and SIGHUP stop the VMM in order with status 0.

use minivmm_tests::{require_kvm, vmm, vmm_bin, Running};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A pseudo-terminal pair: the VMM gets the slave as stdin/stdout/stderr, the test keeps
/// the master and a handle on the slave to read its settings.
struct Pty {
    master: File,
    slave: OwnedFd,
}

fn openpty() -> Pty {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints; name, termp and winp
    // may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
    unsafe {
        Pty {
            master: File::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

/// The slave's local flags (ICANON, ECHO, ISIG...).
fn lflags(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data, filled in by tcgetattr (checked).
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a termios to fill.
    let r = unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) };
    assert_eq!(r, 0, "tcgetattr: {}", std::io::Error::last_os_error());
    t.c_lflag
}

/// Runs `vmm run --cmdline <cmdline>` on the pty; the master's output arrives on the
/// returned receiver.
fn spawn_on(pty: &Pty, cmdline: &str) -> (Child, Receiver<Vec<u8>>) {
    let stdio = || Stdio::from(pty.slave.try_clone().expect("dup of the pty slave"));
    let child = Command::new(vmm_bin())
        .args(["run", "--cmdline", cmdline])
        .stdin(stdio())
        .stdout(stdio())
        .stderr(stdio())
        .spawn()
        .expect("spawning vmm");
    let mut master = pty.master.try_clone().expect("dup of the pty master");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Collects output until it contains `want`.
fn expect(rx: &Receiver<Vec<u8>>, seen: &mut Vec<u8>, want: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !String::from_utf8_lossy(seen).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(bytes) => seen.extend(bytes),
            Err(_) => panic!(
                "no {want:?} within {TIMEOUT:?}; got {:?}",
                String::from_utf8_lossy(seen)
            ),
        }
    }
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for vmm") {
            return status;
        }
        assert!(Instant::now() < deadline, "vmm still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0);
}

#[test]
fn stdin_reaches_the_guest_and_each_stop_signal_restores_the_terminal() {
    require_kvm!();
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let pty = openpty();
        let cooked = lflags(&pty.slave);
        assert_ne!(cooked & libc::ICANON, 0, "a new pty starts cooked");
        let (mut child, rx) = spawn_on(&pty, "echo=1");
        let mut seen = Vec::new();
        expect(&rx, &mut seen, "tick 1");
        let raw = lflags(&pty.slave);
        assert_eq!(raw & (libc::ICANON | libc::ECHO | libc::ISIG), 0, "not raw");
        // Ctrl-C is a byte for the guest, not a signal for the VMM.
        (&pty.master).write_all(b"hello \x03guest\r").unwrap();
        expect(&rx, &mut seen, "tiny: input hello \x03guest");
        assert!(child.try_wait().unwrap().is_none(), "vmm ended on Ctrl-C");
        kill(&child, sig);
        let status = wait(&mut child);
        assert!(status.success(), "signal {sig}: {status}");
        assert_eq!(
            lflags(&pty.slave),
            cooked,
            "signal {sig}: terminal not restored"
        );
    }
}

#[test]
fn the_terminal_is_restored_when_the_guest_crashes_or_resets() {
    require_kvm!();
    for (cmdline, ok) in [("crash_after=1", false), ("exit_after=1", true)] {
        let pty = openpty();
        let cooked = lflags(&pty.slave);
        let (mut child, _rx) = spawn_on(&pty, cmdline);
        let status = wait(&mut child);
        assert_eq!(status.success(), ok, "{cmdline}: {status}");
        assert_eq!(
            lflags(&pty.slave),
            cooked,
            "{cmdline}: terminal not restored"
        );
    }
}

#[test]
fn sigterm_without_a_terminal_is_an_orderly_exit() {
    require_kvm!();
    let mut guest = Running::spawn(vmm(&["run"]));
    guest.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(guest.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let (status, _, stderr) = guest.wait(TIMEOUT);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// `vmm run 2>&1 | grep -m1 ...`: the reader of stderr goes away, and the VMM's next log
/// line meets a closed pipe. That must not kill the thread that logs it: SIGTERM (whose
/// thread logs "stopping") still ends the VMM in order.
#[test]
fn a_closed_stderr_does_not_make_the_vmm_deaf_to_sigterm() {
    minivmm_tests::require_kvm!();
    let mut child = minivmm_tests::vmm(&["run", "--memory", "64M", "--serial", "file:/dev/null"])
        .env("VMM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read(&mut err, &mut first).unwrap();
    drop(err);
    std::thread::sleep(Duration::from_millis(300));
    kill(&child, libc::SIGTERM);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the VMM did not end on SIGTERM with its stderr closed");
}
