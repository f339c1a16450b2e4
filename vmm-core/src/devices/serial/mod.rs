//! The 16550 UART at 0x3f8 (COM1): vm-superio's emulation, its interrupt raised on IRQ 4
//! through an eventfd registered as a KVM irqfd, its output to stdout or a file, and with
//! `--serial stdio` its input from stdin ([`spawn_stdin_reader`]); its state saved and
//! restored in [`persist`].

use super::PioBus;
use crate::config::SerialOutput;
use crate::error::VmmError;
use kvm_ioctls::VmFd;
use std::fs::File;
use std::io::{self, LineWriter, Read, Write};
use std::sync::Arc;
use std::time::Duration;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod persist;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports COM1 decodes.
pub const COM1_LEN: u16 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by writing its irqfd.
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// A trigger writing `evt` (an irqfd).
    pub fn new(evt: EventFd) -> IrqTrigger {
        IrqTrigger(evt)
    }

    /// Another trigger of the same irqfd.
    pub fn try_clone(&self) -> io::Result<IrqTrigger> {
        self.0.try_clone().map(IrqTrigger)
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the console's bytes go: stdout or a file. A write that fails (a closed pipe, a
/// full disk) is logged once; from then on the console's output is dropped, and the guest,
/// which cannot be told, runs on.
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    broken: bool,
}

impl ConsoleOut {
    /// Console output to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> ConsoleOut {
        ConsoleOut { out, broken: false }
    }

    fn guard(&mut self, r: io::Result<()>) {
        if let Err(e) = r {
            if !self.broken {
                log::warn!("serial console output failed, dropping it from now on: {e}");
                self.broken = true;
            }
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.broken {
            let r = self.out.write_all(buf);
            self.guard(r);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.broken {
            let r = self.out.flush();
            self.guard(r);
        }
        Ok(())
    }
}

/// COM1 as the vCPUs see it.
pub type Com1 = Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>;

/// Builds COM1 writing to `output`, its interrupt wired to IRQ 4 of `vm`'s irqchip.
pub fn com1(vm: &VmFd, output: &SerialOutput) -> Result<Com1, VmmError> {
    let out: Box<dyn Write + Send> = match output {
        SerialOutput::Stdio => Box::new(io::stdout()),
        SerialOutput::File(path) => {
            Box::new(LineWriter::new(File::create(path).map_err(|source| {
                VmmError::SerialFile {
                    path: path.clone(),
                    source,
                }
            })?))
        }
    };
    let evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::host("creating the serial eventfd"))?;
    vm.register_irqfd(&evt, COM1_IRQ)
        .map_err(VmmError::kvm("KVM_IRQFD (serial IRQ 4)"))?;
    Ok(com1_with(evt, out))
}

/// COM1 raising `irq` and writing to `out`, for callers that wire the interrupt
/// themselves (and tests).
pub fn com1_with(irq: EventFd, out: Box<dyn Write + Send>) -> Com1 {
    Serial::new(IrqTrigger(irq), ConsoleOut::new(out))
}

/// How long the reader waits for the guest to drain a full receive FIFO.
const FIFO_FULL_WAIT: Duration = Duration::from_millis(5);

/// Forwards standard input to COM1's receive FIFO on a thread of its own until stdin ends
/// (EOF or an error). A guest that does not read its console only stalls this thread.
pub fn spawn_stdin_reader(bus: Arc<PioBus>) -> Result<(), VmmError> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("reading stdin for the serial console: {e}");
                        return;
                    }
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    match bus.serial_input(rest) {
                        0 => std::thread::sleep(FIFO_FULL_WAIT),
                        sent => rest = &rest[sent..],
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(VmmError::host("spawning the stdin reader"))
}
