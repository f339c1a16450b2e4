//! The machine: one KVM VM as its pieces ([`MachineParts`], built in [`build`]) and, once
//! its vCPU threads run, as a [`Machine`] that other threads drive — the control API's
//! commands, a migration's source and destination, a snapshot. This is the narrow handle
//! those rooms use: pause, resume and kick the vCPUs, run work on them while parked
//! ([`state`]: save and restore CPU and device state), hot-add and remove RAM
//! ([`hotplug`]), and end the VM. The machine knows nothing of the main loop, the API
//! server or migration: those rooms (`crate::vmm`, `crate::live`) hold it, never the other
//! way round.
//!
//! [`RunningVm`] ([`embedded`]) is a machine running without the main loop, for embedding
//! and tests.

pub mod backing;
pub mod build;
pub mod embedded;
pub mod hotplug;
pub mod reset;
pub mod snapshot;
pub mod state;

pub use build::MachineParts;
pub use embedded::RunningVm;
pub use hotplug::HotplugError;

use crate::config::VmmConfig;
use crate::devices::PioBus;
use crate::error::VmmError;
use crate::events::{EventBus, VmEvent};
use crate::persist::{VcpuContext, VmState};
use crate::vcpu::{RunControl, VcpuReport, VcpuThread};
use kvm_ioctls::{VcpuFd, VmFd};
use ramlist::kvm::KvmRam;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long stopping the vCPUs may take once the VM ended.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a pause (or a job on every parked vCPU) waits for every vCPU.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the vCPU threads start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Into the guest at once (a boot).
    Running,
    /// Parked at their first checkpoint, before any KVM_RUN, until
    /// [`Machine::release_parked`] (a migration destination, while the stream loads).
    Parked,
}

/// The running VM as the control API, a migration or a snapshot sees it: see the module
/// documentation.
pub struct Machine {
    vm: Arc<VmFd>,
    bus: Arc<PioBus>,
    vcpu_ctx: VcpuContext,
    boot_memory: u64,
    vcpus: u8,
    ram: KvmRam,
    control: Arc<RunControl>,
    /// The vCPU threads, for kicking; emptied when the VM stops.
    threads: Mutex<Vec<VcpuThread>>,
    boot_blocks: Vec<String>,
    /// Lowest guest-physical address for hot-added RAM: above boot RAM and 4 GiB.
    hotplug_base: u64,
    quit: AtomicBool,
    /// Serializes hot-plug: choosing a free guest range, then placing the block there.
    hotplug: Mutex<()>,
    /// Where `STOP` and `RESUME` go.
    events: Arc<EventBus>,
    /// What the VM was built from: a reset loads its kernel again.
    config: VmmConfig,
    /// The state a reset puts the VM back in.
    power_on: VmState,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing guarded here is left half-changed by a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Machine {
    /// The machine `parts` make, its vCPU threads not started yet (see
    /// [`Machine::spawn_vcpus`]); the vCPU fds come back for that. Its pauses and resumes
    /// are told to `events`.
    pub(crate) fn new(
        parts: MachineParts,
        start: Start,
        events: Arc<EventBus>,
    ) -> Result<(Arc<Machine>, Vec<VcpuFd>), VmmError> {
        let control = Arc::new(match start {
            Start::Running => RunControl::new()?,
            Start::Parked => RunControl::new_paused()?,
        });
        let MachineParts {
            config,
            vm,
            ram,
            bus,
            vcpus,
            boot_blocks,
            vcpu_ctx,
            power_on,
            ..
        } = parts;
        let hotplug_base = crate::boot::layout::hotplug_base(&ram.placed());
        let machine = Machine {
            vm,
            bus,
            vcpu_ctx,
            boot_memory: config.memory,
            vcpus: config.vcpus,
            ram,
            control,
            threads: Mutex::new(Vec::new()),
            boot_blocks,
            hotplug_base,
            quit: AtomicBool::new(false),
            hotplug: Mutex::new(()),
            events,
            config,
            power_on,
        };
        Ok((Arc::new(machine), vcpus))
    }

    /// Starts one thread per vCPU; each reports how it ended the VM on `reports`. On an
    /// error the threads already started keep running: the caller stops them
    /// ([`Machine::stop_vcpus`]).
    pub(crate) fn spawn_vcpus(
        &self,
        vcpus: Vec<VcpuFd>,
        reports: &mpsc::Sender<VcpuReport>,
    ) -> Result<(), VmmError> {
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let thread = VcpuThread::spawn(
                index as u8,
                vcpu,
                self.bus.clone(),
                self.control.clone(),
                reports.clone(),
            )?;
            lock(&self.threads).push(thread);
        }
        Ok(())
    }

    /// Stops every vCPU thread and joins it (each given [`STOP_TIMEOUT`]).
    pub(crate) fn stop_vcpus(&self) {
        self.control.stop();
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            t.stop(STOP_TIMEOUT);
        }
    }

    /// The vCPUs' run control: pause and stop requests, the throttle, the VM's end.
    pub fn run_control(&self) -> &Arc<RunControl> {
        &self.control
    }

    /// The VM's bus of port-I/O devices (COM1, the i8042).
    pub fn bus(&self) -> &Arc<PioBus> {
        &self.bus
    }

    /// How many vCPUs the VM has.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpus
    }

    /// The RAM the VM booted with (`--memory`), hot-added blocks not counted.
    pub fn boot_memory(&self) -> u64 {
        self.boot_memory
    }

    /// The guest's RAM as KVM slots.
    pub fn ram(&self) -> &KvmRam {
        &self.ram
    }

    /// What backs the VM's RAM (`--memory-backend`): hot-added blocks too, and those a
    /// migration brings.
    pub fn memory_backend(&self) -> &crate::config::MemoryBackend {
        &self.config.memory_backend
    }

    /// The lowest guest-physical address for hot-added RAM: above boot RAM and 4 GiB.
    pub fn hotplug_base(&self) -> u64 {
        self.hotplug_base
    }

    /// Whether `id` is one of the RAM blocks the guest booted with (never removable).
    pub fn is_boot_block(&self, id: &str) -> bool {
        self.boot_blocks.iter().any(|b| b == id)
    }

    /// The bus the machine's events go to (and the events of what drives it).
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    /// Parks every vCPU (kicking them out of KVM_RUN); `Err(parked)` on timeout. A guest
    /// that ran is now stopped: `STOP`.
    pub fn pause_vcpus(&self) -> Result<(), usize> {
        let was_running = !self.control.is_paused();
        self.park_vcpus()?;
        if was_running {
            self.events.emit(VmEvent::Stop);
        }
        Ok(())
    }

    /// [`Machine::pause_vcpus`] with no event: a pause the guest's run state does not see
    /// (a reset's).
    fn park_vcpus(&self) -> Result<(), usize> {
        self.control
            .pause(usize::from(self.vcpus), PAUSE_TIMEOUT, || self.kick_vcpus())
    }

    /// Lets the vCPUs run again; a guest that was stopped runs: `RESUME`.
    pub fn resume(&self) {
        let was_paused = self.control.is_paused();
        self.control.resume();
        if was_paused {
            self.events.emit(VmEvent::Resume);
        }
    }

    /// Kicks every vCPU thread out of KVM_RUN (to its checkpoint).
    pub fn kick_vcpus(&self) {
        for t in lock(&self.threads).iter() {
            t.kick();
        }
    }

    /// Lets the parked vCPUs run and returns once every one of them has left its park
    /// (each on its way into KVM_RUN), or why not: some still parked after
    /// [`PAUSE_TIMEOUT`], or the VM stopping meanwhile.
    pub fn release_parked(&self) -> Result<(), String> {
        self.control
            .resume_and_wait(PAUSE_TIMEOUT)
            .map_err(|parked| {
                format!(
                    "{parked} of {} vCPUs still parked {PAUSE_TIMEOUT:?} after their release",
                    self.vcpus
                )
            })?;
        if self.control.is_stopping() {
            return Err("the VM is stopping".into());
        }
        self.events.emit(VmEvent::Resume);
        Ok(())
    }

    /// Marks the VM's end as asked for (`quit`, or a migration that moved the guest away):
    /// the VMM then ends with status 0.
    pub(crate) fn request_quit(&self) {
        self.quit.store(true, Ordering::Release);
    }

    /// Whether [`Machine::request_quit`] was called.
    pub(crate) fn quit_requested(&self) -> bool {
        self.quit.load(Ordering::Acquire)
    }
}
