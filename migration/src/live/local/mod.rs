//! Local migration: the guest's memory is handed over, not copied (`vmm migrate --local`,
//! Cloud Hypervisor's `--local`, QEMU's `x-ignore-shared` done by passing descriptors).
//! Both VMMs run on one host; every RAM block of the source is a file another process can
//! map (a memfd, a file on tmpfs or hugetlbfs), and the URI is `unix:`, whose socket
//! carries the files' descriptors (SCM_RIGHTS). No page goes through the socket: the
//! destination maps the very memory the source's guest used.
//!
//! # The exchange
//!
//! ```text
//! source                                         destination
//! "MVML" v1, ADD+fd per block, DONE    ─────▶    checks each file, maps it (KVM slot)
//!                                      ◀─────    MAPPED
//! hold RAM hot-plug, pause the guest
//! DEL / ADD+fd for what changed, DONE  ─────▶    drops / maps them
//! stream: header, RAM setup (every
//!   block, no page), states, end       ─────▶    the checked loader; restores the state
//!                                      ◀─────    READY
//! "MVMG" (go): the guest is given up   ─────▶    starts the vCPUs
//!                                      ◀─────    RUNNING
//! ```
//! The layout's bytes are in [`wire`]; the answers are the return path's replies.
//!
//! # Who owns the guest, when
//!
//! Two processes map one memory, so exactly one may run the guest at any time. The source
//! runs it until it pauses it; the destination starts it only after `go`, and the source
//! sends `go` only after READY. So:
//! - Anything that fails before `go` (the destination refuses a file, dies, times out,
//!   fails to restore): the destination never ran the guest, and the source resumes it on
//!   its memory, as after a failed pre-copy migration.
//! - Once `go` is sent, the source never touches the guest or its memory again, whatever
//!   follows. If RUNNING does not come (the destination died in between) the source says
//!   the guest is lost ([`MigrationError::HandedOver`](crate::live::MigrationError::HandedOver))
//!   and stays paused: resuming it could run two guests on one memory.
//! - After RUNNING the source's VMM ends; the destination's mappings keep the memory.
//!
//! The destination checks every record before it maps anything: a valid id, a non-zero
//! length of whole pages (within [`LoadOptions::max_new_block`](crate::load::LoadOptions::max_new_block)),
//! page-aligned guest address and file offset, a regular file that holds the whole block
//! (a mapping past a file's end would fault on first touch), exactly one descriptor per
//! ADD and none besides, a version it knows; then the ordinary stream's checks (a block
//! of the setup it does not have, or of another length, is refused) and no page at all.

mod dest;
mod source;
pub mod wire;

pub use dest::{incoming_any, incoming_local, map_shared_plain};
pub use source::{check_shareable, migrate_local, migrate_local_to_uri};
pub use wire::{LayoutError, SharedBlock};
