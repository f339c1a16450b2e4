//! Guest RAM for the VMM: blocks of host memory ([`RamBlock`]) on an RCU list
//! ([`RamList`]) that vCPU, device and migration threads read without locks, with dirty
//! bitmaps per client and KVM memory slots built on top.
//!
//! The locking rules live in one place, the `list` module's documentation (and
//! [`RamList`]'s): readers take `rcu::read_lock()` only, writers take the list's writer
//! lock, freed blocks are unmapped after a grace period.
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

mod adopt;
mod block;
mod error;
mod list;
mod lookup;
mod mru;
mod offsets;
mod recent;
mod table;

pub use block::{
    mapped_blocks, page_shift, page_size, Backing, RamBlock, RamBlockOptions, ReclaimNotifier,
    MAX_BLOCK_SIZE, MAX_ID_LEN,
};
pub use error::RamError;
pub use list::{RamList, RamListWriter};
pub use lookup::RamBlockRef;
pub use offsets::{find_ram_offset, ram_offset_align};
pub mod dirty;
pub mod guest;
pub mod kvm;
pub mod pagemap;
