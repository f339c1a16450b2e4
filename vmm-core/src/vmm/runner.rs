//! A built VM running as the `vmm` process: one thread per vCPU, the main loop
//! ([`EventLoop`]) on the calling thread and, with `--api-socket`, the control API on that
//! loop ([`VmControl`]), the signals that end the VM, and the terminal of a console on
//! stdio — what [`crate::Vmm::run`] does once [`crate::Vmm::new`] built everything.
//!
//! The main loop ends when a vCPU thread reports the VM's end (through
//! [`RunControl::vm_ended`](crate::vcpu::RunControl::vm_ended)) or the API's `quit` stops
//! it; then the vCPUs are stopped, the API socket removed, and the guest's RAM slots
//! deleted before the VM fd is closed. [`Runner`] is that in steps, for a migration
//! destination ([`super::incoming`]): its vCPU threads start parked ([`Start::Parked`]),
//! the stream loads beside the main loop, and
//! [`Machine::release_parked`](crate::machine::Machine::release_parked) lets them run
//! once their state is in.

use super::control::VmControl;
use crate::api::qmp::{params::Settings, QmpSession};
use crate::api::server::{CodecFactory, Limits};
use crate::api::socket::ApiSocket;
use crate::api::ApiServer;
use crate::config::SerialOutput;
use crate::error::VmmError;
use crate::event_loop::{EventLoop, HandlerId};
use crate::events::{EventBus, ShutdownCause, VmEvent};
use crate::host::terminal::RawTerminal;
use crate::machine::{Machine, MachineParts, Start};
use crate::vcpu::{install_kick_handler, GuestExit, VcpuReport};
use std::io::Write;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use vmm_sys_util::epoll::EventSet;

/// A VM set up to run: the main loop with the API on it, signals, the terminal, and the
/// vCPU threads. [`Runner::run_loop`] runs the loop on the calling thread until the VM
/// ends; [`Runner::finish`] stops the vCPUs and tears everything down in order.
pub(crate) struct Runner {
    lp: EventLoop,
    machine: Arc<Machine>,
    control: Arc<VmControl>,
    api: Option<ApiServer>,
    qmp: Option<ApiServer>,
    events: Arc<EventBus>,
    reports: mpsc::Receiver<VcpuReport>,
    /// Restored on drop, last.
    _terminal: Option<RawTerminal>,
}

impl Runner {
    /// Sets the VM up and starts its vCPU threads as `start` says. The API socket (if
    /// any) is bound and listening when this returns; it is served once the loop runs.
    pub(crate) fn start(parts: MachineParts, start: Start) -> Result<Runner, VmmError> {
        install_kick_handler()?;
        crate::host::terminal::install_panic_hook();
        let lp = EventLoop::new().map_err(VmmError::host("creating the main loop"))?;
        // Before any other thread exists (the socket's mode comes from a process-wide umask).
        let socket = parts
            .config
            .api_socket
            .as_deref()
            .map(ApiSocket::bind)
            .transpose()?;
        let qmp_socket = parts
            .config
            .qmp
            .as_deref()
            .map(|p| ApiSocket::bind_as(p, "qmp"))
            .transpose()?;
        let events = Arc::new(EventBus::new().map_err(VmmError::host("creating the event bus"))?);
        let serial = parts.config.serial.clone();
        let (machine, vcpus) = Machine::new(parts, start, events.clone())?;
        let vm_control = Arc::new(VmControl::new(machine.clone()));
        let control = machine.run_control().clone();
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
            .map(|s| ApiServer::start(&lp, s, vm_control.clone(), Limits::from_env()))
            .transpose()
            .map_err(VmmError::host("serving the api socket"))?;
        // QMP: the same commands; the migration settings its clients share; the events.
        let settings = Arc::new(Settings::default());
        let qmp_codec: CodecFactory = Arc::new(move || Box::new(QmpSession::new(settings.clone())));
        let qmp = qmp_socket
            .map(|s| {
                ApiServer::start_with(
                    &lp,
                    s,
                    vm_control.clone(),
                    Limits::from_env(),
                    qmp_codec,
                    Some(events.clone()),
                )
            })
            .transpose()
            .map_err(VmmError::host("serving the qmp socket"))?;

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
        let terminal = match serial {
            SerialOutput::Stdio => {
                let raw = RawTerminal::enter()?;
                crate::devices::serial::spawn_stdin_reader(machine.bus().clone())?;
                raw
            }
            SerialOutput::File(_) => None,
        };
        let runner = Runner {
            lp,
            machine,
            control: vm_control,
            api,
            qmp,
            events,
            reports,
            _terminal: terminal,
        };
        if let Err(e) = runner.machine.spawn_vcpus(vcpus, &tx) {
            let _ = runner.finish(Ok(()));
            return Err(e);
        }
        Ok(runner)
    }

    /// The machine, for work beside the main loop (a migration destination's load).
    pub(crate) fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    /// The API's commands on this machine, and its migrations' bookkeeping.
    pub(crate) fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// Runs the main loop on this thread until the VM ends: a vCPU's report, a signal,
    /// the API's `quit`, or [`RunControl::vm_ended`](crate::vcpu::RunControl::vm_ended) from elsewhere.
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
            control,
            api,
            qmp,
            events,
            reports,
            _terminal,
        } = self;
        crate::host::signals::clear();
        machine.stop_vcpus();
        let result = match reports.try_recv() {
            Ok(report) => {
                log::debug!("vCPU {} ended the VM: {:?}", report.cpu, report.result);
                report.result
            }
            Err(_) if machine.quit_requested() => Ok(GuestExit::Quit),
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
        // Told to the QMP clients before they go.
        events.emit(VmEvent::Shutdown(shutdown_cause(&result)));
        for server in [api, qmp].into_iter().flatten() {
            server.shutdown(&lp);
        }
        let _ = std::io::stdout().flush();
        // The handlers' counted references to the machine go after grace periods; then the
        // slots go (KvmRam's drop), then the VM fd (KvmRam holds it to the last).
        drop(lp);
        for _ in 0..3 {
            rcu::drain_call_rcu();
        }
        drop(control);
        drop(machine);
        result
    }
}

/// Why the VMM ends, in `SHUTDOWN`'s words.
fn shutdown_cause(ended: &Result<GuestExit, VmmError>) -> ShutdownCause {
    match ended {
        Ok(GuestExit::Quit) => ShutdownCause::HostQmpQuit,
        Ok(GuestExit::Signal(_)) => ShutdownCause::HostSignal,
        Ok(GuestExit::Reset) => ShutdownCause::GuestReset,
        Ok(GuestExit::Shutdown) => ShutdownCause::GuestShutdown,
        Err(VmmError::TripleFault { .. }) => ShutdownCause::GuestPanic,
        Err(_) => ShutdownCause::HostError,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing guarded here is left half-changed by a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
