//! [`Vmm`]: one KVM virtual machine built from a [`VmmConfig`] and run until the guest
//! ends it (rust-vmm vmm-reference's shape: the command line only fills the config).
//!
//! [`Vmm::new`] does everything that can fail before the guest runs — KVM VM, in-kernel
//! irqchip and PIT, guest RAM on a [`RamList`] placed as KVM slots, the kernel and its PVH
//! boot structures, devices, configured vCPUs — so a bad config is reported before any
//! guest code executes. [`Vmm::run`] starts one thread per vCPU and waits for the first
//! one that ends the VM.

use crate::config::VmmConfig;
use crate::cpu;
use crate::devices::{serial, PioBus};
use crate::error::VmmError;
use crate::host;
use crate::kernel::{load_kernel, BootEntry};
use crate::layout::ram_ranges;
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
    boot: BootEntry,
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
        config.validate()?;
        host::check_memory(config.memory)?;
        let kvm = open_kvm(&config.kvm_device)?;
        host::check_vcpus(config.vcpus, kvm.get_max_vcpus())?;
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

        let (boot, name) = load_kernel(&ram.guest_memory(), &config, &ranges)?;
        log::info!("kernel {name}: {boot:x?}");

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
            if index == 0 {
                cpu::set_entry(&vcpu, &boot)?;
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
        })
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// Where the boot vCPU starts.
    pub fn boot_entry(&self) -> BootEntry {
        self.boot
    }

    /// The guest's RAM as KVM slots.
    pub fn ram(&self) -> &KvmRam {
        &self.ram
    }

    /// Runs the guest until it resets or powers off, or the control API's `quit` (`Ok`),
    /// or a vCPU fails (`Err`). The main loop runs on the calling thread
    /// ([`crate::runner`]).
    pub fn run(self) -> Result<GuestExit, VmmError> {
        let boot_blocks = self.ram.placed().into_iter().map(|p| p.id).collect();
        crate::runner::run(crate::runner::Parts {
            config: self.config,
            vm: self.vm,
            ram: self.ram,
            bus: self.bus,
            vcpus: self.vcpus,
            boot_blocks,
        })
    }
}
