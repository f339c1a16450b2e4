//! [`MigrationError`] (the source) and [`IncomingError`] (the destination): what failed,
//! and at which [`Stage`] of the migration.

use super::VmError;
use crate::load::LoadError;
use crate::save::SaveError;
use crate::transport::TransportError;
use std::fmt;
use std::io;
use std::time::Duration;

/// Where the source was when something failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Starting dirty logging, sending the header and RAM setup, the first-pass scan.
    Setup,
    /// Iteration `n` (0 is the first pass) with the guest running.
    Iteration(u32),
    /// The guest paused: the rest of RAM, the states, the end marker.
    Final,
    /// Everything sent: waiting for the destination to say its guest runs.
    Confirmation,
    /// The guest paused: the switch to post-copy (the pages to drop, the states).
    PostcopySwitch,
    /// The guest runs on the destination: serving its page requests, streaming the rest.
    Postcopy,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Setup => write!(f, "setup"),
            Stage::Iteration(0) => write!(f, "the first pass"),
            Stage::Iteration(n) => write!(f, "iteration {n}"),
            Stage::Final => write!(f, "the final stage (guest paused)"),
            Stage::Confirmation => write!(f, "the wait for the destination's confirmation"),
            Stage::PostcopySwitch => write!(f, "the switch to post-copy (guest paused)"),
            Stage::Postcopy => write!(f, "post-copy (guest running on the destination)"),
        }
    }
}

/// Why a migration failed on the source. Whatever it is, the driver had stopped dirty
/// logging and resumed the guest (if it had paused it) before returning it.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The destination could not be reached.
    #[error(transparent)]
    Connect(#[from] TransportError),
    /// A call into the VMM failed.
    #[error("the VM could not {op} during {stage}: {source}")]
    Vm {
        /// What was asked ("start dirty logging", "sync the dirty log", "pause",
        /// "save its state").
        op: &'static str,
        /// Where.
        stage: Stage,
        /// The VMM's error.
        source: VmError,
    },
    /// The destination closed the connection (killed, or refused the stream without
    /// saying why).
    #[error("the destination closed the connection during {stage}: {source}")]
    DestinationClosed {
        /// Where.
        stage: Stage,
        /// The transport's error (broken pipe, reset, end of stream).
        source: io::Error,
    },
    /// The destination reported a failure on the return path.
    #[error("the destination failed during {stage}: {message}")]
    DestinationFailed {
        /// Where the source was when it learnt it.
        stage: Stage,
        /// The destination's message.
        message: String,
    },
    /// A write to the destination did not complete in time.
    #[error("the destination stopped reading during {stage} (no progress for {timeout:?})")]
    WriteTimeout {
        /// Where.
        stage: Stage,
        /// The write timeout.
        timeout: Duration,
    },
    /// Writing the stream failed otherwise.
    #[error("writing the migration stream failed during {stage}: {source}")]
    Write {
        /// Where.
        stage: Stage,
        /// The transport's error.
        source: io::Error,
    },
    /// The saver refused (more blocks than the stream carries...).
    #[error("saving RAM failed during {stage}: {source}")]
    Save {
        /// Where.
        stage: Stage,
        /// The saver's error.
        source: SaveError,
    },
    /// No answer from the destination in time.
    #[error("the destination did not confirm within {timeout:?}")]
    ConfirmTimeout {
        /// How long was waited.
        timeout: Duration,
    },
    /// The destination answered something that is not a reply.
    #[error("bad answer from the destination: {why}")]
    BadConfirmation {
        /// What was wrong with it.
        why: String,
    },
    /// A local migration needs memory another process can map.
    #[error("a local migration needs guest RAM another process can map, and block {id:?} is private to this process (anonymous memory, or a snapshot mapped copy-on-write): start the VM with --memory-backend memfd or file:DIR")]
    NotShareable {
        /// The first block that is not.
        id: String,
    },
    /// A local migration hands over only files sealed against shrinking: a destination
    /// maps nothing its source could cut short under the guest.
    #[error("a local migration hands over only memory sealed against shrinking, and block {id:?}'s file cannot be sealed (a file in a directory, --memory-backend file:DIR): start the VM with --memory-backend memfd")]
    NotSealed {
        /// The first block that is not.
        id: String,
    },
    /// A local migration passes descriptors over a unix socket.
    #[error(
        "a local migration needs a unix: URI (descriptors pass only over a unix socket), not {uri}"
    )]
    LocalNeedsUnix {
        /// The URI given.
        uri: String,
    },
    /// A local migration failed after the source gave its guest up (`go`): the
    /// destination may run it on the same memory, so it is not resumed here.
    #[error("the destination took the guest over and then did not confirm ({why}): the guest is not resumed here, since it may run there on the same memory; if the destination is gone, the guest is lost")]
    HandedOver {
        /// What happened after `go`.
        why: String,
    },
    /// Post-copy needs a connection whose two halves work at once (the return path is
    /// read while pages go out): a plain unix or tcp socket.
    #[error("post-copy needs a plain unix: or tcp: connection (its return path is read while pages go out); {what} cannot carry it")]
    PostcopyNeedsDuplex {
        /// What the connection was.
        what: String,
    },
    /// Post-copy broke after the destination started the guest: it runs there with pages
    /// that only this side has, so it is not resumed here.
    #[error("post-copy failed after the guest started on the destination ({why}): the guest is not resumed here, since the destination runs it; unless the destination can be reached again, the guest is lost")]
    PostcopyLost {
        /// What happened.
        why: String,
    },
    /// The destination's return path asked for something wrong, or too much.
    #[error("the destination's return path was refused: {why}")]
    BadReturnPath {
        /// What was wrong.
        why: String,
    },
    /// [`MigrationProgress::cancel`](super::MigrationProgress::cancel) was called.
    #[error("migration cancelled during {stage}")]
    Cancelled {
        /// Where.
        stage: Stage,
    },
}

impl MigrationError {
    /// The error for a failed write (or flush) of the stream.
    pub(super) fn from_io(stage: Stage, e: io::Error, write_timeout: Duration) -> MigrationError {
        use io::ErrorKind::*;
        match e.kind() {
            BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof | NotConnected => {
                MigrationError::DestinationClosed { stage, source: e }
            }
            WouldBlock | TimedOut => MigrationError::WriteTimeout {
                stage,
                timeout: write_timeout,
            },
            _ => MigrationError::Write { stage, source: e },
        }
    }

    /// The error for a failed save.
    pub(super) fn from_save(stage: Stage, e: SaveError, write_timeout: Duration) -> MigrationError {
        match e {
            SaveError::Io(e) => MigrationError::from_io(stage, e, write_timeout),
            e => MigrationError::Save { stage, source: e },
        }
    }

    /// The error for the destination's answer `got` when `want` was due at `stage`
    /// (`None`: the answer was `want`).
    pub(super) fn from_reply(
        stage: Stage,
        want: &super::Reply,
        got: Result<super::Reply, super::ReplyError>,
        confirm_timeout: Duration,
    ) -> Option<MigrationError> {
        use super::{Reply, ReplyError};
        Some(match got {
            Ok(r) if r == *want => return None,
            Ok(Reply::Failed(message)) => MigrationError::DestinationFailed { stage, message },
            Ok(other) => MigrationError::BadConfirmation {
                why: format!("{other:?} where {want:?} was due"),
            },
            Err(ReplyError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                MigrationError::ConfirmTimeout {
                    timeout: confirm_timeout,
                }
            }
            Err(ReplyError::Io(e)) => MigrationError::DestinationClosed { stage, source: e },
            Err(ReplyError::Bad(why)) => MigrationError::BadConfirmation { why },
        })
    }

    /// Whether the failure came from the connection (a reply may explain it).
    pub(super) fn is_transport(&self) -> bool {
        matches!(
            self,
            MigrationError::DestinationClosed { .. }
                | MigrationError::WriteTimeout { .. }
                | MigrationError::Write { .. }
        )
    }
}

/// Why an incoming migration failed on the destination.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// Listening or accepting failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Setting the socket's timeouts failed.
    #[error("setting up the connection failed: {0}")]
    Setup(io::Error),
    /// The stream was refused, truncated, or stalled past the read timeout.
    #[error("loading the migration stream failed: {0}")]
    Load(#[source] LoadError),
    /// The whole load took longer than the deadline.
    #[error("the source did not finish within {0:?}")]
    Deadline(Duration),
    /// The VM refused the states.
    #[error("restoring the VM's state failed: {0}")]
    Restore(#[source] VmError),
    /// The VM would not start.
    #[error("resuming the VM failed: {0}")]
    Resume(#[source] VmError),
    /// A local migration's layout was refused (a bad record, a file that does not hold
    /// its block, a stray descriptor...).
    #[error("the source's memory hand-over was refused: {0}")]
    Layout(#[source] super::local::LayoutError),
    /// A local migration's source did not give the guest up (no `go` after ready: it
    /// resumed its guest, or died); the guest never ran here.
    #[error("the source did not hand the guest over after ready: {0}")]
    NoGo(io::Error),
    /// The switch to post-copy could not be made here (no userfaultfd, a block that
    /// cannot be registered...): the guest never ran here, and the source may resume it.
    #[error("the switch to post-copy failed here: {0}")]
    PostcopySetup(String),
    /// After the switch to post-copy the stream broke or was refused: the guest had
    /// started here, and pages it needs may now never come. It is lost unless the
    /// source reconnects (post-copy recovery).
    #[error("post-copy broke after the guest started here; pages are still missing: {0}")]
    PostcopyLost(#[source] LoadError),
    /// The guest runs here, but the confirmation could not be sent: the source may have
    /// given up and resumed its own copy. The VMM decides (quitting is the safe choice).
    #[error("the guest runs, but confirming to the source failed: {0}")]
    Confirm(io::Error),
}
