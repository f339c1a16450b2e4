//! Setting up a vCPU before it first runs: CPUID, MSRs, FPU and local APIC (the boot
//! vCPU's entry registers are its boot protocol's: `crate::boot::entry`).
//!
//! CPUID starts from KVM_GET_SUPPORTED_CPUID and changes only what identifies the vCPU
//! (APIC IDs, the logical processor count) and the hypervisor bit: nothing depends on the
//! host's vendor, which is AMD on some days and Intel on others.

use crate::error::VmmError;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

/// CPUID leaf 1 ECX: running under a hypervisor.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 ECX: `cmpxchg16b`. Hidden from the guest: where guest code is emulated
/// (nested KVM on PVM, see DESIGN.md) KVM's instruction emulator cannot execute it, and
/// Linux's SLUB uses it from its first allocation on (a KVM internal error). Without it
/// Linux takes its lock-based fallback, at no visible cost to a small guest.
const CPUID_1_ECX_CX16: u32 = 1 << 13;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MISC_ENABLE: fast string operations (`rep movs/stos`) on.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Local APIC register offsets and LVT delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;
const APIC_MODE_NMI: u32 = 0x4 << 8;

/// The CPUID entries KVM can offer (the base every vCPU's CPUID is derived from).
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VmmError> {
    kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))
}

/// `base` as vCPU `index` of `count` sees it.
pub fn vcpu_cpuid(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx = (e.ecx | CPUID_1_ECX_HYPERVISOR) & !CPUID_1_ECX_CX16;
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
            }
            // Extended topology: EDX is the x2APIC ID on every subleaf.
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

/// CPUID, MSRs, FPU and LAPIC of any vCPU.
pub fn configure(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), VmmError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(VmmError::kvm("KVM_SET_CPUID2"))?;
    set_msrs(vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VmmError::kvm("KVM_SET_FPU"))?;
    set_lint(vcpu)
}

fn set_msrs(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let wanted = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    // KVM_SET_MSRS stops at the first MSR it refuses; skip that one and go on, so one
    // MSR a host lacks costs only itself.
    let mut rest: &[kvm_msr_entry] = &wanted;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|e| VmmError::VcpuFailed {
            cpu: 0,
            what: format!("building the MSR list: {e:?}"),
        })?;
        let set = vcpu
            .set_msrs(&msrs)
            .map_err(VmmError::kvm("KVM_SET_MSRS"))?;
        if set < rest.len() {
            log::debug!(
                "KVM refused MSR {:#x}; left at its reset value",
                rest[set].index
            );
            rest = &rest[set + 1..];
        } else {
            rest = &[];
        }
    }
    Ok(())
}

/// LINT0 delivers the 8259's interrupts (ExtINT), LINT1 is the NMI line: the PC wiring
/// that firmware sets up before any kernel runs.
fn set_lint(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let mut lapic = vcpu.get_lapic().map_err(VmmError::kvm("KVM_GET_LAPIC"))?;
    let set = |regs: &mut [libc::c_char], offset: usize, mode: u32| {
        let mut v = [0u8; 4];
        for (i, b) in v.iter_mut().enumerate() {
            *b = regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(v) & !0x0001_0700) | mode; // unmask, set mode
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            regs[offset + i] = b as libc::c_char;
        }
    };
    set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(VmmError::kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_identifies_the_vcpu() {
        let leaf = |function, index| kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xaabb_0800,
            ..Default::default()
        };
        let base = CpuId::from_entries(&[leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1)]).unwrap();
        let c = vcpu_cpuid(&base, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0304_0800);
        assert_ne!(e[0].ecx & CPUID_1_ECX_HYPERVISOR, 0);
        assert_eq!(e[0].ecx & CPUID_1_ECX_CX16, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].edx, 3);
    }
}
