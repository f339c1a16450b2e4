//! The destination's driver: [`incoming`] loads the stream, restores the states, resumes
//! the guest and confirms to the source; a stalled source is cut off by the read timeout
//! and an optional deadline.

use super::error::IncomingError;
use super::progress::ms;
use super::reply::Reply;
use super::RestorableVm;
use crate::load::{IncomingLoad, LoadOptions, LoadSummary};
use crate::postcopy::PostcopyFigures;
use crate::transport::{listen, Connection, MigrationUri};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the destination receives.
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// Limits on what the stream may ask (state sizes, hot-added blocks...).
    pub load: LoadOptions,
    /// How long one read may wait for the source (default 10 s): a source that stalls
    /// longer ends the load with an error, never a hang.
    pub stall_timeout: Duration,
    /// A bound on the whole load, from the connection on (None: none; a live source
    /// under a low rate limit may legitimately take long).
    pub deadline: Option<Duration>,
    /// For [`incoming_from_uri`]: how long to wait for the source to connect (None:
    /// forever).
    pub accept_timeout: Option<Duration>,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        IncomingOptions {
            load: LoadOptions::default(),
            stall_timeout: Duration::from_secs(10),
            deadline: None,
            accept_timeout: None,
        }
    }
}

/// What an incoming migration did.
#[derive(Debug, Clone)]
pub struct IncomingStats {
    /// The loader's figures (bytes, pages, blocks added and removed, the states).
    pub summary: LoadSummary,
    /// Loading the stream, in ms.
    pub load_ms: f64,
    /// From the connection to the confirmation, in ms (for post-copy, to the last page
    /// in place).
    pub total_ms: f64,
    /// A post-copy migration's figures here (faults, requests, blocktime, latency).
    pub postcopy: Option<PostcopyFigures>,
}

/// Listens on `uri` (binding it now), accepts the source, then [`incoming`]. For `file:`,
/// restores the snapshot.
pub fn incoming_from_uri(
    vm: &mut dyn RestorableVm,
    uri: &MigrationUri,
    opts: &IncomingOptions,
) -> Result<IncomingStats, IncomingError> {
    let listener = listen(uri)?;
    let conn = match opts.accept_timeout {
        Some(t) => listener.accept_timeout(t)?,
        None => listener.accept()?,
    };
    incoming(vm, conn, opts)
}

/// Receives a migration on `conn` into `vm`: load, restore, resume, confirm. A failure
/// before the guest runs is reported to the source (best effort) and returned; the
/// guest is not started then.
pub fn incoming(
    vm: &mut dyn RestorableVm,
    conn: Connection,
    opts: &IncomingOptions,
) -> Result<IncomingStats, IncomingError> {
    let t0 = Instant::now();
    let stall = Some(opts.stall_timeout.max(Duration::from_millis(1)));
    conn.set_timeouts(stall, stall)
        .map_err(IncomingError::Setup)?;
    let control = conn.control().map_err(IncomingError::Setup)?;
    let duplex = conn.is_duplex();
    let (reader, writer) = conn.into_split();
    let ret = crate::postcopy::return_path(writer);
    let ram = vm.ram();

    // The deadline: a watchdog shuts the socket down, which ends the loader's reads.
    let fired = Arc::new(AtomicBool::new(false));
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = opts.deadline.map(|deadline| {
        let fired = fired.clone();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(deadline) {
                fired.store(true, Ordering::Release);
                if let Err(e) = control.shutdown() {
                    log::warn!("migration: shutting down a stalled source: {e}");
                }
            }
        })
    });
    let input: crate::postcopy::Input = reader;
    let mut incoming = IncomingLoad::new(&ram, input, &opts.load);
    let loaded = incoming.load_until_switch(vm.hotplug());
    drop(done);
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    let fail = |e: IncomingError| {
        log::error!("migration: {e}");
        let mut w = ret.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(err) = Reply::Failed(e.to_string()).write_to(&mut **w) {
            log::debug!("migration: the source did not take the failure reply: {err}");
        }
        e
    };
    let switch = match loaded {
        Ok(s) => s,
        Err(_) if fired.load(Ordering::Acquire) => {
            let deadline = opts.deadline.unwrap_or_default();
            return Err(fail(IncomingError::Deadline(deadline)));
        }
        Err(e) => return Err(fail(IncomingError::Load(e))),
    };
    let load_ms = ms(t0.elapsed());
    if let Some(runs) = switch {
        if !duplex {
            // A file (or TLS) has no way to ask for the pages: nothing would serve the
            // guest's faults.
            return Err(fail(IncomingError::PostcopySetup(
                "the stream switches to post-copy, but this connection cannot carry page requests back (a file, or TLS)".into(),
            )));
        }
        let figures = crate::postcopy::run_destination(
            vm,
            &ram,
            &mut incoming,
            &runs,
            &ret,
            opts.stall_timeout,
        )
        .map_err(|e| match e {
            // After the guest ran: the post-copy driver told the source what it could.
            // A `failed` reply now would make a source that never heard
            // `postcopy-running` resume its own copy.
            IncomingError::PostcopyLost(_) | IncomingError::Confirm(_) => {
                log::error!("migration: {e}");
                e
            }
            e => fail(e),
        })?;
        let stats = IncomingStats {
            summary: incoming.summary().clone(),
            load_ms,
            total_ms: ms(t0.elapsed()),
            postcopy: Some(figures),
        };
        log::info!(
            "migration: incoming post-copy completed in {:.3} ms ({} bytes, {} requests, \
             blocktime {:.3} ms)",
            stats.total_ms,
            stats.summary.bytes,
            stats.postcopy.as_ref().map_or(0, |f| f.requests),
            stats.postcopy.as_ref().map_or(0.0, |f| f.blocktime_ms),
        );
        return Ok(stats);
    }
    let summary = incoming.summary().clone();
    if let Err(e) = vm.restore_state(&summary.states) {
        return Err(fail(IncomingError::Restore(e)));
    }
    if let Err(e) = vm.resume() {
        return Err(fail(IncomingError::Resume(e)));
    }
    Reply::Running
        .write_to(&mut **ret.lock().unwrap_or_else(|e| e.into_inner()))
        .map_err(IncomingError::Confirm)?;
    let stats = IncomingStats {
        summary,
        load_ms,
        total_ms: ms(t0.elapsed()),
        postcopy: None,
    };
    log::info!(
        "migration: incoming completed in {:.3} ms ({} bytes, {} pages, {} zero pages)",
        stats.total_ms,
        stats.summary.bytes,
        stats.summary.pages,
        stats.summary.zero_pages
    );
    Ok(stats)
}
