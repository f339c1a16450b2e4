//! The VMM: a KVM virtual machine with guest RAM from [`ramlist`], an ELF kernel booted
//! through the PVH entry, legacy devices (16550 serial, i8042 reset) and one thread per
//! vCPU. [`Vmm`] is built from a [`VmmConfig`]; the `vmm` binary's command line only fills
//! that config.
//!
//! Modules, from the outside in: [`config`] (what to build), [`vmm`] (building and running
//! it), [`host`] (what the host can give), [`kernel`] (reading `--kernel`/`--initrd` and
//! choosing the boot protocol), [`layout`], [`boot`] (the PVH path) and [`bzimage`] (the
//! Linux boot protocol), [`cpu`] (vCPU state), [`vcpu`] (the run loop) and
//! [`vcpu_control`] (stop, pause, resume), [`runner`] (a built VM running), [`event_loop`]
//! (the main loop: io handlers and timers under RCU), [`api`] (the control API and its
//! thin clients), [`devices`] (port I/O), [`tiny`] (the built-in guest kernel),
//! [`terminal`] and [`signals`] (the host terminal and the signals that stop the VMM),
//! [`persist`] (CPU and device state saved and restored: snapshots and migration),
//! [`migrate`] (live migration's source side), [`incoming`] (its destination: `vmm run
//! --incoming`) and [`migrate_client`] (`vmm migrate`).
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod boot;
pub mod bzimage;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod error;
pub mod event_loop;
pub mod host;
pub mod incoming;
pub mod kernel;
pub mod layout;
pub mod logger;
pub mod migrate;
pub mod migrate_client;
pub mod persist;
pub mod runner;
pub mod signals;
pub mod terminal;
mod throttle;
pub mod tiny;
pub mod vcpu;
pub mod vcpu_control;
pub mod vmm;

pub use config::{KernelSource, SerialOutput, VmmConfig};
pub use error::VmmError;
pub use vcpu::GuestExit;
pub use vmm::Vmm;
