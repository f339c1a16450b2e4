//! kvmclock: the VM-wide clock the guest's kvmclock pages are computed from
//! (KVM_GET_CLOCK / KVM_SET_CLOCK). Restoring it makes the guest's time go on from where
//! the source stopped instead of restarting from the destination VM's creation.

use super::{exact, KvmComponent, PersistError};
use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockState {
    /// KVM_GET_CLOCK.
    #[serde(with = "exact")]
    pub clock: kvm_clock_data,
}

eq_by_bytes!(ClockState);

impl KvmComponent for ClockState {
    type Target = VmFd;

    fn save(vm: &VmFd) -> Result<Self, PersistError> {
        let clock = vm.get_clock().map_err(PersistError::kvm("KVM_GET_CLOCK"))?;
        Ok(ClockState { clock })
    }

    /// Sets the saved clock value with no flags: KVM_CLOCK_REALTIME would add the host
    /// time elapsed since the save (the paused time); the others are outputs of GET only.
    fn restore(&self, vm: &VmFd) -> Result<(), PersistError> {
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(PersistError::kvm("KVM_SET_CLOCK"))
    }
}
