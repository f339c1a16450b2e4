//! `system_reset`: the machine as it powered on, running its kernel from the start again,
//! as QEMU's reset does (and unlike a guest-initiated reset, which ends the VMM as
//! Firecracker's does). Every vCPU, the PIT, the PICs, the IOAPIC, kvmclock and COM1 go
//! back to the state saved when the VM was built, before any guest code ran; the kernel
//! (and initrd, command line, boot structures) is loaded again into guest RAM; the boot
//! vCPU is put at its entry. RAM keeps everything else, hot-added blocks included, as on
//! a PC. A VM that came by migration boots the kernel its own config names.

use super::{Machine, PAUSE_TIMEOUT};
use crate::boot::entry::set_entry;
use crate::boot::layout::ram_ranges;
use crate::boot::load_kernel;
use crate::error::VmmError;
use crate::events::VmEvent;
use crate::persist::PersistError;

impl Machine {
    /// Resets the VM (see the module documentation); a guest that ran runs on from its
    /// kernel's entry, a paused one stays paused there. `RESET` is raised.
    pub fn reset(&self) -> Result<(), VmmError> {
        let was_running = !self.control.is_paused();
        // As QEMU's: the run state does not change (no STOP or RESUME), only RESET.
        self.park_vcpus().map_err(|parked| {
            PersistError::NotPaused(format!(
                "only {parked} of {} vCPUs parked within {PAUSE_TIMEOUT:?}",
                self.vcpus
            ))
        })?;
        let reset = self.reset_paused();
        if let Err(e) = &reset {
            log::error!("system_reset failed: {e}; the VM stays paused");
            return reset;
        }
        self.events.emit(VmEvent::Reset);
        log::info!("VM reset");
        if was_running {
            self.control.resume();
        }
        Ok(())
    }

    fn reset_paused(&self) -> Result<(), VmmError> {
        self.restore_state(&self.power_on)?;
        let ranges = ram_ranges(self.config.memory);
        let (entry, name) = load_kernel(&self.ram.guest_memory(), &self.config, &ranges)?;
        log::info!("reset: kernel {name} loaded again: {entry:x?}");
        let set = self.on_each_parked("took the boot entry", move |cpu, fd| {
            if cpu == 0 {
                set_entry(fd, &entry)
            } else {
                Ok(())
            }
        })?;
        set.into_iter().collect()
    }
}
