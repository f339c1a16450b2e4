//! RAM hot-plug on a running machine: a block added at the first free 2 MiB-aligned
//! guest-physical range above the boot RAM and 4 GiB, or removed (unlinked at once,
//! unmapped after a grace period). One at a time: choosing the range and placing the
//! block there happen under the machine's hot-plug lock. All guest RAM, boot and hot-added,
//! stays within the host's RAM and swap, as `--memory` does: a KVM slot costs the host
//! kernel tracking memory in proportion to its size, touched or not.

use super::backing::add_block;
use super::{lock, Machine};
use crate::boot::layout::{free_guest_range, RAM_BLOCK_IDS};
use crate::host::limits::memory_and_swap;
use ramlist::kvm::{KvmRamError, PlacedBlock};

/// Why a hot-plug was refused.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The id is a boot RAM block's.
    #[error("RAM block id {0:?} is reserved for the guest's boot RAM")]
    ReservedId(String),
    /// The block is boot RAM: it cannot be removed.
    #[error("RAM block {0:?} is the guest's boot RAM and cannot be removed")]
    BootRam(String),
    /// No free guest-physical range of that size.
    #[error("RAM block {id:?}: no free guest-physical range of {size:#x} bytes")]
    NoGuestSpace {
        /// The block.
        id: String,
        /// Its size.
        size: u64,
    },
    /// Larger than a migration destination accepts: such a VM could not move.
    #[error(
        "RAM block {id:?}: {size:#x} bytes is over the {max:#x} a migration destination accepts"
    )]
    TooLarge {
        /// The block.
        id: String,
        /// Its size.
        size: u64,
        /// The largest a destination accepts.
        max: u64,
    },
    /// All guest RAM together would pass what the host has (each byte of a KVM slot also
    /// costs the host kernel its own tracking, whether the guest touches it or not).
    #[error("RAM block {id:?}: {size:#x} more bytes would make {total_mib} MiB of guest RAM, more than this host's {host_mib} MiB of RAM and swap")]
    ExceedsHost {
        /// The block.
        id: String,
        /// Its size.
        size: u64,
        /// Guest RAM with it, in MiB.
        total_mib: u64,
        /// MemTotal + SwapTotal, in MiB.
        host_mib: u64,
    },
    /// A local migration or a snapshot holds the RAM layout still.
    #[error("RAM hot-plug is held off while a migration or a snapshot hands the RAM layout over; try again once it ended")]
    LayoutHeld,
    /// The RAM list or KVM refused it (duplicate id, bad size, unknown id, ...).
    #[error(transparent)]
    Ram(#[from] KvmRamError),
}

impl Machine {
    /// Hot-adds RAM block `id` of `size` bytes; returns where it was placed.
    pub fn ram_add(&self, id: &str, size: u64) -> Result<PlacedBlock, HotplugError> {
        if self.is_boot_block(id) || RAM_BLOCK_IDS.contains(&id) {
            return Err(HotplugError::ReservedId(id.to_string()));
        }
        let max = migration::load::LoadOptions::default().max_new_block;
        if size > max {
            let id = id.to_string();
            return Err(HotplugError::TooLarge { id, size, max });
        }
        let _hotplug = self.try_hotplug()?;
        // The same bound as `--memory`: all guest RAM within the host's RAM and swap.
        if let Some(host) = memory_and_swap() {
            let placed: u64 = self.ram.placed().iter().map(|b| b.size).sum();
            let total = placed.saturating_add(size);
            if total > host {
                return Err(HotplugError::ExceedsHost {
                    id: id.to_string(),
                    size,
                    total_mib: total >> 20,
                    host_mib: host >> 20,
                });
            }
        }
        let addr =
            free_guest_range(&self.ram.placed(), self.hotplug_base, size).ok_or_else(|| {
                HotplugError::NoGuestSpace {
                    id: id.to_string(),
                    size,
                }
            })?;
        let placed = add_block(&self.ram, &self.config.memory_backend, id, size, addr)?;
        log::info!(
            "RAM block {id:?} added: {size:#x} bytes at guest {:#x} (slot {})",
            placed.guest_addr,
            placed.slot
        );
        Ok(placed)
    }

    /// The hot-plug lock, or a refusal while a local migration or a snapshot holds the
    /// layout (waiting would stall the control API for as long as they take).
    fn try_hotplug(&self) -> Result<std::sync::MutexGuard<'_, ()>, HotplugError> {
        match self.hotplug.try_lock() {
            Ok(g) => Ok(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Ok(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(HotplugError::LayoutHeld),
        }
    }

    /// Holds RAM hot-plug off (`ram-add` and `ram-remove` wait) while the guard lives: a
    /// local migration keeps the layout it hands over still.
    pub fn hold_hotplug(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.hotplug)
    }

    /// Hot-removes RAM block `id`: unlinked at once, unmapped after a grace period.
    pub fn ram_remove(&self, id: &str) -> Result<(), HotplugError> {
        if self.is_boot_block(id) {
            return Err(HotplugError::BootRam(id.to_string()));
        }
        let _hotplug = self.try_hotplug()?;
        self.ram.remove(id)?;
        log::info!("RAM block {id:?} removed; its memory goes after a grace period");
        Ok(())
    }
}
