//! Live migration in the VMM: the source side (`SourceVm`, the running machine as
//! [`migration::live::MigratableVm`], driven on a migration thread started by the control
//! API's `migrate`) and the destination side ([`run_incoming`]: `vmm run --incoming URI`
//! builds the VM empty, loads the stream through [`migration::live::incoming_from_uri`],
//! then runs the guest like `vmm run`).
//!
//! The source's end: once the destination confirmed, the VMM keeps serving its API until a
//! `status` answer carrying the final stats went out (so `vmm migrate` gets them), or for
//! [`EXIT_GRACE`] at most, then ends with status 0. A failed migration resumes the guest
//! (the driver does it) and the VMM runs on. After a `file:` snapshot the guest stays
//! paused and the VMM runs on.
//!
//! Auto-converge is on unless the `migrate` request says `"auto_converge": false` (`vmm
//! migrate --no-auto-converge`): `SourceVm` throttles the vCPUs as the driver asks
//! (`crate::throttle`), and lifts the throttle when dropped, whatever happened, so a guest
//! never runs on slowed down after its migration.

use crate::config::VmmConfig;
use crate::error::VmmError;
use crate::persist::VmState;
use crate::runner::Machine;
use crate::throttle::ThrottleTimer;
use crate::vcpu::GuestExit;
use crate::vmm::Vmm;
use migration::live::{
    incoming_from_uri, migrate_to_uri, ComponentState, IncomingError, IncomingOptions,
    MigratableVm, MigrateOptions, MigrationProgress, MigrationState, RestorableVm, VmError,
};
use migration::load::{BlockHotplug, HotplugError};
use migration::transport::{MigrationUri, UriError};
use ramlist::dirty::DirtyClient;
use ramlist::kvm::{KvmRam, PlacedBlock};
use ramlist::RamList;
use ramlist::{RamBlock, RamBlockOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long a migrated-away source waits for a client to read the final stats.
pub const EXIT_GRACE: Duration = Duration::from_secs(3);

/// Why `vmm run --incoming` or a `migrate` request failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The URI does not parse.
    #[error("bad migration URI: {0}")]
    Uri(#[from] UriError),
    /// Building or running the VM failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The incoming stream was refused or broke.
    #[error("incoming migration failed: {0}")]
    Incoming(#[from] IncomingError),
}

/// The machine's migration bookkeeping: the current (or last) migration's progress.
#[derive(Default)]
pub(crate) struct MigrationSlot {
    progress: Mutex<Option<Arc<MigrationProgress>>>,
    /// A `status` answer with the final stats of a completed live migration went out.
    final_served: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MigrationSlot {
    /// Whether a migration runs now.
    pub(crate) fn active(&self) -> bool {
        running(lock(&self.progress).as_deref())
    }

    /// The progress as `status` shows it: the snapshot, plus `stats` once it ended.
    pub(crate) fn status_json(&self) -> Option<serde_json::Value> {
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
            MigrationState::Setup | MigrationState::Active | MigrationState::Device
        ) || (s == MigrationState::None && p.last_stats().is_none())
    })
}

/// The running machine as the migration driver sees it.
pub(crate) struct SourceVm {
    machine: Arc<Machine>,
    /// Auto-converge's vCPU throttle timer.
    throttle: ThrottleTimer,
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
        self.machine.ram.ram().clone()
    }

    fn start_dirty_log(&self) -> Result<(), VmError> {
        Ok(self
            .machine
            .ram
            .set_dirty_logging_all(DirtyClient::Migration, true)?)
    }

    fn stop_dirty_log(&self) -> Result<(), VmError> {
        Ok(self
            .machine
            .ram
            .set_dirty_logging_all(DirtyClient::Migration, false)?)
    }

    fn dirty_sync(&self) -> Result<u64, VmError> {
        Ok(self.machine.ram.sync_dirty_log()?.dirty_pages)
    }

    fn pause(&self) -> Result<bool, VmError> {
        let was_running = !self.machine.control.is_paused();
        self.machine.pause_vcpus().map_err(|parked| {
            format!(
                "only {parked} of {} vCPUs paused in time",
                self.machine.vcpus
            )
        })?;
        Ok(was_running)
    }

    fn resume(&self) -> Result<(), VmError> {
        self.machine.control.resume();
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<ComponentState>, VmError> {
        Ok(self.machine.save_state()?.to_components()?)
    }

    fn is_hotplugged(&self, block: &RamBlock) -> bool {
        !self.machine.is_boot_block(block.id())
    }

    fn set_throttle(&self, percent: u8) -> Result<(), VmError> {
        self.throttle.set(&self.machine, percent)?;
        log::debug!("vCPUs throttled to {}%", self.machine.control.throttle());
        Ok(())
    }
}

/// Starts a migration of `machine` to `uri` on a migration thread (the `migrate` command).
pub(crate) fn start(
    machine: &Weak<Machine>,
    uri: &str,
    downtime_ms: Option<u64>,
    max_bandwidth: Option<u64>,
    auto_converge: Option<bool>,
) -> Result<(), String> {
    let parsed: MigrationUri = uri.parse().map_err(|e: UriError| e.to_string())?;
    let machine = machine.upgrade().ok_or("the VM is stopping")?;
    if machine.control.is_stopping() {
        return Err("the VM is stopping".into());
    }
    let progress = Arc::new(MigrationProgress::new());
    {
        let mut slot = lock(&machine.migration.progress);
        if running(slot.as_deref()) {
            return Err("a migration is already under way".into());
        }
        *slot = Some(progress.clone());
        machine
            .migration
            .final_served
            .store(false, Ordering::Release);
    }
    let mut opts = MigrateOptions::default();
    if let Some(d) = downtime_ms {
        opts.downtime_limit = Duration::from_millis(d.max(1));
    }
    opts.max_bandwidth = max_bandwidth.filter(|&b| b > 0);
    opts.auto_converge = auto_converge.unwrap_or(true);
    let is_file = matches!(parsed, MigrationUri::File(_));
    log::info!("migration to {parsed} starting");
    let spawned = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let vm = SourceVm {
                machine: machine.clone(),
                throttle: ThrottleTimer::default(),
            };
            let result = migrate_to_uri(&vm, &parsed, &opts, &progress);
            // No throttle from here on, whatever happened.
            drop(vm);
            match result {
                Ok(stats) => {
                    log::info!(
                        "migration to {parsed} completed: {:.1} ms, downtime {:.1} ms",
                        stats.total_ms,
                        stats.downtime_ms
                    );
                    if !is_file {
                        leave_after_migration(&machine);
                    }
                }
                Err(e) => log::error!("migration to {parsed} failed: {e}; the guest runs on"),
            }
        });
    spawned
        .map(drop)
        .map_err(|e| format!("cannot start the migration thread: {e}"))
}

/// The guest runs elsewhere now: end this VMM once the final stats were served.
fn leave_after_migration(machine: &Machine) {
    let t0 = Instant::now();
    while !machine.migration.final_served.load(Ordering::Acquire) && t0.elapsed() < EXIT_GRACE {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let that answer leave the socket before the main loop stops.
    std::thread::sleep(Duration::from_millis(200));
    log::info!("the guest runs on the destination; this VMM ends");
    machine.quit.store(true, Ordering::Release);
    machine.control.vm_ended();
}

/// Blocks the source hot-added (before or during the migration) or removed, placed here
/// as KVM slots where the guest saw them on the source (or, for a stream that gives no
/// address, above the boot RAM and 4 GiB, first fit, as `ram-add` would).
struct KvmHotplug<'a> {
    ram: &'a KvmRam,
    boot: Vec<PlacedBlock>,
}

impl BlockHotplug for KvmHotplug<'_> {
    fn add_block(&mut self, ram: &RamList, id: &str, len: u64) -> Result<(), HotplugError> {
        self.add_block_placed(ram, id, len, None)
    }

    fn add_block_placed(
        &mut self,
        _: &RamList,
        id: &str,
        len: u64,
        guest_addr: Option<u64>,
    ) -> Result<(), HotplugError> {
        let addr = match guest_addr {
            Some(addr) => {
                crate::runner::check_hotplug_addr(&self.boot, addr, len)
                    .map_err(|e| format!("block {id:?}: {e}"))?;
                addr
            }
            None => crate::runner::hotplug_guest_addr(&self.boot, &self.ram.placed(), len)
                .ok_or_else(|| {
                    format!("no guest-physical range for block {id:?} ({len:#x} bytes)")
                })?,
        };
        self.ram.add(id, len, addr, RamBlockOptions::default())?;
        Ok(())
    }

    fn remove_block(&mut self, _: &RamList, id: &str) -> Result<(), HotplugError> {
        Ok(self.ram.remove(id)?)
    }
}

/// The freshly built VM as the incoming driver sees it.
struct DestVm<'a> {
    vmm: &'a Vmm,
    hotplug: KvmHotplug<'a>,
    resumed: bool,
}

impl RestorableVm for DestVm<'_> {
    fn ram(&self) -> Arc<RamList> {
        self.vmm.ram().ram().clone()
    }

    fn hotplug(&mut self) -> &mut dyn BlockHotplug {
        &mut self.hotplug
    }

    fn restore_state(&mut self, states: &[ComponentState]) -> Result<(), VmError> {
        let state = VmState::from_components(states, self.vmm.vcpu_count())?;
        Ok(self.vmm.restore_state(&state)?)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        // The vCPU threads start with the main loop, right after the confirmation.
        self.resumed = true;
        Ok(())
    }
}

/// `vmm run --incoming URI`: builds the VM for the stream, receives it, then runs the
/// guest like `vmm run` until it ends.
pub fn run_incoming(config: VmmConfig, uri: &str) -> Result<GuestExit, MigrateError> {
    let uri: MigrationUri = uri.parse()?;
    let vmm = Vmm::new_incoming(config)?;
    log::info!("waiting for the incoming migration on {uri}");
    let mut dest = DestVm {
        vmm: &vmm,
        hotplug: KvmHotplug {
            ram: vmm.ram(),
            boot: vmm.ram().placed(),
        },
        resumed: false,
    };
    // A failure is the one line the caller prints: the driver's own log of it stays
    // quiet unless VMM_LOG asks for it.
    let level = log::max_level();
    if std::env::var_os("VMM_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Off);
    }
    let received = incoming_from_uri(&mut dest, &uri, &IncomingOptions::default());
    log::set_max_level(level);
    let stats = received?;
    debug_assert!(dest.resumed);
    log::info!(
        "incoming migration loaded in {:.1} ms; the guest runs",
        stats.load_ms
    );
    Ok(vmm.run()?)
}
