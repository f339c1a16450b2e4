//! Why building or running a VM failed: one enum, each variant a complete sentence for the
//! one line `vmm` prints on stderr before exiting non-zero.

use crate::config::ConfigError;
use ramlist::kvm::KvmRamError;
use std::io;
use std::path::PathBuf;
use vmm_sys_util::errno;

/// Everything that can go wrong in [`crate::Vmm`].
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is refused: a bad size, memory size, vCPU count or serial output.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The KVM device cannot be opened.
    #[error("cannot open {}: {source} (is KVM available and accessible to this user?)", path.display())]
    NoKvm {
        /// The device (`/dev/kvm` unless `VMM_KVM_DEVICE` names another).
        path: PathBuf,
        /// Why.
        source: errno::Error,
    },
    /// The KVM device opened, but is not KVM (KVM_GET_API_VERSION fails or differs).
    #[error("{} is not a KVM device (KVM_GET_API_VERSION gives {version})", path.display())]
    NotKvm {
        /// The device.
        path: PathBuf,
        /// What the ioctl returned.
        version: i32,
    },
    /// More vCPUs than this host's KVM allows.
    #[error("bad vCPU count {count}: KVM on this host allows at most {max}")]
    TooManyVcpus {
        /// Asked for.
        count: u8,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// More guest RAM than the host has.
    #[error(
        "--memory {mib} MiB is more than this host can give: it has {host_mib} MiB of RAM and swap"
    )]
    MemoryExceedsHost {
        /// Asked for, in MiB.
        mib: u64,
        /// MemTotal + SwapTotal, in MiB.
        host_mib: u64,
    },
    /// The kernel (or its decompression) does not fit in guest RAM.
    #[error("kernel {kernel} needs at least {needs_mib} MiB of guest RAM below 3 GiB, the VM has {has_mib} MiB there: raise --memory")]
    MemoryTooSmall {
        /// The file (or "built-in tiny guest").
        kernel: String,
        /// RAM the kernel needs, from 0.
        needs_mib: u64,
        /// RAM the VM has in its first range.
        has_mib: u64,
    },
    /// The kernel file is neither an ELF nor a bzImage.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(String),
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd {} ({size} bytes) does not fit in guest RAM above the kernel ({room} bytes free there): raise --memory", path.display())]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room left between the kernel and the highest address it may use.
        room: u64,
    },
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// What was asked of KVM.
        op: &'static str,
        /// KVM's errno.
        source: errno::Error,
    },
    /// Guest RAM could not be created or placed.
    #[error("guest RAM: {0}")]
    Ram(#[from] KvmRamError),
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The kernel is not a loadable ELF, or does not fit in guest RAM.
    #[error("cannot load kernel {kernel}: {source}")]
    KernelLoad {
        /// The file (or "built-in tiny guest").
        kernel: String,
        /// linux-loader's reason.
        source: linux_loader::loader::Error,
    },
    /// The ELF kernel has no PVH entry note.
    #[error(
        "kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): boot its bzImage instead"
    )]
    NoPvhEntry(String),
    /// The kernel's load address or entry lies outside what the boot layout allows.
    #[error("kernel {kernel}: {what}")]
    KernelLayout {
        /// The file.
        kernel: String,
        /// What is wrong.
        what: String,
    },
    /// The kernel command line is refused.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// Writing the PVH or Linux boot structures failed.
    #[error("writing the boot structures: {0}")]
    BootParams(linux_loader::configurator::Error),
    /// Writing to guest memory failed.
    #[error("writing guest memory at {addr:#x}: {source}")]
    GuestMemory {
        /// Guest-physical address.
        addr: u64,
        /// vm-memory's reason.
        source: vm_memory::GuestMemoryError,
    },
    /// The serial output file cannot be created.
    #[error("cannot create serial output file {path}: {source}")]
    SerialFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The control API's socket cannot be created (in use, not a socket, ...).
    #[error(transparent)]
    ApiSocket(#[from] crate::api::socket::SocketError),
    /// An eventfd, signal handler or thread could not be created.
    #[error("{what}: {source}")]
    Host {
        /// What was being created.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Saving or restoring CPU or device state failed.
    #[error("VM state: {0}")]
    State(#[from] crate::persist::PersistError),
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("guest triple fault on vCPU {cpu} (rip {rip:#x}): the guest reset itself by crashing")]
    TripleFault {
        /// vCPU index.
        cpu: u8,
        /// Instruction pointer at the exit, if readable.
        rip: u64,
    },
    /// KVM could not run the guest (internal error, failed entry, unexpected exit).
    #[error("vCPU {cpu}: {what}")]
    VcpuFailed {
        /// vCPU index.
        cpu: u8,
        /// What KVM reported.
        what: String,
    },
}

impl VmmError {
    /// Shorthand for [`VmmError::Kvm`].
    pub fn kvm(op: &'static str) -> impl FnOnce(errno::Error) -> VmmError {
        move |source| VmmError::Kvm { op, source }
    }

    /// Shorthand for [`VmmError::Host`].
    pub fn host(what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
        move |source| VmmError::Host { what, source }
    }
}
