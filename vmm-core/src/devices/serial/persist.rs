//! [`Persist`] for COM1: its state saved as the plain [`SerialState`], and the device
//! rebuilt from one with the interrupt line and console output of the VM it now lives in.

use super::{Com1, ConsoleOut, IrqTrigger};
use crate::persist::serial::{SerialState, FIFO_SIZE};
use crate::persist::{Persist, PersistError};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

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
    use super::super::com1_with;
    use super::*;
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
