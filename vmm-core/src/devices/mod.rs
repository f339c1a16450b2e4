//! Legacy port-I/O devices and their dispatch from vCPU exits.
//!
//! [`PioBus`] maps a port to COM1 or the i8042; the 8259 PICs, the PIT and the IOAPIC live
//! in KVM itself and never reach us. A port nothing decodes reads as all ones and swallows
//! writes, as on a PC bus: whatever the guest does, dispatch never fails.
//!
//! The devices sit behind a mutex each for now; a device map published under RCU (no lock
//! on the exit path) replaces this in a later step.

pub mod i8042;
pub mod serial;

use self::i8042::{ResetRequest, I8042, I8042_COMMAND, I8042_DATA};
use self::serial::{Com1, COM1_BASE, COM1_LEN};
use std::sync::{Mutex, MutexGuard};

/// What a port write asks of the VMM beyond the device's own state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing: the guest runs on.
    None,
    /// The guest pulsed the reset line: the VM ends.
    Reset,
}

/// The port-I/O devices of a VM.
pub struct PioBus {
    com1: Mutex<Com1>,
    i8042: Mutex<I8042>,
    reset: ResetRequest,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A device's state stays consistent across a panic in another vCPU thread (every
    // access is one register read or write), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PioBus {
    /// A bus with COM1 and the i8042.
    pub fn new(com1: Com1) -> PioBus {
        let reset = ResetRequest::default();
        PioBus {
            com1: Mutex::new(com1),
            i8042: Mutex::new(I8042::new(reset.clone())),
            reset,
        }
    }

    /// An `in` of `data.len()` bytes from `port`: each byte from its own port.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_byte(port.wrapping_add(i as u16));
        }
    }

    fn read_byte(&self, port: u16) -> u8 {
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) => {
                lock(&self.com1).read((p - COM1_BASE) as u8)
            }
            I8042_DATA | I8042_COMMAND => lock(&self.i8042).read((port - I8042_DATA) as u8),
            _ => 0xff,
        }
    }

    /// Queues `data` in COM1's receive FIFO, raising its interrupt; returns how many bytes
    /// fit (0 while the guest has not drained the FIFO).
    pub fn serial_input(&self, data: &[u8]) -> usize {
        let mut com1 = lock(&self.com1);
        if com1.fifo_capacity() == 0 || data.is_empty() {
            return 0;
        }
        match com1.enqueue_raw_bytes(data) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input: {e:?}");
                0
            }
        }
    }

    /// COM1's registers and unread input (see [`crate::persist::serial`]).
    pub fn serial_state(&self) -> crate::persist::SerialState {
        crate::persist::Persist::save(&*lock(&self.com1))
    }

    /// Puts COM1 in `state`, keeping its interrupt line and console output.
    pub fn restore_serial(
        &self,
        state: &crate::persist::SerialState,
    ) -> Result<(), crate::persist::PersistError> {
        use crate::persist::{Persist, PersistError};
        if state.in_buffer.len() > crate::persist::serial::FIFO_SIZE {
            return Err(PersistError::Invalid {
                what: "serial",
                why: format!("{} bytes of unread input", state.in_buffer.len()),
            });
        }
        let mut com1 = lock(&self.com1);
        let irq = com1
            .interrupt_evt()
            .try_clone()
            .map_err(|e| PersistError::Invalid {
                what: "serial",
                why: format!("duplicating its irqfd: {e}"),
            })?;
        let placeholder = match irq.try_clone() {
            Ok(t) => serial::Com1::new(t, serial::ConsoleOut::new(Box::new(std::io::sink()))),
            Err(e) => {
                return Err(PersistError::Invalid {
                    what: "serial",
                    why: format!("duplicating its irqfd: {e}"),
                })
            }
        };
        let old = std::mem::replace(&mut *com1, placeholder);
        *com1 = Com1::restore((irq, old.into_writer()), state)?;
        Ok(())
    }

    /// An `out` of `data` to `port`: each byte to its own port.
    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        for (i, &byte) in data.iter().enumerate() {
            self.write_byte(port.wrapping_add(i as u16), byte);
        }
        if self.reset.take() {
            IoAction::Reset
        } else {
            IoAction::None
        }
    }

    fn write_byte(&self, port: u16, value: u8) {
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) => {
                if let Err(e) = lock(&self.com1).write((p - COM1_BASE) as u8, value) {
                    log::warn!("serial: {e}");
                }
            }
            I8042_DATA | I8042_COMMAND => {
                // The reset trigger cannot fail (Infallible).
                let _ = lock(&self.i8042).write((port - I8042_DATA) as u8, value);
            }
            _ => log::trace!("write {value:#04x} to unclaimed port {port:#06x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    fn bus(out: Box<dyn Write + Send>) -> PioBus {
        PioBus::new(serial::com1_with(EventFd::new(EFD_NONBLOCK).unwrap(), out))
    }

    #[test]
    fn serial_output_and_status() {
        let sink = Sink::default();
        let bus = bus(Box::new(sink.clone()));
        for &b in b"hi\n" {
            assert_eq!(bus.write(COM1_BASE, &[b]), IoAction::None);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0];
        bus.read(COM1_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter always empty");
    }

    #[test]
    fn unclaimed_ports_float_high_and_swallow_writes() {
        let bus = bus(Box::new(io::sink()));
        let mut data = [0u8; 4];
        bus.read(0x80, &mut data);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(bus.write(0xcf8, &[1, 2, 3, 4]), IoAction::None);
        for port in 0..=u16::MAX {
            let mut b = [0u8; 1];
            bus.read(port, &mut b);
        }
    }

    #[test]
    fn serial_input_fills_the_fifo_and_reads_back() {
        let bus = bus(Box::new(io::sink()));
        let data = [b'x'; 100];
        let n = bus.serial_input(&data);
        assert!(n > 0 && n < data.len(), "{n}");
        assert_eq!(bus.serial_input(&data), 0, "a full FIFO takes nothing");
        let mut lsr = [0];
        bus.read(COM1_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x01, 0, "data ready");
        let mut rbr = [0];
        bus.read(COM1_BASE, &mut rbr);
        assert_eq!(rbr[0], b'x');
        assert_eq!(bus.serial_input(&data), 1);
    }

    #[test]
    fn i8042_reset() {
        let bus = bus(Box::new(io::sink()));
        assert_eq!(bus.write(I8042_COMMAND, &[0xaa]), IoAction::None);
        assert_eq!(bus.write(I8042_DATA, &[0xfe]), IoAction::None);
        assert_eq!(bus.write(I8042_COMMAND, &[0xfe]), IoAction::Reset);
        assert_eq!(bus.write(I8042_COMMAND, &[0x00]), IoAction::None);
    }

    #[test]
    fn broken_console_does_not_fail_the_guest() {
        let bus = bus(Box::new(Broken));
        for _ in 0..3 {
            assert_eq!(bus.write(COM1_BASE, b"x"), IoAction::None);
        }
    }
}
