//! The destination after the switch: drop the stale pages, register guest RAM with
//! userfaultfd, start the fault thread, restore the states, run the guest, say so, then
//! place the rest of RAM as it streams in, and say when every page is there.

use super::pages::{Pages, PostcopyFigures, ReturnPath};
use crate::live::{IncomingError, Reply, RestorableVm};
use crate::load::{DiscardRuns, IncomingLoad, LoadError};
use ramlist::RamList;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// Runs the post-copy half of an incoming migration whose switch package `load` has just
/// read (the states are in its summary). Returns once every page is in place and the
/// source was told; on an error the guest may have run (see [`IncomingError`]'s
/// post-copy variants).
pub(crate) fn run<R: Read>(
    vm: &mut dyn RestorableVm,
    ram: &RamList,
    load: &mut IncomingLoad<'_, R>,
    runs: &DiscardRuns,
    ret: &ReturnPath,
) -> Result<PostcopyFigures, IncomingError> {
    let pages = Pages::register(ram, runs).map_err(IncomingError::PostcopySetup)?;
    log::info!(
        "post-copy: {} pages to come from the source; guest RAM registered",
        pages.left()
    );
    let stop = EventFd::new(libc::EFD_CLOEXEC)
        .map_err(|e| IncomingError::PostcopySetup(format!("an eventfd: {e}")))?;
    let fault_error: Mutex<Option<String>> = Mutex::new(None);
    let result = std::thread::scope(|s| {
        let faults = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn_scoped(s, || {
                if let Err(e) = pages.serve_faults(&stop, ret) {
                    log::error!("post-copy: the fault thread stopped: {e}");
                    *fault_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            })
            .map_err(|e| IncomingError::PostcopySetup(format!("the fault thread: {e}")));
        let faults = match faults {
            Ok(f) => f,
            Err(e) => return Err((false, e)),
        };
        let r = guest_side(vm, load, &pages, ret);
        if let Err(e) = stop.write(1) {
            log::error!("post-copy: stopping the fault thread: {e}");
        }
        let _ = faults.join();
        r
    });
    if let Some(e) = fault_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        log::warn!("post-copy: the fault thread had stopped early: {e}");
    }
    match result {
        Ok(since) => {
            pages.unregister();
            let figures = pages.figures(since);
            let json = serde_json::to_string(&figures).unwrap_or_default();
            Reply::PostcopyDone(json)
                .write_to(&mut **lock(ret))
                .map_err(IncomingError::Confirm)?;
            Ok(figures)
        }
        Err((ran, e)) => {
            if !ran {
                // The guest never ran here: let go of its memory as it is.
                pages.unregister();
            }
            // Else the memory stays registered: a vCPU that touches a missing page
            // waits, rather than reading zeros where the guest's data was.
            Err(e)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Restore, resume, confirm, then place the rest. The error says whether the guest had
/// run (true) by then.
fn guest_side<R: Read>(
    vm: &mut dyn RestorableVm,
    load: &mut IncomingLoad<'_, R>,
    pages: &Pages,
    ret: &ReturnPath,
) -> Result<Instant, (bool, IncomingError)> {
    let states = load.summary().states.clone();
    vm.restore_state(&states)
        .map_err(|e| (false, IncomingError::Restore(e)))?;
    vm.resume().map_err(|e| (false, IncomingError::Resume(e)))?;
    let since = Instant::now();
    let ns = vm
        .running_since_ns()
        .unwrap_or_else(crate::live::local::wire::monotonic_ns);
    Reply::PostcopyRunning(ns)
        .write_to(&mut **lock(ret))
        .map_err(|e| (true, IncomingError::Confirm(e)))?;
    vm.postcopy_running();
    log::info!("post-copy: the guest runs; {} pages to come", pages.left());
    load.load_postcopy(pages)
        .map_err(|e| (true, IncomingError::PostcopyLost(e)))?;
    let left = pages.left();
    if left > 0 {
        let e = LoadError::Postcopy {
            offset: load.summary().bytes,
            why: format!("the source ended the stream with {left} pages still missing"),
        };
        return Err((true, IncomingError::PostcopyLost(e)));
    }
    Ok(since)
}

/// The shared return path over `w`.
pub(crate) fn return_path(w: Box<dyn std::io::Write + Send>) -> ReturnPath {
    Arc::new(Mutex::new(w))
}
