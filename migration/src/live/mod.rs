//! Live pre-copy migration: the source driver [`migrate`] and the destination driver
//! [`incoming`], over the traits the VMM implements ([`MigratableVm`], [`RestorableVm`]).
//! This crate never imports the VMM: it asks for everything through these traits.
//!
//! # The source ([`migrate`])
//!
//! 1. **Setup**: start dirty logging ([`MigratableVm::start_dirty_log`]) and sync once
//!    (with `KVM_DIRTY_LOG_INITIALLY_SET` that first sync reports every page: it must
//!    come before the first pass, whose clear-then-scan then drops the bits of pages
//!    that hold nothing), send the header and the RAM setup (the blocks the VMM did
//!    not hot-add, [`MigratableVm::is_hotplugged`]; the hot-added ones open the first
//!    RAM section as BLOCK_ADD records), mark the first pass from pagemap (only pages
//!    that may hold data; see `save`'s `select` module).
//! 2. **Iterations** while the guest runs: send what is marked (the first pass, then the
//!    pages dirtied since the last sync), in batches bounded in time (one read-side
//!    section each); then [`MigratableVm::dirty_sync`] pulls KVM's log into the Migration
//!    bitmap. Each iteration measures bandwidth (bytes over sending time, cumulated) and
//!    the dirty rate (pages found dirty over the time since the previous sync).
//!
//!    **Auto-converge** (on by default, [`MigrateOptions::auto_converge`]): after each
//!    sync, the bytes dirtied in the period are weighed against the bytes sent in it;
//!    while the guest keeps dirtying more than half of what goes out, its vCPUs are
//!    throttled harder ([`MigratableVm::set_throttle`]; the rule is `throttle`'s, after
//!    QEMU's). Set back to 0 when the migration ends, completed or failed.
//! 3. When the remaining bytes would go within the downtime limit at the measured
//!    bandwidth (default 300 ms, QEMU's), or after [`MigrateOptions::max_iterations`]:
//!    **the final stage**. Pause the vCPUs (the downtime starts), sync once more, send
//!    the rest without rate limit (as QEMU's `ram_save_complete`), then every component's
//!    state ([`MigratableVm::save_state`]) and the end marker.
//! 4. **Confirmation** over the same socket: the destination answers once its guest
//!    runs (the `reply` layout below); the downtime ends there. To a `file:` there is no
//!    one to answer: the snapshot is complete when written, and the source stays paused.
//!
//! If anything fails before the confirmation — a write error, the destination closing
//! or reporting an error, a bad answer, a timeout, a cancel — the driver stops dirty
//! logging, resumes the guest if it paused it, shuts the socket down and returns a
//! [`MigrationError`] naming what failed and at which stage. Progress is published all
//! along in a [`MigrationProgress`] that the VMM's status command reads.
//!
//! # The destination ([`incoming`])
//!
//! Load the stream into the VM's RAM list (the checked loader), restore the components'
//! state, resume, then confirm. A source that stalls is cut off by the read timeout
//! ([`IncomingOptions::stall_timeout`]), and the whole load by an optional deadline. A
//! failure is reported back to the source (best effort) before the error is returned.
//!
//! # The return path (`reply`)
//!
//! ```text
//! reply := "MVMR" | status u8 (0 = running, 1 = failed, 2 = mapped, 3 = ready,
//!          4 = running since: the message is a CLOCK_MONOTONIC instant in ns)
//!          | length u16 (<= 4096) | message
//! ```
//!
//! The destination of a pre-copy migration writes exactly one reply (running or failed),
//! then closes its side; a local one ([`local`]) answers mapped and ready before it.

mod dest;
mod error;
pub mod local;
mod progress;
mod reply;
mod source;
mod state;
mod throttle;

pub use crate::load::ComponentState;
pub use dest::{incoming, incoming_from_uri, IncomingOptions, IncomingStats};
pub use error::{IncomingError, MigrationError, Stage};
pub use progress::{
    IterationStats, MigrationProgress, MigrationState, MigrationStats, PostcopyStats,
    ProgressEvent, ProgressObserver, ProgressSnapshot,
};
pub use reply::{Reply, ReplyError, MAX_REPLY_MESSAGE, MAX_RUNS_PER_MESSAGE, REPLY_MAGIC};
pub use source::{migrate, migrate_to_uri, migrate_to_uri_tls, MigrateOptions};
pub use state::{Persist, StateError};
pub use throttle::{
    next_throttle, AutoConverge, ThrottleSettings, ThrottleUnsupported, HIGH_PERIODS_TO_RAISE,
};

use crate::load::BlockHotplug;
use ramlist::dirty::RecentWrites;
use ramlist::{RamBlock, RamList};
use std::sync::Arc;

/// The error a VMM returns from the traits' methods, passed on as it is.
pub type VmError = Box<dyn std::error::Error + Send + Sync>;

/// What the source VMM gives the live migration driver. The driver calls these from its
/// own thread, in the order the module documentation gives.
pub trait MigratableVm: Send {
    /// The VM's RAM list: the blocks to send.
    fn ram(&self) -> Arc<RamList>;

    /// Starts logging the guest's writes for [`DirtyClient::Migration`](ramlist::dirty::DirtyClient::Migration)
    /// (`KvmRam::set_dirty_logging_all(DirtyClient::Migration, true)`). The VMM's own
    /// writes to guest memory must mark the bitmaps as always (`DirtyMemory::mark_dirty`).
    fn start_dirty_log(&self) -> Result<(), VmError>;

    /// Stops it (`set_dirty_logging_all(DirtyClient::Migration, false)`): at the end of a
    /// migration, whether it succeeded or not.
    fn stop_dirty_log(&self) -> Result<(), VmError>;

    /// Pulls the guest's writes since the last call into the RAM list's bitmaps
    /// (`KvmRam::sync_dirty_log`: GET, CLEAR, merge); returns the pages it reported.
    fn dirty_sync(&self) -> Result<u64, VmError>;

    /// What the guest wrote since the last [`dirty_sync`](Self::dirty_sync), read without
    /// taking it (`KvmRam::peek_dirty_log`), or `None` when the VM cannot tell (the
    /// default). The first pass leaves those pages for the next one instead of sending
    /// them twice ([`RamSaver::hold_back`](crate::save::RamSaver::hold_back)); nothing
    /// rests on the answer being complete or exact.
    fn recent_writes(&self) -> Result<Option<RecentWrites>, VmError> {
        Ok(None)
    }

    /// Stops the vCPUs (and whatever else writes guest memory or device state): returns
    /// once none runs. `Ok(true)` if they were running, `Ok(false)` if they were paused
    /// already (the driver then leaves them paused if the migration fails).
    fn pause(&self) -> Result<bool, VmError>;

    /// Lets the vCPUs run again: after a failed migration, if [`pause`](Self::pause) said
    /// they were running.
    fn resume(&self) -> Result<(), VmError>;

    /// Every component's state, the guest paused: vCPUs (regs, sregs, fpu/xsave, xcrs,
    /// msrs, lapic, mp_state, vcpu events, debugregs), irqchip (PIC, IOAPIC), PIT,
    /// kvmclock, serial... one [`ComponentState`] each, names unique (e.g. "cpu0",
    /// "pic", "ioapic", "pit", "kvmclock", "serial"). [`Persist`] and
    /// [`ComponentState::encode`] make them from plain serializable State structs.
    fn save_state(&self) -> Result<Vec<ComponentState>, VmError>;

    /// Whether `block` was added at run time (`ram-add`) rather than built from the VM's
    /// configuration. The RAM setup lists only the blocks a destination started with the
    /// same configuration has; hot-added ones go as BLOCK_ADD records (with their guest
    /// address) at the start of the first RAM section, and the destination creates them
    /// through its [`BlockHotplug`]. The default, `false`, lists every block in the
    /// setup (a destination that must have them all already).
    fn is_hotplugged(&self, block: &RamBlock) -> bool {
        let _ = block;
        false
    }

    /// Auto-converge (see the `throttle` module): makes every vCPU spend `percent`% of
    /// its time out of the guest (0: full speed again; never more than 99). Called from
    /// the migration thread while the guest runs; pause and resume keep working under a
    /// throttle. The driver sets it back to 0 when the migration ends, whether it
    /// succeeded or not. The default refuses ([`ThrottleUnsupported`]): the driver then
    /// goes on without throttling.
    fn set_throttle(&self, percent: u8) -> Result<(), VmError> {
        let _ = percent;
        Err(Box::new(ThrottleUnsupported))
    }

    /// Holds RAM hot-plug off until the returned value drops: a local migration
    /// ([`local`]) takes it before it pauses the guest and keeps it to the end, so the
    /// layout it hands over last is the layout. The default holds nothing (a VM without
    /// hot-plug).
    fn hold_ram_layout(&self) -> Box<dyn LayoutHold + '_> {
        Box::new(())
    }

    /// A local migration is about to give the guest up (`go`): from now on nothing may
    /// run it or touch its memory here, whatever follows (the VMM refuses resume, reset,
    /// hot-plug...). Called once, the guest paused, before `go` goes out.
    fn handing_over(&self) {}
}

/// Whatever keeps a VM's RAM layout still while it lives ([`MigratableVm::hold_ram_layout`]):
/// a lock guard, usually.
pub trait LayoutHold {}

impl<T> LayoutHold for T {}

/// What the destination VMM gives [`incoming`]. Its vCPUs are not running while the
/// stream loads.
pub trait RestorableVm {
    /// The VM's RAM list: the stream's blocks must be there, fresh (see
    /// `docs/stream.md`, "Setup entries and skipped zero pages"), with the source's
    /// lengths.
    fn ram(&self) -> Arc<RamList>;

    /// How blocks the source added or removed during the migration are created and
    /// dropped here (a KVM slot besides the memory, usually).
    fn hotplug(&mut self) -> &mut dyn BlockHotplug;

    /// Restores every component from the states the source sent (in stream order).
    fn restore_state(&mut self, states: &[ComponentState]) -> Result<(), VmError>;

    /// Starts the vCPUs. [`incoming`] confirms to the source once this returned, so it
    /// must return only once the guest really runs (its vCPUs released into it, not merely
    /// marked to start later); an error instead (the guest must then not run) goes to the
    /// source as the failure reply, and the source resumes its own guest.
    fn resume(&mut self) -> Result<(), VmError>;

    /// After [`resume`](Self::resume): when the guest ran again (CLOCK_MONOTONIC, ns: the
    /// last vCPU out of its park), if the VM knows. A local migration's source, on the
    /// same host's clock, takes its downtime from it. The default: unknown.
    fn running_since_ns(&self) -> Option<u64> {
        None
    }

    /// Post-copy: called before [`resume`](Self::resume) — the guest about to run here
    /// will still miss pages (a VMM that reports its state says `postcopy-active`, not
    /// completed, once it runs). The default does nothing.
    fn postcopy_starting(&mut self) {}

    /// Post-copy: the guest runs (after [`resume`](Self::resume)), and the pages it
    /// misses are still coming; the migration ends when the last is in place. The
    /// default does nothing.
    fn postcopy_running(&mut self) {}

    /// Post-copy: the link to the source broke (`why`). The guest stays as it is here,
    /// its vCPUs waiting on the pages they miss, until a source reconnects
    /// ([`postcopy_reconnect`](Self::postcopy_reconnect)).
    fn postcopy_paused(&mut self, why: &str) {
        let _ = why;
    }

    /// Post-copy recovery: waits for the source to connect again (where the VMM listens:
    /// its incoming URI) and returns the connection; `None` gives the guest up (the VMM
    /// is ending). The default gives up at once: no recovery.
    fn postcopy_reconnect(&mut self) -> Option<crate::transport::Connection> {
        None
    }

    /// Post-copy failed after the guest ran here: pages it needs will never come. Stop
    /// its vCPUs now, before guest RAM is let go (its missing pages would then read as
    /// zeros). The default does nothing.
    fn postcopy_failed(&mut self) {}
}
