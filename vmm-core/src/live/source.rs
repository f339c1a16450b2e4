//! Live migration in the VMM, the source side: `SourceVm` (the running machine as
//! [`migration::live::MigratableVm`]), driven on a migration thread that [`start`] begins
//! (the control API's `migrate`); [`MigrationSlot`] keeps its progress for `status`. The
//! destination side (`vmm run --incoming URI`) is [`super::destination`].
//!
//! The source's end: once the destination confirmed, the VMM keeps serving its API until a
//! `status` answer carrying the final stats went out (so `vmm migrate` gets them), or for
//! [`EXIT_GRACE`] at most, then ends with status 0. A failed migration resumes the guest
//! (the driver does it) and the VMM runs on. After a `file:` snapshot the guest stays
//! paused and the VMM runs on.
//!
//! Auto-converge is on unless the `migrate` request says `"auto_converge": false` (`vmm
//! migrate --no-auto-converge`): `SourceVm` throttles the vCPUs as the driver asks
//! ([`super::throttle`]), and lifts the throttle when dropped, whatever happened, so a guest
//! never runs on slowed down after its migration.

use super::throttle::ThrottleTimer;
use crate::events::VmEvent;
use crate::machine::Machine;
use migration::live::local::{check_shareable, migrate_local_to_uri};
use migration::live::{
    migrate_to_uri, migrate_to_uri_tls, ComponentState, LayoutHold, MigratableVm, MigrateOptions,
    MigrationProgress, MigrationState, ProgressEvent, VmError,
};
use migration::transport::{MigrationUri, TlsClient, UriError};
use ramlist::dirty::{DirtyClient, RecentWrites};
use ramlist::RamBlock;
use ramlist::RamList;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a migrated-away source waits for a client to read the final stats.
pub const EXIT_GRACE: Duration = Duration::from_secs(3);

/// The machine's migration bookkeeping: the current (or last) migration's progress.
#[derive(Default)]
pub struct MigrationSlot {
    progress: Mutex<Option<Arc<MigrationProgress>>>,
    /// A `status` answer with the final stats of a completed live migration went out.
    final_served: AtomicBool,
    /// A local migration is giving or gave the guest away (set just before `go`): it is
    /// another VMM's now, whatever followed.
    handed_over: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MigrationSlot {
    /// The current or last migration's progress, for a client that reads it (QMP's
    /// `query-migrate`): once it shows a completed migration's final figures, the
    /// migrated-away VMM need not wait any longer for a reader (as with `status`).
    pub fn progress(&self) -> Option<Arc<MigrationProgress>> {
        let progress = lock(&self.progress).clone()?;
        if progress
            .last_stats()
            .is_some_and(|s| s.status == MigrationState::Completed)
        {
            self.final_served.store(true, Ordering::Release);
        }
        Some(progress)
    }

    /// Asks the migration under way to stop at its next batch (the guest runs on here);
    /// refused when none runs, once its final stage began (the guest is paused and its
    /// state on the way: QEMU does not cancel then either), or in post-copy. A post-copy
    /// paused by a broken link is given up instead: the guest is lost, and stays paused
    /// here.
    pub fn cancel(&self) -> Result<(), String> {
        let progress = lock(&self.progress).clone();
        match progress {
            Some(p) if running(Some(&p)) => {
                if p.state() == MigrationState::Device {
                    return Err(
                        "the migration is in its final stage and cannot be cancelled".into(),
                    );
                }
                if p.state() == MigrationState::PostcopyActive {
                    return Err("post-copy cannot be cancelled: the guest runs on the destination, which still needs pages from here".into());
                }
                p.cancel();
                Ok(())
            }
            _ => Err("no migration is under way".into()),
        }
    }

    /// Whether a local migration gave the guest away (it must never run here again).
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// Whether post-copy runs or is paused: the destination's guest needs this VMM's
    /// memory.
    pub fn in_postcopy(&self) -> bool {
        lock(&self.progress).as_ref().is_some_and(|p| {
            matches!(
                p.state(),
                MigrationState::PostcopyActive | MigrationState::PostcopyPaused
            )
        })
    }

    /// Asks a post-copy paused by a broken link to reconnect to `uri` (see
    /// [`MigrationProgress::resume_postcopy`]).
    pub fn resume_postcopy(&self, uri: migration::transport::MigrationUri) -> Result<u32, String> {
        match lock(&self.progress).clone() {
            Some(p) => p.resume_postcopy(uri),
            None => Err("no migration is under way".into()),
        }
    }

    /// Asks the migration under way to switch to post-copy (see
    /// [`MigrationProgress::start_postcopy`]).
    pub fn start_postcopy(&self) -> Result<(), String> {
        match lock(&self.progress).clone() {
            Some(p) => p.start_postcopy(),
            None => Err("no migration is under way".into()),
        }
    }

    /// Whether a migration runs its final stage now (the guest paused for it).
    pub fn in_final_stage(&self) -> bool {
        lock(&self.progress)
            .as_ref()
            .is_some_and(|p| p.state() == MigrationState::Device && p.last_stats().is_none())
    }

    /// Whether a migration runs now.
    pub fn active(&self) -> bool {
        running(lock(&self.progress).as_deref())
    }

    /// The progress as `status` shows it: the snapshot, plus `stats` once it ended.
    pub fn status_json(&self) -> Option<serde_json::Value> {
        let progress = lock(&self.progress).clone()?;
        let mut v = serde_json::to_value(progress.snapshot()).ok()?;
        if let Some(stats) = progress.last_stats() {
            let done = stats.status == MigrationState::Completed;
            if let Ok(s) = serde_json::to_value(&stats) {
                v["stats"] = s;
            }
            if done {
                self.final_served.store(true, Ordering::Release);
            }
        }
        Some(v)
    }
}

fn running(progress: Option<&MigrationProgress>) -> bool {
    progress.is_some_and(|p| {
        let s = p.state();
        matches!(
            s,
            MigrationState::Setup
                | MigrationState::Active
                | MigrationState::Device
                | MigrationState::PostcopyActive
                | MigrationState::PostcopyPaused
        ) || (s == MigrationState::None && p.last_stats().is_none())
    })
}

/// The running machine as the migration driver sees it.
struct SourceVm {
    machine: Arc<Machine>,
    /// Auto-converge's vCPU throttle timer.
    throttle: ThrottleTimer,
    /// Whether the guest ran when the driver paused it: sent as the run state, so that a
    /// guest paused here stays paused on the destination (as in QEMU).
    was_running: AtomicBool,
    /// The slot's flag: set when a local migration gives the guest up.
    handed_over: Arc<AtomicBool>,
}

impl Drop for SourceVm {
    fn drop(&mut self) {
        // The driver lifts it; this is for a driver that did not get to.
        if let Err(e) = self.throttle.set(&self.machine, 0) {
            log::error!("lifting the vCPU throttle: {e}");
        }
    }
}

impl MigratableVm for SourceVm {
    fn ram(&self) -> Arc<RamList> {
        self.machine.ram().ram().clone()
    }

    fn start_dirty_log(&self) -> Result<(), VmError> {
        Ok(self
            .machine
            .ram()
            .set_dirty_logging_all(DirtyClient::Migration, true)?)
    }

    fn stop_dirty_log(&self) -> Result<(), VmError> {
        Ok(self
            .machine
            .ram()
            .set_dirty_logging_all(DirtyClient::Migration, false)?)
    }

    fn dirty_sync(&self) -> Result<u64, VmError> {
        Ok(self.machine.ram().sync_dirty_log()?.dirty_pages)
    }

    fn recent_writes(&self) -> Result<Option<RecentWrites>, VmError> {
        Ok(self.machine.ram().peek_dirty_log()?)
    }

    fn pause(&self) -> Result<bool, VmError> {
        let was_running = !self.machine.run_control().is_paused();
        self.machine.pause_vcpus().map_err(|parked| {
            format!(
                "only {parked} of {} vCPUs paused in time",
                self.machine.vcpu_count()
            )
        })?;
        self.was_running.store(was_running, Ordering::Relaxed);
        Ok(was_running)
    }

    fn resume(&self) -> Result<(), VmError> {
        self.machine.resume();
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<ComponentState>, VmError> {
        let mut state = self.machine.save_state()?;
        state.running = self.was_running.load(Ordering::Relaxed);
        Ok(state.to_components()?)
    }

    fn is_hotplugged(&self, block: &RamBlock) -> bool {
        !self.machine.is_boot_block(block.id())
    }

    fn hold_ram_layout(&self) -> Box<dyn LayoutHold + '_> {
        Box::new(self.machine.hold_hotplug())
    }

    fn handing_over(&self) {
        self.handed_over.store(true, Ordering::Release);
        log::info!("the guest is handed over: it never runs here again");
    }

    fn set_throttle(&self, percent: u8) -> Result<(), VmError> {
        self.throttle.set(&self.machine, percent)?;
        log::debug!(
            "vCPUs throttled to {}%",
            self.machine.run_control().throttle()
        );
        Ok(())
    }
}

/// Writes a snapshot of `machine` into `dir` (`vmm snapshot`): the guest paused, and left
/// paused; on failure it runs on if it ran.
pub fn snapshot(
    machine: &Arc<Machine>,
    dir: &std::path::Path,
    base: Option<&migration::snapshot::OpenSnapshot>,
) -> Result<migration::snapshot::SnapshotStats, String> {
    let vm = SourceVm {
        machine: machine.clone(),
        throttle: ThrottleTimer::default(),
        was_running: AtomicBool::new(true),
        handed_over: Arc::default(),
    };
    let stats = migration::snapshot::write_snapshot(&vm, dir, base).map_err(|e| e.to_string())?;
    log::info!(
        "snapshot written to {}: {} pages, {} bytes allocated, in {:.1} ms; the guest stays paused",
        dir.display(),
        stats.pages_written,
        stats.allocated_bytes,
        stats.total_ms
    );
    Ok(stats)
}

/// How the guest goes.
pub enum Carry {
    /// Pre-copy over the stream (a snapshot for `file:`), over mutual TLS when given
    /// (`tcp:` only).
    Copy(Option<TlsClient>),
    /// Its memory handed over (`--local`: `unix:`, RAM another process can map).
    Local,
}

/// Starts a migration of `machine` to `uri` on a migration thread (the `migrate`
/// command), with `slot` following it, carried as `carry` says; refused while one is
/// under way, and a local one refused before it starts when the URI or the RAM does not
/// allow it.
pub fn start(
    machine: &Arc<Machine>,
    slot: &Arc<MigrationSlot>,
    uri: &str,
    opts: MigrateOptions,
    carry: Carry,
) -> Result<(), String> {
    let parsed: MigrationUri = uri.parse().map_err(|e: UriError| e.to_string())?;
    match &carry {
        Carry::Copy(Some(_)) if !matches!(parsed, MigrationUri::Tcp { .. }) => {
            return Err(format!("TLS needs a tcp: URI, not {parsed}"));
        }
        Carry::Local => {
            if !matches!(parsed, MigrationUri::Unix(_)) {
                return Err(migration::live::MigrationError::LocalNeedsUnix {
                    uri: parsed.to_string(),
                }
                .to_string());
            }
            check_shareable(machine.ram().ram()).map_err(|e| e.to_string())?;
        }
        Carry::Copy(_) => {}
    }
    if machine.run_control().is_stopping() {
        return Err("the VM is stopping".into());
    }
    let progress = Arc::new(MigrationProgress::new());
    let events = machine.events().clone();
    progress.set_observer(Arc::new(move |e| {
        events.emit(match e {
            ProgressEvent::State(state) => VmEvent::Migration {
                status: state.name(),
            },
            ProgressEvent::Pass(pass) => VmEvent::MigrationPass { pass },
        })
    }));
    {
        let mut current = lock(&slot.progress);
        if running(current.as_deref()) {
            return Err("a migration is already under way".into());
        }
        *current = Some(progress.clone());
        slot.final_served.store(false, Ordering::Release);
    }
    let is_file = matches!(parsed, MigrationUri::File(_));
    log::info!("migration to {parsed} starting");
    let (machine, slot) = (machine.clone(), slot.clone());
    let spawned = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let vm = SourceVm {
                machine: machine.clone(),
                throttle: ThrottleTimer::default(),
                was_running: AtomicBool::new(true),
                handed_over: slot.handed_over.clone(),
            };
            let result = match &carry {
                Carry::Copy(Some(tls)) => migrate_to_uri_tls(&vm, &parsed, tls, &opts, &progress),
                Carry::Copy(None) => migrate_to_uri(&vm, &parsed, &opts, &progress),
                Carry::Local => migrate_local_to_uri(&vm, &parsed, &opts, &progress),
            };
            // No throttle from here on, whatever happened.
            drop(vm);
            // A local migration set `handed_over` itself, before its `go`.
            match result {
                Ok(stats) => {
                    log::info!(
                        "migration to {parsed} completed: {:.1} ms, downtime {:.1} ms",
                        stats.total_ms,
                        stats.downtime_ms
                    );
                    if !is_file {
                        leave_after_migration(&machine, &slot);
                    }
                }
                Err(e) => {
                    let now = if machine.run_control().is_paused() {
                        "the guest stays paused"
                    } else {
                        "the guest runs on"
                    };
                    log::error!("migration to {parsed} failed: {e}; {now}");
                }
            }
        });
    spawned
        .map(drop)
        .map_err(|e| format!("cannot start the migration thread: {e}"))
}

/// The guest runs elsewhere now: end this VMM once the final stats were served.
fn leave_after_migration(machine: &Machine, slot: &MigrationSlot) {
    let t0 = Instant::now();
    while !slot.final_served.load(Ordering::Acquire) && t0.elapsed() < EXIT_GRACE {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let that answer leave the socket before the main loop stops.
    std::thread::sleep(Duration::from_millis(200));
    log::info!("the guest runs on the destination; this VMM ends");
    machine.request_quit();
    machine.run_control().vm_ended();
}
