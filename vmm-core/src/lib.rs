//! The VMM: a KVM virtual machine with guest RAM from [`ramlist`], a kernel booted through
//! its PVH entry or the Linux boot protocol, legacy devices (16550 serial, i8042 reset),
//! one thread per vCPU, a control API, and live migration over the [`migration`] crate.
//! [`Vmm`] is built from a [`VmmConfig`]; the `vmm` binary's command line only fills that
//! config.
//!
//! The crate is a house of rooms, each a folder (or one file) with one job, and imports
//! run one way only, from the top down (`scripts/check-layers.sh` checks it; see
//! docs/architecture.md for the drawing):
//!
//! - [`vmm`] — the VMM process: a machine on the main loop with the control API, its
//!   commands dispatched to the machine and to live migration, `vmm run --incoming`.
//! - [`live`] — live migration's source side, the throttle timer, the destination side.
//! - [`machine`] — a VM built from its config and, running, the handle the rooms above
//!   drive: pause, resume, save and restore state, hot-plug RAM.
//! - [`vcpu`] — vCPU set-up (CPUID, MSRs), the run loop, pause/resume/throttle control.
//! - [`devices`] — the port bus, COM1 (and its saved state), the i8042, the device map.
//! - [`boot`] — kernel and initrd loading (ELF/PVH, bzImage), the guest memory layout,
//!   the built-in tiny guest.
//! - [`host`] — what the host can give (RAM, vCPUs), the terminal, signals, the log.
//! - [`error`] — [`VmmError`], what `vmm` prints when building or running a VM fails.
//! - [`api`] — the control API: protocol, socket, server (over the [`api::Control`]
//!   trait that [`vmm`] implements) and the thin clients.
//! - [`persist`] — CPU and device state as plain serializable values.
//! - [`event_loop`] — the epoll main loop: io handlers and timers under RCU.
//! - [`events`] — what the VM tells its watchers (QMP's events), raised anywhere,
//!   delivered by the main loop.
//! - [`config`] — what to build: [`VmmConfig`], its limits and its errors.
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod boot;
pub mod config;
pub mod devices;
pub mod error;
pub mod event_loop;
pub mod events;
pub mod host;
pub mod live;
pub mod machine;
pub mod persist;
pub mod vcpu;
pub mod vmm;

pub use config::{KernelSource, SerialOutput, VmmConfig};
pub use error::VmmError;
pub use machine::RunningVm;
pub use vcpu::GuestExit;
pub use vmm::Vmm;
