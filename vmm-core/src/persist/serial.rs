//! COM1: vm-superio's own `SerialState` (divisor latch, IER, IIR, LCR, LSR, MCR, MSR,
//! scratch, receive FIFO) mirrored as a serde struct, and [`Persist`] for the device
//! (restored with its interrupt line and console output from the new VM).

use super::{Persist, PersistError};
use crate::devices::serial::{Com1, ConsoleOut, IrqTrigger};
use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

/// Most bytes the 16550's receive FIFO holds (vm-superio's FIFO_SIZE).
pub const FIFO_SIZE: usize = 64;

/// COM1's registers and unread input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt Enable Register.
    pub interrupt_enable: u8,
    /// Interrupt Identification Register.
    pub interrupt_identification: u8,
    /// Line Control Register.
    pub line_control: u8,
    /// Line Status Register.
    pub line_status: u8,
    /// Modem Control Register.
    pub modem_control: u8,
    /// Modem Status Register.
    pub modem_status: u8,
    /// Scratch Register.
    pub scratch: u8,
    /// Received bytes the guest has not read (at most [`FIFO_SIZE`]).
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Persist for Com1 {
    type State = SerialState;
    type ConstructorArgs = (IrqTrigger, ConsoleOut);
    type Error = PersistError;

    fn save(&self) -> SerialState {
        self.state().into()
    }

    fn restore(
        (irq, out): (IrqTrigger, ConsoleOut),
        state: &SerialState,
    ) -> Result<Com1, PersistError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(PersistError::Invalid {
                what: "serial",
                why: format!("{} bytes in a {FIFO_SIZE}-byte FIFO", state.in_buffer.len()),
            });
        }
        Serial::from_state(&state.into(), irq, NoEvents, out).map_err(|e| PersistError::Invalid {
            what: "serial",
            why: format!("{e:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::com1_with;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn serial_round_trips_and_refuses_an_overfull_fifo() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut com1 = com1_with(evt.try_clone().unwrap(), Box::new(std::io::sink()));
        com1.write(7, 0x5a).unwrap(); // scratch
        com1.write(3, 0x83).unwrap(); // LCR with DLAB
        com1.write(0, 0x01).unwrap(); // divisor low
        com1.enqueue_raw_bytes(b"hi").unwrap();
        let state = Persist::save(&com1);
        let json = serde_json::to_vec(&state).unwrap();
        let back: SerialState = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, state);
        let args = || {
            (
                IrqTrigger::new(evt.try_clone().unwrap()),
                ConsoleOut::new(Box::new(std::io::sink())),
            )
        };
        let again = <Com1 as Persist>::restore(args(), &back).unwrap();
        assert_eq!(Persist::save(&again), state);
        let mut big = state.clone();
        big.in_buffer = vec![0; FIFO_SIZE + 1];
        assert!(<Com1 as Persist>::restore(args(), &big).is_err());
    }
}
