//! Post-copy: the guest moves to the destination before all of its memory did, and the
//! pages it still misses follow — those it touches first, on request.
//!
//! # When
//!
//! `vmm migrate --postcopy` starts as pre-copy and switches after the first pass
//! (`--postcopy-after N`: after N iterations; the API's `start-postcopy`: at the end of
//! the iteration running), unless the migration converged by then. Choose it when the
//! guest dirties memory faster than the link carries it and throttling it (auto-converge)
//! would hurt more than a few faults that wait one round trip each.
//!
//! # The switch (source, guest paused)
//!
//! One last sync of the dirty log; a RAM section announcing any block added or removed
//! since the last batch; then the switch package:
//!
//! ```text
//! postcopy := 0x05 | token u64 | count u32
//!             | count × (idstr | runs u32 | runs × (first_page u64 | pages u64))
//!             state sections... | end (0x04)
//! ```
//!
//! The token is random; a source that resumes this post-copy on a new connection shows
//! it (see Recovery). The runs are the pages the destination must not trust: every page
//! still marked in the Migration bitmap (dirtied since it was sent, or never sent yet).
//! The source's reported downtime ends here, when the package is written (as QEMU's).
//!
//! # The destination
//!
//! The loader ([`crate::load::IncomingLoad`]) checks the runs against the blocks the
//! stream declared and stops after the package's end. The driver then drops the stale
//! pages (`MADV_DONTNEED`, `MADV_REMOVE` for shared memory), registers every block of
//! guest RAM with a userfaultfd in missing mode, starts the fault thread, restores the
//! states, resumes the vCPUs and answers `postcopy-running` (reply status 5). The `pages`
//! module says how each fault is served: a missing page is asked for once (reply status
//! 6, `OFFSET_HEX PAGES ID`), any other absent page is a zero page filled at once. The
//! VMM's own accesses to guest memory fault and are served the same way.
//!
//! After the package the stream goes on with RAM sections (pages and zero records, no
//! block records) and a final end; each page is placed with `UFFDIO_COPY` (or
//! `UFFDIO_ZEROPAGE`), which wakes its waiters. At the end every page must be in place:
//! the destination unregisters and answers `postcopy-done` (status 7) with its figures
//! as JSON; the source exits 0.
//!
//! # The source after the switch
//!
//! A thread reads the return path. The driver sends each requested page at once, in
//! its own RAM section, and the rest a few pages at a time in block order from the last
//! request, only while the socket holds less than the link's bandwidth-delay product plus
//! a small margin (`transport::queue`): a requested page never waits behind more than
//! about one round trip of background pages.
//!
//! # Failure
//!
//! Before the destination says its guest runs, a failure resumes the guest on the source
//! (it never ran there). After it, the source never runs the guest again: it lives on
//! the destination, with pages only the source has. A destination that fails or
//! misbehaves (a failed reply, a hostile return path) then ends post-copy, and the guest
//! is lost; both sides say so plainly.
//!
//! # Recovery
//!
//! A link that breaks after the guest ran (the connection closed, reset or stalled past
//! the write timeout) pauses both sides instead (`postcopy-paused`), each keeping the
//! guest's memory: on the destination, threads that touch a missing page wait; the VMM
//! listens on its incoming URI again ([`RestorableVm::postcopy_reconnect`](crate::live::RestorableVm::postcopy_reconnect)).
//! [`MigrationProgress::resume_postcopy`](crate::live::MigrationProgress::resume_postcopy)
//! (`vmm migrate --resume --to URI`) makes the source reconnect:
//!
//! ```text
//! source → destination:  "MVMP" | token u64 (the switch's)
//! destination → source:  reply 8 (missing pages: `HEX+COUNT,... ID`, at most 100 runs
//!                        a message), as many as needed, then reply 9 (ready)
//! ```
//!
//! The source then marks exactly those pages to send (pages lost in flight come back,
//! pages the destination has go no more), the destination asks again for the pages its
//! threads wait on, and the stream goes on with RAM sections and the final end. A
//! connection that does not open this way, or shows another token, is refused and the
//! destination waits on. The source stays paused, and can be resumed again, until it
//! reconnects or is cancelled (`migrate_cancel`: the guest is given up).
//!
//! Post-copy needs both halves of the connection at once (plain `unix:` or `tcp:`; not
//! TLS, whose halves share one session) and userfaultfd on the destination.

/// What a source resuming a paused post-copy sends first on the new connection, before
/// the switch's token (u64, big-endian).
pub const RESUME_MAGIC: [u8; 4] = *b"MVMP";

mod dest;
mod pages;
pub mod uffd;

pub(crate) use dest::{return_path, run as run_destination, Input};
pub use pages::PostcopyFigures;
