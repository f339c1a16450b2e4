//! The host terminal while the guest's console is on it: raw mode (every key, Ctrl-C
//! included, goes to the guest, as with Firecracker and Cloud Hypervisor), and the saved
//! settings put back on every way out — the [`RawTerminal`] guard's drop (normal end,
//! error, the orderly shutdown a signal starts) and a panic hook ([`install_panic_hook`]).

use crate::error::VmmError;
use std::io;
use std::sync::{Mutex, MutexGuard, Once};

/// The settings to restore, while the terminal is raw.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

fn saved() -> MutexGuard<'static, Option<libc::termios>> {
    SAVED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether standard input is a terminal.
pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor; any value is allowed.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Puts the saved settings back, if the terminal is raw (idempotent; safe to call from
/// any thread, a panic hook included).
pub fn restore() {
    if let Some(t) = saved().take() {
        // SAFETY: `t` is a termios tcgetattr filled in for this descriptor.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) } != 0 {
            log::warn!(
                "restoring the terminal settings: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Restores the terminal before any panic message is printed, then lets the previous
/// hook print it. Installed once per process.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// Standard input in raw mode; the previous settings come back when this is dropped.
pub struct RawTerminal(());

impl RawTerminal {
    /// Switches standard input to raw mode when it is a terminal (`None` otherwise).
    pub fn enter() -> Result<Option<RawTerminal>, VmmError> {
        if !stdin_is_tty() {
            return Ok(None);
        }
        install_panic_hook();
        // SAFETY: termios is plain data; tcgetattr fills it in or fails (checked).
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return Err(VmmError::host("reading the terminal settings")(
                io::Error::last_os_error(),
            ));
        }
        let original = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        t.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR | libc::BRKINT);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        *saved() = Some(original);
        // SAFETY: `t` is the terminal's own settings with some flags cleared.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) } != 0 {
            let e = io::Error::last_os_error();
            saved().take();
            return Err(VmmError::host("setting the terminal to raw mode")(e));
        }
        Ok(Some(RawTerminal(())))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}
