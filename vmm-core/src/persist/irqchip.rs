//! The in-kernel interrupt controllers: the 8259 pair (master and slave) and the IOAPIC,
//! read and written with KVM_GET_IRQCHIP / KVM_SET_IRQCHIP (one chip per call).

use super::{exact, KvmComponent, PersistError};
use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

fn get(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, PersistError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(PersistError::kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

fn set(vm: &VmFd, chip: &kvm_irqchip, want: u32) -> Result<(), PersistError> {
    if chip.chip_id != want {
        return Err(PersistError::Invalid {
            what: "irqchip",
            why: format!("chip id {} where {want} belongs", chip.chip_id),
        });
    }
    vm.set_irqchip(chip)
        .map_err(PersistError::kvm("KVM_SET_IRQCHIP"))
}

/// Both 8259s.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PicState {
    /// The master (IRQ 0-7).
    #[serde(with = "exact")]
    pub master: kvm_irqchip,
    /// The slave (IRQ 8-15).
    #[serde(with = "exact")]
    pub slave: kvm_irqchip,
}

/// The IOAPIC (redirection table, id, IRR).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoapicState {
    /// KVM_IRQCHIP_IOAPIC.
    #[serde(with = "exact")]
    pub ioapic: kvm_irqchip,
}

eq_by_bytes!(PicState, IoapicState);

impl KvmComponent for PicState {
    type Target = VmFd;

    fn save(vm: &VmFd) -> Result<Self, PersistError> {
        Ok(PicState {
            master: get(vm, KVM_IRQCHIP_PIC_MASTER)?,
            slave: get(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        })
    }

    fn restore(&self, vm: &VmFd) -> Result<(), PersistError> {
        set(vm, &self.master, KVM_IRQCHIP_PIC_MASTER)?;
        set(vm, &self.slave, KVM_IRQCHIP_PIC_SLAVE)
    }
}

impl KvmComponent for IoapicState {
    type Target = VmFd;

    fn save(vm: &VmFd) -> Result<Self, PersistError> {
        Ok(IoapicState {
            ioapic: get(vm, KVM_IRQCHIP_IOAPIC)?,
        })
    }

    fn restore(&self, vm: &VmFd) -> Result<(), PersistError> {
        set(vm, &self.ioapic, KVM_IRQCHIP_IOAPIC)
    }
}
