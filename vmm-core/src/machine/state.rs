//! The VM's CPU and device state, saved and restored ([`crate::persist`]'s order: PIT,
//! PICs, IOAPIC, kvmclock, then each vCPU, then COM1).
//!
//! On a running [`Machine`] the vCPUs must be parked: each parked vCPU saves or restores
//! its own state on its own thread (a job run at its checkpoint, see
//! [`crate::vcpu::control`]), so no vCPU ioctl ever races KVM_RUN. On [`MachineParts`]
//! (built, no vCPU thread yet) the vCPU fds are at hand and restored from here.

use super::{Machine, MachineParts, PAUSE_TIMEOUT};
use crate::error::VmmError;
use crate::persist::{ClockState, IoapicState, PicState, PitState};
use crate::persist::{KvmComponent, PersistError, VcpuState, VmState};
use kvm_ioctls::VcpuFd;
use std::sync::{mpsc, Arc};

impl Machine {
    /// Runs `job` on every vCPU's own thread while it sits parked (the VM paused, or
    /// started [`super::Start::Parked`]); the results by vCPU index, or an error naming
    /// `what` when not all of them came back within [`PAUSE_TIMEOUT`].
    pub(crate) fn on_each_parked<T: Send + 'static>(
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

    fn check_paused(&self) -> Result<(), VmmError> {
        if !self.control.is_paused() || self.control.is_stopping() {
            return Err(PersistError::NotPaused("the VM is not paused".into()).into());
        }
        Ok(())
    }

    /// The VM's CPU and device state; the VM must be paused. Each vCPU saves its own
    /// state on its thread while parked; then the VM-wide parts (PIT, PICs, IOAPIC,
    /// kvmclock) and COM1 are read from here.
    pub fn save_state(&self) -> Result<VmState, VmmError> {
        self.check_paused()?;
        let ctx = self.vcpu_ctx.clone();
        let vcpus = self
            .on_each_parked("saved their state", move |_, fd| VcpuState::save(fd, &ctx))?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
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

    /// Puts the VM in `state` (a migration destination's, started
    /// [`super::Start::Parked`]): the VM-wide parts from here, each vCPU on its own parked
    /// thread, then COM1. The vCPUs stay parked.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmmError> {
        self.check_paused()?;
        check_vcpu_count(state, usize::from(self.vcpus))?;
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
}

impl MachineParts {
    /// Puts the VM in `state` (saved by a running machine or a migration source), before
    /// its vCPUs first run and with guest RAM in place.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmmError> {
        check_vcpu_count(state, self.vcpus.len())?;
        state.pit.restore(&self.vm)?;
        state.pic.restore(&self.vm)?;
        state.ioapic.restore(&self.vm)?;
        state.clock.restore(&self.vm)?;
        for (vcpu, s) in self.vcpus.iter().zip(&state.vcpus) {
            s.restore(vcpu, &self.vcpu_ctx)?;
        }
        self.bus.restore_serial(&state.serial)?;
        log::info!("VM state restored ({} vCPUs)", state.vcpus.len());
        Ok(())
    }
}

fn check_vcpu_count(state: &VmState, vm: usize) -> Result<(), PersistError> {
    if state.vcpus.len() != vm {
        return Err(PersistError::VcpuCount {
            state: state.vcpus.len(),
            vm,
        });
    }
    Ok(())
}
