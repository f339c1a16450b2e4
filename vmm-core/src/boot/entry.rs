//! Where the boot vCPU starts, per boot protocol ([`BootEntry`]), and the register state
//! that puts it there: PVH (32-bit protected mode, flat segments, paging off) or the
//! bzImage's 64-bit entry (long mode on identity page tables). Set once, on the boot vCPU
//! of a VM that boots; a migration destination's vCPUs get their state from the stream.

use super::bzimage::{LinuxEntry, BOOT_CS, BOOT_DS, GDT64};
use super::layout::BOOT_GDT;
use super::pvh::{PvhEntry, CODE_SELECTOR, DATA_SELECTOR, GDT};
use crate::error::VmmError;
use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;

/// Where the boot vCPU starts, per boot protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// An ELF kernel's PVH entry: 32-bit protected mode, %ebx = `hvm_start_info`.
    Pvh(PvhEntry),
    /// A bzImage's 64-bit entry: long mode, identity paging, %rsi = `boot_params`.
    Linux64(LinuxEntry),
}

impl BootEntry {
    /// The guest-physical address the boot vCPU starts at.
    pub fn entry(&self) -> u64 {
        match self {
            BootEntry::Pvh(e) => e.entry,
            BootEntry::Linux64(e) => e.entry,
        }
    }
}

/// The entry state `boot` asks for.
pub fn set_entry(vcpu: &VcpuFd, boot: &BootEntry) -> Result<(), VmmError> {
    match boot {
        BootEntry::Pvh(e) => set_pvh_entry(vcpu, e),
        BootEntry::Linux64(e) => set_linux64_entry(vcpu, e),
    }
}

/// The Linux boot protocol's 64-bit entry state: long mode with paging on the identity
/// page tables, `__BOOT_CS`/`__BOOT_DS` from [`GDT64`], interrupts off, %rsi = the zero
/// page.
pub fn set_linux64_entry(vcpu: &VcpuFd, boot: &LinuxEntry) -> Result<(), VmmError> {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let mut sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
    sregs.cs = kvm_segment {
        l: 1,
        db: 0,
        ..flat_segment(BOOT_CS, 0xb)
    };
    let data = flat_segment(BOOT_DS, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (GDT64.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = boot.pml4;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: boot.entry,
        rsi: boot.boot_params,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VmmError::kvm("KVM_SET_REGS"))
}

/// The PVH entry state: 32-bit protected mode, flat 4 GiB segments from the boot GDT,
/// paging off, interrupts off, %ebx = `hvm_start_info`.
pub fn set_pvh_entry(vcpu: &VcpuFd, boot: &PvhEntry) -> Result<(), VmmError> {
    let mut sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
    sregs.cs = flat_segment(CODE_SELECTOR, 0xb); // execute/read, accessed
    let data = flat_segment(DATA_SELECTOR, 0x3); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(VmmError::kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rip: boot.entry,
        rbx: boot.start_info,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VmmError::kvm("KVM_SET_REGS"))
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}
