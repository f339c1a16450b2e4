//! The main loop's timers, after QEMU's "qemu-timer: use RCU to preserve the timers during
//! lockless lookup": the armed timers sit on an [`RcuList`] sorted by deadline, so the
//! loop's deadline check reads the head with no lock, while arming, re-arming, cancelling
//! and firing take the list's writer lock. Only freeing a timer's node waits for a grace
//! period (the list hands unlinked nodes to `call_rcu`).
//!
//! A timer here is one-shot: it fires once at its deadline unless cancelled or re-armed
//! first. Its callback runs on the loop's thread, without any lock held, so it may arm
//! timers or add and remove io handlers.

use super::EventLoop;
use rcu::{ListWriter, RcuList};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// What a timer runs when it fires.
pub type TimerCallback = Arc<dyn Fn(&EventLoop) + Send + Sync>;

/// Names an armed timer, for [`Timers::rearm`] and [`Timers::cancel`]. Ids are never
/// reused, so a stale id never reaches a newer timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId(u64);

/// One armed timer.
struct Armed {
    id: TimerId,
    deadline: Instant,
    callback: TimerCallback,
}

/// The armed timers of one loop.
pub struct Timers {
    /// Sorted by deadline, earliest first (ties in arming order).
    ///
    /// Concurrency rules, the qemu-timer seed's: [`Timers::next_deadline`] reads the head
    /// under `rcu::read_lock()` and nothing else; every change (arm, re-arm, cancel, fire)
    /// holds the list's writer lock, and a re-arm is an unlink plus a new node, never an
    /// in-place change a reader could see half done; unlinked nodes (and their callbacks)
    /// are freed after a grace period, never under a reader.
    active: RcuList<Armed>,
    next_id: AtomicU64,
}

impl Default for Timers {
    fn default() -> Self {
        Timers::new()
    }
}

impl fmt::Debug for Timers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timers")
            .field("armed", &self.active.len())
            .finish()
    }
}

impl Timers {
    /// No timers armed.
    pub fn new() -> Timers {
        Timers {
            active: RcuList::new(),
            next_id: AtomicU64::new(1),
        }
    }

    /// The earliest deadline of all armed timers: the loop's deadline check, lock-free.
    pub fn next_deadline(&self) -> Option<Instant> {
        let guard = rcu::read_lock();
        let head = self.active.iter(&guard).next().map(|t| t.deadline);
        head
    }

    /// How many timers are armed (a snapshot).
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// True if no timer is armed (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Arms a new timer that runs `callback` once at `deadline`. Returns its id and
    /// whether it became the earliest (the loop must then recompute its wait).
    pub fn arm(&self, deadline: Instant, callback: TimerCallback) -> (TimerId, bool) {
        let id = TimerId(self.next_id.fetch_add(1, Relaxed));
        let earliest = insert(
            &mut self.active.lock(),
            Armed {
                id,
                deadline,
                callback,
            },
        );
        (id, earliest)
    }

    /// Moves timer `id` to `deadline`. Returns `None` if it is no longer armed (it fired
    /// or was cancelled), else whether it became the earliest.
    pub fn rearm(&self, id: TimerId, deadline: Instant) -> Option<bool> {
        let mut writer = self.active.lock();
        let callback = writer.iter().find(|t| t.id == id)?.callback.clone();
        writer.remove_first(|t| t.id == id);
        Some(insert(
            &mut writer,
            Armed {
                id,
                deadline,
                callback,
            },
        ))
    }

    /// Disarms timer `id`; false if it was not armed. Its node, and the callback with
    /// whatever it holds, is freed after a grace period.
    pub fn cancel(&self, id: TimerId) -> bool {
        self.active.lock().remove_first(|t| t.id == id)
    }

    /// Fires every timer whose deadline is at or before `now`, earliest first, each
    /// callback with no lock held. Returns how many fired.
    pub fn run_expired(&self, lp: &EventLoop, now: Instant) -> usize {
        let mut fired = 0;
        loop {
            let mut writer = self.active.lock();
            let due = writer
                .iter()
                .next()
                .filter(|t| t.deadline <= now)
                .map(|t| (t.id, t.callback.clone()));
            let Some((id, callback)) = due else {
                return fired;
            };
            writer.remove_first(|t| t.id == id);
            drop(writer);
            callback(lp);
            fired += 1;
        }
    }
}

/// Links `timer` in deadline order under the held writer lock; true if it is now the head.
fn insert(writer: &mut ListWriter<'_, Armed>, timer: Armed) -> bool {
    let (id, deadline) = (timer.id, timer.deadline);
    writer.insert_before_first(|t| t.deadline > deadline, timer);
    writer.iter().next().map(|t| t.id) == Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    fn recorder() -> (Arc<Mutex<Vec<u32>>>, impl Fn(u32) -> TimerCallback) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        (log, move |n| {
            let l = l.clone();
            Arc::new(move |_: &EventLoop| l.lock().unwrap().push(n)) as TimerCallback
        })
    }

    #[test]
    fn fire_in_deadline_order_and_cancel() {
        let lp = EventLoop::new().unwrap();
        let t = Timers::new();
        let (log, cb) = recorder();
        let t0 = Instant::now();
        assert_eq!(t.next_deadline(), None);
        let (_, first) = t.arm(t0 + Duration::from_millis(30), cb(3));
        assert!(first);
        let (a, first) = t.arm(t0 + Duration::from_millis(10), cb(1));
        assert!(first);
        let (_, first) = t.arm(t0 + Duration::from_millis(20), cb(2));
        assert!(!first);
        let (c, _) = t.arm(t0 + Duration::from_millis(15), cb(9));
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert!(t.cancel(c));
        assert!(!t.cancel(c));
        assert_eq!(t.run_expired(&lp, t0 + Duration::from_millis(20)), 2);
        assert_eq!(*log.lock().unwrap(), vec![1, 2]);
        assert_eq!(t.rearm(a, t0), None, "a fired timer is not armed");
        assert_eq!(t.len(), 1);
        assert_eq!(t.run_expired(&lp, t0 + Duration::from_secs(1)), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn rearm_moves_a_timer() {
        let lp = EventLoop::new().unwrap();
        let t = Timers::new();
        let (log, cb) = recorder();
        let t0 = Instant::now();
        let (a, _) = t.arm(t0 + Duration::from_millis(10), cb(1));
        t.arm(t0 + Duration::from_millis(20), cb(2));
        assert_eq!(t.rearm(a, t0 + Duration::from_millis(30)), Some(false));
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(20)));
        assert_eq!(t.run_expired(&lp, t0 + Duration::from_millis(25)), 1);
        assert_eq!(t.rearm(a, t0), Some(true));
        assert_eq!(t.run_expired(&lp, t0), 1);
        assert_eq!(*log.lock().unwrap(), vec![2, 1]);
    }

    #[test]
    fn a_callback_may_arm_timers() {
        let lp = Arc::new(EventLoop::new().unwrap());
        let t = Arc::new(Timers::new());
        let (log, cb) = recorder();
        let t0 = Instant::now();
        let inner = cb(2);
        let t2 = t.clone();
        t.arm(
            t0,
            Arc::new(move |_: &EventLoop| {
                t2.arm(t0, inner.clone());
            }),
        );
        // The timer armed by the callback is due too and fires in the same pass.
        assert_eq!(t.run_expired(&lp, t0), 2);
        assert_eq!(*log.lock().unwrap(), vec![2]);
    }
}
