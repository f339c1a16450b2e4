//! What the VM tells whoever watches it, as it happens: QMP's asynchronous events (`STOP`,
//! `RESUME`, `SHUTDOWN`, `MIGRATION`, `MIGRATION_PASS`). They are raised on any thread —
//! a vCPU pausing, the migration thread, the main loop — into one [`EventBus`] per VMM,
//! timestamped there, and delivered by the main loop: the bus's eventfd is an io handler of
//! the loop, which drains the queue and hands each event to the QMP clients.
//!
//! Nothing is queued while no one listens ([`EventBus::listen`] not called), and the queue
//! keeps at most [`MAX_QUEUED`] events (the oldest go first), so a VMM whose events nobody
//! reads never grows.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Events kept for the main loop at most; beyond, the oldest are dropped (and counted).
pub const MAX_QUEUED: usize = 1024;

/// Why the VMM is ending (QEMU's `ShutdownCause`, the values a `SHUTDOWN` event carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownCause {
    /// `quit` (either control socket).
    HostQmpQuit,
    /// SIGINT, SIGTERM or SIGHUP.
    HostSignal,
    /// The guest powered off.
    GuestShutdown,
    /// The guest reset itself (the VMM ends, as Firecracker's does).
    GuestReset,
    /// The guest crashed (triple fault, or a crash report).
    GuestPanic,
    /// A vCPU failed, or the VMM itself.
    HostError,
}

impl ShutdownCause {
    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::GuestReset => "guest-reset",
            ShutdownCause::GuestPanic => "guest-panic",
            ShutdownCause::HostError => "host-error",
        }
    }

    /// Whether the guest asked for it (QEMU's `guest` member).
    pub fn by_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic
        )
    }
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The vCPUs stopped (a pause, or a migration's final stage).
    Stop,
    /// The vCPUs run again.
    Resume,
    /// The machine was reset (`system_reset`).
    Reset,
    /// The VMM is ending.
    Shutdown(ShutdownCause),
    /// A migration (outgoing or incoming) moved to `status` (QEMU's names: `setup`,
    /// `active`, `device`, `completed`, `failed`, `cancelled`).
    Migration {
        /// The new status.
        status: &'static str,
    },
    /// A migration began dirty-page pass `pass` (1 is the first sync).
    MigrationPass {
        /// The pass.
        pass: u32,
    },
}

/// An event and when it was raised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timestamped {
    /// What happened.
    pub event: VmEvent,
    /// Seconds since the Unix epoch.
    pub seconds: u64,
    /// And microseconds.
    pub microseconds: u32,
}

/// The VMM's events on their way to the main loop: see the module documentation.
pub struct EventBus {
    queue: Mutex<VecDeque<Timestamped>>,
    wake: EventFd,
    listening: AtomicBool,
    dropped: AtomicU64,
}

impl EventBus {
    /// An empty bus, not listened to yet.
    pub fn new() -> io::Result<EventBus> {
        Ok(EventBus {
            queue: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            listening: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        })
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Timestamped>> {
        // Every change is one push or one drain: nothing is left half-done by a panic.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on events are queued (a QMP server serves them).
    pub fn listen(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// Raises `event`, timestamped now; a no-op while no one listens.
    pub fn emit(&self, event: VmEvent) {
        if !self.listening.load(Ordering::Acquire) {
            return;
        }
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut queue = self.queue();
        if queue.len() >= MAX_QUEUED {
            queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(Timestamped {
            event,
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        });
        drop(queue);
        // Only a full counter (2^64 - 2 wake-ups unread) fails: the loop is awake anyway.
        let _ = self.wake.write(1);
    }

    /// The descriptor that becomes readable when events wait (for the main loop).
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Takes every event waiting, oldest first.
    pub fn drain(&self) -> Vec<Timestamped> {
        // Read the counter before taking the queue: an event raised in between wakes the
        // loop again rather than being left behind.
        let _ = self.wake.read();
        self.queue().drain(..).collect()
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_queued_before_listen_and_the_queue_is_bounded() {
        let bus = EventBus::new().unwrap();
        bus.emit(VmEvent::Stop);
        assert!(bus.drain().is_empty());
        bus.listen();
        bus.emit(VmEvent::Stop);
        bus.emit(VmEvent::Resume);
        let got: Vec<_> = bus.drain().into_iter().map(|t| t.event).collect();
        assert_eq!(got, vec![VmEvent::Stop, VmEvent::Resume]);
        for pass in 0..(MAX_QUEUED as u32 + 5) {
            bus.emit(VmEvent::MigrationPass { pass });
        }
        let got = bus.drain();
        assert_eq!(got.len(), MAX_QUEUED);
        assert_eq!(got[0].event, VmEvent::MigrationPass { pass: 5 });
        assert_eq!(bus.dropped(), 5);
    }

    #[test]
    fn the_fd_is_readable_while_events_wait() {
        let bus = EventBus::new().unwrap();
        bus.listen();
        assert!(bus.wake.read().is_err(), "readable with nothing raised");
        bus.emit(VmEvent::Stop);
        assert_eq!(bus.wake.read().unwrap(), 1);
        bus.emit(VmEvent::Resume);
        assert_eq!(bus.drain().len(), 2);
        assert!(bus.wake.read().is_err(), "readable after the drain");
    }
}
