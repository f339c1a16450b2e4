//! The source's post-copy (see `crate::postcopy` for the protocol): the switch, then
//! serving the destination's page requests ahead of the background stream until every
//! page went and the destination says it has them all.
//!
//! The return path is read on its own thread, which hands each reply to the driver over
//! a bounded channel: a destination that floods it with more than
//! [`MAX_PENDING_REQUESTS`] unanswered messages is cut off, never buffered without end.
//! Before the destination says its guest runs, any failure resumes the guest here (it
//! never ran there); after, nothing does: the guest runs there, on pages only this side
//! has, and a failure is [`MigrationError::PostcopyLost`].

use super::super::error::{MigrationError, Stage};
use super::super::progress::{ms, IterationStats, MigrationState, PostcopyStats};
use super::super::reply::{Reply, ReplyError};
use super::Run;
use crate::postcopy::PostcopyFigures;
use crate::save::ServeError;
use crate::stream::{BlockRuns, RateLimiter, PAGE_SIZE};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages from the return path the driver has not taken yet, at most.
pub const MAX_PENDING_REQUESTS: usize = 4096;

/// Background pages per RAM section: small, so a request waits behind little.
const BACKGROUND_PAGES: u64 = 16;

/// How often post-copy's progress is published.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// How long the driver waits for a request when the socket is full.
const IDLE_WAIT: Duration = Duration::from_millis(1);

/// Where post-copy stands, across connections.
struct Serving {
    paused_at: Instant,
    /// Pages missing at the switch.
    missing: u64,
    /// Pages missing at the last resume.
    missing_now: u64,
    bytes0: u64,
    /// When the destination said its guest runs.
    started: Option<Instant>,
    /// A background lap found no page left to send.
    drained: bool,
    /// When `status` last got the figures.
    published: Instant,
    /// Every page went, and the end marker: waiting for the destination's last word.
    ended: bool,
    ended_at: Option<Instant>,
    requests: u64,
    /// Requests taken before the last resume.
    requests_base: u64,
    /// The bandwidth cap on the background.
    cap: Option<RateLimiter>,
    stats: PostcopyStats,
}

/// Whether `e` is the link breaking (post-copy pauses) rather than the destination
/// failing or misbehaving (post-copy ends).
fn link_broke(e: &MigrationError) -> bool {
    matches!(
        e,
        MigrationError::DestinationClosed { .. }
            | MigrationError::WriteTimeout { .. }
            | MigrationError::Write { .. }
            | MigrationError::ConfirmTimeout { .. }
    )
}

/// A token no other migration shows: 8 bytes from the kernel's random source.
fn random_token() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `b`, which has them.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        // No random source: the clock still tells migrations apart.
        return crate::live::local::wire::monotonic_ns() ^ u64::from(std::process::id()) << 32;
    }
    u64::from_ne_bytes(b)
}

/// The thread reading the return path, and what it hands over.
struct ReturnPathThread {
    rx: mpsc::Receiver<FromDest>,
    /// Set when it stopped because the driver left too many messages untaken.
    flood: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

/// What the return-path thread hands over.
enum FromDest {
    Reply(Reply),
    /// It stopped: the connection ended or broke, or sent junk.
    Ended(ReplyError),
}

impl Run<'_> {
    /// Whether to switch to post-copy after iteration `n` (0 is the first pass).
    pub(super) fn wants_postcopy(&self, n: u32) -> bool {
        self.duplex
            && (self.progress.postcopy_requested()
                || self.opts.postcopy_after.is_some_and(|k| n + 1 >= k.max(1)))
    }

    /// The switch, then post-copy to its end.
    pub(super) fn postcopy(&mut self) -> Result<(), MigrationError> {
        let _layout = self.vm.hold_ram_layout();
        self.stage = Stage::PostcopySwitch;
        let n = self.iterations.len() as u32;
        self.drain_queue()?;
        self.progress.update(|s| s.state = MigrationState::Device);
        let paused_at = Instant::now();
        self.paused_at = Some(paused_at);
        self.paused = self.vm.pause().map_err(self.vm_err("pause"))?;
        self.vm
            .dirty_sync()
            .map_err(self.vm_err("sync the dirty log"))?;
        self.out.set_rate_limit(None);
        let (st, t) = (self.stage, self.opts.write_timeout);
        let save_err = move |e| MigrationError::from_save(st, e, t);
        let bytes0 = self.out.bytes_written();
        self.saver
            .announce_layout(&mut self.out)
            .map_err(save_err)?;
        let runs = self.saver.pending_runs();
        let missing: u64 = runs
            .iter()
            .flat_map(|b| b.runs.iter().map(|&(_, c)| c))
            .sum();
        self.token = random_token();
        self.out
            .postcopy_switch(self.token, &runs)
            .map_err(self.io_err())?;
        let states = self
            .vm
            .save_state()
            .map_err(self.vm_err("save its state"))?;
        for s in &states {
            self.out.state(&s.name, &s.data).map_err(self.io_err())?;
        }
        self.out.end().map_err(self.io_err())?;
        self.out.flush().map_err(self.io_err())?;
        // QEMU's post-copy downtime: from the stop to the package sent.
        self.downtime = paused_at.elapsed();
        let switch_bytes = self.out.bytes_written() - bytes0;
        log::info!(
            "migration: switched to post-copy in {:.3} ms ({missing} pages to follow, {} \
             states, {switch_bytes} bytes)",
            ms(self.downtime),
            states.len()
        );
        self.iterations.push(IterationStats {
            iteration: n,
            stage: "postcopy-switch",
            bytes: switch_bytes,
            ms: ms(self.downtime),
            remaining_bytes: missing * PAGE_SIZE,
            cpu_throttle_percent: self.throttle.percent(),
            ..IterationStats::default()
        });
        // The package may have arrived: from now on only the destination's explicit
        // failure (sent only while its guest never ran) lets the guest run here again;
        // a link that breaks before its `postcopy-running` pauses, as QEMU does.
        self.guest_elsewhere = true;
        // The guest is stopped here for good (if it goes to run there): nothing writes.
        self.stop_logging();
        self.unthrottle();

        let mut st = Serving {
            paused_at,
            missing,
            missing_now: missing,
            bytes0,
            started: None,
            drained: false,
            published: Instant::now(),
            ended: false,
            ended_at: None,
            requests: 0,
            requests_base: 0,
            cap: self.opts.max_bandwidth.map(RateLimiter::new),
            stats: PostcopyStats {
                postcopy: true,
                postcopy_missing_pages: missing,
                ..PostcopyStats::default()
            },
        };
        let mut link = self.start_return_path()?;
        loop {
            let r = self.serve(&link.rx, &mut st);
            // The destination is done with us (or we with it): end the reader's wait.
            if let Err(e) = self.control.shutdown() {
                log::debug!("migration: shutting the socket down: {e}");
            }
            let _ = link.handle.join();
            let r = match r {
                Err(_) if link.flood.load(Ordering::Acquire) => {
                    Err(MigrationError::BadReturnPath {
                        why: format!(
                            "more than {MAX_PENDING_REQUESTS} messages pending on the return path"
                        ),
                    })
                }
                r => r,
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) if self.guest_elsewhere && link_broke(&e) => {
                    link = self.recover(e, &mut st)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The link broke after the destination started the guest: both sides keep the
    /// guest's memory (`postcopy-paused`) until [`MigrationProgress::resume_postcopy`](crate::live::MigrationProgress::resume_postcopy)
    /// names where the destination listens again; then reconnect, learn which pages it
    /// still misses, and go on. A cancel instead gives the guest up.
    fn recover(
        &mut self,
        e: MigrationError,
        st: &mut Serving,
    ) -> Result<ReturnPathThread, MigrationError> {
        let why = e.to_string();
        log::warn!(
            "migration: post-copy paused: {why}; the guest waits on the destination for \
             its pages (`vmm migrate --resume --to URI` goes on once the destination \
             listens again; if the destination is gone, the guest is lost)"
        );
        // A cancel asked while post-copy ran had no effect: it must not give the guest up
        // now.
        self.progress.clear_cancel();
        self.progress.update(|s| {
            s.state = MigrationState::PostcopyPaused;
            s.error = Some(why.clone());
            s.postcopy_pauses += 1;
        });
        loop {
            let Some(uri) = self.progress.wait_resume() else {
                return Err(MigrationError::PostcopyLost {
                    why: format!("cancelled while paused ({why})"),
                });
            };
            log::info!("migration: post-copy: resuming on {uri}");
            match self.reconnect(&uri, st) {
                Ok(link) => {
                    self.progress.update(|s| {
                        s.state = MigrationState::PostcopyActive;
                        s.error = None;
                        s.postcopy_resume_attempts += 1;
                    });
                    log::info!("migration: post-copy resumed on {uri}");
                    return Ok(link);
                }
                Err(err) => {
                    let msg = format!("resuming on {uri} failed: {err}");
                    log::warn!("migration: {msg}; still paused");
                    self.progress.update(|s| {
                        s.error = Some(msg);
                        s.postcopy_resume_attempts += 1;
                    });
                }
            }
        }
    }

    /// Connects to `uri`, shows the switch's token, takes the pages the destination
    /// still misses as the ones to send, and starts reading the new return path.
    fn reconnect(
        &mut self,
        uri: &crate::transport::MigrationUri,
        st: &mut Serving,
    ) -> Result<ReturnPathThread, MigrationError> {
        if matches!(uri, crate::transport::MigrationUri::File(_)) {
            // Refused before the file is made (or cut to nothing).
            return Err(MigrationError::PostcopyNeedsDuplex {
                what: format!("{uri} (a file)"),
            });
        }
        let conn = crate::transport::connect(uri)?;
        if !conn.is_duplex() {
            return Err(MigrationError::PostcopyNeedsDuplex {
                what: conn.peer().to_string(),
            });
        }
        let io =
            |e: io::Error| MigrationError::from_io(Stage::Postcopy, e, self.opts.write_timeout);
        let at_least = |d: Duration| Some(d.max(Duration::from_millis(1)));
        conn.set_timeouts(
            at_least(self.opts.confirm_timeout),
            at_least(self.opts.write_timeout),
        )
        .map_err(io)?;
        let control = conn.control().map_err(io)?;
        let (mut reader, mut writer) = conn.into_split();
        let mut hello = crate::postcopy::RESUME_MAGIC.to_vec();
        hello.extend_from_slice(&self.token.to_be_bytes());
        writer
            .write_all(&hello)
            .and_then(|()| writer.flush())
            .map_err(io)?;
        let mut missing: Vec<BlockRuns> = Vec::new();
        let mut messages = 0u64;
        let limit = st.missing + MAX_PENDING_REQUESTS as u64;
        loop {
            let reply = Reply::read_from(&mut *reader).map_err(|e| match e {
                ReplyError::Io(e) => io(e),
                ReplyError::Bad(why) => MigrationError::BadReturnPath { why },
            })?;
            messages += 1;
            if messages > limit {
                return Err(MigrationError::BadReturnPath {
                    why: format!("more than {limit} messages listing missing pages"),
                });
            }
            match reply {
                Reply::PostcopyMissing { id, runs } => {
                    // Checked as it comes, so that what is kept is bounded by the
                    // blocks' pages: a block it was sent, runs inside it, ascending and
                    // apart across messages too (what a destination listing its missing
                    // pages sends).
                    let Some(len) = self.saver.sent_block_len(&id) else {
                        return Err(MigrationError::BadReturnPath {
                            why: format!(
                                "missing pages of a block the destination was never sent ({} bytes of id)",
                                id.len()
                            ),
                        });
                    };
                    let pages = len / PAGE_SIZE;
                    if let Some(&(first, n)) = runs
                        .iter()
                        .find(|&&(f, n)| f.checked_add(n).is_none_or(|e| e > pages))
                    {
                        return Err(MigrationError::BadReturnPath {
                            why: format!(
                                "missing pages {first}+{n} past the end of block {id:?} ({pages} pages)"
                            ),
                        });
                    }
                    let at = match missing.iter().position(|b| b.id == id) {
                        Some(i) => i,
                        None => {
                            missing.push(BlockRuns {
                                id,
                                len: 0,
                                runs: Vec::new(),
                            });
                            missing.len() - 1
                        }
                    };
                    let b = &mut missing[at];
                    for (first, n) in runs {
                        let after = b.runs.last().map_or(0, |&(f, c)| f + c);
                        if (first < after && !b.runs.is_empty()) || first.checked_add(n).is_none() {
                            return Err(MigrationError::BadReturnPath {
                                why: format!(
                                    "missing pages of block {:?} not ascending and apart \
                                     (a run at page {first} after page {after})",
                                    b.id
                                ),
                            });
                        }
                        b.runs.push((first, n));
                    }
                }
                Reply::PostcopyResumeReady => break,
                Reply::Failed(message) => {
                    return Err(MigrationError::DestinationFailed {
                        stage: Stage::Postcopy,
                        message,
                    })
                }
                other => {
                    return Err(MigrationError::BadReturnPath {
                        why: format!("{other:?} while listing the missing pages"),
                    })
                }
            }
        }
        let pages = self
            .saver
            .reset_pending(&missing)
            .map_err(|r| MigrationError::BadReturnPath { why: r.to_string() })?;
        log::info!("migration: post-copy: the destination still misses {pages} pages");
        self.out.replace_inner(writer);
        self.control = control;
        self.reader = reader;
        st.ended = false;
        st.drained = false;
        st.requests_base = st.requests;
        st.missing_now = pages;
        if st.started.is_none() {
            // It takes a resume only while its guest runs in post-copy.
            self.started_elsewhere(st);
        }
        self.start_return_path()
    }

    /// Starts the thread that reads the return path.
    fn start_return_path(&mut self) -> Result<ReturnPathThread, MigrationError> {
        // The reader waits as long as post-copy lasts: the socket's read timeout would
        // cut it mid-message. Shutting the socket down ends its wait.
        self.control
            .set_timeouts(
                None,
                Some(self.opts.write_timeout.max(Duration::from_millis(1))),
            )
            .map_err(self.io_err())?;
        let mut reader: Box<dyn Read + Send> =
            std::mem::replace(&mut self.reader, Box::new(io::empty()));
        let (tx, rx) = mpsc::sync_channel(MAX_PENDING_REQUESTS);
        let flood = Arc::new(AtomicBool::new(false));
        let flooded = flood.clone();
        let handle = std::thread::Builder::new()
            .name("postcopy-return".into())
            .spawn(move || loop {
                let msg = match Reply::read_from(&mut *reader) {
                    Ok(r) => FromDest::Reply(r),
                    Err(e) => FromDest::Ended(e),
                };
                let last = matches!(msg, FromDest::Ended(_));
                match tx.try_send(msg) {
                    Ok(()) if !last => {}
                    Ok(()) => return,
                    Err(TrySendError::Full(_)) => {
                        flooded.store(true, Ordering::Release);
                        return;
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
            })
            .map_err(|e| MigrationError::Vm {
                op: "start the return path's thread",
                stage: self.stage,
                source: Box::new(e),
            })?;
        Ok(ReturnPathThread { rx, flood, handle })
    }

    /// Serves one connection: requests first, the background when the socket has room,
    /// the end when every page went, then the destination's last word. Before the
    /// destination says its guest runs, a failure resumes the guest here.
    fn serve(
        &mut self,
        rx: &mpsc::Receiver<FromDest>,
        st: &mut Serving,
    ) -> Result<(), MigrationError> {
        let run_deadline = Instant::now() + self.opts.confirm_timeout;
        let background_bytes = BACKGROUND_PAGES * (PAGE_SIZE + 16);
        let figures = loop {
            let msg = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return Err(self.closed()),
            };
            let msg = match msg {
                Some(m) => Some(m),
                None if st.started.is_none() || st.ended => {
                    let wait = if st.started.is_none() {
                        run_deadline.saturating_duration_since(Instant::now())
                    } else {
                        self.opts.confirm_timeout
                    };
                    match rx.recv_timeout(wait.min(IDLE_WAIT * 100)) {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Disconnected) => return Err(self.closed()),
                        Err(RecvTimeoutError::Timeout) if st.started.is_none() => {
                            if Instant::now() >= run_deadline {
                                return Err(MigrationError::ConfirmTimeout {
                                    timeout: self.opts.confirm_timeout,
                                });
                            }
                            None
                        }
                        Err(RecvTimeoutError::Timeout) => None,
                    }
                }
                None if st.drained => {
                    self.out.end().map_err(self.io_err())?;
                    self.out.flush().map_err(self.io_err())?;
                    st.ended = true;
                    st.ended_at = Some(Instant::now());
                    log::debug!("migration: post-copy: every page sent");
                    continue;
                }
                None if self.socket_has_room()
                    && st
                        .cap
                        .as_mut()
                        .is_none_or(|c| c.has_credit_at(background_bytes, Instant::now())) =>
                {
                    let (stage, t) = (self.stage, self.opts.write_timeout);
                    let b = self
                        .saver
                        .send_background(&mut self.out, BACKGROUND_PAGES)
                        .map_err(|e| MigrationError::from_save(stage, e, t))?;
                    // A whole lap that found nothing: every page went (the guest is
                    // stopped here, so none is marked again).
                    st.drained = b.clean && b.pages + b.zero_pages == 0;
                    if let Some(c) = st.cap.as_mut() {
                        c.take_at(b.bytes, Instant::now());
                    }
                    self.out.flush().map_err(self.io_err())?;
                    // Counting what is left walks the bitmaps: a few times a second.
                    if st.published.elapsed() >= PUBLISH_EVERY {
                        st.published = Instant::now();
                        self.publish_postcopy();
                    }
                    continue;
                }
                None => match rx.recv_timeout(IDLE_WAIT) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Err(self.closed()),
                },
            };
            if st.ended
                && st
                    .ended_at
                    .is_some_and(|t| t.elapsed() >= self.opts.confirm_timeout)
            {
                return Err(MigrationError::PostcopyLost {
                    why: format!(
                        "no word from the destination within {:?} after the last page",
                        self.opts.confirm_timeout
                    ),
                });
            }
            match msg {
                None => {}
                Some(FromDest::Reply(Reply::PostcopyRunning(_))) if st.started.is_none() => {
                    self.started_elsewhere(st);
                }
                Some(FromDest::Reply(Reply::PageRequest { id, offset, pages })) => {
                    st.requests += 1;
                    // A destination asks for each missing page once (per connection).
                    let asked = st.requests - st.requests_base;
                    let missing = st.missing_now.max(st.missing);
                    if asked > missing + MAX_PENDING_REQUESTS as u64 {
                        return Err(MigrationError::BadReturnPath {
                            why: format!(
                                "{asked} page requests, more than the {missing} pages it \
                                 was missing"
                            ),
                        });
                    }
                    if st.ended {
                        // Every page is on its way already.
                        continue;
                    }
                    self.saver
                        .send_requested(&mut self.out, &id, offset, pages)
                        .map_err(|e| match e {
                            ServeError::Refused(r) => {
                                MigrationError::BadReturnPath { why: r.to_string() }
                            }
                            ServeError::Save(e) => {
                                MigrationError::from_save(self.stage, e, self.opts.write_timeout)
                            }
                        })?;
                    self.out.flush().map_err(self.io_err())?;
                    let n = st.requests;
                    self.progress.update(|s| s.postcopy_requests = n);
                }
                Some(FromDest::Reply(Reply::PostcopyDone(json)))
                    if st.ended && st.started.is_some() =>
                {
                    break serde_json::from_str::<PostcopyFigures>(&json).map_err(|e| {
                        MigrationError::BadConfirmation {
                            why: format!("post-copy figures {json:?}: {e}"),
                        }
                    })?;
                }
                Some(FromDest::Reply(Reply::Failed(message))) if st.started.is_none() => {
                    // Sent only while its guest never ran: the guest may run here again.
                    self.guest_elsewhere = false;
                    return Err(MigrationError::DestinationFailed {
                        stage: self.stage,
                        message,
                    });
                }
                Some(FromDest::Reply(Reply::Failed(message))) => {
                    return Err(MigrationError::PostcopyLost {
                        why: format!("the destination failed: {message}"),
                    })
                }
                Some(FromDest::Reply(other)) => {
                    return Err(MigrationError::BadReturnPath {
                        why: format!("{other:?} during post-copy"),
                    })
                }
                Some(FromDest::Ended(e)) => return Err(self.ended(e)),
            }
        };
        let started = st.started.unwrap_or(st.paused_at);
        let stats = &mut st.stats;
        stats.postcopy_requests = figures.requests;
        stats.postcopy_blocktime_ms = figures.blocktime_ms;
        stats.postcopy_fault_p50_ms = figures.fault_p50_ms;
        stats.postcopy_fault_p99_ms = figures.fault_p99_ms;
        stats.postcopy_fault_max_ms = figures.fault_max_ms;
        stats.postcopy_ms = ms(started.elapsed());
        stats.postcopy_bytes = self.out.bytes_written() - st.bytes0;
        if figures.requests != st.requests {
            log::debug!(
                "migration: post-copy: the destination counts {} requests, we took {}",
                figures.requests,
                st.requests
            );
        }
        log::info!(
            "migration: post-copy done: {} requests, blocktime {:.3} ms, fault latency \
             p50 {:.3} ms p99 {:.3} ms",
            figures.requests,
            figures.blocktime_ms,
            figures.fault_p50_ms,
            figures.fault_p99_ms
        );
        self.postcopy = Some(stats.clone());
        self.paused = false;
        Ok(())
    }

    /// The destination runs the guest: it never runs here again.
    fn started_elsewhere(&mut self, st: &mut Serving) {
        self.guest_elsewhere = true;
        self.vm.handing_over();
        let switched = st.paused_at.elapsed();
        st.stats.postcopy_switch_ms = ms(switched);
        st.started = Some(Instant::now());
        self.stage = Stage::Postcopy;
        self.progress
            .update(|s| s.state = MigrationState::PostcopyActive);
        log::info!(
            "migration: post-copy: the destination runs the guest ({:.3} ms after the \
             pause)",
            ms(switched)
        );
    }

    /// The error for a return path that ended.
    /// (After the switch a closed connection pauses post-copy; `fail` names a guest
    /// lost.)
    fn ended(&self, e: ReplyError) -> MigrationError {
        match e {
            ReplyError::Io(e) => MigrationError::DestinationClosed {
                stage: self.stage,
                source: e,
            },
            ReplyError::Bad(why) => MigrationError::BadReturnPath { why },
        }
    }

    /// Whether a background section may go now without queueing a request behind more
    /// than the link holds in flight plus [`MigrateOptions::postcopy_queue_bytes`](super::MigrateOptions::postcopy_queue_bytes).
    fn socket_has_room(&self) -> bool {
        match self.control.send_queue() {
            Some(q) => q.queued < q.bdp.unwrap_or(0) + self.opts.postcopy_queue_bytes,
            None => true,
        }
    }

    /// The error for a return path that is gone with no word.
    fn closed(&self) -> MigrationError {
        self.ended(ReplyError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the return path closed",
        )))
    }

    fn publish_postcopy(&self) {
        let (bytes, left) = (
            self.out.bytes_written(),
            self.saver.remaining_pages() * PAGE_SIZE,
        );
        self.progress.update(|s| {
            s.transferred_bytes = bytes;
            s.remaining_bytes = left;
        });
    }
}
