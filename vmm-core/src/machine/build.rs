//! Building a VM from its [`VmmConfig`]: everything that can fail before the guest runs —
//! the KVM VM, in-kernel irqchip and PIT, guest RAM on a [`RamList`] placed as KVM slots,
//! the kernel and its boot structures, COM1, the vCPUs with their CPUID — so a bad config
//! is reported before any guest code executes.
//!
//! For a snapshot restore or a migration destination ([`Boot::Incoming`]) the same
//! machine is built (RAM layout, irqchip, PIT, devices, vCPUs with their CPUID) without
//! loading a kernel or setting boot registers: RAM comes from the stream, state from
//! [`MachineParts::restore_state`] or [`super::Machine::restore_state`].
//!
//! A snapshot restore ([`MachineParts::build_from`]) builds its boot RAM straight from
//! the snapshot's memory file (each block its range of the file, mapped MAP_PRIVATE, as
//! [`super::Machine::map_snapshot`] then finds it): no anonymous RAM made, given a KVM
//! slot, and dropped again for the mapping.
//!
//! Everything is made in sequence. KVM setup steps done on threads side by side gain
//! nothing here: a slot's creation (KVM zeroing its per-page arrays, ~2.5 MiB per GiB
//! with this host's shadow MMU) holds `kvm->slots_lock`, which KVM_CREATE_PIT2 also takes
//! to register its ports, and on these two-CPU hosts a second thread only competed for
//! the CPU (measured: slower, not faster).

use super::backing::add_block;
use crate::boot::layout::{ram_ranges, RAM_BLOCK_IDS};
use crate::boot::{entry::set_entry, load_kernel, BootEntry};
use crate::config::VmmConfig;
use crate::devices::{serial, PioBus};
use crate::error::VmmError;
use crate::host::limits;
use crate::persist::{ClockState, IoapicState, KvmComponent, PicState, PitState};
use crate::persist::{VcpuContext, VcpuState, VmState};
use crate::vcpu::setup as cpu;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migration::snapshot::OpenSnapshot;
use ramlist::kvm::{KvmRam, KvmRamError, PlacedBlock};
use ramlist::{RamBlockOptions, RamList};
use std::os::fd::AsFd;
use std::sync::Arc;

/// Where KVM puts the TSS it needs for real-mode emulation on Intel (3 pages below the
/// BIOS area, inside the MMIO hole, as QEMU and Firecracker place it).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Whether the guest boots a kernel or comes from a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Load the kernel and set the boot vCPU at its entry.
    Kernel,
    /// Leave RAM and state for an incoming snapshot or migration.
    Incoming,
}

/// A VM built and not running yet: what the machine runs once its vCPU threads start. Only
/// [`MachineParts::build`] makes one, so its pieces always agree (the vCPU fds with the
/// config's count, the slots with the RAM list).
pub struct MachineParts {
    /// The configuration it was built from.
    pub(crate) config: VmmConfig,
    /// The KVM VM.
    pub(crate) vm: Arc<VmFd>,
    /// Guest RAM as KVM slots.
    pub(crate) ram: KvmRam,
    /// Port-I/O devices.
    pub(crate) bus: Arc<PioBus>,
    /// The vCPUs, configured.
    pub(crate) vcpus: Vec<VcpuFd>,
    /// Where the boot vCPU starts (`None` for [`Boot::Incoming`]).
    pub(crate) boot: Option<BootEntry>,
    /// Ids of the RAM blocks the guest booted with (never removable).
    pub(crate) boot_blocks: Vec<String>,
    /// What saving and restoring vCPU state needs.
    pub(crate) vcpu_ctx: VcpuContext,
    /// The state the VM powers on in (every vCPU configured, none at a kernel's entry
    /// yet), for `system_reset`.
    pub(crate) power_on: VmState,
}

/// Opens the KVM device at `path`.
fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmmError> {
    use std::os::unix::ffi::OsStrExt;
    let no_kvm = |source| VmmError::NoKvm {
        path: path.to_path_buf(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| no_kvm(vmm_sys_util::errno::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(no_kvm)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmmError::NotKvm {
            path: path.to_path_buf(),
            version,
        });
    }
    Ok(kvm)
}

impl MachineParts {
    /// The configuration it was built from.
    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// Where the boot vCPU starts (`None` for [`Boot::Incoming`]).
    pub fn boot_entry(&self) -> Option<BootEntry> {
        self.boot
    }

    /// How many vCPUs it has.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The guest's RAM as KVM slots.
    pub fn ram(&self) -> &KvmRam {
        &self.ram
    }

    /// Builds the VM `config` describes: see the module documentation.
    pub fn build(config: VmmConfig, boot: Boot) -> Result<MachineParts, VmmError> {
        MachineParts::build_from(config, boot, None)
    }

    /// [`build`](Self::build), the boot RAM blocks that `snapshot` (checked whole by
    /// [`migration::snapshot::open_snapshot`]) holds with their length and address mapped
    /// from its memory file at once; any other block is made as `build` makes it (and
    /// `map_snapshot` then refuses or replaces it as before).
    pub fn build_from(
        config: VmmConfig,
        boot: Boot,
        snapshot: Option<&OpenSnapshot>,
    ) -> Result<MachineParts, VmmError> {
        config.validate()?;
        limits::check_memory(config.memory)?;
        let t0 = std::time::Instant::now();
        let kvm = open_kvm(&config.kvm_device)?;
        limits::check_vcpus(config.vcpus, kvm.get_max_vcpus())?;
        let vm = Arc::new(kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?);
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(VmmError::kvm("KVM_CREATE_PIT2"))?;
        let vm_at = t0.elapsed();

        let ram = KvmRam::new(Arc::new(RamList::new()), vm.clone())?;
        let ranges = ram_ranges(config.memory);
        for (&(addr, size), id) in ranges.iter().zip(RAM_BLOCK_IDS) {
            boot_block(&ram, &config, snapshot, id, size, addr)?;
        }
        let ram_at = t0.elapsed();

        let entry = match boot {
            Boot::Kernel => {
                let (entry, name) = load_kernel(&ram.guest_memory(), &config, &ranges)?;
                log::info!("kernel {name}: {entry:x?}");
                Some(entry)
            }
            Boot::Incoming => {
                log::info!("incoming VM: no kernel loaded, RAM and state to come");
                None
            }
        };
        let vcpu_ctx = VcpuContext::new(&kvm, &vm)?;

        let bus = Arc::new(PioBus::new(serial::com1(&vm, &config.serial)?));

        let base_cpuid = cpu::supported_cpuid(&kvm)?;
        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        for index in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(index.into())
                .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
            cpu::configure(&vcpu, &cpu::vcpu_cpuid(&base_cpuid, index, config.vcpus))?;
            vcpus.push(vcpu);
        }
        let vcpus_at = t0.elapsed();
        let power_on = VmState {
            vcpus: vcpus
                .iter()
                .map(|fd| VcpuState::save(fd, &vcpu_ctx))
                .collect::<Result<_, _>>()?,
            pit: PitState::save(&vm)?,
            pic: PicState::save(&vm)?,
            ioapic: IoapicState::save(&vm)?,
            clock: ClockState::save(&vm)?,
            serial: bus.serial_state(),
            running: true,
        };
        log::debug!(
            "build: VM, irqchip and PIT at {vm_at:?}, RAM slots at {ram_at:?}, vCPUs at {vcpus_at:?}, power-on state at {:?}",
            t0.elapsed()
        );
        // Only the boot vCPU starts at the kernel; the others wait for INIT/SIPI in the
        // in-kernel local APIC, as on a PC.
        if let (Some(first), Some(entry)) = (vcpus.first(), &entry) {
            set_entry(first, entry)?;
        }
        // The boot blocks, by id: a destination's list will also hold the blocks the
        // source had hot-added, which stay hot-added (removable, and announced as such to
        // the next migration).
        let boot_blocks = RAM_BLOCK_IDS
            .iter()
            .take(ranges.len())
            .map(|id| id.to_string())
            .collect();
        Ok(MachineParts {
            config,
            vm,
            ram,
            bus,
            vcpus,
            boot: entry,
            boot_blocks,
            vcpu_ctx,
            power_on,
        })
    }
}

/// Places boot RAM block `id` (`size` bytes at guest `addr`): from `snapshot`'s memory
/// file when it holds that block with that length and address (mapped MAP_PRIVATE at its
/// offset, as a restore maps it), else made as `--memory-backend` says.
fn boot_block(
    ram: &KvmRam,
    config: &VmmConfig,
    snapshot: Option<&OpenSnapshot>,
    id: &str,
    size: u64,
    addr: u64,
) -> Result<PlacedBlock, KvmRamError> {
    let from_file = snapshot.and_then(|snap| {
        snap.state
            .blocks
            .iter()
            .find(|b| {
                b.id == id
                    && !b.hotplugged
                    && b.len == size
                    && b.guest_addr.is_none_or(|a| a == addr)
            })
            .map(|b| (snap, b.file_offset))
    });
    match from_file {
        Some((snap, offset)) => ram.add_from_fd_private(
            id,
            size,
            addr,
            snap.memory.as_fd(),
            offset,
            RamBlockOptions::default(),
        ),
        None => add_block(ram, &config.memory_backend, id, size, addr),
    }
}
