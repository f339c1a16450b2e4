//! A built VM running: one thread per vCPU, the main loop ([`EventLoop`]) on the calling
//! thread and, with `--api-socket`, the control API on that loop — what
//! [`crate::Vmm::run`] does once [`crate::Vmm::new`] built everything.
//!
//! The main loop ends when a vCPU thread reports the VM's end (through
//! [`RunControl::vm_ended`]) or the API's `quit` stops it; then the vCPUs are stopped, the
//! API socket removed, and the guest's RAM slots deleted before the VM fd is closed.
//!
//! [`RunningVm`] is the same machine without the main loop (for embedding and tests):
//! pause, resume, [`RunningVm::save_state`] and stop. Saving state needs the vCPUs paused:
//! each parked vCPU saves its own state on its own thread (a job run at its checkpoint,
//! see [`crate::vcpu_control`]), so no vCPU ioctl ever races KVM_RUN.

use crate::api::server::Limits;
use crate::api::socket::ApiSocket;
use crate::api::{ApiError, ApiServer, BlockInfo, Control, Status, VmState};
use crate::config::{SerialOutput, VmmConfig};
use crate::devices::PioBus;
use crate::error::VmmError;
use crate::event_loop::{EventLoop, HandlerId};
use crate::layout::RAM_ABOVE_4G;
use crate::migrate::MigrationSlot;
use crate::persist::{self, KvmComponent, PersistError, VcpuContext, VcpuState};
use crate::persist::{ClockState, IoapicState, PicState, PitState};
use crate::terminal::RawTerminal;
use crate::vcpu::{install_kick_handler, GuestExit, VcpuReport, VcpuThread};
use crate::vcpu_control::RunControl;
use kvm_ioctls::{VcpuFd, VmFd};
use ramlist::kvm::{KvmRam, PlacedBlock};
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
/// Hot-added blocks start on this boundary in guest-physical space.
const HOTPLUG_ALIGN: u64 = 2 << 20;

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

/// Runs the VM until the guest ends it, a vCPU fails, or the API's `quit`.
pub(crate) fn run(parts: Parts) -> Result<GuestExit, VmmError> {
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
    crate::terminal::install_panic_hook();
    let lp = EventLoop::new().map_err(VmmError::host("creating the main loop"))?;
    // Before any other thread exists (the socket's mode comes from a process-wide umask).
    let socket = config
        .api_socket
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()?;
    let control = Arc::new(RunControl::new()?);
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

    let (tx, rx) = mpsc::channel();
    // SIGINT, SIGTERM and SIGHUP end the VM in order, as a guest shutdown does.
    let on_signal = Mutex::new((tx.clone(), control.clone()));
    crate::signals::install(move |sig| {
        let on_signal = lock(&on_signal);
        // The receiver is gone only when the VM is already ending.
        let _ = on_signal.0.send(VcpuReport {
            cpu: 0,
            result: Ok(GuestExit::Signal(sig)),
        });
        on_signal.1.vm_ended();
    })?;
    // With `--serial stdio`, stdin goes to the guest's console, in raw mode when it is a
    // terminal; the terminal is restored on every way out.
    let _terminal = match config.serial {
        SerialOutput::Stdio => {
            let raw = RawTerminal::enter()?;
            crate::devices::serial::spawn_stdin_reader(bus.clone())?;
            raw
        }
        SerialOutput::File(_) => None,
    };
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        let thread = VcpuThread::spawn(index as u8, vcpu, bus.clone(), control.clone(), tx.clone());
        match thread {
            Ok(t) => lock(&machine.threads).push(t),
            Err(e) => {
                stop_vcpus(&machine);
                return Err(e);
            }
        }
    }
    drop(tx);

    let looped = lp.run();
    crate::signals::clear();
    stop_vcpus(&machine);
    if let Some(api) = api {
        api.shutdown(&lp);
    }
    let result = match rx.try_recv() {
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
    hotplug_base: u64,
    pub(crate) quit: AtomicBool,
    /// Serializes hot-plug: choosing a free guest range, then placing the block there.
    hotplug: Mutex<()>,
    /// The current or last migration (see [`crate::migrate`]).
    pub(crate) migration: MigrationSlot,
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
        let hotplug_base = boot_blocks_end(&ram.placed()).max(RAM_ABOVE_4G);
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
            hotplug_base: align_up(hotplug_base, HOTPLUG_ALIGN).unwrap_or(hotplug_base),
            quit: AtomicBool::new(false),
            hotplug: Mutex::new(()),
            migration: MigrationSlot::default(),
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

    /// The VM's CPU and device state; the VM must be paused. Each vCPU saves its own
    /// state on its thread while parked; then the VM-wide parts (PIT, PICs, IOAPIC,
    /// kvmclock) and COM1 are read from here.
    pub(crate) fn save_state(&self) -> Result<persist::VmState, VmmError> {
        if !self.control.is_paused() || self.control.is_stopping() {
            return Err(PersistError::NotPaused("the VM is not paused".into()).into());
        }
        let n = usize::from(self.vcpus);
        let (tx, rx) = mpsc::channel();
        for cpu in 0..self.vcpus {
            let (tx, ctx) = (tx.clone(), self.vcpu_ctx.clone());
            self.control.run_on_parked(
                cpu,
                Box::new(move |fd| {
                    // The receiver is gone only if the save gave up waiting.
                    let _ = tx.send((cpu, VcpuState::save(fd, &ctx)));
                }),
            );
        }
        drop(tx);
        let mut vcpus: Vec<Option<VcpuState>> = vec![None; n];
        let deadline = std::time::Instant::now() + PAUSE_TIMEOUT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (cpu, state) = rx.recv_timeout(left).map_err(|_| {
                PersistError::NotPaused(format!(
                    "only {} of {n} vCPUs saved their state within {PAUSE_TIMEOUT:?}",
                    vcpus.iter().flatten().count()
                ))
            })?;
            vcpus[usize::from(cpu)] = Some(state?);
        }
        let vcpus = vcpus.into_iter().flatten().collect();
        Ok(persist::VmState {
            vcpus,
            pit: PitState::save(&self.vm)?,
            pic: PicState::save(&self.vm)?,
            ioapic: IoapicState::save(&self.vm)?,
            clock: ClockState::save(&self.vm)?,
            serial: self.bus.serial_state(),
        })
    }

    pub(crate) fn is_boot_block(&self, id: &str) -> bool {
        self.boot_blocks.iter().any(|b| b == id)
    }
}

impl Control for Machine {
    fn status(&self) -> Status {
        let state = if self.control.is_stopping() {
            VmState::Stopping
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
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
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
        if self.is_boot_block(id) || crate::vmm::RAM_BLOCK_IDS.contains(&id) {
            return Err(ApiError::ReservedId(id.to_string()));
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
        crate::migrate::start(&self.me, uri, downtime_ms, max_bandwidth, auto_converge)
            .map_err(ApiError::Migration)
    }
}

/// A VM whose vCPUs run on their own threads, without the main loop: see the module
/// documentation. Stop it with [`RunningVm::stop`] (dropping it stops it too).
pub struct RunningVm {
    machine: Option<Arc<Machine>>,
    reports: mpsc::Receiver<VcpuReport>,
}

impl RunningVm {
    pub(crate) fn start(parts: Parts) -> Result<RunningVm, VmmError> {
        install_kick_handler()?;
        let control = Arc::new(RunControl::new()?);
        let machine = Arc::new_cyclic(|me| {
            Machine::new(
                &parts.config,
                parts.vm,
                parts.ram,
                parts.bus.clone(),
                control.clone(),
                parts.boot_blocks,
                parts.vcpu_ctx,
                me.clone(),
            )
        });
        let (tx, reports) = mpsc::channel();
        let mut vm = RunningVm {
            machine: Some(machine.clone()),
            reports,
        };
        for (index, vcpu) in parts.vcpus.into_iter().enumerate() {
            let t = VcpuThread::spawn(
                index as u8,
                vcpu,
                parts.bus.clone(),
                control.clone(),
                tx.clone(),
            );
            match t {
                Ok(t) => lock(&machine.threads).push(t),
                Err(e) => {
                    vm.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(vm)
    }

    fn machine(&self) -> &Machine {
        // Only `shutdown` (in `stop` or drop) takes it.
        self.machine
            .as_deref()
            .expect("RunningVm used after shutdown")
    }

    /// Parks every vCPU outside KVM_RUN.
    pub fn pause(&self) -> Result<(), VmmError> {
        let m = self.machine();
        m.pause_vcpus().map_err(|parked| {
            PersistError::NotPaused(format!(
                "only {parked} of {} vCPUs parked within {PAUSE_TIMEOUT:?}",
                m.vcpus
            ))
            .into()
        })
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.machine().control.resume();
    }

    /// The CPU and device state; valid only while paused ([`RunningVm::pause`]).
    pub fn save_state(&self) -> Result<persist::VmState, VmmError> {
        self.machine().save_state()
    }

    /// The guest's RAM.
    pub fn ram(&self) -> &KvmRam {
        &self.machine().ram
    }

    /// A vCPU's report if one ended the VM (guest reset, shutdown, failure).
    pub fn ended(&self) -> Option<Result<GuestExit, VmmError>> {
        self.reports.try_recv().ok().map(|r| r.result)
    }

    /// Stops the vCPUs and tears the VM down (slots, then the VM fd); returns how the
    /// guest ended it, if it did.
    pub fn stop(mut self) -> Option<Result<GuestExit, VmmError>> {
        self.shutdown();
        self.ended()
    }

    fn shutdown(&mut self) {
        if let Some(machine) = self.machine.take() {
            stop_vcpus(&machine);
            rcu::drain_call_rcu();
            drop(machine);
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where a block of `size` bytes hot-added to a VM whose boot RAM is `boot` goes, given
/// the blocks `placed` now (the incoming side of a migration uses it too).
pub(crate) fn hotplug_guest_addr(
    boot: &[PlacedBlock],
    placed: &[PlacedBlock],
    size: u64,
) -> Option<u64> {
    let base = boot_blocks_end(boot).max(RAM_ABOVE_4G);
    free_guest_range(placed, align_up(base, HOTPLUG_ALIGN).unwrap_or(base), size)
}

/// Checks that a block of `size` bytes may be hot-added at `addr` in a VM whose boot RAM
/// is `boot`: where [`hotplug_guest_addr`] could have put it (at or above the hotplug
/// base, aligned). Overlaps with placed blocks are the RAM list's to refuse.
pub(crate) fn check_hotplug_addr(boot: &[PlacedBlock], addr: u64, size: u64) -> Result<(), String> {
    let base = boot_blocks_end(boot).max(RAM_ABOVE_4G);
    let base = align_up(base, HOTPLUG_ALIGN).unwrap_or(base);
    if addr < base || !addr.is_multiple_of(HOTPLUG_ALIGN) || addr.checked_add(size).is_none() {
        return Err(format!(
            "guest range {addr:#x}+{size:#x} is not a hotplug range (from {base:#x}, \
             {HOTPLUG_ALIGN:#x}-aligned)"
        ));
    }
    Ok(())
}

/// One past the highest guest-physical address of the boot RAM.
fn boot_blocks_end(placed: &[PlacedBlock]) -> u64 {
    placed
        .iter()
        .map(|p| p.guest_addr.saturating_add(p.size))
        .max()
        .unwrap_or(0)
}

fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// The lowest [`HOTPLUG_ALIGN`]ed guest-physical address at or above `base` where `size`
/// bytes overlap no placed block (first fit); `None` past 2^64.
fn free_guest_range(placed: &[PlacedBlock], base: u64, size: u64) -> Option<u64> {
    let mut ranges: Vec<(u64, u64)> = placed
        .iter()
        .map(|p| (p.guest_addr, p.guest_addr.saturating_add(p.size)))
        .collect();
    ranges.sort_unstable();
    let mut at = align_up(base, HOTPLUG_ALIGN)?;
    for (start, end) in ranges {
        if end <= at {
            continue;
        }
        if at.checked_add(size)? <= start {
            break;
        }
        at = align_up(end, HOTPLUG_ALIGN)?;
    }
    at.checked_add(size)?;
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(ranges: &[(u64, u64)]) -> Vec<PlacedBlock> {
        ranges
            .iter()
            .enumerate()
            .map(|(i, &(guest_addr, size))| PlacedBlock {
                id: format!("b{i}"),
                slot: i as u32,
                guest_addr,
                size,
                ram_addr: 0,
                logging: false,
                log_clients: vec![],
            })
            .collect()
    }

    #[test]
    fn hot_added_ram_goes_to_the_first_free_aligned_range() {
        const G: u64 = 1 << 30;
        const M: u64 = 1 << 20;
        let boot = placed(&[(0, 128 * M)]);
        assert_eq!(boot_blocks_end(&boot), 128 * M);
        assert_eq!(free_guest_range(&boot, 4 * G, G), Some(4 * G));
        let some = placed(&[(0, 128 * M), (4 * G, 16 * M), (4 * G + 64 * M, 16 * M)]);
        // Fits in the hole between the two blocks above 4 GiB.
        assert_eq!(free_guest_range(&some, 4 * G, 32 * M), Some(4 * G + 16 * M));
        // Does not fit: after the last one.
        assert_eq!(free_guest_range(&some, 4 * G, 64 * M), Some(4 * G + 80 * M));
        // Unaligned ends are rounded up.
        let odd = placed(&[(4 * G, 4096)]);
        assert_eq!(free_guest_range(&odd, 4 * G, 4096), Some(4 * G + 2 * M));
        assert_eq!(free_guest_range(&[], u64::MAX - M, 4096), None);
        assert_eq!(free_guest_range(&[], 4 * G, u64::MAX), None);
    }
}
