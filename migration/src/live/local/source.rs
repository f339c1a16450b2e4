//! The source's side of a local migration: [`migrate_local`] hands each RAM block's file
//! over, then, the guest paused and RAM hot-plug held off, the layout's changes and the
//! state; it gives the guest up (`go`) only once the destination said it is ready, and
//! resumes it here on any failure before that.

use super::wire::{header, monotonic_ns, send_record, RecordOut, GO};
use crate::live::error::{MigrationError, Stage};
use crate::live::progress::{ms, MigrationProgress, MigrationState, MigrationStats};
use crate::live::reply::{Reply, ReplyError};
use crate::live::{MigratableVm, MigrateOptions};
use crate::stream::StreamWriter;
use crate::transport::{MigrationUri, TransportError};
use ramlist::{Backing, RamList};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// One block as handed over: what tells it apart from a block removed and added again
/// under the same id, and a descriptor of its file kept for sending.
struct Handed {
    id: String,
    len: u64,
    guest_addr: Option<u64>,
    offset: u64,
    /// The file's device and inode.
    file: (u64, u64),
    fd: OwnedFd,
}

impl Handed {
    fn same(&self, other: &Handed) -> bool {
        (
            self.id.as_str(),
            self.len,
            self.guest_addr,
            self.offset,
            self.file,
        ) == (
            other.id.as_str(),
            other.len,
            other.guest_addr,
            other.offset,
            other.file,
        )
    }
}

/// Every block of `ram` with its file, or the first block that has none (or whose file
/// is not sealed: [`check_shareable`]).
fn layout(ram: &RamList) -> Result<Vec<Handed>, MigrationError> {
    check_shareable(ram)?;
    let guard = rcu::read_lock();
    let mut out = Vec::new();
    for b in ram.blocks(&guard) {
        let (Backing::Fd { offset, .. }, Some(fd), true) = (b.backing(), b.fd(), b.is_shared())
        else {
            return Err(MigrationError::NotShareable {
                id: b.id().to_string(),
            });
        };
        let io = |source| MigrationError::Vm {
            op: "share its RAM",
            stage: Stage::Setup,
            source: format!("block {:?}: {source}", b.id()).into(),
        };
        // Our own descriptor: the block's may go with the block once the guard drops.
        let fd = fd.try_clone_to_owned().map_err(io)?;
        let meta = std::fs::File::from(fd.try_clone().map_err(io)?)
            .metadata()
            .map_err(io)?;
        out.push(Handed {
            id: b.id().to_string(),
            len: b.len(),
            guest_addr: b.guest_addr(),
            offset,
            file: (meta.dev(), meta.ino()),
            fd,
        });
    }
    Ok(out)
}

/// Whether every block of `ram` is memory another process can map: `Err` names the first
/// that is not (a local migration is refused before it starts).
pub fn check_shareable(ram: &RamList) -> Result<(), MigrationError> {
    let guard = rcu::read_lock();
    for b in ram.blocks(&guard) {
        let Some(fd) = b.fd().filter(|_| b.is_shared()) else {
            return Err(MigrationError::NotShareable {
                id: b.id().to_string(),
            });
        };
        let sealed = fd
            .try_clone_to_owned()
            .is_ok_and(|fd| super::dest::sealed_against_shrinking(&std::fs::File::from(fd)));
        if !sealed {
            return Err(MigrationError::NotSealed {
                id: b.id().to_string(),
            });
        }
    }
    Ok(())
}

/// Connects to `uri` (`unix:` only) and [`migrate_local`]s.
pub fn migrate_local_to_uri(
    vm: &dyn MigratableVm,
    uri: &MigrationUri,
    opts: &MigrateOptions,
    progress: &MigrationProgress,
) -> Result<MigrationStats, MigrationError> {
    let t0 = Instant::now();
    let connected = match uri {
        MigrationUri::Unix(path) => {
            UnixStream::connect(path).map_err(|source| TransportError::Connect {
                uri: uri.to_string(),
                source,
            })
        }
        other => {
            return Err(failed(
                progress,
                t0,
                MigrationError::LocalNeedsUnix {
                    uri: other.to_string(),
                },
            ))
        }
    };
    match connected {
        Ok(sock) => migrate_local(vm, sock, opts, progress),
        Err(e) => Err(failed(progress, t0, e.into())),
    }
}

fn failed(progress: &MigrationProgress, t0: Instant, e: MigrationError) -> MigrationError {
    progress.start(0);
    progress.finish(MigrationStats {
        status: MigrationState::Failed,
        error: Some(e.to_string()),
        total_ms: ms(t0.elapsed()),
        local: true,
        ..MigrationStats::default()
    });
    e
}

/// Migrates `vm` to the destination at the other end of `sock` by handing its memory
/// over (see the parent module). Returns once the destination said its guest runs. Before
/// the `go`, any failure resumes the guest here (if this call paused it); after it, the
/// guest is the destination's and is never resumed here
/// ([`MigrationError::HandedOver`]).
pub fn migrate_local(
    vm: &dyn MigratableVm,
    sock: UnixStream,
    opts: &MigrateOptions,
    progress: &MigrationProgress,
) -> Result<MigrationStats, MigrationError> {
    let ram = vm.ram();
    progress.start(ram.total_bytes());
    let mut run = Local {
        vm,
        opts,
        progress,
        sock,
        t0: Instant::now(),
        stage: Stage::Setup,
        paused: false,
        paused_at: None,
        paused_ns: 0,
        running_since_ns: None,
        confirmed: None,
        handed_over: false,
        bytes: 0,
        setup: Duration::ZERO,
        blocks: 0,
    };
    match run.go(&ram) {
        Ok(()) => Ok(run.finish()),
        Err(e) => Err(run.fail(e)),
    }
}

struct Local<'a> {
    vm: &'a dyn MigratableVm,
    opts: &'a MigrateOptions,
    progress: &'a MigrationProgress,
    sock: UnixStream,
    t0: Instant,
    stage: Stage,
    /// The guest was running and we paused it.
    paused: bool,
    paused_at: Option<Instant>,
    /// The pause on the host's monotonic clock, and the destination's word for when its
    /// guest ran (the same clock): the guest's downtime, to the nanosecond.
    paused_ns: u64,
    running_since_ns: Option<u64>,
    /// From the pause to the destination's confirmation here.
    confirmed: Option<Duration>,
    /// `go` went out: the guest is the destination's now.
    handed_over: bool,
    bytes: u64,
    setup: Duration,
    /// Blocks handed over, both layouts.
    blocks: u64,
}

impl Local<'_> {
    fn io_err(&self) -> impl FnOnce(io::Error) -> MigrationError {
        let (stage, t) = (self.stage, self.opts.write_timeout);
        move |e| MigrationError::from_io(stage, e, t)
    }

    fn send(&mut self, rec: &RecordOut<'_>, b: Option<&Handed>) -> Result<(), MigrationError> {
        let n = send_record(&self.sock, rec, b.map(|b| b.fd.as_fd())).map_err(self.io_err())?;
        self.bytes += n;
        self.blocks += u64::from(b.is_some());
        Ok(())
    }

    fn add(&mut self, b: &Handed) -> Result<(), MigrationError> {
        let rec = RecordOut::Add {
            id: &b.id,
            len: b.len,
            guest_addr: b.guest_addr,
            offset: b.offset,
        };
        self.send(&rec, Some(b))
    }

    fn go(&mut self, ram: &RamList) -> Result<(), MigrationError> {
        let at_least = |d: Duration| Some(d.max(Duration::from_millis(1)));
        self.sock
            .set_read_timeout(at_least(self.opts.confirm_timeout))
            .and_then(|()| {
                self.sock
                    .set_write_timeout(at_least(self.opts.write_timeout))
            })
            .map_err(self.io_err())?;
        // 1. The guest runs: every block's file goes, and the destination maps them all.
        let first = layout(ram)?;
        (&self.sock).write_all(&header()).map_err(self.io_err())?;
        self.bytes += header().len() as u64;
        for b in &first {
            self.add(b)?;
        }
        self.send(&RecordOut::Done, None)?;
        self.expect(Reply::Mapped)?;
        self.setup = self.t0.elapsed();
        self.progress.update(|s| s.state = MigrationState::Active);
        if self.progress.is_cancelled() {
            return Err(MigrationError::Cancelled { stage: self.stage });
        }

        // 2. Hot-plug held off and the guest paused: what changed since, then the state.
        self.stage = Stage::Final;
        self.progress.update(|s| s.state = MigrationState::Device);
        let _hold = self.vm.hold_ram_layout();
        self.paused_at = Some(Instant::now());
        self.paused_ns = monotonic_ns();
        self.paused = self.vm.pause().map_err(|source| MigrationError::Vm {
            op: "pause",
            stage: Stage::Final,
            source,
        })?;
        let paused_in = self.paused_at.map(|t| t.elapsed());
        let now = layout(ram)?;
        for old in first.iter().filter(|o| !now.iter().any(|n| n.same(o))) {
            self.send(&RecordOut::Del(&old.id), None)?;
        }
        for new in now.iter().filter(|n| !first.iter().any(|o| o.same(n))) {
            self.add(new)?;
        }
        self.send(&RecordOut::Done, None)?;
        let states = self.vm.save_state().map_err(|source| MigrationError::Vm {
            op: "save its state",
            stage: Stage::Final,
            source,
        })?;
        let mut out = StreamWriter::new(&self.sock);
        let wrote = (|| {
            out.header()?;
            out.ram_setup(now.iter().map(|b| (b.id.as_str(), b.len)))?;
            for s in &states {
                out.state(&s.name, &s.data)?;
            }
            out.end()?;
            out.flush()
        })();
        self.bytes += out.bytes_written();
        wrote.map_err(self.io_err())?;
        let sent_in = self.paused_at.map(|t| t.elapsed());

        // 3. The destination has everything and waits: from `go` on, the guest is its.
        self.stage = Stage::Confirmation;
        self.expect(Reply::Ready)?;
        let ready_in = self.paused_at.map(|t| t.elapsed());
        // The guest must still be as its state was sent: paused since our pause. Someone
        // who let it run meanwhile made that state stale, and the destination must not
        // run it: no `go` (it ends without running the guest), and the guest runs on here.
        let vm = self.vm;
        match vm.pause() {
            Ok(false) => {}
            Ok(true) => {
                self.paused = true;
                return Err(MigrationError::Vm {
                    op: "stay paused",
                    stage: Stage::Confirmation,
                    source: "the guest was resumed after its state was sent".into(),
                });
            }
            Err(source) => {
                return Err(MigrationError::Vm {
                    op: "stay paused",
                    stage: Stage::Confirmation,
                    source,
                })
            }
        }
        vm.handing_over();
        self.handed_over = true;
        (&self.sock)
            .write_all(&GO)
            .map_err(|e| MigrationError::HandedOver {
                why: format!("sending go failed: {e}"),
            })?;
        self.bytes += GO.len() as u64;
        let running = self.reply();
        self.confirmed = self.paused_at.map(|t| t.elapsed());
        log::debug!(
            "migration: local downtime: paused in {paused_in:?}, state sent at {sent_in:?}, ready at {ready_in:?}, confirmed at {:?}",
            self.confirmed
        );
        match running {
            Ok(Reply::Running) => Ok(()),
            Ok(Reply::RunningSince(ns)) => {
                // Only an instant between our pause and now is believed.
                if (self.paused_ns..=monotonic_ns()).contains(&ns) {
                    self.running_since_ns = Some(ns);
                }
                Ok(())
            }
            Ok(other) => Err(MigrationError::HandedOver {
                why: format!("it answered {other:?} instead of running"),
            }),
            Err(e) => Err(MigrationError::HandedOver { why: e.to_string() }),
        }
    }

    fn reply(&mut self) -> Result<Reply, ReplyError> {
        Reply::read_from(&mut &self.sock)
    }

    /// Reads the destination's answer and checks it is `want`.
    fn expect(&mut self, want: Reply) -> Result<(), MigrationError> {
        let got = self.reply();
        match MigrationError::from_reply(self.stage, &want, got, self.opts.confirm_timeout) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    fn stats(&self, status: MigrationState, error: Option<String>) -> MigrationStats {
        let total = self.t0.elapsed();
        MigrationStats {
            status,
            error,
            total_ms: ms(total),
            downtime_ms: match (self.running_since_ns, self.confirmed) {
                (Some(ns), _) => (ns - self.paused_ns) as f64 / 1e6,
                (None, Some(c)) => ms(c),
                (None, None) => self.paused_at.map_or(0.0, |t| ms(t.elapsed())),
            },
            downtime_confirmed_ms: self.confirmed.map_or(0.0, ms),
            setup_ms: ms(self.setup),
            transferred_bytes: self.bytes,
            iterations: 1,
            throughput_mbps: self.bytes as f64 * 8.0 / total.as_secs_f64().max(1e-9) / 1e6,
            ram_bytes: self.progress.snapshot().ram_bytes,
            downtime_limit_ms: ms(self.opts.downtime_limit),
            converged: true,
            local: true,
            shared_blocks: self.blocks,
            ..MigrationStats::default()
        }
    }

    fn finish(self) -> MigrationStats {
        let stats = self.stats(MigrationState::Completed, None);
        log::info!(
            "migration: local hand-over completed in {:.3} ms (downtime {:.3} ms, {} bytes, \
             {} blocks' memory passed)",
            stats.total_ms,
            stats.downtime_ms,
            stats.transferred_bytes,
            self.blocks
        );
        self.progress.finish(stats.clone());
        stats
    }

    fn fail(mut self, e: MigrationError) -> MigrationError {
        if let Err(err) = self.sock.shutdown(std::net::Shutdown::Both) {
            log::debug!("migration: shutting the socket down: {err}");
        }
        if self.handed_over {
            // The destination may run the guest on this very memory: never here too.
            log::error!("migration: {e}");
        } else if std::mem::take(&mut self.paused) {
            match self.vm.resume() {
                Ok(()) => log::info!("local migration failed; the guest runs on here"),
                Err(err) => log::error!("local migration failed, and resuming the guest: {err}"),
            }
        }
        let status = match e {
            MigrationError::Cancelled { .. } => MigrationState::Cancelled,
            _ => MigrationState::Failed,
        };
        let stats = self.stats(status, Some(e.to_string()));
        self.progress.finish(stats);
        e
    }
}
