//! Live migration for minivmm: the stream format, the RAM saver and loader, the
//! transports that carry the stream, and the live pre-copy driver, which asks the VMM for
//! dirty-log syncs, pausing and vCPU and device state through traits of its own.
//!
//! - [`stream`]: the byte layout (header, RAM setup, RAM sections of page records, state
//!   blobs, end marker), a buffered, counting, rate-limitable writer and a bounded reader.
//! - [`save`]: [`RamSaver`](save::RamSaver) walks the RAM list under read-side sections
//!   bounded in time and sends setup, a first pass and dirty pages.
//! - [`load`]: [`load`](load::load) checks every value of a stream against the
//!   destination's RAM list before it writes a byte of guest memory.
//! - [`snapshot`]: `DIR/state` and the sparse `DIR/memory`, written with the guest paused
//!   and checked whole before a restore maps anything.
//! - [`transport`]: `unix:`, `tcp:` and `file:` URIs, connect, listen and accept.
//! - [`live`]: [`migrate`](live::migrate) (the source: setup, iterations, final stage,
//!   confirmation, and the guest resumed on any failure) and
//!   [`incoming`](live::incoming) (the destination), over the [`MigratableVm`](live::MigratableVm)
//!   and [`RestorableVm`](live::RestorableVm) traits the VMM implements.
//!
//! The rules for touching the RAM list are ramlist's (its `list` module): read sections
//! for walks, counted references for what outlives one.
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

pub mod live;
pub mod load;
pub mod postcopy;
pub mod save;
pub mod snapshot;
pub mod stream;
pub mod transport;
mod zero;

pub use zero::{is_zero, is_zero_shared};
