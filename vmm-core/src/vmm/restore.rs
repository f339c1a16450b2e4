//! `vmm run --restore DIR [--restore-prefault]` as a process ([`run_restore`]): the
//! snapshot read and checked whole ([`migration::snapshot::open_snapshot`]) before KVM is
//! touched; the machine built for its layout (boot RAM from the layout, vCPUs from its
//! states) with its vCPUs parked; `DIR/memory` mapped as guest RAM
//! ([`Machine::map_snapshot`](crate::machine::Machine::map_snapshot)); the CPU and device
//! state restored; then the vCPUs released (unless the guest was paused when the snapshot
//! was taken: `vmm resume` releases it then) and the VMM runs as `vmm run` does.

use super::runner::Runner;
use super::Vmm;
use crate::config::VmmConfig;
use crate::error::VmmError;
use crate::machine::Start;
use crate::persist::VmState;
use crate::vcpu::GuestExit;
use migration::snapshot::{open_stack, SnapshotError};
use std::path::Path;
use std::time::Instant;

/// Why `vmm run --restore` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunRestoreError {
    /// The snapshot is missing, damaged or hostile.
    #[error("cannot restore {dir}: {source}")]
    Snapshot {
        /// The snapshot directory.
        dir: String,
        /// What is wrong with it.
        source: SnapshotError,
    },
    /// Its layout or states do not fit a VM.
    #[error("cannot restore {dir}: {why}")]
    Layout {
        /// The snapshot directory.
        dir: String,
        /// What does not fit.
        why: String,
    },
    /// Building or running the VM failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// Restores the snapshot in `dir` and runs its guest (see the module documentation).
/// `config` gives the VMM's own settings (serial, API socket, KVM device, memory backend
/// for blocks hot-added later); its memory size and vCPU count are the snapshot's.
pub fn run_restore(
    mut config: VmmConfig,
    dir: &Path,
    prefault: bool,
) -> Result<GuestExit, RunRestoreError> {
    let t0 = Instant::now();
    let shown = dir.display().to_string();
    let stack = open_stack(dir).map_err(|source| RunRestoreError::Snapshot {
        dir: shown.clone(),
        source,
    })?;
    // The top of the stack: its states and (the same for all) its layout.
    let snap = &stack[stack.len() - 1];
    let layout = |why: String| RunRestoreError::Layout {
        dir: shown.clone(),
        why,
    };
    let states = &snap.state.states;
    let vcpus = (0..=u8::MAX as usize)
        .take_while(|i| states.iter().any(|s| s.name == format!("cpu{i}")))
        .count();
    let state = VmState::from_components(states, vcpus).map_err(|e| layout(e.to_string()))?;
    config.vcpus = u8::try_from(vcpus)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| layout(format!("{vcpus} vCPUs")))?;
    config.memory = snap
        .state
        .blocks
        .iter()
        .filter(|b| !b.hotplugged)
        .map(|b| b.len)
        .sum();
    // Hot-added blocks obey `ram-add`'s bounds: each within what a migration destination
    // accepts, all guest RAM within the host's RAM and swap (the boot RAM is checked as
    // `--memory` is, when the VM is built).
    let max = migration::load::LoadOptions::default().max_new_block;
    if let Some(b) = snap
        .state
        .blocks
        .iter()
        .find(|b| b.hotplugged && b.len > max)
    {
        return Err(layout(format!(
            "hot-added block {:?} of {:#x} bytes is over the {max:#x} a block may have",
            b.id, b.len
        )));
    }
    let total: u64 = snap.state.blocks.iter().map(|b| b.len).sum();
    if let Some(host) = crate::host::limits::memory_and_swap() {
        if total > host {
            return Err(layout(format!(
                "{} MiB of guest RAM, more than this host's {} MiB of RAM and swap",
                total >> 20,
                host >> 20
            )));
        }
    }
    let opened = t0.elapsed();
    // The full snapshot (the bottom of the stack) is what the boot RAM maps.
    let vmm = Vmm::new_restore(config, &stack[0])?;
    let built = t0.elapsed();
    let runner = Runner::start(vmm.into_parts(), Start::Parked)?;
    let started = t0.elapsed();
    let machine = runner.machine().clone();
    let restored = machine
        .map_snapshot(&stack, prefault)
        .map_err(layout)
        .and_then(|mapped| {
            machine
                .restore_state(&state)
                .map_err(|e| layout(e.to_string()))?;
            Ok(mapped)
        })
        .and_then(|mapped| {
            if state.running {
                machine.release_parked().map_err(layout)?;
            }
            Ok(mapped)
        });
    log::debug!(
        "restore: opened at {opened:?}, built at {built:?}, runner at {started:?}, running at {:?}",
        t0.elapsed()
    );
    let mapped = match restored {
        Ok(m) => m,
        Err(e) => {
            drop(machine);
            let _ = runner.finish(Ok(()));
            return Err(e);
        }
    };
    log::info!(
        "restored {shown} ({} snapshots stacked, {} KiB of diffs copied): {} blocks mapped{} in {:.1} ms; the guest {}",
        stack.len(),
        mapped.diff_bytes >> 10,
        mapped.blocks,
        if prefault {
            format!(", {} MiB read in", mapped.prefaulted >> 20)
        } else {
            String::new()
        },
        t0.elapsed().as_secs_f64() * 1e3,
        if state.running {
            "runs"
        } else {
            "stays paused, as it was"
        }
    );
    runner
        .control()
        .set_restored_from(stack.iter().map(|s| s.state.id).collect());
    drop(machine);
    let looped = runner.run_loop();
    Ok(runner.finish(looped)?)
}
