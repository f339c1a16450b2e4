//! A minimal `log` backend: `vmm: LEVEL: message` lines on stderr, the level taken from
//! `VMM_LOG` (error, warn, info, debug, trace; default warn). A thread can silence its
//! own records ([`quiet_this_thread`]) when what it does wrong is reported otherwise.

use log::{LevelFilter, Log, Metadata, Record};
use std::cell::Cell;

thread_local! {
    /// This thread's records are dropped.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Drops every record this thread logs from now on, unless `VMM_LOG` is set (whoever set
/// it wants them). For a thread whose failure the VMM reports as one line of its own.
pub fn quiet_this_thread() {
    if std::env::var_os("VMM_LOG").is_none() {
        QUIET.with(|q| q.set(true));
    }
}

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level() && !QUIET.with(Cell::get)
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            // Not eprintln!, which panics when stderr is gone (a closed pipe: `vmm run
            // 2>&1 | head`): a log line must never take down the thread that logs (the
            // signal thread did, and SIGTERM went unheard).
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "vmm: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Installs the logger (a second call does nothing).
pub fn init() {
    let level = std::env::var("VMM_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn);
    if log::set_logger(&StderrLogger).is_ok() {
        log::set_max_level(level);
    }
}
