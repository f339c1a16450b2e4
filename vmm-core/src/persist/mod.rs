//! Saving and restoring a VM's CPU and device state: Firecracker's `Persist` shape. Every
//! component captures a plain serializable `State` (serde) and is restored from one; a
//! whole VM's state is a [`VmState`], which travels as JSON (self-describing: a missing or
//! extra field is an error that names it) or as the migration stream's named component
//! blobs ([`VmState::to_components`] / [`VmState::from_components`]).
//!
//! Components: [`vcpu`] (registers, xsave, MSRs, local APIC, events...), [`irqchip`]
//! (the 8259 pair and the IOAPIC), [`pit`], [`clock`] (kvmclock) and [`serial`] (COM1).
//!
//! # Restore order
//!
//! On a VM built but whose vCPUs never ran ([`crate::Vmm::new_incoming`]), with guest RAM
//! already in place, [`crate::Vmm::restore_state`] applies:
//! 1. the PIT (KVM_SET_PIT2), then the irqchip (PIC master, PIC slave, IOAPIC:
//!    KVM_SET_IRQCHIP), then kvmclock (KVM_SET_CLOCK, flags cleared: the guest's clock
//!    goes on from the saved value, the paused time is not counted);
//! 2. each vCPU, in the order [`vcpu::VcpuState::restore`] documents (sregs, regs, xsave,
//!    xcrs, debugregs, lapic, MSRs, mp_state, vcpu events last);
//! 3. COM1 (raising its interrupt again if one was pending).
//!
//! KVM-backed components implement [`KvmComponent`] (they read and write a KVM object they
//! do not own); components the VMM owns implement [`Persist`], the migration crate's shape
//! (its own trait here: COM1 is a vm-superio type); both travel through
//! [`ComponentState::encode`] and [`ComponentState::decode`].

use migration::load::ComponentState;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;

pub use clock::ClockState;
pub use irqchip::{IoapicState, PicState};
pub use pit::PitState;
pub use serial::SerialState;
pub use vcpu::{MsrEntry, VcpuContext, VcpuState};

/// A component whose state travels: it saves a plain State value and is rebuilt from one
/// (the shape of `migration::live::Persist` and Firecracker's `Persist`). A trait of this
/// crate, because the orphan rule forbids implementing the migration crate's for COM1, a
/// vm-superio type.
pub trait Persist: Sized {
    /// The plain data.
    type State: Serialize + DeserializeOwned;
    /// What rebuilding needs besides the state.
    type ConstructorArgs;
    /// Why rebuilding failed.
    type Error;

    /// The component's state now (its VM paused).
    fn save(&self) -> Self::State;

    /// A component rebuilt from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// State kept inside KVM (a VM or vCPU fd): read out of and written back into an object the
/// VMM does not rebuild.
pub trait KvmComponent: Sized + Serialize + DeserializeOwned {
    /// The KVM object holding the state (`VmFd`, `VcpuFd`...).
    type Target: ?Sized;

    /// Reads the state out of `target` (its vCPUs not running).
    fn save(target: &Self::Target) -> Result<Self, PersistError>;

    /// Writes it into `target`.
    fn restore(&self, target: &Self::Target) -> Result<(), PersistError>;
}

/// Why saving or restoring state failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// KVM's errno.
        source: errno::Error,
    },
    /// KVM_SET_MSRS stopped before the end of the list.
    #[error("KVM_SET_MSRS refused MSR {index:#x} (set {set} of {total})")]
    MsrRefused {
        /// The first MSR not set.
        index: u32,
        /// How many were set.
        set: usize,
        /// How many were asked.
        total: usize,
    },
    /// A state holds a value this host or VM cannot take.
    #[error("bad {what} state: {why}")]
    Invalid {
        /// The component.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The state's vCPU count differs from the VM's.
    #[error("the state has {state} vCPUs, the VM {vm}")]
    VcpuCount {
        /// In the state.
        state: usize,
        /// In the VM.
        vm: usize,
    },
    /// A component the VM needs is not among the blobs.
    #[error("no state for component {0:?}")]
    Missing(String),
    /// A component blob the VM does not know.
    #[error("unknown state component {0:?}")]
    Unknown(String),
    /// A state blob could not be encoded or decoded.
    #[error("state {name:?}: {source}")]
    Codec {
        /// The component ("vm" for a whole [`VmState`]).
        name: String,
        /// serde_json's reason.
        source: serde_json::Error,
    },
    /// The VM is not paused, or a vCPU did not answer while parked.
    #[error("cannot save state: {0}")]
    NotPaused(String),
}

impl From<migration::live::StateError> for PersistError {
    fn from(e: migration::live::StateError) -> PersistError {
        PersistError::Codec {
            name: e.name,
            source: e.source,
        }
    }
}

impl PersistError {
    /// Shorthand for [`PersistError::Kvm`].
    pub fn kvm(op: &'static str) -> impl FnOnce(errno::Error) -> PersistError {
        move |source| PersistError::Kvm { op, source }
    }
}

/// A whole VM's CPU and device state (guest RAM travels separately).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The two 8259s.
    pub pic: PicState,
    /// The IOAPIC.
    pub ioapic: IoapicState,
    /// The 8254 PIT.
    pub pit: PitState,
    /// kvmclock.
    pub clock: ClockState,
    /// COM1.
    pub serial: SerialState,
    /// Whether the guest was running when the migration paused it (QEMU's run state): a
    /// destination leaves a guest that was paused on the source paused (`vmm resume`
    /// there decides). `true` for a state that does not say.
    #[serde(default = "running_by_default")]
    pub running: bool,
}

fn running_by_default() -> bool {
    true
}

/// The "runstate" component: [`VmState::running`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunState {
    running: bool,
}

/// The name of the optional run-state component.
pub const RUNSTATE_COMPONENT: &str = "runstate";

fn codec(name: &str) -> impl FnOnce(serde_json::Error) -> PersistError + '_ {
    move |source| PersistError::Codec {
        name: name.to_string(),
        source,
    }
}

/// Names of the non-vCPU components, in restore order.
pub const DEVICE_COMPONENTS: [&str; 5] = ["pit", "pic", "ioapic", "kvmclock", "serial"];

impl VmState {
    /// The state as one JSON document.
    pub fn to_bytes(&self) -> Result<Vec<u8>, PersistError> {
        serde_json::to_vec(self).map_err(codec("vm"))
    }

    /// A state from [`VmState::to_bytes`]'s bytes (checked: sizes, fields, no trailing data).
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState, PersistError> {
        serde_json::from_slice(bytes).map_err(codec("vm"))
    }

    /// One blob per component for the migration stream: "cpu0".."cpuN", then
    /// [`DEVICE_COMPONENTS`], then [`RUNSTATE_COMPONENT`].
    pub fn to_components(&self) -> Result<Vec<ComponentState>, PersistError> {
        fn one<T: Serialize>(name: String, v: &T) -> Result<ComponentState, PersistError> {
            Ok(ComponentState::encode(&name, v)?)
        }
        let mut out = Vec::with_capacity(self.vcpus.len() + DEVICE_COMPONENTS.len());
        for (i, v) in self.vcpus.iter().enumerate() {
            out.push(one(format!("cpu{i}"), v)?);
        }
        out.push(one("pit".into(), &self.pit)?);
        out.push(one("pic".into(), &self.pic)?);
        out.push(one("ioapic".into(), &self.ioapic)?);
        out.push(one("kvmclock".into(), &self.clock)?);
        out.push(one("serial".into(), &self.serial)?);
        let run = RunState {
            running: self.running,
        };
        out.push(one(RUNSTATE_COMPONENT.into(), &run)?);
        Ok(out)
    }

    /// The state of a VM with `vcpus` vCPUs from the stream's blobs (any order; each
    /// component exactly once).
    pub fn from_components(
        blobs: &[ComponentState],
        vcpus: usize,
    ) -> Result<VmState, PersistError> {
        let find = |name: &str| -> Result<&ComponentState, PersistError> {
            let mut it = blobs.iter().filter(|b| b.name == name);
            let first = it
                .next()
                .ok_or_else(|| PersistError::Missing(name.into()))?;
            if it.next().is_some() {
                return Err(PersistError::Invalid {
                    what: "component list",
                    why: format!("{name:?} appears twice"),
                });
            }
            Ok(first)
        };
        fn decode<T: DeserializeOwned>(b: &ComponentState) -> Result<T, PersistError> {
            Ok(b.decode()?)
        }
        // Said as such, before the per-name checks would say "unknown"/"no state for" cpuN.
        let state_vcpus = blobs
            .iter()
            .filter(|b| {
                b.name
                    .strip_prefix("cpu")
                    .is_some_and(|n| n.parse::<usize>().is_ok())
            })
            .count();
        if state_vcpus != vcpus {
            return Err(PersistError::VcpuCount {
                state: state_vcpus,
                vm: vcpus,
            });
        }
        let cpu_names: Vec<String> = (0..vcpus).map(|i| format!("cpu{i}")).collect();
        if let Some(b) = blobs.iter().find(|b| {
            !cpu_names.contains(&b.name)
                && !DEVICE_COMPONENTS.contains(&b.name.as_str())
                && b.name != RUNSTATE_COMPONENT
        }) {
            return Err(PersistError::Unknown(b.name.clone()));
        }
        let vcpu_states = cpu_names
            .iter()
            .map(|n| decode(find(n)?))
            .collect::<Result<Vec<VcpuState>, _>>()?;
        Ok(VmState {
            vcpus: vcpu_states,
            pit: decode(find("pit")?)?,
            pic: decode(find("pic")?)?,
            ioapic: decode(find("ioapic")?)?,
            clock: decode(find("kvmclock")?)?,
            serial: decode(find("serial")?)?,
            // Optional (streams from before it ran the guest), but once at most.
            running: match blobs.iter().any(|b| b.name == RUNSTATE_COMPONENT) {
                true => decode::<RunState>(find(RUNSTATE_COMPONENT)?)?.running,
                false => true,
            },
        })
    }
}

/// serde for kvm-bindings structs (their `serde` feature: the struct's bytes) that refuses
/// a byte string of any other length than the struct's: kvm-bindings itself would
/// zero-pad a short one or drop the end of a long one.
pub(crate) mod exact {
    use serde::de::{DeserializeOwned, Error};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        let want = std::mem::size_of::<T>();
        if bytes.len() != want {
            return Err(D::Error::custom(format!(
                "{} bytes for a {}-byte {}",
                bytes.len(),
                want,
                std::any::type_name::<T>()
            )));
        }
        T::deserialize(serde::de::value::BytesDeserializer::<D::Error>::new(&bytes))
    }
}

/// Equality of states holding kvm-bindings structs (which do not all derive `PartialEq`,
/// unions among them): equal serialized bytes.
pub(crate) fn same_bytes<T: Serialize>(a: &T, b: &T) -> bool {
    match (serde_json::to_vec(a), serde_json::to_vec(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// `PartialEq` and `Eq` by [`same_bytes`].
macro_rules! eq_by_bytes {
    ($($t:ty),*) => {$(
        impl PartialEq for $t {
            fn eq(&self, other: &Self) -> bool {
                $crate::persist::same_bytes(self, other)
            }
        }
        impl Eq for $t {}
    )*};
}

eq_by_bytes!(VmState);

pub mod clock;
pub mod irqchip;
pub mod pit;
pub mod serial;
pub mod vcpu;
