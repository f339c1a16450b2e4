//! One thread per vCPU: KVM_RUN in a loop, port and MMIO exits handed to the devices, and
//! the exits that end the VM reported to the thread that waits in [`crate::Vmm::run`].
//!
//! Each vCPU thread is a quiescent-state RCU reader ([`rcu::QsbrReader`], DESIGN.md's
//! concurrency rules): offline inside KVM_RUN, so no grace period waits for a vCPU that
//! sits in the guest; online while it handles an exit, dispatching through the RCU device
//! map with no lock and no read-side cost; a quiescent state after each exit. Anything else
//! that blocks in the loop (a pause, a throttle's sleep) must run inside
//! `qsbr.offline_scope`.
//!
//! Stopping and pausing ([`RunControl`]): the main thread sets the stop or pause request
//! and sends each vCPU thread the kick signal (a real-time signal), which makes a KVM_RUN
//! in progress return EINTR; the loop then sees the request at its checkpoint. The
//! signal's handler also sets `immediate_exit` in the thread's `kvm_run`, so a kick that
//! lands after the checkpoint but before the ioctl makes KVM_RUN return at once.

use super::control::RunControl;
use crate::devices::{IoAction, PioBus};
use crate::error::VmmError;
use kvm_bindings::kvm_run;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// How the guest ended the VM, when it did so cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset the machine (i8042 pulse, KVM reset event).
    Reset,
    /// The guest powered off.
    Shutdown,
    /// The VMM was told to stop by a signal (SIGINT, SIGTERM, SIGHUP): an orderly end.
    Signal(i32),
    /// Not the guest: the control API's `quit` ended the VM.
    Quit,
}

/// What a vCPU thread reports when it leaves its loop on its own.
#[derive(Debug)]
pub struct VcpuReport {
    /// The vCPU's index.
    pub cpu: u8,
    /// A clean end of the VM, or why the vCPU cannot go on.
    pub result: Result<GuestExit, VmmError>,
}

/// What one exit asks of the loop.
enum Step {
    Continue,
    Stop(Result<GuestExit, VmmError>),
    TripleFault,
    InternalError,
}

/// The signal that interrupts KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This vCPU thread's `kvm_run` while its loop runs; null elsewhere.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialized thread-local without destructor is a plain TLS read here.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own `kvm_run` mapping, set by `KvmRunSlot`
        // for the life of its loop (and cleared before the vCPU fd, which owns the
        // mapping, is dropped); the signal interrupted this very thread, which touches
        // `immediate_exit` only between KVM_RUN calls, and the store is volatile.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Publishes a vCPU's `kvm_run` to the kick handler of the current thread while alive.
struct KvmRunSlot;

impl KvmRunSlot {
    fn set(vcpu: &mut VcpuFd) -> KvmRunSlot {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
        KvmRunSlot
    }
}

impl Drop for KvmRunSlot {
    fn drop(&mut self) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Installs the kick signal's (empty) handler, once per process.
pub fn install_kick_handler() -> Result<(), VmmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|errno| VmmError::Host {
            what: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// A running vCPU thread.
pub struct VcpuThread {
    cpu: u8,
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Starts vCPU `cpu`'s loop on its own thread.
    pub fn spawn(
        cpu: u8,
        vcpu: VcpuFd,
        bus: Arc<PioBus>,
        control: Arc<RunControl>,
        reports: Sender<VcpuReport>,
    ) -> Result<VcpuThread, VmmError> {
        // Kicking a thread with no handler for the kick signal would end the process.
        install_kick_handler()?;
        let handle = thread::Builder::new()
            .name(format!("vcpu{cpu}"))
            .spawn(move || {
                let result = catch_unwind(AssertUnwindSafe(|| run_loop(cpu, vcpu, &bus, &control)))
                    .unwrap_or_else(|_| {
                        Some(Err(VmmError::VcpuFailed {
                            cpu,
                            what: "the vCPU thread panicked".into(),
                        }))
                    });
                control.exited();
                if let Some(result) = result {
                    // The receiver is gone only when the VMM is already ending.
                    let _ = reports.send(VcpuReport { cpu, result });
                    control.vm_ended();
                }
            })
            .map_err(VmmError::host("spawning a vCPU thread"))?;
        Ok(VcpuThread { cpu, handle })
    }

    /// Sends the kick signal: a KVM_RUN in progress (or about to start) returns.
    pub fn kick(&self) {
        if !self.handle.is_finished() {
            if let Err(e) = self.handle.kill(kick_signal()) {
                log::warn!("kicking vCPU {}: {e}", self.cpu);
            }
        }
    }

    /// Kicks the thread out of KVM_RUN until it ends (the stop flag must be set), for at
    /// most `timeout`. A thread that does not end in time is left behind (logged).
    pub fn stop(self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.handle.is_finished() {
            if Instant::now() >= deadline {
                log::warn!("vCPU {} did not stop within {timeout:?}", self.cpu);
                return;
            }
            if let Err(e) = self.handle.kill(kick_signal()) {
                log::warn!("kicking vCPU {}: {e}", self.cpu);
            }
            thread::sleep(Duration::from_millis(1));
        }
        let _ = self.handle.join();
    }
}

/// Runs the vCPU until the VM ends (`Some`) or it is stopped (`None`); parks it while
/// paused.
fn run_loop(
    cpu: u8,
    mut vcpu: VcpuFd,
    bus: &PioBus,
    control: &RunControl,
) -> Option<Result<GuestExit, VmmError>> {
    let failed = |what: String| Some(Err(VmmError::VcpuFailed { cpu, what }));
    // Dropped before `vcpu` (a parameter): the handler never sees an unmapped kvm_run.
    let _kvm_run = KvmRunSlot::set(&mut vcpu);
    let mut qsbr = rcu::QsbrReader::register();
    let mut throttled = control.throttle_epoch();
    loop {
        // A throttle's sleep and a pause hold the thread here: offline, so no grace
        // period waits for it.
        if !qsbr.offline_scope(|| {
            control.throttle_point(&mut throttled);
            control.checkpoint_vcpu(cpu, &vcpu)
        }) {
            return None;
        }
        let fd = &mut vcpu;
        // Offline in the guest; online (reads through `&qsbr`) while handling the exit.
        let step = match qsbr.offline_scope(move || {
            let fd = fd;
            fd.run()
        }) {
            Ok(exit) => handle_exit(cpu, exit, bus, &qsbr),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: its immediate_exit did its job.
                vcpu.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => return failed(format!("KVM_RUN failed: {e}")),
        };
        // Nothing read through the reader outlives the exit.
        qsbr.quiescent_state();
        match step {
            Step::Continue => {}
            Step::Stop(result) => return Some(result),
            Step::TripleFault => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Some(Err(VmmError::TripleFault { cpu, rip }));
            }
            Step::InternalError => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                let run = vcpu.get_kvm_run();
                // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which KVM fills
                // the `internal` member of the exit union; it is plain integers.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                return failed(format!(
                    "KVM internal error at rip {rip:#x}: {} (suberror {}, data {:x?})",
                    internal_error_name(internal.suberror),
                    internal.suberror,
                    &internal.data[..n]
                ));
            }
        }
    }
}

/// What KVM_INTERNAL_ERROR_* suberrors mean.
fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
            "KVM could not emulate an instruction (with an unusable IDT, how a triple fault ends where guest code is emulated)"
        }
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "an exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "an event could not be delivered",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "an exit KVM did not expect",
        _ => "unknown suberror",
    }
}

fn handle_exit(cpu: u8, exit: VcpuExit<'_>, bus: &PioBus, guard: &rcu::ReadGuard) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => bus.read_in(guard, port, data),
        VcpuExit::IoOut(port, data) => {
            if bus.write_in(guard, port, data) == IoAction::Reset {
                log::info!("vCPU {cpu}: guest reset through the i8042");
                return Step::Stop(Ok(GuestExit::Reset));
            }
        }
        VcpuExit::MmioRead(addr, data) => bus.mmio_read_in(guard, addr, data),
        VcpuExit::MmioWrite(addr, data) => bus.mmio_write_in(guard, addr, data),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Hlt => return Step::Stop(Ok(GuestExit::Shutdown)),
        VcpuExit::Shutdown => return Step::TripleFault,
        VcpuExit::SystemEvent(kind, data) => {
            return Step::Stop(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Ok(GuestExit::Shutdown),
                KVM_SYSTEM_EVENT_RESET => Ok(GuestExit::Reset),
                KVM_SYSTEM_EVENT_CRASH => Err(VmmError::VcpuFailed {
                    cpu,
                    what: format!("guest reported a crash ({data:x?})"),
                }),
                other => Err(VmmError::VcpuFailed {
                    cpu,
                    what: format!("unknown KVM system event {other}"),
                }),
            })
        }
        VcpuExit::InternalError => return Step::InternalError,
        VcpuExit::FailEntry(reason, on_cpu) => {
            return Step::Stop(Err(VmmError::VcpuFailed {
                cpu,
                what: format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, host CPU {on_cpu})"
                ),
            }))
        }
        other => {
            return Step::Stop(Err(VmmError::VcpuFailed {
                cpu,
                what: format!("unexpected KVM exit {other:?}"),
            }))
        }
    }
    Step::Continue
}
