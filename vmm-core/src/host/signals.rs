//! SIGINT, SIGTERM and SIGHUP lead to an orderly shutdown: the vCPUs are stopped, guest
//! RAM and the VM are released, the terminal is restored, and `vmm` exits with status 0
//! (the VM was asked to stop and did, as Cloud Hypervisor treats these signals).
//!
//! The handler only stores the signal number and writes an eventfd (both
//! async-signal-safe); a thread waiting on that eventfd calls the stop callback.

use crate::error::VmmError;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

/// The signals that stop the VMM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The eventfd the handler writes (-1 until installed).
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
/// The last stop signal received and not yet handled (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED.store(num, Ordering::Release);
    let fd = STOP_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; `one` is 8 readable bytes and `fd` the
        // eventfd, which lives for the rest of the process (leaked below).
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// What a stop signal calls.
type StopTarget = Box<dyn FnMut(libc::c_int) + Send>;

/// Who is told about a stop signal: the running VM, or nobody (then the process ends).
static TARGET: Mutex<Option<StopTarget>> = Mutex::new(None);

fn target() -> MutexGuard<'static, Option<StopTarget>> {
    TARGET.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes SIGINT, SIGTERM and SIGHUP call `on_stop` with the signal's number (on the
/// signal thread), replacing any earlier target. The handlers and the thread are set up
/// on the first call.
pub fn install(on_stop: impl FnMut(libc::c_int) + Send + 'static) -> Result<(), VmmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    *target() = Some(Box::new(on_stop));
    INSTALLED
        .get_or_init(setup)
        .map_err(|errno| VmmError::Host {
            what: "installing the SIGINT/SIGTERM/SIGHUP handlers",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// Removes the target: a stop signal now ends the process at once (status 0, the terminal
/// restored).
pub fn clear() {
    target().take();
}

fn setup() -> Result<(), i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    let evt = EventFd::new(libc::EFD_CLOEXEC).map_err(errno)?;
    let waiter = evt.try_clone().map_err(errno)?;
    STOP_FD.store(evt.as_raw_fd(), Ordering::Release);
    std::mem::forget(evt); // the handler may write it until the process ends
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if waiter.read().is_err() {
                continue;
            }
            let sig = RECEIVED.swap(0, Ordering::AcqRel);
            log::info!("signal {sig}: stopping");
            match target().as_mut() {
                Some(f) => f(sig),
                None => {
                    crate::host::terminal::restore();
                    std::process::exit(0);
                }
            }
        })
        .map_err(errno)?;
    for sig in STOP_SIGNALS {
        register_signal_handler(sig, on_stop_signal).map_err(|e| e.errno())?;
    }
    Ok(())
}
