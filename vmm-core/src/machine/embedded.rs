//! [`RunningVm`]: a built VM whose vCPUs run on their own threads without the main loop,
//! for embedding and tests (`crate::Vmm::start`): pause, resume, save the state, stop.

use super::{Machine, MachineParts, Start, PAUSE_TIMEOUT};
use crate::error::VmmError;
use crate::events::EventBus;
use crate::persist::{PersistError, VmState};
use crate::vcpu::{GuestExit, VcpuReport};
use ramlist::kvm::KvmRam;
use std::sync::{mpsc, Arc};

/// A VM whose vCPUs run on their own threads, without the main loop: see the module
/// documentation. Stop it with [`RunningVm::stop`] (dropping it stops it too).
pub struct RunningVm {
    machine: Option<Arc<Machine>>,
    reports: mpsc::Receiver<VcpuReport>,
}

impl RunningVm {
    /// Starts the vCPUs of the VM `parts` make, into the guest at once.
    pub fn start(parts: MachineParts) -> Result<RunningVm, VmmError> {
        // No one listens to an embedded machine's events.
        let events = Arc::new(EventBus::new().map_err(VmmError::host("creating the event bus"))?);
        let (machine, vcpus) = Machine::new(parts, Start::Running, events)?;
        let (tx, reports) = mpsc::channel();
        let mut vm = RunningVm {
            machine: Some(machine.clone()),
            reports,
        };
        if let Err(e) = machine.spawn_vcpus(vcpus, &tx) {
            vm.shutdown();
            return Err(e);
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
                m.vcpu_count()
            ))
            .into()
        })
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.machine().resume();
    }

    /// The CPU and device state; valid only while paused ([`RunningVm::pause`]).
    pub fn save_state(&self) -> Result<VmState, VmmError> {
        self.machine().save_state()
    }

    /// The guest's RAM.
    pub fn ram(&self) -> &KvmRam {
        self.machine().ram()
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
            machine.stop_vcpus();
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
