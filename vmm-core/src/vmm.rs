//! [`Vmm`]: one KVM virtual machine built from a [`VmmConfig`] and run until the guest
//! ends it (rust-vmm vmm-reference's shape: the command line only fills the config).
//!
//! [`Vmm::new`] does everything that can fail before the guest runs — KVM VM, in-kernel
//! irqchip and PIT, guest RAM on a [`RamList`] placed as KVM slots, the kernel and its PVH
//! boot structures, devices, configured vCPUs — so a bad config is reported before any
//! guest code executes. [`Vmm::run`] starts one thread per vCPU and waits for the first
//! one that ends the VM.
//!
//! For a snapshot restore or a migration destination, [`Vmm::new_incoming`] builds the same
//! machine (RAM layout, irqchip, PIT, devices, vCPUs with their CPUID) without loading a
//! kernel or setting boot registers; guest RAM then comes from the stream and the CPU and
//! device state from [`Vmm::restore_state`]. [`Vmm::start`] runs the vCPUs without the main
//! loop, for embedding and tests ([`crate::runner::RunningVm`]).

use crate::boot::layout::ram_ranges;
use crate::boot::{load_kernel, BootEntry};
use crate::config::VmmConfig;
use crate::devices::{serial, PioBus};
use crate::error::VmmError;
use crate::host::limits;
use crate::persist::{KvmComponent, PersistError, VcpuContext, VmState};
use crate::vcpu::setup as cpu;
use crate::vcpu::GuestExit;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use ramlist::kvm::KvmRam;
use ramlist::{RamBlockOptions, RamList};
use std::sync::Arc;

/// Where KVM puts the TSS it needs for real-mode emulation on Intel (3 pages below the
/// BIOS area, inside the MMIO hole, as QEMU and Firecracker place it).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Ids of the RAM blocks below and above the MMIO hole.
pub(crate) const RAM_BLOCK_IDS: [&str; 2] = ["ram-below-4g", "ram-above-4g"];

/// A virtual machine ready to run.
pub struct Vmm {
    config: VmmConfig,
    vm: Arc<VmFd>,
    ram: KvmRam,
    bus: Arc<PioBus>,
    vcpus: Vec<VcpuFd>,
    /// `None` for a migration destination.
    boot: Option<BootEntry>,
    vcpu_ctx: VcpuContext,
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

impl Vmm {
    /// Builds the VM `config` describes, with the kernel loaded and the vCPUs at its entry.
    pub fn new(config: VmmConfig) -> Result<Vmm, VmmError> {
        Vmm::build(config, true)
    }

    /// Builds the VM `config` describes for an incoming snapshot or migration: the same
    /// RAM blocks (ids, sizes, guest addresses), irqchip, PIT, COM1 and vCPUs (CPUID, as
    /// [`Vmm::new`]), but no kernel loaded and no boot registers set: RAM is left for the
    /// stream, state for [`Vmm::restore_state`]. The kernel in `config` is not read.
    pub fn new_incoming(config: VmmConfig) -> Result<Vmm, VmmError> {
        Vmm::build(config, false)
    }

    fn build(config: VmmConfig, load: bool) -> Result<Vmm, VmmError> {
        config.validate()?;
        limits::check_memory(config.memory)?;
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

        let ram = KvmRam::new(Arc::new(RamList::new()), vm.clone())?;
        let ranges = ram_ranges(config.memory);
        for (&(addr, size), id) in ranges.iter().zip(RAM_BLOCK_IDS) {
            ram.add(id, size, addr, RamBlockOptions::default())?;
        }

        let boot = if load {
            let (boot, name) = load_kernel(&ram.guest_memory(), &config, &ranges)?;
            log::info!("kernel {name}: {boot:x?}");
            Some(boot)
        } else {
            log::info!("incoming VM: no kernel loaded, RAM and state to come");
            None
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
            // Only the boot vCPU starts at the kernel; the others wait for INIT/SIPI in
            // the in-kernel local APIC, as on a PC.
            if let (0, Some(boot)) = (index, &boot) {
                crate::boot::entry::set_entry(&vcpu, boot)?;
            }
            vcpus.push(vcpu);
        }
        Ok(Vmm {
            config,
            vm,
            ram,
            bus,
            vcpus,
            boot,
            vcpu_ctx,
        })
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// Where the boot vCPU starts (`None` for [`Vmm::new_incoming`]).
    pub fn boot_entry(&self) -> Option<BootEntry> {
        self.boot
    }

    /// Puts the VM in `state` (saved by [`crate::runner::RunningVm::save_state`] or a
    /// migration source), before its vCPUs first run and with guest RAM in place. Order
    /// (see [`crate::persist`]): PIT, PICs, IOAPIC, kvmclock, then each vCPU, then COM1.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmmError> {
        if state.vcpus.len() != self.vcpus.len() {
            return Err(PersistError::VcpuCount {
                state: state.vcpus.len(),
                vm: self.vcpus.len(),
            }
            .into());
        }
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

    /// Starts the vCPU threads without the main loop, signals or terminal handling (for
    /// embedding and tests): the VM runs until [`crate::runner::RunningVm::stop`].
    pub fn start(self) -> Result<crate::runner::RunningVm, VmmError> {
        crate::runner::RunningVm::start(self.into_parts())
    }

    pub(crate) fn into_parts(self) -> crate::runner::Parts {
        // The configuration's blocks only: a destination's list also holds the blocks the
        // source had hot-added, which stay hot-added (removable, and announced as such
        // to the next migration).
        let boot_blocks = self
            .ram
            .placed()
            .into_iter()
            .map(|p| p.id)
            .filter(|id| RAM_BLOCK_IDS.contains(&id.as_str()))
            .collect();
        crate::runner::Parts {
            config: self.config,
            vm: self.vm,
            ram: self.ram,
            bus: self.bus,
            vcpus: self.vcpus,
            boot_blocks,
            vcpu_ctx: self.vcpu_ctx,
        }
    }

    /// How many vCPUs the VM has.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The guest's RAM as KVM slots.
    pub fn ram(&self) -> &KvmRam {
        &self.ram
    }

    /// Runs the guest until it resets or powers off, or the control API's `quit` (`Ok`),
    /// or a vCPU fails (`Err`). The main loop runs on the calling thread
    /// ([`crate::runner`]).
    pub fn run(self) -> Result<GuestExit, VmmError> {
        crate::runner::run(self.into_parts())
    }
}
