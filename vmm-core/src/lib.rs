//! The VMM: a KVM virtual machine with guest RAM from [`ramlist`], an ELF kernel booted
//! through the PVH entry, legacy devices (16550 serial, i8042 reset) and one thread per
//! vCPU. [`Vmm`] is built from a [`VmmConfig`]; the `vmm` binary's command line only fills
//! that config.
//!
//! Modules, from the outside in: [`config`] (what to build), [`vmm`] (building and running
//! it), [`runner`] (a built VM running), [`host`] (the host: limits, terminal, signals,
//! log), [`boot`] (kernel loading and the guest layout), [`vcpu`] (set-up, run loop and
//! control), [`event_loop`] (the main loop: io handlers and timers under RCU), [`api`]
//! (the control API and its thin clients), [`devices`] (port I/O), [`persist`] (CPU and
//! device state saved and restored), [`migrate`] (live migration's source side),
//! [`incoming`] (its destination: `vmm run --incoming`) and [`migrate_client`] (`vmm
//! migrate`).
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod boot;
pub mod config;
pub mod devices;
pub mod error;
pub mod event_loop;
pub mod host;
pub mod incoming;
pub mod migrate;
pub mod migrate_client;
pub mod persist;
pub mod runner;
mod throttle;
pub mod vcpu;
pub mod vmm;

pub use config::{KernelSource, SerialOutput, VmmConfig};
pub use error::VmmError;
pub use vcpu::GuestExit;
pub use vmm::Vmm;
