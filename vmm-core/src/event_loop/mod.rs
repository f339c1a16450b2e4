//! The VMM's main loop: epoll on the main thread, io handlers on an RCU list and one-shot
//! timers — QEMU's main loop after "rcuify iohandlers" and the qemu-timer RCU seed.
//!
//! An [`EventLoop`] owns an epoll instance. [`EventLoop::add_io`] registers a file
//! descriptor with an [`IoHandler`]; when epoll reports it ready, the loop finds the
//! handler on its list and calls it. Timers ([`Timers`]) bound each wait: the loop sleeps
//! until the earliest deadline, then fires what is due. Any thread may add or remove
//! handlers, arm or cancel timers, or [`stop`](EventLoop::stop) the loop; an eventfd wakes
//! the sleeping loop when its wait must be recomputed.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//! let lp = vmm_core::event_loop::EventLoop::new().unwrap();
//! lp.arm_timer(Instant::now() + Duration::from_millis(5), Arc::new(|lp| lp.stop()));
//! lp.run().unwrap();
//! ```

pub mod timers;

pub use timers::{TimerCallback, TimerId, Timers};

use rcu::RcuList;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Names a registered io handler. Ids are never reused: an event still queued for a
/// removed handler cannot reach a newer one on the same descriptor number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandlerId(u64);

/// Something the loop calls when its descriptor is ready.
pub trait IoHandler: Send + Sync {
    /// `events` are what epoll reported (readable, writable, hang-up, error). Runs on the
    /// loop's thread with no lock held and outside any read section, so it may do anything
    /// the loop's thread may, including removing itself.
    fn ready(&self, lp: &EventLoop, id: HandlerId, events: EventSet);
}

impl<F: Fn(&EventLoop, HandlerId, EventSet) + Send + Sync> IoHandler for F {
    fn ready(&self, lp: &EventLoop, id: HandlerId, events: EventSet) {
        self(lp, id, events)
    }
}

/// One registered descriptor.
struct Handler {
    id: HandlerId,
    fd: RawFd,
    io: Box<dyn IoHandler>,
    /// Set by [`EventLoop::remove_io`] before the unlink (QEMU's `node->deleted`): an
    /// event for this handler already in hand is dropped.
    removed: AtomicBool,
}

/// The epoll data of the wake-up eventfd; handler ids start above it.
const WAKE: u64 = 0;
/// Events taken from epoll per wait.
const MAX_EVENTS: usize = 64;

/// An epoll loop with RCU-listed io handlers and timers.
pub struct EventLoop {
    epoll: Epoll,
    /// The registered io handlers.
    ///
    /// Concurrency rules (QEMU's "rcuify iohandlers"): dispatch looks a handler up under
    /// `rcu::read_lock()` and nothing else, takes a counted reference there and calls the
    /// handler after the read section; registration and removal hold the list's writer
    /// lock, which never waits for dispatch. A removed handler is flagged, deleted from
    /// epoll and unlinked at once, and freed (with the descriptor it owns) after a grace
    /// period and once dispatch dropped its counted reference: never while it runs. A
    /// handler removed by another thread while dispatch already holds it may run once
    /// more; one removed on the loop's thread never runs again.
    handlers: RcuList<Handler>,
    timers: Timers,
    /// Written to make a sleeping `epoll_wait` return (new earliest timer, stop).
    wake: EventFd,
    next_id: AtomicU64,
    stopped: AtomicBool,
}

impl EventLoop {
    /// A loop with no handlers and no timers.
    pub fn new() -> io::Result<EventLoop> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        Ok(EventLoop {
            epoll,
            handlers: RcuList::new(),
            timers: Timers::new(),
            wake,
            next_id: AtomicU64::new(WAKE + 1),
            stopped: AtomicBool::new(false),
        })
    }

    /// Calls `io` whenever `fd` is ready for `events`. `fd` must stay open until the
    /// handler is removed and freed; the usual way is for `io` to own it.
    pub fn add_io(
        &self,
        fd: RawFd,
        events: EventSet,
        io: impl IoHandler + 'static,
    ) -> io::Result<HandlerId> {
        let id = HandlerId(self.next_id.fetch_add(1, Relaxed));
        // Linked before epoll knows the descriptor, so its first event finds it.
        self.handlers.lock().push_back(Handler {
            id,
            fd,
            io: Box::new(io),
            removed: AtomicBool::new(false),
        });
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, id.0))
        {
            self.handlers.lock().remove_first(|h| h.id == id);
            return Err(e);
        }
        Ok(id)
    }

    /// Changes the events handler `id` waits for.
    pub fn set_events(&self, id: HandlerId, events: EventSet) -> io::Result<()> {
        let fd = {
            let guard = rcu::read_lock();
            let fd = self
                .handlers
                .iter(&guard)
                .find(|h| h.id == id)
                .map(|h| h.fd);
            fd
        };
        let fd = fd.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, id.0))
    }

    /// Removes handler `id`; false if it was not registered. See the rules at
    /// `handlers` for when it is freed.
    pub fn remove_io(&self, id: HandlerId) -> bool {
        let mut writer = self.handlers.lock();
        let Some(handler) = writer.iter().find(|h| h.id == id) else {
            return false;
        };
        handler.removed.store(true, Release);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, handler.fd, EpollEvent::default())
        {
            log::debug!("event loop: deleting fd {} from epoll: {e}", handler.fd);
        }
        writer.remove_first(|h| h.id == id)
    }

    /// How many io handlers are registered (a snapshot).
    pub fn handler_count(&self) -> usize {
        self.handlers.len()
    }

    /// The loop's timers (arming through [`EventLoop::arm_timer`] also wakes the loop).
    pub fn timers(&self) -> &Timers {
        &self.timers
    }

    /// Arms a one-shot timer running `callback` on the loop's thread at `deadline`.
    pub fn arm_timer(&self, deadline: Instant, callback: TimerCallback) -> TimerId {
        let (id, earliest) = self.timers.arm(deadline, callback);
        if earliest {
            self.wake();
        }
        id
    }

    /// Moves timer `id` to `deadline`; false if it already fired or was cancelled.
    pub fn rearm_timer(&self, id: TimerId, deadline: Instant) -> bool {
        match self.timers.rearm(id, deadline) {
            Some(earliest) => {
                if earliest {
                    self.wake();
                }
                true
            }
            None => false,
        }
    }

    /// Disarms timer `id`; false if it already fired or was cancelled.
    pub fn cancel_timer(&self, id: TimerId) -> bool {
        self.timers.cancel(id)
    }

    /// Makes [`EventLoop::run`] return after the dispatch in progress (from any thread).
    pub fn stop(&self) {
        self.stopped.store(true, Release);
        self.wake();
    }

    /// Whether [`EventLoop::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Acquire)
    }

    fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            // Only an eventfd counter at its maximum refuses, and then the loop is
            // already due to wake.
            log::debug!("event loop: wake-up write: {e}");
        }
    }

    /// Dispatches until [`EventLoop::stop`] is called.
    pub fn run(&self) -> io::Result<()> {
        while !self.is_stopped() {
            self.run_once(None)?;
        }
        Ok(())
    }

    /// Waits for ready descriptors or the next timer deadline (or `max_wait`, when given
    /// and sooner), dispatches what is ready, then fires the timers that are due. Returns
    /// how many handlers and timers ran.
    pub fn run_once(&self, max_wait: Option<Duration>) -> io::Result<usize> {
        let now = Instant::now();
        let until_timer = self
            .timers
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        let wait = match (until_timer, max_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        let n = match self.epoll.wait(timeout_ms(wait), &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        let mut ran = 0;
        for event in &events[..n] {
            if event.data() == WAKE {
                // Drains the counter; a failure means it was already drained.
                let _ = self.wake.read();
                continue;
            }
            let handler = {
                let guard = rcu::read_lock();
                let found = self
                    .handlers
                    .iter(&guard)
                    .find(|h| h.id.0 == event.data())
                    .map(|entry| entry.counted());
                found
            };
            if let Some(h) = handler.filter(|h| !h.removed.load(Acquire)) {
                h.io.ready(self, h.id, event.event_set());
                ran += 1;
            }
        }
        ran += self.timers.run_expired(self, Instant::now());
        Ok(ran)
    }
}

/// epoll_wait's timeout for `wait`: -1 for none, milliseconds rounded up otherwise (a
/// timer is never fired early, and a sub-millisecond wait is not a busy loop).
fn timeout_ms(wait: Option<Duration>) -> i32 {
    match wait {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn dispatches_ready_descriptors_and_removes_handlers() {
        let lp = EventLoop::new().unwrap();
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let (f, h) = (fd.clone(), hits.clone());
        let id = lp
            .add_io(
                fd.as_raw_fd(),
                EventSet::IN,
                move |_: &EventLoop, _: HandlerId, ev: EventSet| {
                    assert!(ev.contains(EventSet::IN));
                    f.read().unwrap();
                    h.fetch_add(1, Relaxed);
                },
            )
            .unwrap();
        assert_eq!(lp.handler_count(), 1);
        fd.write(1).unwrap();
        assert_eq!(lp.run_once(Some(Duration::from_secs(5))).unwrap(), 1);
        assert_eq!(hits.load(Relaxed), 1);
        assert!(lp.remove_io(id));
        assert!(!lp.remove_io(id));
        fd.write(1).unwrap();
        assert_eq!(lp.run_once(Some(Duration::from_millis(20))).unwrap(), 0);
        assert_eq!(hits.load(Relaxed), 1);
        assert!(lp.set_events(id, EventSet::OUT).is_err());
    }

    #[test]
    fn a_handler_removing_itself_never_runs_again() {
        let lp = EventLoop::new().unwrap();
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        lp.add_io(
            fd.as_raw_fd(),
            EventSet::IN,
            move |lp: &EventLoop, id: HandlerId, _: EventSet| {
                h.fetch_add(1, Relaxed);
                assert!(lp.remove_io(id));
            },
        )
        .unwrap();
        fd.write(1).unwrap();
        for _ in 0..3 {
            lp.run_once(Some(Duration::from_millis(10))).unwrap();
        }
        assert_eq!(hits.load(Relaxed), 1);
        assert_eq!(lp.handler_count(), 0);
    }

    #[test]
    fn timers_bound_the_wait_and_stop_ends_run() {
        let lp = Arc::new(EventLoop::new().unwrap());
        let t0 = Instant::now();
        lp.arm_timer(
            t0 + Duration::from_millis(30),
            Arc::new(|lp: &EventLoop| lp.stop()),
        );
        lp.run().unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert!(lp.timers().is_empty());
    }

    #[test]
    fn another_thread_wakes_the_loop() {
        let lp = Arc::new(EventLoop::new().unwrap());
        let l = lp.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            // An earlier timer armed from elsewhere must be noticed by the sleeping loop.
            l.arm_timer(Instant::now(), Arc::new(|lp: &EventLoop| lp.stop()));
        });
        lp.arm_timer(
            Instant::now() + Duration::from_secs(3600),
            Arc::new(|_: &EventLoop| panic!("the far timer fired")),
        );
        lp.run().unwrap();
        t.join().unwrap();
        assert_eq!(lp.timers().len(), 1);
    }

    #[test]
    fn timeouts_round_up() {
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(timeout_ms(Some(Duration::ZERO)), 0);
        assert_eq!(timeout_ms(Some(Duration::from_micros(1))), 1);
        assert_eq!(timeout_ms(Some(Duration::from_millis(7))), 7);
        assert_eq!(timeout_ms(Some(Duration::from_secs(u64::MAX))), i32::MAX);
    }
}
