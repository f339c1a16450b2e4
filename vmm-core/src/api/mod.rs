//! The control API behind `vmm run --api-socket PATH`: a unix socket (mode 0600) that
//! speaks one JSON object per line, QMP-like.
//!
//! ```text
//! → {"cmd":"status"}
//! ← {"ok":true,"state":"running","memory_bytes":134217728,"vcpus":1,"blocks":[...]}
//! → {"cmd":"ram-add","id":"extra","size":"1G"}
//! ← {"ok":true,"id":"extra","size":1073741824,"guest_addr":4294967296}
//! → {"cmd":"bogus"}
//! ← {"ok":false,"class":"unknown-command","error":"unknown command \"bogus\"; ..."}
//! ```
//!
//! Commands: `status`, `pause`, `resume`, `quit`, `ram-add {id, size}` (size in bytes, or
//! a string with a K/M/G/T suffix), `ram-remove {id}` and `migrate {uri, downtime_ms?,
//! max_bandwidth?, auto_converge?, local?}` (started on its own thread; `status` shows its
//! progress) and `snapshot {dir}` (the guest paused, `dir/state` and a sparse
//! `dir/memory` written; answered with the figures). Every answer is one line with
//! `ok`; a refusal has `error` (a sentence) and `class` (a stable name for programs).
//!
//! Modules: [`protocol`] (requests, answers, errors), [`socket`] (creating the socket
//! safely), [`server`] (clients on the main loop), [`client`] (the `vmm status|...` thin
//! clients) and [`migrate_client`] (`vmm migrate`: its progress bar and `--json`). What
//! a command does to the VM is behind the [`Control`] trait, so the server knows nothing
//! of KVM, and this room imports nothing of the VMM but [`crate::config`]'s size parser
//! and [`crate::event_loop`].

pub mod client;
pub mod codec;
pub mod migrate_client;
pub mod protocol;
pub mod qmp;
pub mod server;
pub mod socket;

pub use protocol::{ApiError, BlockInfo, MigrationParams, Request, Status, VmState};

use migration::live::MigrationProgress;
pub use server::ApiServer;
use std::sync::Arc;

/// What the API's commands do to a running VM (implemented by `crate::vmm`'s control;
/// tests use a fake). Every method is called on the main loop's thread.
pub trait Control: Send + Sync {
    /// The VM's state, memory and RAM blocks.
    fn status(&self) -> Status;
    /// Stops every vCPU (idempotent); returns once none runs guest code.
    fn pause(&self) -> Result<(), ApiError>;
    /// Lets the vCPUs run again (idempotent).
    fn resume(&self) -> Result<(), ApiError>;
    /// Asks the VMM to end with status 0 once the answer is sent.
    fn quit(&self);
    /// Hot-adds RAM block `id` of `size` bytes; returns what was placed.
    fn ram_add(&self, id: &str, size: u64) -> Result<BlockInfo, ApiError>;
    /// Hot-removes RAM block `id`: unlinked at once, unmapped after a grace period.
    fn ram_remove(&self, id: &str) -> Result<(), ApiError>;
    /// Starts a migration to `params.uri` on a migration thread and returns at once;
    /// `status` shows its progress. `auto_converge` (default on) throttles the vCPUs while
    /// the guest dirties memory faster than it goes. Refused by VMMs that cannot migrate.
    fn migrate(&self, params: &MigrationParams) -> Result<(), ApiError> {
        Err(ApiError::Migration(format!(
            "cannot migrate to {:?} from here",
            params.uri
        )))
    }
    /// Pauses the guest (it stays paused) and writes a snapshot restored by mapping into
    /// `dir`: `dir/state` and the sparse `dir/memory` (with `diff_from`, a diff of that
    /// snapshot). Returns its figures.
    fn snapshot(&self, dir: &str, diff_from: Option<&str>) -> Result<serde_json::Value, ApiError> {
        let _ = diff_from;
        Err(ApiError::Snapshot(format!(
            "cannot snapshot to {dir:?} from here"
        )))
    }
    /// Asks the migration under way to stop at its next batch (the guest runs on here);
    /// refused when none runs, or once its final stage began.
    fn migrate_cancel(&self) -> Result<(), ApiError> {
        Err(ApiError::Migration("no migration is under way".into()))
    }
    /// Why `quit` must not end this VMM now (`None`: it may): a post-copy source holds
    /// pages the guest on the destination still needs.
    fn quit_refused(&self) -> Option<String> {
        None
    }
    /// Switches the migration under way to post-copy at the end of its iteration (QMP's
    /// `migrate-start-postcopy`).
    fn migrate_start_postcopy(&self) -> Result<(), ApiError> {
        Err(ApiError::Migration("no migration is under way".into()))
    }
    /// Resets the machine: its devices and vCPUs as they powered on, its kernel loaded
    /// again (QMP's `system_reset`).
    fn system_reset(&self) -> Result<(), ApiError> {
        Err(ApiError::Reset("this VM cannot be reset".into()))
    }
    /// On a destination started with `--incoming defer`: listens on `uri` and receives
    /// the migration there (QMP's `migrate-incoming`).
    fn migrate_incoming(&self, uri: &str) -> Result<(), ApiError> {
        Err(ApiError::Migration(format!(
            "cannot receive a migration on {uri:?} here"
        )))
    }
    /// The current or last migration's progress, as the driver updates it.
    fn migration_progress(&self) -> Option<Arc<MigrationProgress>> {
        None
    }
    /// Whether the guest's vCPUs run now (QMP's `running`).
    fn is_running(&self) -> bool {
        matches!(self.status().state, VmState::Running | VmState::Migrating)
    }
}
