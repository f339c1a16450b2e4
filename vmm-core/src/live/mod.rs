//! Live migration in the VMM, over the migration crate's driver: the source side
//! ([`source`]: the running machine as a [`migration::live::MigratableVm`], on a migration
//! thread), auto-converge's vCPU throttle timer ([`throttle`]), and the destination side
//! ([`destination`]: the receiving thread of `vmm run --incoming`, the machine as a
//! [`migration::live::RestorableVm`]).
//!
//! This room drives the machine through its handle ([`crate::machine::Machine`]: pause,
//! resume, kick, save and restore state on parked vCPUs, the RAM list) and knows nothing
//! of the main loop or the control API; the VMM process (`crate::vmm`) starts what is
//! here and shows its progress in `status`.

pub mod destination;
pub mod source;
pub mod throttle;
