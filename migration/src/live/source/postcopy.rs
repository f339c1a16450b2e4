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
use crate::stream::{RateLimiter, PAGE_SIZE};
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages from the return path the driver has not taken yet, at most.
pub const MAX_PENDING_REQUESTS: usize = 4096;

/// Background pages per RAM section: small, so a request waits behind little.
const BACKGROUND_PAGES: u64 = 16;

/// How long the driver waits for a request when the socket is full.
const IDLE_WAIT: Duration = Duration::from_millis(1);

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
        self.check_cancel()?;
        let n = self.iterations.len() as u32;
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
        self.out.postcopy_switch(&runs).map_err(self.io_err())?;
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
        // The guest is stopped here for good (if it goes to run there): nothing writes.
        self.stop_logging();
        self.unthrottle();

        let ReturnPathThread {
            rx,
            flood,
            handle: reader,
        } = self.start_return_path()?;
        let r = self.serve(&rx, paused_at, missing, bytes0);
        // The destination is done with us (or we with it): end the reader's wait.
        if let Err(e) = self.control.shutdown() {
            log::debug!("migration: shutting the socket down: {e}");
        }
        let _ = reader.join();
        match r {
            Err(_) if flood.load(Ordering::Acquire) => Err(MigrationError::BadReturnPath {
                why: format!(
                    "more than {MAX_PENDING_REQUESTS} messages pending on the return path"
                ),
            }),
            r => r,
        }
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

    /// Waits for the destination to run the guest, then serves requests and streams the
    /// rest until the destination has every page.
    fn serve(
        &mut self,
        rx: &mpsc::Receiver<FromDest>,
        paused_at: Instant,
        missing: u64,
        bytes0: u64,
    ) -> Result<(), MigrationError> {
        // Requests may come before the destination says its guest runs (the VMM's own
        // accesses while it restores): they are served alike. Until it says so, a
        // failure resumes the guest here.
        let run_deadline = Instant::now() + self.opts.confirm_timeout;
        let mut started: Option<Instant> = None;
        let mut stats = PostcopyStats {
            postcopy: true,
            postcopy_missing_pages: missing,
            ..PostcopyStats::default()
        };
        // Requests, then the background when the socket has room, the end when all went,
        // then the destination's last word.
        let mut ended = false;
        let mut requests = 0u64;
        // The bandwidth cap holds for the background; a requested page goes at once.
        let mut cap = self.opts.max_bandwidth.map(RateLimiter::new);
        let background_bytes = BACKGROUND_PAGES * (PAGE_SIZE + 16);
        let figures = loop {
            let msg = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return Err(self.closed()),
            };
            let msg = match msg {
                Some(m) => Some(m),
                None if started.is_none() || ended => {
                    let wait = if started.is_none() {
                        run_deadline.saturating_duration_since(Instant::now())
                    } else {
                        self.opts.confirm_timeout
                    };
                    match rx.recv_timeout(wait.min(IDLE_WAIT * 100)) {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Disconnected) => return Err(self.closed()),
                        Err(RecvTimeoutError::Timeout) if started.is_none() => {
                            if Instant::now() >= run_deadline {
                                return Err(MigrationError::ConfirmTimeout {
                                    timeout: self.opts.confirm_timeout,
                                });
                            }
                            None
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            return Err(MigrationError::PostcopyLost {
                                why: format!(
                                    "no word from the destination within {:?} after the last page",
                                    self.opts.confirm_timeout
                                ),
                            })
                        }
                    }
                }
                None if self.saver.remaining_pages() == 0 => {
                    self.out.end().map_err(self.io_err())?;
                    self.out.flush().map_err(self.io_err())?;
                    ended = true;
                    log::debug!("migration: post-copy: every page sent");
                    continue;
                }
                None if self.socket_has_room()
                    && cap
                        .as_mut()
                        .is_none_or(|c| c.has_credit_at(background_bytes, Instant::now())) =>
                {
                    let (st, t) = (self.stage, self.opts.write_timeout);
                    let b = self
                        .saver
                        .send_background(&mut self.out, BACKGROUND_PAGES)
                        .map_err(|e| MigrationError::from_save(st, e, t))?;
                    if let Some(c) = cap.as_mut() {
                        c.take_at(b.bytes, Instant::now());
                    }
                    self.out.flush().map_err(self.io_err())?;
                    self.publish_postcopy();
                    continue;
                }
                None => match rx.recv_timeout(IDLE_WAIT) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Err(self.closed()),
                },
            };
            match msg {
                None => {}
                Some(FromDest::Reply(Reply::PostcopyRunning(_))) if started.is_none() => {
                    self.guest_elsewhere = true;
                    self.vm.handing_over();
                    let switched = paused_at.elapsed();
                    stats.postcopy_switch_ms = ms(switched);
                    started = Some(Instant::now());
                    self.stage = Stage::Postcopy;
                    self.progress
                        .update(|s| s.state = MigrationState::PostcopyActive);
                    log::info!(
                        "migration: post-copy: the destination runs the guest ({:.3} ms \
                         after the pause)",
                        ms(switched)
                    );
                }
                Some(FromDest::Reply(Reply::PageRequest { id, offset, pages })) => {
                    requests += 1;
                    // A destination asks for each missing page once.
                    if requests > missing + MAX_PENDING_REQUESTS as u64 {
                        return Err(MigrationError::BadReturnPath {
                            why: format!(
                                "{requests} page requests, more than the {missing} pages it \
                                 was missing"
                            ),
                        });
                    }
                    if ended {
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
                }
                Some(FromDest::Reply(Reply::PostcopyDone(json))) if ended && started.is_some() => {
                    break serde_json::from_str::<PostcopyFigures>(&json).map_err(|e| {
                        MigrationError::BadConfirmation {
                            why: format!("post-copy figures {json:?}: {e}"),
                        }
                    })?;
                }
                Some(FromDest::Reply(Reply::Failed(message))) if started.is_none() => {
                    return Err(MigrationError::DestinationFailed {
                        stage: self.stage,
                        message,
                    })
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
        let started = started.unwrap_or(paused_at);
        stats.postcopy_requests = figures.requests;
        stats.postcopy_blocktime_ms = figures.blocktime_ms;
        stats.postcopy_fault_p50_ms = figures.fault_p50_ms;
        stats.postcopy_fault_p99_ms = figures.fault_p99_ms;
        stats.postcopy_fault_max_ms = figures.fault_max_ms;
        stats.postcopy_ms = ms(started.elapsed());
        stats.postcopy_bytes = self.out.bytes_written() - bytes0;
        if figures.requests != requests {
            log::debug!(
                "migration: post-copy: the destination counts {} requests, we took {requests}",
                figures.requests
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
        self.postcopy = Some(stats);
        self.paused = false;
        Ok(())
    }

    /// The error for a return path that ended.
    fn ended(&self, e: ReplyError) -> MigrationError {
        let why = match e {
            ReplyError::Io(e) => format!("the connection broke: {e}"),
            ReplyError::Bad(why) => return MigrationError::BadReturnPath { why },
        };
        if self.guest_elsewhere {
            MigrationError::PostcopyLost { why }
        } else {
            MigrationError::DestinationClosed {
                stage: self.stage,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, why),
            }
        }
    }

    /// Whether a background section may go now without queueing a request behind more
    /// than the link holds in flight plus [`MigrateOptions::postcopy_queue_bytes`].
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
