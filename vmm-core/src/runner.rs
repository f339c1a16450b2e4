//! A built VM running: one thread per vCPU, the main loop ([`EventLoop`]) on the calling
//! thread and, with `--api-socket`, the control API on that loop — what
//! [`crate::Vmm::run`] does once [`crate::Vmm::new`] built everything.
//!
//! The main loop ends when a vCPU thread reports the VM's end (through
//! [`RunControl::vm_ended`]) or the API's `quit` stops it; then the vCPUs are stopped, the
//! API socket removed, and the guest's RAM slots deleted before the VM fd is closed.
//! `Runner` is that in steps, for a migration destination ([`crate::incoming`]): its
//! vCPU threads start parked (`Start::Parked`), the stream loads beside the main loop,
//! and `Machine::release_parked` lets them run once their state is in.
//!
//! [`RunningVm`] (in `embedded.rs`) is the same machine without the main loop (for
//! embedding and tests): pause, resume, [`RunningVm::save_state`] and stop. Saving or
//! restoring state needs the vCPUs parked: each parked vCPU saves or restores its own
//! state on its own thread (a job run at its checkpoint, see [`crate::vcpu::control`]), so
//! no vCPU ioctl ever races KVM_RUN.

use crate::api::server::Limits;
use crate::api::socket::ApiSocket;
use crate::api::{ApiError, ApiServer, BlockInfo, Control, Status, VmState};
use crate::boot::layout::{free_guest_range, hotplug_base};
use crate::config::{SerialOutput, VmmConfig};
use crate::devices::PioBus;
use crate::error::VmmError;
use crate::event_loop::{EventLoop, HandlerId};
use crate::host::terminal::RawTerminal;
use crate::incoming::IncomingSlot;
use crate::migrate::MigrationSlot;
use crate::persist::{self, KvmComponent, PersistError, VcpuContext, VcpuState};
use crate::persist::{ClockState, IoapicState, PicState, PitState};
use crate::vcpu::control::RunControl;
use crate::vcpu::{install_kick_handler, GuestExit, VcpuReport, VcpuThread};
use kvm_ioctls::{VcpuFd, VmFd};
use ramlist::kvm::KvmRam;
use ramlist::RamBlockOptions;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use vmm_sys_util::epoll::EventSet;

/// How long stopping the vCPUs may take once the VM ended.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a pause waits for every vCPU to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What [`crate::Vmm::new`] built, handed over to run.
pub(crate) struct Parts {
    pub config: VmmConfig,
    pub vm: Arc<VmFd>,
    pub ram: KvmRam,
    pub bus: Arc<PioBus>,
    pub vcpus: Vec<VcpuFd>,
    /// Ids of the RAM blocks the guest booted with (never removable).
    pub boot_blocks: Vec<String>,
    /// What saving vCPU state needs.
    pub vcpu_ctx: VcpuContext,
}

/// How the vCPU threads start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Into the guest at once (a boot).
    Running,
    /// Parked at their first checkpoint, before any KVM_RUN, until
    /// [`Machine::release_parked`] (a migration destination, while the stream loads).
    Parked,
}

/// Runs the VM until the guest ends it, a vCPU fails, or the API's `quit`.
pub(crate) fn run(parts: Parts) -> Result<GuestExit, VmmError> {
    let runner = Runner::start(parts, Start::Running)?;
    let looped = runner.run_loop();
    runner.finish(looped)
}

/// A VM set up to run: the main loop with the API on it, signals, the terminal, and the
/// vCPU threads. [`Runner::run_loop`] runs the loop on the calling thread until the VM
/// ends; [`Runner::finish`] stops the vCPUs and tears everything down in order.
pub(crate) struct Runner {
    lp: EventLoop,
    machine: Arc<Machine>,
    api: Option<ApiServer>,
    reports: mpsc::Receiver<VcpuReport>,
    vm: Arc<VmFd>,
    /// Restored on drop, last.
    _terminal: Option<RawTerminal>,
}

impl Runner {
    /// Sets the VM up and starts its vCPU threads as `start` says. The API socket (if
    /// any) is bound and listening when this returns; it is served once the loop runs.
    pub(crate) fn start(parts: Parts, start: Start) -> Result<Runner, VmmError> {
        let Parts {
            config,
            vm,
            ram,
            bus,
            vcpus,
            boot_blocks,
            vcpu_ctx,
        } = parts;
        install_kick_handler()?;
        crate::host::terminal::install_panic_hook();
        let lp = EventLoop::new().map_err(VmmError::host("creating the main loop"))?;
        // Before any other thread exists (the socket's mode comes from a process-wide umask).
        let socket = config
            .api_socket
            .as_deref()
            .map(ApiSocket::bind)
            .transpose()?;
        let control = Arc::new(match start {
            Start::Running => RunControl::new()?,
            Start::Parked => RunControl::new_paused()?,
        });
        let machine = Arc::new_cyclic(|me| {
            Machine::new(
                &config,
                vm.clone(),
                ram,
                bus.clone(),
                control.clone(),
                boot_blocks,
                vcpu_ctx,
                me.clone(),
            )
        });
        let c = control.clone();
        lp.add_io(
            control.ended_fd(),
            EventSet::IN,
            move |lp: &EventLoop, _: HandlerId, _: EventSet| {
                c.clear_ended();
                lp.stop();
            },
        )
        .map_err(VmmError::host("watching the vCPUs"))?;
        let api = socket
            .map(|s| ApiServer::start(&lp, s, machine.clone(), Limits::from_env()))
            .transpose()
            .map_err(VmmError::host("serving the api socket"))?;

        let (tx, reports) = mpsc::channel();
        // SIGINT, SIGTERM and SIGHUP end the VM in order, as a guest shutdown does.
        let on_signal = Mutex::new((tx.clone(), control.clone()));
        crate::host::signals::install(move |sig| {
            let on_signal = lock(&on_signal);
            // The receiver is gone only when the VM is already ending.
            let _ = on_signal.0.send(VcpuReport {
                cpu: 0,
                result: Ok(GuestExit::Signal(sig)),
            });
            on_signal.1.vm_ended();
        })?;
        // With `--serial stdio`, stdin goes to the guest's console, in raw mode when it is
        // a terminal; the terminal is restored on every way out.
        let terminal = match config.serial {
            SerialOutput::Stdio => {
                let raw = RawTerminal::enter()?;
                crate::devices::serial::spawn_stdin_reader(bus.clone())?;
                raw
            }
            SerialOutput::File(_) => None,
        };
        let runner = Runner {
            lp,
            machine,
            api,
            reports,
            vm,
            _terminal: terminal,
        };
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let thread =
                VcpuThread::spawn(index as u8, vcpu, bus.clone(), control.clone(), tx.clone());
            match thread {
                Ok(t) => lock(&runner.machine.threads).push(t),
                Err(e) => {
                    let _ = runner.finish(Ok(()));
                    return Err(e);
                }
            }
        }
        Ok(runner)
    }

    /// The machine, for work beside the main loop (a migration destination's load).
    pub(crate) fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    /// Runs the main loop on this thread until the VM ends: a vCPU's report, a signal,
    /// the API's `quit`, or [`RunControl::vm_ended`] from elsewhere.
    pub(crate) fn run_loop(&self) -> std::io::Result<()> {
        let looped = self.lp.run();
        crate::host::signals::clear();
        looped
    }

    /// Stops the vCPUs, closes the API, and tears the VM down (the slots before the VM
    /// fd); returns how the VM ended.
    pub(crate) fn finish(self, looped: std::io::Result<()>) -> Result<GuestExit, VmmError> {
        let Runner {
            lp,
            machine,
            api,
            reports,
            vm,
            _terminal,
        } = self;
        crate::host::signals::clear();
        stop_vcpus(&machine);
        if let Some(api) = api {
            api.shutdown(&lp);
        }
        let result = match reports.try_recv() {
            Ok(report) => {
                log::debug!("vCPU {} ended the VM: {:?}", report.cpu, report.result);
                report.result
            }
            Err(_) if machine.quit.load(Ordering::Acquire) => Ok(GuestExit::Quit),
            Err(_) => Err(match looped {
                Err(source) => VmmError::Host {
                    what: "the main loop failed",
                    source,
                },
                Ok(()) => VmmError::VcpuFailed {
                    cpu: 0,
                    what: "the main loop ended without a reason".into(),
                },
            }),
        };
        let _ = std::io::stdout().flush();
        // The handlers' counted references to the machine go after grace periods; then the
        // slots go (KvmRam's drop), then the VM fd.
        drop(lp);
        for _ in 0..3 {
            rcu::drain_call_rcu();
        }
        drop(machine);
        drop(vm);
        result
    }
}

mod embedded;
pub use embedded::RunningVm;

fn stop_vcpus(machine: &Machine) {
    machine.control.stop();
    let threads = std::mem::take(&mut *lock(&machine.threads));
    for t in threads {
        t.stop(STOP_TIMEOUT);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing guarded here is left half-changed by a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running VM as the control API (and the migration thread) sees it.
pub(crate) struct Machine {
    vm: Arc<VmFd>,
    bus: Arc<PioBus>,
    vcpu_ctx: VcpuContext,
    boot_memory: u64,
    pub(crate) vcpus: u8,
    pub(crate) ram: KvmRam,
    pub(crate) control: Arc<RunControl>,
    /// The vCPU threads, for kicking; emptied when the VM stops.
    threads: Mutex<Vec<VcpuThread>>,
    boot_blocks: Vec<String>,
    /// Lowest guest-physical address for hot-added RAM: above boot RAM and 4 GiB.
    pub(crate) hotplug_base: u64,
    pub(crate) quit: AtomicBool,
    /// Serializes hot-plug: choosing a free guest range, then placing the block there.
    hotplug: Mutex<()>,
    /// The current or last migration (see [`crate::migrate`]).
    pub(crate) migration: MigrationSlot,
    /// The incoming migration, on a destination (see [`crate::incoming`]).
    pub(crate) incoming: IncomingSlot,
    /// Itself, for the migration thread.
    me: Weak<Machine>,
}

impl Machine {
    #[allow(clippy::too_many_arguments)]
    fn new(
        config: &VmmConfig,
        vm: Arc<VmFd>,
        ram: KvmRam,
        bus: Arc<PioBus>,
        control: Arc<RunControl>,
        boot_blocks: Vec<String>,
        vcpu_ctx: VcpuContext,
        me: Weak<Machine>,
    ) -> Machine {
        let hotplug_base = hotplug_base(&ram.placed());
        Machine {
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
            migration: MigrationSlot::default(),
            incoming: IncomingSlot::default(),
            me,
        }
    }

    /// Parks every vCPU (kicking them out of KVM_RUN); `Err(parked)` on timeout.
    pub(crate) fn pause_vcpus(&self) -> Result<(), usize> {
        self.control
            .pause(usize::from(self.vcpus), PAUSE_TIMEOUT, || self.kick_vcpus())
    }

    /// Kicks every vCPU thread out of KVM_RUN (to its checkpoint).
    pub(crate) fn kick_vcpus(&self) {
        for t in lock(&self.threads).iter() {
            t.kick();
        }
    }

    /// Runs `job` on every vCPU's own thread while it sits parked (the VM paused, or
    /// started [`Start::Parked`]); the results by vCPU index, or an error naming `what`
    /// when not all of them came back within [`PAUSE_TIMEOUT`].
    fn on_each_parked<T: Send + 'static>(
        &self,
        what: &str,
        job: impl Fn(u8, &VcpuFd) -> T + Send + Sync + 'static,
    ) -> Result<Vec<T>, PersistError> {
        let n = usize::from(self.vcpus);
        let job = Arc::new(job);
        let (tx, rx) = mpsc::channel();
        for cpu in 0..self.vcpus {
            let (tx, job) = (tx.clone(), job.clone());
            self.control.run_on_parked(
                cpu,
                Box::new(move |fd| {
                    // The receiver is gone only if the caller gave up waiting.
                    let _ = tx.send((cpu, job(cpu, fd)));
                }),
            );
        }
        drop(tx);
        let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let deadline = std::time::Instant::now() + PAUSE_TIMEOUT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (cpu, r) = rx.recv_timeout(left).map_err(|_| {
                PersistError::NotPaused(format!(
                    "only {} of {n} vCPUs {what} within {PAUSE_TIMEOUT:?}",
                    results.iter().flatten().count()
                ))
            })?;
            results[usize::from(cpu)] = Some(r);
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// The VM's CPU and device state; the VM must be paused. Each vCPU saves its own
    /// state on its thread while parked; then the VM-wide parts (PIT, PICs, IOAPIC,
    /// kvmclock) and COM1 are read from here.
    pub(crate) fn save_state(&self) -> Result<persist::VmState, VmmError> {
        if !self.control.is_paused() || self.control.is_stopping() {
            return Err(PersistError::NotPaused("the VM is not paused".into()).into());
        }
        let ctx = self.vcpu_ctx.clone();
        let vcpus = self
            .on_each_parked("saved their state", move |_, fd| VcpuState::save(fd, &ctx))?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(persist::VmState {
            vcpus,
            pit: PitState::save(&self.vm)?,
            pic: PicState::save(&self.vm)?,
            ioapic: IoapicState::save(&self.vm)?,
            clock: ClockState::save(&self.vm)?,
            serial: self.bus.serial_state(),
            // The caller (a migration) knows whether it paused a running guest.
            running: true,
        })
    }

    /// Puts the VM in `state` (a migration destination's, started [`Start::Parked`]),
    /// in [`crate::persist`]'s order: PIT, PICs, IOAPIC, kvmclock, then each vCPU on its
    /// own parked thread, then COM1. The vCPUs stay parked.
    pub(crate) fn restore_state(&self, state: &persist::VmState) -> Result<(), VmmError> {
        if !self.control.is_paused() || self.control.is_stopping() {
            return Err(PersistError::NotPaused("the VM is not paused".into()).into());
        }
        if state.vcpus.len() != usize::from(self.vcpus) {
            return Err(PersistError::VcpuCount {
                state: state.vcpus.len(),
                vm: usize::from(self.vcpus),
            }
            .into());
        }
        state.pit.restore(&self.vm)?;
        state.pic.restore(&self.vm)?;
        state.ioapic.restore(&self.vm)?;
        state.clock.restore(&self.vm)?;
        let (states, ctx) = (Arc::new(state.vcpus.clone()), self.vcpu_ctx.clone());
        let restored = self.on_each_parked("restored their state", move |cpu, fd| {
            states[usize::from(cpu)].restore(fd, &ctx)
        })?;
        for r in restored {
            r?;
        }
        self.bus.restore_serial(&state.serial)?;
        log::info!("VM state restored ({} vCPUs)", self.vcpus);
        Ok(())
    }

    /// Lets the parked vCPUs run and returns once every one of them has left its park
    /// (each on its way into KVM_RUN), or why not: some still parked after
    /// [`PAUSE_TIMEOUT`], or the VM stopping meanwhile.
    pub(crate) fn release_parked(&self) -> Result<(), String> {
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
        Ok(())
    }

    /// Refuses `cmd` while an incoming migration has not started the guest here: the
    /// loader owns the RAM list and the vCPUs wait for their state.
    fn guest_here(&self, cmd: &'static str) -> Result<(), ApiError> {
        if self.incoming.in_progress() {
            return Err(ApiError::Inmigrate(cmd));
        }
        Ok(())
    }

    pub(crate) fn is_boot_block(&self, id: &str) -> bool {
        self.boot_blocks.iter().any(|b| b == id)
    }
}

impl Control for Machine {
    fn status(&self) -> Status {
        let state = if self.control.is_stopping() {
            VmState::Stopping
        } else if self.incoming.in_progress() {
            VmState::Inmigrate
        } else if self.migration.active() {
            VmState::Migrating
        } else if self.control.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        };
        let guard = rcu::read_lock();
        let blocks = self
            .ram
            .ram()
            .blocks(&guard)
            .map(|b| BlockInfo {
                id: b.id().to_string(),
                size: b.len(),
                guest_addr: b.guest_addr(),
                hotplugged: !self.is_boot_block(b.id()),
            })
            .collect::<Vec<_>>();
        drop(guard);
        Status {
            state,
            memory_bytes: blocks.iter().map(|b| b.size).sum(),
            boot_memory_bytes: self.boot_memory,
            vcpus: self.vcpus,
            blocks,
            cpu_throttle_percent: self.control.throttle(),
            migration: self.migration.status_json(),
            incoming: self.incoming.status_json(),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.guest_here("pause")?;
        if self.control.is_stopping() {
            return Err(ApiError::Stopping);
        }
        let vcpus = usize::from(self.vcpus);
        self.pause_vcpus()
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
        if self.control.is_stopping() {
            return Err(ApiError::Stopping);
        }
        self.control.resume();
        log::info!("VM resumed");
        Ok(())
    }

    fn quit(&self) {
        log::info!("quit requested through the api");
        self.quit.store(true, Ordering::Release);
    }

    fn ram_add(&self, id: &str, size: u64) -> Result<BlockInfo, ApiError> {
        self.guest_here("ram-add")?;
        if self.is_boot_block(id) || crate::vmm::RAM_BLOCK_IDS.contains(&id) {
            return Err(ApiError::ReservedId(id.to_string()));
        }
        let max = migration::load::LoadOptions::default().max_new_block;
        if size > max {
            let id = id.to_string();
            return Err(ApiError::BlockTooLarge { id, size, max });
        }
        let _hotplug = lock(&self.hotplug);
        let addr =
            free_guest_range(&self.ram.placed(), self.hotplug_base, size).ok_or_else(|| {
                ApiError::NoGuestSpace {
                    id: id.to_string(),
                    size,
                }
            })?;
        let placed = self.ram.add(id, size, addr, RamBlockOptions::default())?;
        log::info!(
            "RAM block {id:?} added: {size:#x} bytes at guest {:#x} (slot {})",
            placed.guest_addr,
            placed.slot
        );
        Ok(BlockInfo {
            id: placed.id,
            size: placed.size,
            guest_addr: Some(placed.guest_addr),
            hotplugged: true,
        })
    }

    fn ram_remove(&self, id: &str) -> Result<(), ApiError> {
        self.guest_here("ram-remove")?;
        if self.is_boot_block(id) {
            return Err(ApiError::BootRam(id.to_string()));
        }
        let _hotplug = lock(&self.hotplug);
        self.ram.remove(id)?;
        log::info!("RAM block {id:?} removed; its memory goes after a grace period");
        Ok(())
    }

    fn migrate(
        &self,
        uri: &str,
        downtime_ms: Option<u64>,
        max_bandwidth: Option<u64>,
        auto_converge: Option<bool>,
    ) -> Result<(), ApiError> {
        self.guest_here("migrate")?;
        crate::migrate::start(&self.me, uri, downtime_ms, max_bandwidth, auto_converge)
            .map_err(ApiError::Migration)
    }
}
