//! [`MigrationProgress`], shared between the driver and whoever shows progress (the
//! VMM's `status` command, `vmm migrate`'s progress bar), and [`MigrationStats`], the
//! JSON object `vmm migrate --json` prints at the end (DESIGN.md lists its fields).

use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a migration is (QEMU's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Not started.
    #[default]
    None,
    /// Dirty logging on, RAM setup and first-pass scan.
    Setup,
    /// Iterating with the guest running.
    Active,
    /// Guest paused: sending the rest and the device state, then waiting for the answer.
    Device,
    /// Done: the destination runs the guest (or the snapshot is written).
    Completed,
    /// Failed; the guest runs on here (unless it was paused before).
    Failed,
    /// Cancelled; the guest runs on here.
    Cancelled,
    /// Post-copy: the guest runs on the destination, which asks for the pages it misses
    /// while the rest streams.
    #[serde(rename = "postcopy-active")]
    PostcopyActive,
    /// Post-copy, the link broken: both sides keep the guest's memory, the guest waits
    /// on the destination for what is missing until the source reconnects.
    #[serde(rename = "postcopy-paused")]
    PostcopyPaused,
}

impl MigrationState {
    /// The name QEMU gives the state (`query-migrate`'s `status`, the `MIGRATION` event).
    pub fn name(self) -> &'static str {
        match self {
            MigrationState::None => "none",
            MigrationState::Setup => "setup",
            MigrationState::Active => "active",
            MigrationState::Device => "device",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
            MigrationState::Cancelled => "cancelled",
            MigrationState::PostcopyActive => "postcopy-active",
            MigrationState::PostcopyPaused => "postcopy-paused",
        }
    }
}

/// One iteration of the pre-copy loop (or the first pass, or the final stage).
#[derive(Debug, Clone, Default, Serialize)]
pub struct IterationStats {
    /// 0 is the first pass; the final stage is the last.
    pub iteration: u32,
    /// "first", "iterate" or "final".
    pub stage: &'static str,
    /// Pages of data sent.
    pub pages: u64,
    /// Zero pages sent as a flag.
    pub zero_pages: u64,
    /// Times a dirty page was left for the next pass because the guest had written it
    /// again since the pass began (the first pass only; see `RamSaver::hold_back`): per
    /// lap over the list, so a page held back on two laps counts twice.
    pub held_back_pages: u64,
    /// Stream bytes.
    pub bytes: u64,
    /// Time spent sending, in ms.
    pub ms: f64,
    /// Pages dirtied per second, measured at the sync that followed.
    pub dirty_rate: f64,
    /// Bytes still to send after that sync.
    pub remaining_bytes: u64,
    /// The vCPU throttle (auto-converge) in force while it ran, in percent.
    pub cpu_throttle_percent: u8,
}

/// A copy of the progress at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgressSnapshot {
    /// Where the migration is.
    pub state: MigrationState,
    /// Bytes of guest RAM.
    pub ram_bytes: u64,
    /// Stream bytes sent so far.
    pub transferred_bytes: u64,
    /// Bytes still to send, as of the last batch.
    pub remaining_bytes: u64,
    /// Pages dirtied per second, as of the last sync.
    pub dirty_pages_rate: f64,
    /// The iteration running (0: the first pass).
    pub iteration: u32,
    /// Since the start, in ms.
    pub elapsed_ms: f64,
    /// Bandwidth measured so far, in bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// The downtime the remaining bytes would take now, in ms.
    pub expected_downtime_ms: f64,
    /// Iterations done.
    pub iterations: Vec<IterationStats>,
    /// The vCPU throttle (auto-converge) in force now, in percent (QEMU's
    /// `cpu-throttle-percentage`); 0 again once the migration ended.
    pub cpu_throttle_percent: u8,
    /// Why it failed, once it did; in `postcopy-paused`, why the link broke (or why the
    /// last resume failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Post-copy recovery: resume attempts that ended (reconnected or failed).
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub postcopy_resume_attempts: u32,
    /// ... and the times the link broke after the switch.
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub postcopy_pauses: u32,
    /// Post-copy: page requests served so far.
    #[serde(skip_serializing_if = "is_zero")]
    pub postcopy_requests: u64,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// The figures of a finished migration: `vmm migrate --json` prints this object.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationStats {
    /// "completed", "failed" or "cancelled".
    pub status: MigrationState,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the start to the confirmation (or the end of the snapshot), in ms.
    pub total_ms: f64,
    /// From pausing the guest to the destination's confirmation, in ms; for a failed
    /// migration, to the guest's resumption here (0 when it failed before the pause). A
    /// local migration, whose two processes share the host's clock, measures it to the
    /// instant the destination's last vCPU left its park: the guest's own downtime.
    pub downtime_ms: f64,
    /// A local migration: from the pause to the destination's confirmation arriving here
    /// (the downtime plus the message's trip), in ms.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub downtime_confirmed_ms: f64,
    /// Dirty logging on, RAM setup and first-pass scan, in ms.
    pub setup_ms: f64,
    /// Stream bytes sent.
    pub transferred_bytes: u64,
    /// Pages of data sent.
    pub normal_pages: u64,
    /// Zero pages sent as a flag.
    pub zero_pages: u64,
    /// Pages the first pass knew were zero (never touched, or the zero page): not sent.
    pub skipped_pages: u64,
    /// Iterations, the first pass and the final stage included.
    pub iterations: u32,
    /// Megabits per second over the whole migration.
    pub throughput_mbps: f64,
    /// Pages dirtied per second, at the last sync before the pause.
    pub dirty_pages_rate: f64,
    /// Bytes of guest RAM.
    pub ram_bytes: u64,
    /// The downtime limit, in ms.
    pub downtime_limit_ms: f64,
    /// The downtime expected when the guest was paused, in ms.
    pub expected_downtime_ms: f64,
    /// True if the remaining bytes fit the downtime limit; false if the iteration limit
    /// forced the final stage.
    pub converged: bool,
    /// Whether auto-converge was on.
    pub auto_converge: bool,
    /// The highest vCPU throttle auto-converge set, in percent (0: none); lifted when the
    /// migration ended.
    pub cpu_throttle_percent: u8,
    /// Each iteration.
    pub per_iteration: Vec<IterationStats>,
    /// A local migration: the memory was handed over, not copied.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// Blocks whose memory a local migration handed over.
    #[serde(skip_serializing_if = "is_zero")]
    pub shared_blocks: u64,
    /// A post-copy migration's own figures.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyStats>,
}

/// What a post-copy migration adds to [`MigrationStats`] (QEMU reports the same).
/// `downtime_ms` is then, as in QEMU, from the pause to the switch package sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopyStats {
    /// Always true: the migration switched to post-copy.
    pub postcopy: bool,
    /// From the pause to the destination saying its guest runs (a round trip of the
    /// link included), in ms.
    pub postcopy_switch_ms: f64,
    /// Pages the destination had to get after the switch.
    pub postcopy_missing_pages: u64,
    /// Pages the destination asked for because a vCPU (or the VMM) touched them.
    pub postcopy_requests: u64,
    /// Total time threads waited on missing pages on the destination, in ms.
    pub postcopy_blocktime_ms: f64,
    /// A request's latency (asked to page in place), median, in ms.
    pub postcopy_fault_p50_ms: f64,
    /// ... 99th percentile, in ms.
    pub postcopy_fault_p99_ms: f64,
    /// ... the worst, in ms.
    pub postcopy_fault_max_ms: f64,
    /// From the switch to the last page in place, in ms.
    pub postcopy_ms: f64,
    /// Stream bytes sent after the switch.
    pub postcopy_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_f64(n: &f64) -> bool {
    *n == 0.0
}

/// What an observer of a migration hears ([`MigrationProgress::set_observer`]): QEMU's
/// `MIGRATION` and `MIGRATION_PASS` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressEvent {
    /// The migration moved to this state.
    State(MigrationState),
    /// Dirty-page pass `n` was sent (1: the first pass, then one per sync of the dirty
    /// log; the final stage's is the last).
    Pass(u32),
}

/// Called on the driver's thread at every [`ProgressEvent`], with no lock of the progress
/// held (it may read the progress).
pub type ProgressObserver = Arc<dyn Fn(ProgressEvent) + Send + Sync>;

/// A migration's progress, updated by the driver after every batch, read by anyone.
#[derive(Default)]
pub struct MigrationProgress {
    snap: Mutex<ProgressSnapshot>,
    started: Mutex<Option<Instant>>,
    cancel: AtomicBool,
    start_postcopy: AtomicBool,
    postcopy_possible: AtomicBool,
    /// Where a paused post-copy is to reconnect (`resume_postcopy`), until the driver
    /// takes it.
    resume: Mutex<Option<crate::transport::MigrationUri>>,
    resumed: std::sync::Condvar,
    last: Mutex<Option<MigrationStats>>,
    observer: Mutex<Option<ProgressObserver>>,
}

impl std::fmt::Debug for MigrationProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationProgress")
            .field("snap", &*lock(&self.snap))
            .field("cancel", &self.cancel)
            .finish_non_exhaustive()
    }
}

/// Lock that survives a panicking holder: every update is a plain store of figures.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MigrationProgress {
    /// Nothing started.
    pub fn new() -> MigrationProgress {
        MigrationProgress::default()
    }

    /// The progress now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let mut s = lock(&self.snap).clone();
        if let Some(t) = *lock(&self.started) {
            s.elapsed_ms = ms(t.elapsed());
        }
        s
    }

    /// Where the migration is.
    pub fn state(&self) -> MigrationState {
        lock(&self.snap).state
    }

    /// Asks the driver to stop at its next batch: it resumes the guest and returns
    /// [`MigrationError::Cancelled`](super::MigrationError::Cancelled). No effect once
    /// the guest is paused for the final stage.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// Forgets a cancel that came when it could not act (post-copy, before a pause).
    pub(super) fn clear_cancel(&self) {
        self.cancel.store(false, Ordering::Release);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Asks the migration under way to switch to post-copy at the end of the iteration
    /// running (QEMU's `migrate-start-postcopy`). Refused, saying why, when it cannot:
    /// none runs, it is not a pre-copy over a plain socket (a file, TLS, a local
    /// migration), or it is past its iterations.
    pub fn start_postcopy(&self) -> Result<(), String> {
        let state = self.state();
        if !self.postcopy_possible.load(Ordering::Acquire) {
            return Err(match state {
                MigrationState::Setup | MigrationState::Active => {
                    "this migration cannot switch to post-copy: it needs a plain unix: or tcp: connection (not a file, TLS or a local migration)".into()
                }
                _ => "no migration is under way".into(),
            });
        }
        match state {
            MigrationState::Setup | MigrationState::Active => {
                self.start_postcopy.store(true, Ordering::Release);
                Ok(())
            }
            MigrationState::PostcopyActive | MigrationState::PostcopyPaused => {
                Err("the migration is in post-copy already".into())
            }
            MigrationState::Device => {
                Err("the migration is in its final stage: too late for post-copy".into())
            }
            _ => Err("no migration is under way".into()),
        }
    }

    /// Asks a post-copy paused by a broken link to reconnect to `uri` (where the
    /// destination listens again) and go on; refused unless it is paused. The outcome
    /// shows in the progress: `postcopy-active` again, or still paused with
    /// [`ProgressSnapshot::postcopy_resume_attempts`] one more and the reason in `error`.
    pub fn resume_postcopy(&self, uri: crate::transport::MigrationUri) -> Result<u32, String> {
        let snap = lock(&self.snap);
        if snap.state != MigrationState::PostcopyPaused {
            return Err(format!(
                "only a post-copy paused by a broken link can be resumed (the migration is {})",
                snap.state.name()
            ));
        }
        let attempts = snap.postcopy_resume_attempts;
        drop(snap);
        *lock(&self.resume) = Some(uri);
        self.resumed.notify_all();
        Ok(attempts)
    }

    /// Waits for [`resume_postcopy`](Self::resume_postcopy)'s URI; `None` once the
    /// migration is cancelled instead.
    pub(super) fn wait_resume(&self) -> Option<crate::transport::MigrationUri> {
        let mut r = lock(&self.resume);
        loop {
            if let Some(uri) = r.take() {
                return Some(uri);
            }
            if self.is_cancelled() {
                return None;
            }
            r = self
                .resumed
                .wait_timeout(r, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The driver can switch to post-copy (a pre-copy over a plain socket).
    pub(super) fn allow_postcopy(&self, possible: bool) {
        self.postcopy_possible.store(possible, Ordering::Release);
    }

    /// Whether [`start_postcopy`](Self::start_postcopy) was called.
    pub fn postcopy_requested(&self) -> bool {
        self.start_postcopy.load(Ordering::Acquire)
    }

    /// The figures of the last migration that ended (completed or not).
    pub fn last_stats(&self) -> Option<MigrationStats> {
        lock(&self.last).clone()
    }

    /// From now on, `observer` hears every change of state and every new pass.
    pub fn set_observer(&self, observer: ProgressObserver) {
        *lock(&self.observer) = Some(observer);
    }

    fn tell(&self, events: &[ProgressEvent]) {
        let observer = lock(&self.observer).clone();
        if let Some(observer) = observer {
            for &e in events {
                observer(e);
            }
        }
    }

    pub(super) fn start(&self, ram_bytes: u64) {
        *lock(&self.started) = Some(Instant::now());
        *lock(&self.snap) = ProgressSnapshot {
            state: MigrationState::Setup,
            ram_bytes,
            remaining_bytes: ram_bytes,
            ..ProgressSnapshot::default()
        };
        *lock(&self.last) = None;
        self.cancel.store(false, Ordering::Release);
        self.start_postcopy.store(false, Ordering::Release);
        self.postcopy_possible.store(false, Ordering::Release);
        self.tell(&[ProgressEvent::State(MigrationState::Setup)]);
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut ProgressSnapshot)) {
        let events = {
            let mut s = lock(&self.snap);
            let (state, passes) = (s.state, s.iterations.len());
            f(&mut s);
            let mut events = Vec::new();
            if s.state != state {
                events.push(ProgressEvent::State(s.state));
            }
            for n in passes..s.iterations.len() {
                events.push(ProgressEvent::Pass(n as u32 + 1));
            }
            events
        };
        self.tell(&events);
    }

    pub(super) fn finish(&self, stats: MigrationStats) {
        self.postcopy_possible.store(false, Ordering::Release);
        let state = stats.status;
        let changed = {
            let mut s = lock(&self.snap);
            let changed = s.state != state;
            s.state = state;
            s.error = stats.error.clone();
            s.transferred_bytes = stats.transferred_bytes;
            changed
        };
        *lock(&self.last) = Some(stats);
        if changed {
            self.tell(&[ProgressEvent::State(state)]);
        }
    }
}

/// A duration in milliseconds, with microseconds.
pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_observer_hears_each_state_and_pass_once() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let p = MigrationProgress::new();
        let h = heard.clone();
        p.set_observer(Arc::new(move |e| lock(&h).push(e)));
        p.start(1 << 20);
        p.update(|s| s.state = MigrationState::Active);
        p.update(|s| s.transferred_bytes = 1);
        p.update(|s| s.iterations.push(IterationStats::default()));
        p.update(|s| {
            s.state = MigrationState::Device;
            s.iterations.push(IterationStats::default());
        });
        p.finish(MigrationStats {
            status: MigrationState::Completed,
            ..MigrationStats::default()
        });
        use MigrationState::*;
        use ProgressEvent::*;
        assert_eq!(
            *lock(&heard),
            vec![
                State(Setup),
                State(Active),
                Pass(1),
                State(Device),
                Pass(2),
                State(Completed)
            ]
        );
    }

    #[test]
    fn stats_serialize_with_the_documented_fields() {
        let s = MigrationStats {
            status: MigrationState::Completed,
            per_iteration: vec![IterationStats {
                stage: "first",
                ..IterationStats::default()
            }],
            ..MigrationStats::default()
        };
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        for k in [
            "status",
            "total_ms",
            "downtime_ms",
            "setup_ms",
            "transferred_bytes",
            "normal_pages",
            "zero_pages",
            "iterations",
            "throughput_mbps",
            "dirty_pages_rate",
            "per_iteration",
            "auto_converge",
            "cpu_throttle_percent",
        ] {
            assert!(v.get(k).is_some(), "{k} missing from {v}");
        }
        assert_eq!(v["status"], "completed");
        assert!(v.get("error").is_none());
        let it = &v["per_iteration"][0];
        for k in ["pages", "bytes", "ms", "dirty_rate", "cpu_throttle_percent"] {
            assert!(it.get(k).is_some(), "{k} missing from {it}");
        }
    }
}
