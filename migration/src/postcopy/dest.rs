//! The destination after the switch: register guest RAM with userfaultfd, drop the stale
//! pages (in that order: a page touched in between would map a zero page that its
//! arrival could not replace), start the fault thread, restore the states, run the guest, say so, then
//! place the rest of RAM as it streams in, and say when every page is there.
//!
//! A link that breaks after the guest ran pauses post-copy here (`postcopy-paused`): the
//! memory stays registered, threads that touch a missing page wait, and the VMM waits
//! for the source to reconnect ([`RestorableVm::postcopy_reconnect`]). A connection that
//! does not open with [`RESUME_MAGIC`] and the switch's token is
//! refused and the wait goes on. The source is told which pages are still missing, the
//! requests of waiting faults go again, and the stream goes on where it is.

use super::pages::{Pages, PostcopyFigures, ReturnPath};
use super::RESUME_MAGIC;
use crate::live::{IncomingError, Reply, RestorableVm, MAX_RUNS_PER_MESSAGE};
use crate::load::{DiscardRuns, IncomingLoad, LoadError};
use crate::transport::Connection;
use ramlist::RamList;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// How long a reconnecting peer has to show the resume hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// The input the post-copy loader reads: the connection's reader, replaced on recovery.
pub(crate) type Input = Box<dyn Read + Send>;

/// Runs the post-copy half of an incoming migration whose switch package `load` has just
/// read (the states are in its summary). Returns once every page is in place and the
/// source was told; on an error the guest may have run (see [`IncomingError`]'s
/// post-copy variants).
pub(crate) fn run(
    vm: &mut dyn RestorableVm,
    ram: &RamList,
    load: &mut IncomingLoad<'_, Input>,
    runs: &DiscardRuns,
    ret: &ReturnPath,
    stall: Duration,
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
                    *lock(&fault_error) = Some(e);
                }
            })
            .map_err(|e| IncomingError::PostcopySetup(format!("the fault thread: {e}")));
        let faults = match faults {
            Ok(f) => f,
            Err(e) => return Err((false, e)),
        };
        let r = guest_side(vm, load, &pages, ret, runs.token, stall);
        if let Err(e) = stop.write(1) {
            log::error!("post-copy: stopping the fault thread: {e}");
        }
        let _ = faults.join();
        r
    });
    if let Some(e) = lock(&fault_error).take() {
        log::warn!("post-copy: the fault thread had stopped early: {e}");
    }
    match result {
        Ok(since) => {
            pages.unregister();
            let figures = pages.figures(since);
            let json = serde_json::to_string(&figures).unwrap_or_default();
            if let Err(e) = Reply::PostcopyDone(json).write_to(&mut **lock(ret)) {
                // Every page is here: the guest is whole, and the source, which handed
                // it over, never runs it again. Only the source's figures are lost.
                log::warn!("post-copy: telling the source every page is in failed: {e}");
            }
            Ok(figures)
        }
        Err((ran, e)) => {
            if ran {
                // Its missing pages will never come: stop the guest before the memory is
                // let go (dropping the userfaultfd wakes its waiting vCPUs onto zeros),
                // and fence those pages for any vCPU that could not be stopped.
                vm.postcopy_failed();
                pages.fence_missing();
                // The source knows the guest ran here (it had `postcopy-running`, or it
                // would not resume a post-copy): telling it why cannot make it run the
                // guest too.
                if let Err(err) = Reply::Failed(e.to_string()).write_to(&mut **lock(ret)) {
                    log::debug!("post-copy: the source did not take the failure: {err}");
                }
            }
            pages.unregister();
            Err(e)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Restore, resume, confirm, then place the rest (reconnecting as often as the link
/// breaks and the VMM finds a source). The error says whether the guest had run (true)
/// by then.
fn guest_side(
    vm: &mut dyn RestorableVm,
    load: &mut IncomingLoad<'_, Input>,
    pages: &Pages,
    ret: &ReturnPath,
    token: u64,
    stall: Duration,
) -> Result<Instant, (bool, IncomingError)> {
    let states = load.summary().states.clone();
    vm.restore_state(&states)
        .map_err(|e| (false, IncomingError::Restore(e)))?;
    vm.postcopy_starting();
    vm.resume().map_err(|e| (false, IncomingError::Resume(e)))?;
    let since = Instant::now();
    let ns = vm
        .running_since_ns()
        .unwrap_or_else(crate::live::local::wire::monotonic_ns);
    vm.postcopy_running();
    // A source that does not hear this pauses (it cannot tell whether the guest runs
    // here), as it does for any break after the switch: so does this side.
    let told = Reply::PostcopyRunning(ns).write_to(&mut **lock(ret));
    log::info!("post-copy: the guest runs; {} pages to come", pages.left());
    let mut next = match told {
        Ok(()) => None,
        Err(e) => Some(format!("telling the source the guest runs: {e}")),
    };
    loop {
        let broke = match next.take() {
            Some(why) => why,
            None => match load.load_postcopy(pages) {
                Ok(()) => break,
                // Every page is here: the end marker lost with the link changes nothing.
                Err(e) if e.is_transport() && pages.left() == 0 => {
                    log::warn!("post-copy: the link broke after the last page ({e})");
                    break;
                }
                Err(e) if e.is_transport() => e.to_string(),
                Err(e) => return Err((true, IncomingError::PostcopyLost(e))),
            },
        };
        log::warn!(
            "post-copy paused: {broke}; {} pages still missing, the guest waits for them \
             until the source reconnects",
            pages.left()
        );
        vm.postcopy_paused(&broke);
        let conn = reconnect(vm, pages, token, stall).ok_or_else(|| {
            let e = LoadError::Postcopy {
                offset: load.summary().bytes,
                why: format!("the link to the source broke ({broke}) and no source came back"),
            };
            (true, IncomingError::PostcopyLost(e))
        })?;
        let (reader, writer) = conn.into_split();
        *lock(ret) = writer;
        load.replace_input(reader);
        match pages.ask_again(ret) {
            Ok(again) => {
                vm.postcopy_running();
                log::info!(
                    "post-copy resumed: {} pages still missing, {again} asked for again",
                    pages.left()
                );
            }
            Err(e) => next = Some(format!("asking the source again for waited pages: {e}")),
        }
    }
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

/// Waits for a source that shows `token`, and tells it which pages are still missing.
/// `None`: the VMM gave up.
fn reconnect(
    vm: &mut dyn RestorableVm,
    pages: &Pages,
    token: u64,
    stall: Duration,
) -> Option<Connection> {
    loop {
        let conn = vm.postcopy_reconnect()?;
        match handshake(conn, pages, token, stall) {
            Ok(conn) => return Some(conn),
            Err(e) => log::warn!("post-copy: a reconnecting source was refused: {e}"),
        }
    }
}

fn handshake(
    mut conn: Connection,
    pages: &Pages,
    token: u64,
    stall: Duration,
) -> io::Result<Connection> {
    let stall = Some(stall.max(Duration::from_millis(1)));
    if !conn.is_duplex() {
        return Err(io::Error::other("not a plain socket"));
    }
    // A peer that connects and says nothing keeps the source out only this long.
    conn.set_timeouts(Some(HELLO_TIMEOUT), stall)?;
    let mut hello = [0u8; 12];
    conn.reader().read_exact(&mut hello)?;
    conn.set_timeouts(stall, stall)?;
    let refuse = |conn: &mut Connection, why: String| {
        let _ = Reply::Failed(why.clone()).write_to(conn.writer());
        Err(io::Error::other(why))
    };
    if hello[..4] != RESUME_MAGIC {
        return refuse(
            &mut conn,
            format!("not a post-copy resume (starts with {:02x?})", &hello[..4]),
        );
    }
    let shown = u64::from_be_bytes(hello[4..].try_into().unwrap_or_default());
    if shown != token {
        return refuse(
            &mut conn,
            "a resume of another post-copy migration (its token is not this one's)".into(),
        );
    }
    let w = conn.writer();
    for (id, runs) in pages.missing_runs() {
        for chunk in runs.chunks(MAX_RUNS_PER_MESSAGE) {
            Reply::PostcopyMissing {
                id: id.clone(),
                runs: chunk.to_vec(),
            }
            .write_to(w)?;
        }
    }
    Reply::PostcopyResumeReady.write_to(w)?;
    w.flush()?;
    Ok(conn)
}

/// The shared return path over `w`.
pub(crate) fn return_path(w: Box<dyn Write + Send>) -> ReturnPath {
    Arc::new(Mutex::new(w))
}
