//! One vCPU's architectural state as KVM keeps it: general and special registers, the
//! XSAVE area (x87/SSE/AVX..., so no separate KVM_GET_FPU), XCRs, debug registers, the
//! in-kernel local APIC, the MSRs KVM lists (TSC, kvmclock's, APIC base, EFER, SYSCALL,
//! PAT, MTRRs... whatever this host's KVM_GET_MSR_INDEX_LIST gives and KVM_GET_MSRS
//! reads), mp_state and pending events. Nothing here depends on the host's CPU vendor.
//!
//! Save order (Firecracker's reasoning): mp_state first (KVM_GET_MP_STATE may accept
//! pending INIT/SIPI and change APIC state), then regs, sregs, xsave, xcrs, debugregs,
//! lapic, MSRs, and vcpu events last (reading other state must not lose a pending
//! exception). The restore order is [`VcpuState::restore`]'s.

use super::{exact, PersistError};
use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, Xsave, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Bytes of the classic `struct kvm_xsave` (KVM_GET_XSAVE).
const XSAVE_LEGACY_BYTES: usize = std::mem::size_of::<kvm_xsave>();
/// `KVM_CAP_XSAVE2`: the XSAVE area's size when larger than 4 KiB (AMX), else 0.
const KVM_CAP_XSAVE2: u64 = 208;

/// What saving a vCPU needs from its VM and host, found once when the VM is built.
#[derive(Debug, Clone, Default)]
pub struct VcpuContext {
    /// KVM_GET_MSR_INDEX_LIST.
    pub msr_indices: Vec<u32>,
    /// Bytes of the XSAVE area (4096, or KVM_CAP_XSAVE2's answer when larger).
    pub xsave_bytes: usize,
}

impl VcpuContext {
    /// The MSR list and XSAVE size of `vm` on `kvm`.
    pub fn new(kvm: &Kvm, vm: &VmFd) -> Result<VcpuContext, PersistError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(PersistError::kvm("KVM_GET_MSR_INDEX_LIST"))?;
        let xsave2 = vm.check_extension_raw(KVM_CAP_XSAVE2);
        let xsave_bytes = usize::try_from(xsave2).unwrap_or(0).max(XSAVE_LEGACY_BYTES);
        Ok(VcpuContext {
            msr_indices: list.as_slice().to_vec(),
            xsave_bytes,
        })
    }
}

/// One model-specific register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrEntry {
    /// MSR number.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// A vCPU's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// KVM_GET_REGS.
    #[serde(with = "exact")]
    pub regs: kvm_regs,
    /// KVM_GET_SREGS (segments, CRs, EFER, APIC base, pending interrupt bitmap).
    #[serde(with = "exact")]
    pub sregs: kvm_sregs,
    /// KVM_GET_XSAVE(2), as 32-bit words: 1024 of them, more with AMX.
    pub xsave: Vec<u32>,
    /// KVM_GET_XCRS.
    #[serde(with = "exact")]
    pub xcrs: kvm_xcrs,
    /// KVM_GET_DEBUGREGS.
    #[serde(with = "exact")]
    pub debugregs: kvm_debugregs,
    /// KVM_GET_LAPIC (the local APIC's register page).
    #[serde(with = "exact")]
    pub lapic: kvm_lapic_state,
    /// Every MSR of the host's list that KVM_GET_MSRS reads, in list order.
    pub msrs: Vec<MsrEntry>,
    /// KVM_GET_MP_STATE.
    #[serde(with = "exact")]
    pub mp_state: kvm_mp_state,
    /// KVM_GET_VCPU_EVENTS (pending exception, interrupt, NMI, SMI, shadow).
    #[serde(with = "exact")]
    pub events: kvm_vcpu_events,
}

eq_by_bytes!(VcpuState);

/// Reads every MSR of `indices` that KVM reads: KVM_GET_MSRS stops at the first one it
/// cannot read; that one is left out and the rest asked again.
pub fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrEntry>, PersistError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| PersistError::Invalid {
            what: "MSR list",
            why: format!("{e:?}"),
        })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(PersistError::kvm("KVM_GET_MSRS"))?
            .min(batch.len());
        out.extend(msrs.as_slice()[..n].iter().map(|e| MsrEntry {
            index: e.index,
            data: e.data,
        }));
        if n < batch.len() {
            log::debug!("KVM_GET_MSRS cannot read MSR {:#x}; not saved", batch[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

/// Writes `msrs` with KVM_SET_MSRS, every one of them or an error naming the first refused.
pub fn write_msrs(vcpu: &VcpuFd, msrs: &[MsrEntry]) -> Result<(), PersistError> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|e| PersistError::Invalid {
            what: "MSR list",
            why: format!("{e:?}"),
        })?;
        let set = vcpu
            .set_msrs(&list)
            .map_err(PersistError::kvm("KVM_SET_MSRS"))?;
        if set != chunk.len() {
            return Err(PersistError::MsrRefused {
                index: chunk.get(set).map_or(0, |m| m.index),
                set,
                total: chunk.len(),
            });
        }
    }
    Ok(())
}

fn get_xsave(vcpu: &VcpuFd, bytes: usize) -> Result<Vec<u32>, PersistError> {
    if bytes <= XSAVE_LEGACY_BYTES {
        let x = vcpu
            .get_xsave()
            .map_err(PersistError::kvm("KVM_GET_XSAVE"))?;
        return Ok(x.region.to_vec());
    }
    let extra = (bytes - XSAVE_LEGACY_BYTES).div_ceil(4);
    let mut x = Xsave::new(extra).map_err(|e| PersistError::Invalid {
        what: "xsave",
        why: format!("{e:?}"),
    })?;
    // SAFETY: `x` holds 4096 bytes plus `extra` words, at least the KVM_CAP_XSAVE2 size
    // KVM writes; no XSTATE feature is enabled on this thread after that size was read.
    unsafe { vcpu.get_xsave2(&mut x) }.map_err(PersistError::kvm("KVM_GET_XSAVE2"))?;
    let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(x.as_slice());
    Ok(words)
}

fn set_xsave(vcpu: &VcpuFd, words: &[u32], host_bytes: usize) -> Result<(), PersistError> {
    let region_words = XSAVE_LEGACY_BYTES / 4;
    let bad = |why: String| PersistError::Invalid { what: "xsave", why };
    if words.len() < region_words {
        return Err(bad(format!(
            "{} words, at least {region_words} needed",
            words.len()
        )));
    }
    if words.len() * 4 > host_bytes.max(XSAVE_LEGACY_BYTES) {
        return Err(bad(format!(
            "{} bytes, this host's XSAVE area has {host_bytes}",
            words.len() * 4
        )));
    }
    if host_bytes <= XSAVE_LEGACY_BYTES {
        let mut x = kvm_xsave::default();
        x.region.copy_from_slice(&words[..region_words]);
        // SAFETY: the host's XSAVE area fits the classic 4096-byte struct (KVM_CAP_XSAVE2
        // says no more), so KVM reads only inside `x`.
        return unsafe { vcpu.set_xsave(&x) }.map_err(PersistError::kvm("KVM_SET_XSAVE"));
    }
    let extra = (host_bytes - XSAVE_LEGACY_BYTES).div_ceil(4);
    let mut x = Xsave::new(extra).map_err(|e| bad(format!("{e:?}")))?;
    // SAFETY: only the fixed `region` is written; the FAM length stays what `Xsave::new`
    // set, so the wrapper's invariant holds.
    let fam = unsafe { x.as_mut_fam_struct() };
    fam.xsave.region.copy_from_slice(&words[..region_words]);
    let tail = &words[region_words..];
    x.as_mut_slice()[..tail.len()].copy_from_slice(tail);
    // SAFETY: `x` holds the KVM_CAP_XSAVE2 size of this host (checked above), which is
    // what KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave2(&x) }.map_err(PersistError::kvm("KVM_SET_XSAVE2"))
}

impl VcpuState {
    /// Reads `vcpu`'s state. The vCPU must not be in KVM_RUN (parked, or never run).
    pub fn save(vcpu: &VcpuFd, ctx: &VcpuContext) -> Result<VcpuState, PersistError> {
        let mp_state = vcpu
            .get_mp_state()
            .map_err(PersistError::kvm("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(PersistError::kvm("KVM_GET_REGS"))?;
        let sregs = vcpu
            .get_sregs()
            .map_err(PersistError::kvm("KVM_GET_SREGS"))?;
        let xsave = get_xsave(vcpu, ctx.xsave_bytes)?;
        let xcrs = vcpu.get_xcrs().map_err(PersistError::kvm("KVM_GET_XCRS"))?;
        let debugregs = vcpu
            .get_debug_regs()
            .map_err(PersistError::kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu
            .get_lapic()
            .map_err(PersistError::kvm("KVM_GET_LAPIC"))?;
        let msrs = read_msrs(vcpu, &ctx.msr_indices)?;
        let events = vcpu
            .get_vcpu_events()
            .map_err(PersistError::kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            mp_state,
            events,
        })
    }

    /// Writes this state into `vcpu` (built, CPUID set, never run), in this order:
    /// 1. sregs: CR0/CR4/EFER (the mode the rest is read in) and the APIC base MSR;
    /// 2. regs (KVM_SET_REGS drops a pending exception: events restore it at the end);
    /// 3. xsave, xcrs, debugregs;
    /// 4. lapic, after sregs set the APIC base (and its x2APIC mode);
    /// 5. MSRs, after the lapic: TSC_DEADLINE is only taken by a local APIC in that mode;
    ///    every one of them must be taken (the count KVM_SET_MSRS returns is checked);
    /// 6. mp_state (runnable, halted, waiting for INIT/SIPI), after the APIC it refers to;
    /// 7. vcpu events last: a pending exception, interrupt or NMI survives only if
    ///    nothing after it resets it.
    pub fn restore(&self, vcpu: &VcpuFd, ctx: &VcpuContext) -> Result<(), PersistError> {
        vcpu.set_sregs(&self.sregs)
            .map_err(PersistError::kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs)
            .map_err(PersistError::kvm("KVM_SET_REGS"))?;
        set_xsave(vcpu, &self.xsave, ctx.xsave_bytes)?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(PersistError::kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(PersistError::kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(PersistError::kvm("KVM_SET_LAPIC"))?;
        write_msrs(vcpu, &self.msrs)?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(PersistError::kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(PersistError::kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// The value of MSR `index`, if saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> VcpuState {
        VcpuState {
            regs: kvm_regs {
                rip: 0x1234,
                rax: 7,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: vec![3; 1024],
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![MsrEntry {
                index: 0x10,
                data: 99,
            }],
            mp_state: kvm_mp_state::default(),
            events: kvm_vcpu_events::default(),
        }
    }

    #[test]
    fn round_trips_and_refuses_wrong_sizes() {
        let s = state();
        let json = serde_json::to_vec(&s).unwrap();
        let back: VcpuState = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.regs.rip, 0x1234);
        assert_eq!(back.msr(0x10), Some(99));

        // regs with one byte short: refused, not zero-padded.
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["regs"].as_array_mut().unwrap().pop();
        let e = serde_json::from_value::<VcpuState>(v).unwrap_err();
        assert!(e.to_string().contains("bytes for a"), "{e}");

        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["surprise"] = 1.into();
        assert!(serde_json::from_value::<VcpuState>(v).is_err());
    }
}
