//! The i8042 keyboard controller at 0x60/0x64, for one purpose: the guest's "pulse reset
//! line" command (0xfe to port 0x64), which ends the VM (vm-superio's emulation).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vm_superio::{I8042Device, Trigger};

/// The controller's data port.
pub const I8042_DATA: u16 = 0x60;
/// The controller's command/status port.
pub const I8042_COMMAND: u16 = 0x64;

/// Records that the guest asked for a CPU reset.
#[derive(Clone, Default)]
pub struct ResetRequest(Arc<AtomicBool>);

impl ResetRequest {
    /// Whether a reset was asked for since the last call (clears the request).
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

impl Trigger for ResetRequest {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// The controller as the vCPUs see it.
pub type I8042 = I8042Device<ResetRequest>;
