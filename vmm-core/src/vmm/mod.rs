//! [`Vmm`]: one KVM virtual machine built from a [`VmmConfig`] and run as the `vmm`
//! process runs it, until the guest ends it (rust-vmm vmm-reference's shape: the command
//! line only fills the config). This is the top room: it puts the machine
//! ([`crate::machine`]) on the main loop (`runner`) with the control API, whose commands
//! it dispatches to the machine and to live migration (`control`), and runs a migration
//! destination ([`incoming`]: `vmm run --incoming`).
//!
//! [`Vmm::new`] does everything that can fail before the guest runs
//! ([`MachineParts::build`]), so a bad config is reported before any guest code executes.
//! [`Vmm::run`] starts one thread per vCPU and runs the main loop until the VM ends.
//!
//! For a snapshot restore or a migration destination, [`Vmm::new_incoming`] builds the same
//! machine without loading a kernel or setting boot registers; guest RAM then comes from
//! the stream and the CPU and device state from [`Vmm::restore_state`]. [`Vmm::start`]
//! runs the vCPUs without the main loop, for embedding and tests ([`RunningVm`]).

pub(crate) mod control;
pub mod incoming;
pub mod restore;
pub(crate) mod runner;

pub use incoming::{run_incoming, IncomingTls, RunIncomingError};
pub use restore::{run_restore, RunRestoreError};

use crate::boot::BootEntry;
use crate::config::VmmConfig;
use crate::error::VmmError;
use crate::machine::build::Boot;
use crate::machine::{MachineParts, RunningVm, Start};
use crate::persist::VmState;
use crate::vcpu::GuestExit;
use ramlist::kvm::KvmRam;
use runner::Runner;

/// A virtual machine ready to run.
pub struct Vmm {
    parts: MachineParts,
}

impl Vmm {
    /// Builds the VM `config` describes, with the kernel loaded and the vCPUs at its entry.
    pub fn new(config: VmmConfig) -> Result<Vmm, VmmError> {
        Ok(Vmm {
            parts: MachineParts::build(config, Boot::Kernel)?,
        })
    }

    /// Builds the VM `config` describes for an incoming snapshot or migration: the same
    /// RAM blocks (ids, sizes, guest addresses), irqchip, PIT, COM1 and vCPUs (CPUID, as
    /// [`Vmm::new`]), but no kernel loaded and no boot registers set: RAM is left for the
    /// stream, state for [`Vmm::restore_state`]. The kernel in `config` is not read.
    pub fn new_incoming(config: VmmConfig) -> Result<Vmm, VmmError> {
        Ok(Vmm {
            parts: MachineParts::build(config, Boot::Incoming)?,
        })
    }

    /// [`Vmm::new_incoming`] for a snapshot restore: the boot RAM blocks `snapshot` holds
    /// are mapped from its memory file as they are built
    /// ([`MachineParts::build_from`]), not made anonymous and replaced later.
    pub fn new_restore(
        config: VmmConfig,
        snapshot: &migration::snapshot::OpenSnapshot,
    ) -> Result<Vmm, VmmError> {
        Ok(Vmm {
            parts: MachineParts::build_from(config, Boot::Incoming, Some(snapshot))?,
        })
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmmConfig {
        self.parts.config()
    }

    /// Where the boot vCPU starts (`None` for [`Vmm::new_incoming`]).
    pub fn boot_entry(&self) -> Option<BootEntry> {
        self.parts.boot_entry()
    }

    /// Puts the VM in `state` (saved by [`RunningVm::save_state`] or a migration source),
    /// before its vCPUs first run and with guest RAM in place. Order (see
    /// [`crate::persist`]): PIT, PICs, IOAPIC, kvmclock, then each vCPU, then COM1.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmmError> {
        self.parts.restore_state(state)
    }

    /// Starts the vCPU threads without the main loop, signals or terminal handling (for
    /// embedding and tests): the VM runs until [`RunningVm::stop`].
    pub fn start(self) -> Result<RunningVm, VmmError> {
        RunningVm::start(self.parts)
    }

    /// The VM's pieces, for running it on the main loop another way (a destination).
    pub(crate) fn into_parts(self) -> MachineParts {
        self.parts
    }

    /// How many vCPUs the VM has.
    pub fn vcpu_count(&self) -> usize {
        self.parts.vcpu_count()
    }

    /// The guest's RAM as KVM slots.
    pub fn ram(&self) -> &KvmRam {
        self.parts.ram()
    }

    /// Runs the guest until it resets or powers off, or the control API's `quit` (`Ok`),
    /// or a vCPU fails (`Err`). The main loop runs on the calling thread (`runner`).
    pub fn run(self) -> Result<GuestExit, VmmError> {
        let runner = Runner::start(self.parts, Start::Running)?;
        let looped = runner.run_loop();
        runner.finish(looped)
    }
}
