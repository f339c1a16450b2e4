//! The in-kernel 8254 PIT (three channels, the speaker's flags): KVM_GET_PIT2 /
//! KVM_SET_PIT2. Its channel 0 is the tiny guest's clock tick.

use super::{exact, KvmComponent, PersistError};
use kvm_bindings::kvm_pit_state2;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// The PIT.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PitState {
    /// KVM_GET_PIT2.
    #[serde(with = "exact")]
    pub pit: kvm_pit_state2,
}

eq_by_bytes!(PitState);

impl KvmComponent for PitState {
    type Target = VmFd;

    fn save(vm: &VmFd) -> Result<Self, PersistError> {
        let pit = vm.get_pit2().map_err(PersistError::kvm("KVM_GET_PIT2"))?;
        Ok(PitState { pit })
    }

    fn restore(&self, vm: &VmFd) -> Result<(), PersistError> {
        vm.set_pit2(&self.pit)
            .map_err(PersistError::kvm("KVM_SET_PIT2"))
    }
}
