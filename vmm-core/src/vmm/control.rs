//! The control API's commands ([`crate::api::Control`]) on this VMM: what needs the guest
//! goes to the machine, `migrate` to live migration's source side, and `status` gathers
//! the machine's state with the current migration's (or incoming migration's) progress.
//! One place decides what is refused while an incoming migration has not started the
//! guest here (QEMU's `inmigrate`: only `status` and `quit`).

use crate::api::{ApiError, BlockInfo, Control, MigrationParams, Status, VmState};
use crate::live::destination::IncomingSlot;
use crate::live::destination::Outcome;
use crate::live::source::{self, MigrationSlot};
use crate::machine::{HotplugError, Machine, PAUSE_TIMEOUT};
use migration::live::{MigrateOptions, MigrationProgress};
use migration::transport::{TlsClient, TlsServer};
use std::path::Path;
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The running machine and its migrations, as the API's commands see them.
pub(crate) struct VmControl {
    machine: Arc<Machine>,
    /// The current or last outgoing migration.
    migration: Arc<MigrationSlot>,
    /// The incoming migration, on a destination (empty on a VM that booted).
    incoming: Arc<IncomingSlot>,
    /// On a destination: the TLS its listener requires (`--tls-creds`).
    incoming_tls: Mutex<Option<TlsServer>>,
    /// On a destination: the receiving thread, once it started.
    receiver: Mutex<Option<JoinHandle<Outcome>>>,
    /// The ids of the snapshots this guest was restored from (a stack: the full one and
    /// its diffs), the bases a diff snapshot may name.
    restored_from: Mutex<Vec<u64>>,
}

impl VmControl {
    /// The commands for `machine`, with no migration yet.
    pub(crate) fn new(machine: Arc<Machine>) -> VmControl {
        VmControl {
            incoming: Arc::new(IncomingSlot::with_events(machine.events().clone())),
            machine,
            migration: Arc::default(),
            incoming_tls: Mutex::new(None),
            receiver: Mutex::new(None),
            restored_from: Mutex::new(Vec::new()),
        }
    }

    /// The guest was restored from the snapshots `ids` (`vmm run --restore`).
    pub(crate) fn set_restored_from(&self, ids: Vec<u64>) {
        *lock(&self.restored_from) = ids;
    }

    /// The TLS a destination's listener requires.
    pub(crate) fn set_incoming_tls(&self, tls: Option<TlsServer>) {
        *lock(&self.incoming_tls) = tls;
    }

    pub(crate) fn incoming_tls(&self) -> Option<TlsServer> {
        lock(&self.incoming_tls).clone()
    }

    /// Keeps the receiving thread, for the VMM's end to join.
    pub(crate) fn keep_receiver(&self, thread: JoinHandle<Outcome>) {
        *lock(&self.receiver) = Some(thread);
    }

    /// The receiving thread, if one started.
    pub(crate) fn take_receiver(&self) -> Option<JoinHandle<Outcome>> {
        lock(&self.receiver).take()
    }

    /// The incoming migration's bookkeeping, for the receiving thread.
    pub(crate) fn incoming(&self) -> &Arc<IncomingSlot> {
        &self.incoming
    }

    /// Refuses `cmd` while an incoming migration has not started the guest here: the
    /// loader owns the RAM list and the vCPUs wait for their state.
    fn guest_here(&self, cmd: &'static str) -> Result<(), ApiError> {
        if self.incoming.in_progress() {
            return Err(ApiError::Inmigrate(cmd));
        }
        Ok(())
    }

    /// Refuses `cmd` while post-copy still brings the guest's pages here: the layout is
    /// fixed until the last one is in place, and the guest is not whole to move on.
    fn not_in_postcopy(&self, cmd: &'static str) -> Result<(), ApiError> {
        if self.incoming.in_postcopy() {
            return Err(ApiError::Migration(format!(
                "{cmd} refused: the guest's memory is still arriving here (post-copy)"
            )));
        }
        Ok(())
    }

    fn not_stopping(&self) -> Result<(), ApiError> {
        if self.machine.run_control().is_stopping() {
            return Err(ApiError::Stopping);
        }
        Ok(())
    }

    /// Refuses to change the run state while a migration's final stage runs: the guest was
    /// paused for it and its state is on the way (a guest resumed now would run on after
    /// its state was taken).
    fn not_in_final_stage(&self, cmd: &'static str) -> Result<(), ApiError> {
        if self.migration.in_final_stage() {
            return Err(ApiError::Migration(format!(
                "{cmd} refused: a migration is in its final stage (the guest stays paused until it ends)"
            )));
        }
        Ok(())
    }

    /// Refuses to run the guest, or move it again, once a local migration gave it away:
    /// another VMM may run it on this very memory.
    fn not_handed_over(&self) -> Result<(), ApiError> {
        if self.migration.handed_over() {
            return Err(ApiError::Migration(
                "the guest was handed over to another VMM (a local or post-copy migration): it must not run here again"
                    .into(),
            ));
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each holds one value, set or taken in one step.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl From<HotplugError> for ApiError {
    fn from(e: HotplugError) -> ApiError {
        match e {
            HotplugError::ReservedId(id) => ApiError::ReservedId(id),
            HotplugError::BootRam(id) => ApiError::BootRam(id),
            HotplugError::NoGuestSpace { id, size } => ApiError::NoGuestSpace { id, size },
            HotplugError::TooLarge { id, size, max } => ApiError::BlockTooLarge { id, size, max },
            e @ HotplugError::ExceedsHost { .. } => ApiError::HostLimit(e.to_string()),
            e @ HotplugError::LayoutHeld => ApiError::Migration(e.to_string()),
            HotplugError::Ram(e) => ApiError::Ram(e),
        }
    }
}

/// The migration driver's options for `params` (each argument left out takes the
/// driver's default; auto-converge is on unless asked off).
fn migrate_options(params: &MigrationParams) -> MigrateOptions {
    let mut opts = MigrateOptions::default();
    if let Some(d) = params.downtime_ms {
        opts.downtime_limit = Duration::from_millis(d.max(1));
    }
    opts.max_bandwidth = params.max_bandwidth.filter(|&b| b > 0);
    opts.auto_converge = params.auto_converge.unwrap_or(true);
    opts.postcopy_after = params.postcopy_after;
    opts
}

impl Control for VmControl {
    fn status(&self) -> Status {
        let m = &self.machine;
        let control = m.run_control();
        let state = if control.is_stopping() {
            VmState::Stopping
        } else if self.incoming.in_progress() {
            VmState::Inmigrate
        } else if self.migration.active() {
            VmState::Migrating
        } else if control.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        };
        let guard = rcu::read_lock();
        let blocks = m
            .ram()
            .ram()
            .blocks(&guard)
            .map(|b| BlockInfo {
                id: b.id().to_string(),
                size: b.len(),
                guest_addr: b.guest_addr(),
                hotplugged: !m.is_boot_block(b.id()),
            })
            .collect::<Vec<_>>();
        drop(guard);
        Status {
            state,
            memory_bytes: blocks.iter().map(|b| b.size).sum(),
            boot_memory_bytes: m.boot_memory(),
            vcpus: m.vcpu_count(),
            blocks,
            cpu_throttle_percent: control.throttle(),
            migration: self.migration.status_json(),
            incoming: self.incoming.status_json(),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        // A vCPU that waits on a missing page inside KVM cannot be kicked out to park.
        self.not_in_postcopy("pause")?;
        self.guest_here("pause")?;
        self.not_stopping()?;
        self.not_handed_over()?;
        self.not_in_final_stage("pause")?;
        let vcpus = usize::from(self.machine.vcpu_count());
        self.machine
            .pause_vcpus()
            .map_err(|parked| ApiError::PauseTimeout {
                parked,
                vcpus,
                timeout_ms: PAUSE_TIMEOUT.as_millis() as u64,
            })?;
        log::info!("VM paused");
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.guest_here("resume")?;
        self.not_stopping()?;
        self.not_handed_over()?;
        self.not_in_final_stage("resume")?;
        self.machine.resume();
        log::info!("VM resumed");
        Ok(())
    }

    fn quit(&self) {
        log::info!("quit requested through the api");
        self.machine.request_quit();
    }

    fn ram_add(&self, id: &str, size: u64) -> Result<BlockInfo, ApiError> {
        self.guest_here("ram-add")?;
        self.not_in_postcopy("ram-add")?;
        self.not_handed_over()?;
        let placed = self.machine.ram_add(id, size)?;
        Ok(BlockInfo {
            id: placed.id,
            size: placed.size,
            guest_addr: Some(placed.guest_addr),
            hotplugged: true,
        })
    }

    fn ram_remove(&self, id: &str) -> Result<(), ApiError> {
        self.guest_here("ram-remove")?;
        self.not_in_postcopy("ram-remove")?;
        self.not_handed_over()?;
        Ok(self.machine.ram_remove(id)?)
    }

    fn snapshot(&self, dir: &str, diff_from: Option<&str>) -> Result<serde_json::Value, ApiError> {
        self.guest_here("snapshot")?;
        self.not_in_postcopy("snapshot")?;
        self.not_stopping()?;
        if dir.is_empty() {
            return Err(ApiError::Snapshot("an empty directory name".into()));
        }
        self.not_handed_over()?;
        if self.migration.active() {
            return Err(ApiError::Snapshot(
                "a migration is under way: cancel it first".into(),
            ));
        }
        let base = match diff_from {
            None => None,
            Some(base) => {
                let open = migration::snapshot::open_snapshot(Path::new(base))
                    .map_err(|e| ApiError::Snapshot(e.to_string()))?;
                if !lock(&self.restored_from).contains(&open.state.id) {
                    return Err(ApiError::Snapshot(format!(
                        "--diff-from {base}: this guest was not restored from that snapshot (nor from one stacked on it); a diff snapshot records the pages a guest restored by mapping wrote since: take a full snapshot"
                    )));
                }
                Some(open)
            }
        };
        let stats = source::snapshot(&self.machine, Path::new(dir), base.as_ref())
            .map_err(ApiError::Snapshot)?;
        serde_json::to_value(stats).map_err(|e| ApiError::Snapshot(e.to_string()))
    }

    fn migrate_cancel(&self) -> Result<(), ApiError> {
        self.guest_here("migrate_cancel")?;
        self.migration.cancel().map_err(ApiError::Migration)?;
        log::info!("migration cancel requested through the api");
        Ok(())
    }

    fn quit_refused(&self) -> Option<String> {
        self.migration.in_postcopy().then(|| {
            "quit refused: post-copy is under way, and this VMM holds pages the guest on the destination still needs (quitting would lose the guest); a post-copy paused by a broken link can be given up with QMP's migrate_cancel first".to_string()
        })
    }

    fn migrate_start_postcopy(&self) -> Result<(), ApiError> {
        self.guest_here("start-postcopy")?;
        self.migration
            .start_postcopy()
            .map_err(ApiError::Migration)?;
        log::info!("post-copy requested through the api");
        Ok(())
    }

    fn system_reset(&self) -> Result<(), ApiError> {
        self.guest_here("system_reset")?;
        self.not_in_postcopy("system_reset")?;
        self.not_stopping()?;
        self.not_handed_over()?;
        if self.migration.active() {
            return Err(ApiError::Reset(
                "a migration is under way: cancel it first".into(),
            ));
        }
        self.machine
            .reset()
            .map_err(|e| ApiError::Reset(e.to_string()))
    }

    fn migrate_incoming(&self, uri: &str) -> Result<(), ApiError> {
        if !self.incoming.is_deferred() {
            return Err(ApiError::Migration(
                "migrate-incoming needs a VMM started with --incoming defer whose migration has not begun".into(),
            ));
        }
        let parsed = uri
            .parse()
            .map_err(|e: migration::transport::UriError| ApiError::Migration(e.to_string()))?;
        let bound = super::incoming::start_receiving(&self.machine, self, &parsed)
            .map_err(|e| ApiError::Migration(e.to_string()))?;
        log::info!("incoming migration: listening on {bound} (migrate-incoming)");
        Ok(())
    }

    fn migration_progress(&self) -> Option<Arc<MigrationProgress>> {
        self.migration.progress()
    }

    fn is_running(&self) -> bool {
        let control = self.machine.run_control();
        !control.is_paused() && !control.is_stopping() && !self.incoming.in_progress()
    }

    fn migrate(&self, params: &MigrationParams) -> Result<(), ApiError> {
        if params.resume {
            let uri = params
                .uri
                .parse()
                .map_err(|e: migration::transport::UriError| ApiError::Migration(e.to_string()))?;
            self.migration
                .resume_postcopy(uri)
                .map_err(ApiError::Migration)?;
            log::info!(
                "post-copy resume on {} requested through the api",
                params.uri
            );
            return Ok(());
        }
        self.guest_here("migrate")?;
        self.not_in_postcopy("migrate")?;
        self.not_handed_over()?;
        let tls = params
            .tls_creds
            .as_deref()
            .map(|dir| TlsClient::load(Path::new(dir)))
            .transpose()
            .map_err(|e| ApiError::Migration(e.to_string()))?;
        if params.local && params.postcopy_after.is_some() {
            return Err(ApiError::Migration(
                "a local migration hands the memory over and copies no page: it has nothing to switch to post-copy".into(),
            ));
        }
        let carry = match (params.local, tls) {
            (false, tls) => source::Carry::Copy(tls),
            (true, None) => source::Carry::Local,
            (true, Some(_)) => {
                return Err(ApiError::Migration(
                    "a local migration passes descriptors over a unix socket: it takes no TLS"
                        .into(),
                ))
            }
        };
        source::start(
            &self.machine,
            &self.migration,
            &params.uri,
            migrate_options(params),
            carry,
        )
        .map_err(ApiError::Migration)
    }
}
