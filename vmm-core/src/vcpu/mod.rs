//! The vCPUs: each one set up before it first runs ([`setup`]: CPUID, MSRs, FPU, local
//! APIC), its thread running KVM_RUN and handing exits to the devices ([`run`]), and how
//! other threads stop, pause, resume, throttle and reach a parked vCPU ([`control`]).
//!
//! Nothing here knows how a VM is built or what a migration is: the machine
//! (`crate::machine`) starts the threads and drives them through [`RunControl`].

pub mod control;
pub mod run;
pub mod setup;

pub use control::RunControl;
pub use run::{install_kick_handler, GuestExit, VcpuReport, VcpuThread};
