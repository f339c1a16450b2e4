//! Legacy port-I/O devices and their dispatch from vCPU exits.
//!
//! [`PioBus`] dispatches port and MMIO accesses through a [`map::DeviceMap`] published
//! under RCU (QEMU's FlatView): COM1 and the i8042 on ports; the 8259 PICs, the PIT and the
//! IOAPIC live in KVM itself and never reach us. The lookup takes no lock (vCPU threads
//! read the map through their QSBR reader); each device keeps its own state behind a
//! mutex. A port nothing decodes reads as all ones and swallows writes, as on a PC bus,
//! and so does unclaimed MMIO: whatever the guest does, dispatch never fails.

pub mod i8042;
pub mod map;
pub mod serial;

use self::i8042::{ResetRequest, I8042, I8042_COMMAND, I8042_DATA};
use self::map::{BusDevice, DeviceMap, Space};
use self::serial::{Com1, COM1_BASE, COM1_LEN};
use rcu::ReadGuard;
use std::sync::{Arc, Mutex, MutexGuard};

/// What a port write asks of the VMM beyond the device's own state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing: the guest runs on.
    None,
    /// The guest pulsed the reset line: the VM ends.
    Reset,
}

/// The port-I/O and MMIO devices of a VM, found through the device map.
pub struct PioBus {
    map: DeviceMap,
    /// COM1 itself, also claimed in the map: input, save and restore reach it here.
    com1: Arc<Mutex<Com1>>,
    reset: ResetRequest,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A device's state stays consistent across a panic in another vCPU thread (every
    // access is one register read or write), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for Mutex<Com1> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut com1 = lock(self);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = com1.read((offset as usize + i) as u8);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut com1 = lock(self);
        for (i, &byte) in data.iter().enumerate() {
            if let Err(e) = com1.write((offset as usize + i) as u8, byte) {
                log::warn!("serial: {e}");
            }
        }
    }
}

impl BusDevice for Mutex<I8042> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut dev = lock(self);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = dev.read((offset as usize + i) as u8);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut dev = lock(self);
        for (i, &byte) in data.iter().enumerate() {
            // The reset trigger cannot fail (Infallible).
            let _ = dev.write((offset as usize + i) as u8, byte);
        }
    }
}

/// The i8042's two ports are four apart: two one-port ranges onto the same device, each
/// passing the offset the vm-superio emulation expects (0 data, 4 command).
struct I8042Port {
    dev: Arc<Mutex<I8042>>,
    offset: u64,
}

impl BusDevice for I8042Port {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.dev.read(self.offset + offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.dev.write(self.offset + offset, data)
    }
}

impl PioBus {
    /// A bus with COM1 and the i8042.
    pub fn new(com1: Com1) -> PioBus {
        let reset = ResetRequest::default();
        let map = DeviceMap::new();
        let i8042 = Arc::new(Mutex::new(I8042::new(reset.clone())));
        let com1 = Arc::new(Mutex::new(com1));
        let claims: [(u16, u16, Arc<dyn BusDevice>); 3] = [
            (COM1_BASE, COM1_LEN, com1.clone()),
            (
                I8042_DATA,
                1,
                Arc::new(I8042Port {
                    dev: i8042.clone(),
                    offset: 0,
                }),
            ),
            (
                I8042_COMMAND,
                1,
                Arc::new(I8042Port {
                    dev: i8042,
                    offset: u64::from(I8042_COMMAND - I8042_DATA),
                }),
            ),
        ];
        for (base, len, dev) in claims {
            map.add(Space::Pio, u64::from(base), u64::from(len), dev)
                .expect("the legacy ports do not overlap");
        }
        PioBus { map, com1, reset }
    }

    /// The device map, to add or remove devices while vCPUs run.
    pub fn map(&self) -> &DeviceMap {
        &self.map
    }

    /// An `in` of `data.len()` bytes from `port` (each byte from its own port), under a
    /// section of its own.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        self.read_in(&rcu::read_lock(), port, data)
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

    /// COM1's registers and unread input (see [`serial::persist`]).
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

    /// An `out` of `data` to `port` (each byte to its own port), under a section of its
    /// own.
    pub fn write(&self, port: u16, data: &[u8]) -> IoAction {
        self.write_in(&rcu::read_lock(), port, data)
    }

    /// [`read`](Self::read) inside the caller's read section (a vCPU's `&reader`).
    #[inline]
    pub fn read_in(&self, guard: &ReadGuard, port: u16, data: &mut [u8]) {
        let view = self.map.view(guard);
        for (i, byte) in data.iter_mut().enumerate() {
            let p = u64::from(port.wrapping_add(i as u16));
            if !view.read(Space::Pio, p, std::slice::from_mut(byte)) {
                *byte = 0xff;
            }
        }
    }

    /// [`write`](Self::write) inside the caller's read section (a vCPU's `&reader`).
    #[inline]
    pub fn write_in(&self, guard: &ReadGuard, port: u16, data: &[u8]) -> IoAction {
        let view = self.map.view(guard);
        for (i, byte) in data.iter().enumerate() {
            let p = port.wrapping_add(i as u16);
            if !view.write(Space::Pio, u64::from(p), std::slice::from_ref(byte)) {
                log::trace!("write {byte:#04x} to unclaimed port {p:#06x}");
            }
        }
        if self.reset.take() {
            IoAction::Reset
        } else {
            IoAction::None
        }
    }

    /// An MMIO read at `addr`; unclaimed addresses read as all ones.
    #[inline]
    pub fn mmio_read_in(&self, guard: &ReadGuard, addr: u64, data: &mut [u8]) {
        if !self.map.view(guard).read(Space::Mmio, addr, data) {
            log::trace!("read of {} bytes at unclaimed MMIO {addr:#x}", data.len());
            data.fill(0xff);
        }
    }

    /// An MMIO write at `addr`; unclaimed addresses swallow it.
    #[inline]
    pub fn mmio_write_in(&self, guard: &ReadGuard, addr: u64, data: &[u8]) {
        if !self.map.view(guard).write(Space::Mmio, addr, data) {
            log::trace!("write of {data:x?} to unclaimed MMIO {addr:#x}");
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
