//! The vCPU throttle timer of a live migration's auto-converge: while the throttle is
//! above 0, a `vcpu-throttle` thread waits out each period
//! ([`RunControl::throttle_period`](crate::vcpu::control::RunControl::throttle_period))
//! and kicks every vCPU out of KVM_RUN, so that each sleeps its share of the period at its
//! throttle point (see [`crate::vcpu::control`]).
//!
//! [`ThrottleTimer`] belongs to the migration's source VM ([`super::source`]): setting 0
//! (the driver does at the end of every migration, and the source VM when dropped) wakes
//! the timer and joins it, so no throttle and no timer outlive the migration. The timer
//! holds the machine only weakly, and only while it kicks.

use crate::error::VmmError;
use crate::machine::Machine;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};

/// The timer thread, while a throttle is set.
#[derive(Default)]
pub struct ThrottleTimer {
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ThrottleTimer {
    fn thread(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        // The handle is put or taken in one step.
        self.thread.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Throttles `machine`'s vCPUs to `percent` (clamped to 99; 0: full speed, the timer
    /// joined before this returns).
    pub fn set(&self, machine: &Arc<Machine>, percent: u8) -> Result<(), VmmError> {
        let mut thread = self.thread();
        let control = machine.run_control().clone();
        control.set_throttle(percent);
        if percent == 0 {
            if let Some(t) = thread.take() {
                // It wakes at the change and ends at once.
                if t.join().is_err() {
                    log::error!("the vCPU throttle timer panicked");
                }
            }
            return Ok(());
        }
        if thread.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        let weak: Weak<Machine> = Arc::downgrade(machine);
        let spawned = thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while control.throttle_period() {
                    match weak.upgrade() {
                        Some(m) => m.kick_vcpus(),
                        None => break,
                    }
                }
            });
        match spawned {
            Ok(t) => {
                *thread = Some(t);
                Ok(())
            }
            Err(e) => {
                // No timer: no throttle either.
                machine.run_control().set_throttle(0);
                Err(VmmError::host("spawning the vCPU throttle timer")(e))
            }
        }
    }
}
