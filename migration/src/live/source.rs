//! The source's driver: [`migrate`] runs setup, the pre-copy iterations, the final stage
//! and the wait for the destination's confirmation (the parent module tells the steps),
//! and undoes what it did when anything fails before the confirmation.

use super::error::{MigrationError, Stage};
use super::progress::{ms, IterationStats, MigrationProgress, MigrationState, MigrationStats};
use super::reply::Reply;
use super::throttle::{ThrottleSettings, Throttler};
use super::MigratableVm;
use crate::save::RamSaver;
use crate::stream::{StreamWriter, PAGE_SIZE};
use crate::transport::{
    connect, connect_tls, Connection, ConnectionControl, MigrationUri, TlsClient, TransportError,
};
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

mod postcopy;

/// How the source migrates.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The longest the guest may stay paused (QEMU's `downtime-limit`, default 300 ms):
    /// the final stage starts when the remaining bytes would go within it at the measured
    /// bandwidth.
    pub downtime_limit: Duration,
    /// Bandwidth cap in bytes per second (None: none); lifted for the final stage, as in
    /// QEMU, so the downtime is not stretched by it. After a switch to post-copy it caps
    /// the background pages; a page the destination asks for goes at once.
    pub max_bandwidth: Option<u64>,
    /// Iterations (the first pass included) after which the final stage starts even if
    /// the remaining bytes do not fit the downtime limit (default 30).
    pub max_iterations: u32,
    /// How long to wait for the destination's confirmation once everything is sent
    /// (default 10 s).
    pub confirm_timeout: Duration,
    /// How long one write may make no progress before the destination is given up
    /// (default 10 s).
    pub write_timeout: Duration,
    /// How long one batch may hold its read-side section (default 50 ms, QEMU's).
    pub batch_limit: Duration,
    /// Throttle the guest's vCPUs while it dirties memory faster than it goes (QEMU's
    /// `auto-converge`; see the `throttle` module). On by default here, off in QEMU: a
    /// migration that cannot converge otherwise ends at [`Self::max_iterations`] with a
    /// downtime far over the limit, and a slower guest for a few seconds is the better
    /// trade for a VMM whose users ask for a downtime limit.
    pub auto_converge: bool,
    /// When and how hard auto-converge throttles (QEMU's defaults).
    pub throttle: ThrottleSettings,
    /// Switch to post-copy after this many iterations (1: after the first pass; 0: at
    /// once, before any page is sent) unless the migration converged by then; `None`:
    /// only when asked
    /// ([`MigrationProgress::start_postcopy`]). Needs a plain unix or tcp connection.
    pub postcopy_after: Option<u32>,
    /// Post-copy paces its background pages so that no more than this many bytes wait
    /// in the socket ahead of a requested page, beyond what the link holds in flight
    /// (TCP's measured bandwidth-delay product). Default 64 KiB.
    pub postcopy_queue_bytes: u64,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            max_iterations: 30,
            confirm_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            batch_limit: crate::save::DEFAULT_BATCH_LIMIT,
            auto_converge: true,
            throttle: ThrottleSettings::default(),
            postcopy_after: None,
            postcopy_queue_bytes: 64 << 10,
        }
    }
}

/// Below this many bytes sent, the bandwidth measured is mostly per-batch latency (and
/// the time spent reading pages, zero ones above all): the driver takes TCP's own
/// measure of the link instead ([`SendQueue::delivery_rate`]), or, with none (a unix
/// socket), assumes [`ASSUMED_BANDWIDTH`]; capped by the rate limit either way. A first
/// pass that held a busy guest's working set back sends little, over a slow link slowly.
///
/// [`SendQueue::delivery_rate`]: crate::transport::queue::SendQueue::delivery_rate
const MEASURE_MIN_BYTES: u64 = 4 << 20;
/// [`Run::drain_queue`]: the socket's queue left when the guest is paused.
const DRAINED_BYTES: u64 = 16 << 10;
/// [`Run::drain_queue`]: the longest the guest's pause is put off for it.
const DRAIN_LIMIT: Duration = Duration::from_secs(1);
/// A local socket's order of magnitude, in bytes per second.
const ASSUMED_BANDWIDTH: f64 = 1e9;
/// How long a failed write waits for the destination's reply explaining it.
const REPLY_AFTER_ERROR: Duration = Duration::from_millis(300);

/// [`connect`] to `uri`, then [`migrate`]. A `file:` URI writes a snapshot: no
/// confirmation, and the guest stays paused after it.
pub fn migrate_to_uri(
    vm: &dyn MigratableVm,
    uri: &MigrationUri,
    opts: &MigrateOptions,
    progress: &MigrationProgress,
) -> Result<MigrationStats, MigrationError> {
    if opts.postcopy_after.is_some() && matches!(uri, MigrationUri::File(_)) {
        // Refused before the file is made (or an existing one cut to nothing).
        let e = MigrationError::PostcopyNeedsDuplex {
            what: format!("{uri} (a file)"),
        };
        return Err(finish_failed(progress, e, Instant::now()));
    }
    migrate_connected(vm, connect(uri), opts, progress)
}

/// [`migrate_to_uri`] over mutual TLS (`tcp:` only): the destination's certificate is
/// checked, and ours shown, before a byte of the stream goes.
pub fn migrate_to_uri_tls(
    vm: &dyn MigratableVm,
    uri: &MigrationUri,
    tls: &TlsClient,
    opts: &MigrateOptions,
    progress: &MigrationProgress,
) -> Result<MigrationStats, MigrationError> {
    if opts.postcopy_after.is_some() {
        // Refused before a connection is made.
        let e = MigrationError::PostcopyNeedsDuplex {
            what: format!("TLS to {uri}"),
        };
        return Err(finish_failed(progress, e, Instant::now()));
    }
    migrate_connected(vm, connect_tls(uri, tls), opts, progress)
}

fn migrate_connected(
    vm: &dyn MigratableVm,
    connected: Result<Connection, TransportError>,
    opts: &MigrateOptions,
    progress: &MigrationProgress,
) -> Result<MigrationStats, MigrationError> {
    match connected {
        Ok(conn) => migrate(vm, conn, opts, progress),
        Err(e) => {
            let e = MigrationError::from(e);
            progress.start(0);
            progress.finish(MigrationStats {
                status: MigrationState::Failed,
                error: Some(e.to_string()),
                ..MigrationStats::default()
            });
            Err(e)
        }
    }
}

/// Migrates `vm` over `conn` (see the parent module). Returns once the destination
/// confirmed that its guest runs (for a file: once the snapshot is written, the guest
/// paused here). On any failure before that, dirty logging is stopped, the guest resumed
/// (if this call paused it), the socket shut down, and the error names what failed; the
/// figures, failed or not, are also left in `progress` ([`MigrationProgress::last_stats`]).
pub fn migrate(
    vm: &dyn MigratableVm,
    conn: Connection,
    opts: &MigrateOptions,
    progress: &MigrationProgress,
) -> Result<MigrationStats, MigrationError> {
    let ram = vm.ram();
    progress.start(ram.total_bytes());
    let t0 = Instant::now();
    let control = match conn.control() {
        Ok(c) => c,
        Err(e) => {
            let e = MigrationError::from_io(Stage::Setup, e, opts.write_timeout);
            return Err(finish_failed(progress, e, t0));
        }
    };
    let two_way = conn.is_two_way();
    let duplex = conn.is_duplex();
    if opts.postcopy_after.is_some() && !duplex {
        let e = MigrationError::PostcopyNeedsDuplex {
            what: if two_way {
                format!("a TLS connection to {}", conn.peer())
            } else {
                format!("{} (a file)", conn.peer())
            },
        };
        return Err(finish_failed(progress, e, t0));
    }
    let (reader, writer) = conn.into_split();
    progress.allow_postcopy(duplex);
    let mut out = StreamWriter::new(writer);
    out.set_rate_limit(opts.max_bandwidth);
    let mut saver = RamSaver::new(ram.clone());
    saver.set_batch_limit(opts.batch_limit);
    let mut run = Run {
        vm,
        opts,
        progress,
        out,
        reader,
        control,
        two_way,
        duplex,
        saver,
        t0,
        stage: Stage::Setup,
        logging: false,
        paused: false,
        setup: Duration::ZERO,
        paused_at: None,
        downtime: Duration::ZERO,
        sent_bytes: 0,
        sent_time: Duration::ZERO,
        iterations: Vec::new(),
        dirty_rate: 0.0,
        expected_downtime: Duration::ZERO,
        converged: false,
        throttle: Throttler::new(opts.auto_converge, opts.throttle),
        postcopy: None,
        guest_elsewhere: false,
        token: 0,
    };
    let at_least = |d: Duration| Some(d.max(Duration::from_millis(1)));
    if let Err(e) = run
        .control
        .set_timeouts(at_least(opts.confirm_timeout), at_least(opts.write_timeout))
    {
        let e = MigrationError::from_io(Stage::Setup, e, opts.write_timeout);
        return Err(run.fail(e));
    }
    match run.go() {
        Ok(()) => Ok(run.finish()),
        Err(e) => Err(run.fail(e)),
    }
}

/// Records a failure that happened before the driver had anything to undo.
fn finish_failed(progress: &MigrationProgress, e: MigrationError, t0: Instant) -> MigrationError {
    progress.finish(MigrationStats {
        status: MigrationState::Failed,
        error: Some(e.to_string()),
        total_ms: ms(t0.elapsed()),
        ..MigrationStats::default()
    });
    e
}

/// One migration on the source.
struct Run<'a> {
    vm: &'a dyn MigratableVm,
    opts: &'a MigrateOptions,
    progress: &'a MigrationProgress,
    out: StreamWriter<Box<dyn Write + Send>>,
    reader: Box<dyn Read + Send>,
    control: ConnectionControl,
    two_way: bool,
    /// Both halves usable at once: post-copy possible.
    duplex: bool,
    saver: RamSaver,
    t0: Instant,
    stage: Stage,
    /// Dirty logging was started by us and is on.
    logging: bool,
    /// The guest was running and we paused it.
    paused: bool,
    setup: Duration,
    /// When the final stage paused the guest: the downtime starts.
    paused_at: Option<Instant>,
    downtime: Duration,
    /// Bytes sent and time spent sending them (the bandwidth measure).
    sent_bytes: u64,
    sent_time: Duration,
    iterations: Vec<IterationStats>,
    dirty_rate: f64,
    expected_downtime: Duration,
    converged: bool,
    /// Auto-converge: the policy and the throttle set on the VM.
    throttle: Throttler,
    /// Post-copy's figures, once switched.
    postcopy: Option<super::PostcopyStats>,
    /// The destination runs the guest (post-copy): it must never be resumed here.
    guest_elsewhere: bool,
    /// Post-copy: what a resume shows the destination.
    token: u64,
}

impl Run<'_> {
    fn vm_err(&self, op: &'static str) -> impl FnOnce(super::VmError) -> MigrationError {
        let stage = self.stage;
        move |source| MigrationError::Vm { op, stage, source }
    }

    fn io_err(&self) -> impl FnOnce(io::Error) -> MigrationError {
        let (stage, t) = (self.stage, self.opts.write_timeout);
        move |e| MigrationError::from_io(stage, e, t)
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.progress.is_cancelled() {
            return Err(MigrationError::Cancelled { stage: self.stage });
        }
        Ok(())
    }

    fn go(&mut self) -> Result<(), MigrationError> {
        self.vm
            .start_dirty_log()
            .map_err(self.vm_err("start dirty logging"))?;
        self.logging = true;
        // One sync before the first pass: with KVM_DIRTY_LOG_INITIALLY_SET the first sync
        // after logging starts reports every page (and re-arms write protection for
        // all). Taken now, the first pass's clear-then-scan drops those bits for the
        // pages pagemap shows empty; taken after it, they would resend all of RAM.
        self.vm
            .dirty_sync()
            .map_err(self.vm_err("sync the dirty log"))?;
        self.out.header().map_err(self.io_err())?;
        let (stage, t) = (self.stage, self.opts.write_timeout);
        let vm = self.vm;
        self.saver
            .setup_with(&mut self.out, |b| !vm.is_hotplugged(b))
            .map_err(|e| MigrationError::from_save(stage, e, t))?;
        self.setup = self.t0.elapsed();
        let fp = self.saver.stats().first_pass;
        log::info!(
            "migration: setup {:.3} ms ({} pages marked, {} absent and {} zero skipped, \
             scan {:.3} ms)",
            ms(self.setup),
            fp.marked_pages,
            fp.absent_pages,
            fp.known_zero_pages,
            ms(fp.scan_time)
        );
        self.progress.update(|s| s.state = MigrationState::Active);
        if self.opts.postcopy_after == Some(0) && self.duplex {
            // Post-copy from the start: no page goes before the guest moves.
            return self.postcopy();
        }
        let mut last_sync = Instant::now();
        let mut n = 0u32;
        loop {
            self.stage = Stage::Iteration(n);
            self.check_cancel()?;
            let mut it = self.send_pass(n, if n == 0 { "first" } else { "iterate" })?;
            let dirtied = self
                .vm
                .dirty_sync()
                .map_err(self.vm_err("sync the dirty log"))?;
            let now = Instant::now();
            let period = now.duration_since(last_sync).as_secs_f64().max(1e-6);
            last_sync = now;
            let remaining = self.saver.remaining_pages();
            self.dirty_rate = remaining as f64 / period;
            it.dirty_rate = self.dirty_rate;
            it.remaining_bytes = remaining * PAGE_SIZE;
            let bandwidth = self.bandwidth();
            self.expected_downtime = Duration::from_secs_f64(it.remaining_bytes as f64 / bandwidth);
            log::debug!(
                "migration: iteration {n}: {} pages ({} held back), {} bytes in {:.3} ms; \
                 {remaining} dirty ({:.0} pages/s), expected downtime {:.3} ms",
                it.pages + it.zero_pages,
                it.held_back_pages,
                it.bytes,
                it.ms,
                self.dirty_rate,
                ms(self.expected_downtime)
            );
            let (sent, held_back) = (it.bytes, it.held_back_pages);
            self.iterations.push(it);
            // Pages the first pass held back go in a pass of their own while the guest
            // runs, not in the pause: on a fast link they fit the limit at once, and
            // would have gone live had they not been held.
            if self.expected_downtime <= self.opts.downtime_limit && held_back == 0 {
                self.converged = true;
                self.publish(remaining, bandwidth);
                break;
            }
            // Auto-converge judges the period that just ended (unless the next stage is
            // the final one anyway).
            if n + 1 < self.opts.max_iterations {
                self.throttle
                    .period(self.vm, dirtied.saturating_mul(PAGE_SIZE), sent);
            }
            self.publish(remaining, bandwidth);
            if self.wants_postcopy(n) {
                return self.postcopy();
            }
            n += 1;
            if n >= self.opts.max_iterations {
                log::warn!(
                    "migration: not converged after {n} iterations ({:.0} pages/s dirtied): \
                     pausing with {:.1} ms expected downtime",
                    self.dirty_rate,
                    ms(self.expected_downtime)
                );
                break;
            }
        }
        self.final_stage()?;
        if self.two_way {
            self.stage = Stage::Confirmation;
            self.confirmation()?;
        }
        // The guest runs again (on the destination, or the snapshot is complete).
        self.downtime = self.paused_at.map_or(Duration::ZERO, |t| t.elapsed());
        Ok(())
    }

    /// The figures of the iteration that just ended, for `status`.
    fn publish(&self, remaining: u64, bandwidth: f64) {
        let (rate, expected, iters, throttle) = (
            self.dirty_rate,
            ms(self.expected_downtime),
            self.iterations.clone(),
            self.throttle.percent(),
        );
        self.progress.update(|s| {
            s.dirty_pages_rate = rate;
            s.remaining_bytes = remaining * PAGE_SIZE;
            s.bandwidth_bytes_per_s = bandwidth;
            s.expected_downtime_ms = expected;
            s.iterations = iters;
            s.cpu_throttle_percent = throttle;
        });
    }

    /// The bandwidth to expect, in bytes per second.
    fn bandwidth(&self) -> f64 {
        let secs = self.sent_time.as_secs_f64();
        let measured = if self.sent_bytes >= MEASURE_MIN_BYTES && secs > 0.0 {
            self.sent_bytes as f64 / secs
        } else {
            self.control
                .send_queue()
                .and_then(|q| q.delivery_rate)
                .map_or(ASSUMED_BANDWIDTH, |r| r as f64)
        };

        match self.opts.max_bandwidth {
            Some(limit) => measured.min(limit.max(1) as f64),
            None => measured,
        }
    }

    /// Sends what is marked now, batch after batch, until a lap finds nothing left or as
    /// many pages went as were pending at the start (so that pages the VMM marks all the
    /// time cannot keep one iteration going).
    fn send_pass(&mut self, n: u32, stage: &'static str) -> Result<IterationStats, MigrationError> {
        let mut it = IterationStats {
            iteration: n,
            stage,
            cpu_throttle_percent: self.throttle.percent(),
            ..IterationStats::default()
        };
        let target = self.saver.remaining_pages();
        if target == 0 {
            return Ok(it);
        }
        let start = Instant::now();
        let bytes0 = self.out.bytes_written();
        let mut sent = 0u64;
        loop {
            self.check_cancel()?;
            if n == 0 {
                self.hold_back_recent_writes();
            }
            let (st, t) = (self.stage, self.opts.write_timeout);
            let b = self
                .saver
                .iterate(&mut self.out)
                .map_err(|e| MigrationError::from_save(st, e, t))?;
            it.pages += b.pages;
            it.zero_pages += b.zero_pages;
            it.held_back_pages += b.held_back;
            sent += b.pages + b.zero_pages;
            let (bytes, left) = (
                self.out.bytes_written(),
                self.saver.remaining_pages() * PAGE_SIZE,
            );
            self.progress.update(|s| {
                s.iteration = n;
                s.transferred_bytes = bytes;
                s.remaining_bytes = left;
            });
            if b.clean || sent >= target {
                break;
            }
        }
        self.saver.hold_back(None);
        let elapsed = start.elapsed();
        it.bytes = self.out.bytes_written() - bytes0;
        it.ms = ms(elapsed);
        self.sent_bytes += it.bytes;
        self.sent_time += elapsed;
        Ok(it)
    }

    /// Lets what the socket holds cross the link while the guest still runs, so that the
    /// guest's pause does not wait for it too: until at most [`DRAINED_BYTES`] are left
    /// unacknowledged (or unread, for a unix socket), for at most [`DRAIN_LIMIT`]. The
    /// kernel signals no such level, so the queue is looked at every millisecond.
    ///
    /// A cancel meanwhile ends the migration here, the guest still running on this side.
    fn drain_queue(&self) -> Result<(), MigrationError> {
        let start = Instant::now();
        while let Some(q) = self.control.send_queue() {
            self.check_cancel()?;
            if q.queued <= DRAINED_BYTES || start.elapsed() >= DRAIN_LIMIT {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        log::debug!(
            "migration: socket drained in {:.3} ms before the pause",
            ms(start.elapsed())
        );
        self.check_cancel()
    }

    /// The first pass leaves alone the pages the guest wrote since the last sync: they
    /// are dirty again already, and the next pass (or post-copy) sends them once. Looked
    /// at before every batch, as the guest goes on writing.
    fn hold_back_recent_writes(&mut self) {
        let recent = self.vm.recent_writes().unwrap_or_else(|e| {
            log::warn!(
                "migration: cannot read what the guest wrote lately ({e}); sending every page"
            );
            None
        });
        self.saver.hold_back(recent);
    }

    /// Pauses the guest, sends the rest of RAM, the states and the end marker.
    fn final_stage(&mut self) -> Result<(), MigrationError> {
        let n = self.iterations.len() as u32;
        self.stage = Stage::Final;
        self.drain_queue()?;
        self.progress.update(|s| s.state = MigrationState::Device);
        let paused_at = Instant::now();
        self.paused_at = Some(paused_at);
        self.paused = self.vm.pause().map_err(self.vm_err("pause"))?;
        let pause_took = paused_at.elapsed();
        self.vm
            .dirty_sync()
            .map_err(self.vm_err("sync the dirty log"))?;
        let synced_at = paused_at.elapsed();
        self.out.set_rate_limit(None);
        let bytes0 = self.out.bytes_written();
        let (st, t) = (self.stage, self.opts.write_timeout);
        let b = self
            .saver
            .complete(&mut self.out)
            .map_err(|e| MigrationError::from_save(st, e, t))?;
        let sent_at = paused_at.elapsed();
        let states = self
            .vm
            .save_state()
            .map_err(self.vm_err("save its state"))?;
        log::debug!(
            "migration: final stage: vCPUs paused in {:.3} ms, log synced at {:.3} ms, \
             RAM sent at {:.3} ms, states saved at {:.3} ms",
            ms(pause_took),
            ms(synced_at),
            ms(sent_at),
            ms(paused_at.elapsed())
        );
        for s in &states {
            self.out.state(&s.name, &s.data).map_err(self.io_err())?;
        }
        self.out.end().map_err(self.io_err())?;
        self.out.flush().map_err(self.io_err())?;
        let it = IterationStats {
            iteration: n,
            stage: "final",
            pages: b.pages,
            zero_pages: b.zero_pages,
            held_back_pages: 0,
            bytes: self.out.bytes_written() - bytes0,
            ms: ms(paused_at.elapsed()),
            dirty_rate: 0.0,
            remaining_bytes: 0,
            cpu_throttle_percent: self.throttle.percent(),
        };
        log::debug!(
            "migration: final stage: {} pages, {} states, {} bytes in {:.3} ms",
            b.pages + b.zero_pages,
            states.len(),
            it.bytes,
            it.ms
        );
        self.iterations.push(it);
        let (bytes, iters) = (self.out.bytes_written(), self.iterations.clone());
        self.progress.update(|s| {
            s.transferred_bytes = bytes;
            s.remaining_bytes = 0;
            s.iterations = iters;
        });
        Ok(())
    }

    /// Waits for the destination's reply.
    fn confirmation(&mut self) -> Result<(), MigrationError> {
        let got = Reply::read_from(&mut self.reader);
        match MigrationError::from_reply(
            self.stage,
            &Reply::Running,
            got,
            self.opts.confirm_timeout,
        ) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// The figures so far.
    fn stats(&self, status: MigrationState, error: Option<String>) -> MigrationStats {
        let total = self.t0.elapsed();
        let saved = self.saver.stats();
        let bytes = self.out.bytes_written();
        MigrationStats {
            status,
            error,
            total_ms: ms(total),
            downtime_ms: ms(self.downtime),
            setup_ms: ms(self.setup),
            transferred_bytes: bytes,
            normal_pages: saved.pages,
            zero_pages: saved.zero_pages,
            skipped_pages: saved.first_pass.absent_pages + saved.first_pass.known_zero_pages,
            iterations: self.iterations.len() as u32,
            throughput_mbps: bytes as f64 * 8.0 / total.as_secs_f64().max(1e-9) / 1e6,
            dirty_pages_rate: self.dirty_rate,
            ram_bytes: self.progress.snapshot().ram_bytes,
            downtime_limit_ms: ms(self.opts.downtime_limit),
            expected_downtime_ms: ms(self.expected_downtime),
            converged: self.converged,
            auto_converge: self.opts.auto_converge,
            cpu_throttle_percent: self.throttle.peak(),
            per_iteration: self.iterations.clone(),
            local: false,
            shared_blocks: 0,
            downtime_confirmed_ms: 0.0,
            postcopy: self.postcopy.clone(),
        }
    }

    fn finish(mut self) -> MigrationStats {
        self.stop_logging();
        self.unthrottle();
        let stats = self.stats(MigrationState::Completed, None);
        log::info!(
            "migration: completed in {:.3} ms (downtime {:.3} ms, {} bytes, {} iterations)",
            stats.total_ms,
            stats.downtime_ms,
            stats.transferred_bytes,
            stats.iterations
        );
        self.progress.finish(stats.clone());
        stats
    }

    fn unthrottle(&mut self) {
        self.throttle.reset(self.vm);
        self.progress.update(|s| s.cpu_throttle_percent = 0);
    }

    fn stop_logging(&mut self) {
        if std::mem::take(&mut self.logging) {
            if let Err(e) = self.vm.stop_dirty_log() {
                log::error!("migration: stopping dirty logging failed: {e}");
            }
        }
    }

    /// Undoes what was done, and records and returns the error (explained by the
    /// destination's reply when it sent one).
    fn fail(mut self, e: MigrationError) -> MigrationError {
        let e = if e.is_transport() && self.two_way {
            self.reply_after_error().unwrap_or(e)
        } else {
            e
        };
        if let Err(err) = self.control.shutdown() {
            log::debug!("migration: shutting the socket down: {err}");
        }
        self.stop_logging();
        // Full speed before it runs on here.
        self.unthrottle();
        // The guest was stopped from the final stage's pause until now: that is the
        // downtime the failure cost it.
        self.downtime = self.paused_at.map_or(Duration::ZERO, |t| t.elapsed());
        let e = if self.guest_elsewhere {
            // Post-copy: the destination runs the guest; never run it here too.
            self.paused = false;
            match e {
                MigrationError::PostcopyLost { .. } => e,
                other => MigrationError::PostcopyLost {
                    why: other.to_string(),
                },
            }
        } else {
            e
        };
        if std::mem::take(&mut self.paused) {
            match self.vm.resume() {
                Ok(()) => log::info!("migration failed; the guest runs on here"),
                Err(err) => log::error!("migration failed, and resuming the guest too: {err}"),
            }
        }
        let status = match e {
            MigrationError::Cancelled { .. } => MigrationState::Cancelled,
            _ => MigrationState::Failed,
        };
        log::error!("migration: {e}");
        let stats = self.stats(status, Some(e.to_string()));
        self.progress.finish(stats);
        e
    }

    /// After a failed write: the destination's reply, if it sent one before closing.
    fn reply_after_error(&mut self) -> Option<MigrationError> {
        self.control
            .set_timeouts(Some(REPLY_AFTER_ERROR), None)
            .ok()?;
        match Reply::read_from(&mut self.reader) {
            Ok(Reply::Failed(message)) => Some(MigrationError::DestinationFailed {
                stage: self.stage,
                message,
            }),
            _ => None,
        }
    }
}
