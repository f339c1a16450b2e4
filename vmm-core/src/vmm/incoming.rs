//! `vmm run --incoming URI` as a process ([`run_incoming`]): the machine built empty and
//! run on the main loop with its vCPUs parked, the stream received beside it on a thread
//! of its own ([`crate::live::destination`], which documents the stages), and how the VMM
//! ends.
//!
//! The control API is served from the start. Until the guest runs here `status` says
//! `"state": "inmigrate"` and `quit`, like SIGINT, SIGTERM or SIGHUP, abandons the
//! migration: the connection is shut down (the source sees its destination go, and
//! resumes its guest) and the VMM ends with a non-zero status and `vmm: incoming migration
//! from URI abandoned: quit through the control API, before the guest ran here`. A stream
//! that fails ends the VMM with exactly one line, `vmm: incoming migration failed: ...`.

use super::control::VmControl;
use super::runner::Runner;
use super::Vmm;
use crate::config::VmmConfig;
use crate::error::VmmError;
use crate::live::destination::{receive, Outcome};
use crate::machine::{Machine, Start};
use crate::vcpu::GuestExit;
use migration::live::IncomingError;
use migration::transport::{listen, listen_tls, MigrationUri, TlsError, TlsServer, UriError};
use std::path::PathBuf;
use std::sync::Arc;

/// Mutual TLS on an incoming `tcp:` migration (`--tls-creds DIR [--tls-authz NAME]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingTls {
    /// The destination's credentials (QEMU's x509 layout: `ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`).
    pub creds: PathBuf,
    /// The only name a source's certificate may carry, if limited.
    pub authz: Option<String>,
}

/// Why `vmm run --incoming` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunIncomingError {
    /// The URI does not parse.
    #[error("bad migration URI: {0}")]
    Uri(#[from] UriError),
    /// The TLS credentials cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Building or running the VM failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The incoming stream was refused or broke, or the guest could not start.
    #[error("incoming migration failed: {0}")]
    Incoming(#[from] IncomingError),
    /// The VMM was told to end before the guest ran here.
    #[error("incoming migration from {uri} abandoned: {by}, before the guest ran here")]
    Abandoned {
        /// Where the stream was to come from.
        uri: String,
        /// What ended the VMM ("quit through the control API", "signal 15").
        by: String,
    },
    /// The receiving thread died.
    #[error("incoming migration failed: the receiving thread panicked")]
    Panicked,
}

/// What ended a VMM whose main loop stopped, in words.
fn ended_by(ended: &Result<GuestExit, VmmError>) -> String {
    match ended {
        Ok(GuestExit::Quit) => "quit through the control API".into(),
        Ok(GuestExit::Signal(sig)) => format!("signal {sig}"),
        Ok(other) => format!("the guest ended ({other:?})"),
        Err(e) => e.to_string(),
    }
}

/// Listens on `uri` (over TLS when `control` holds a TLS server), then receives the
/// stream on a thread of its own; `control` keeps the thread. Returns where it listens
/// (for `tcp:HOST:0`, with the port the system chose).
pub(crate) fn start_receiving(
    machine: &Arc<Machine>,
    control: &VmControl,
    uri: &MigrationUri,
) -> Result<String, RunIncomingError> {
    let listened = match control.incoming_tls() {
        Some(tls) => listen_tls(uri, tls),
        None => listen(uri),
    };
    let listener = listened.map_err(IncomingError::Transport)?;
    let bound = listener.uri().to_string();
    log::info!("waiting for the incoming migration on {bound}");
    let slot = control.incoming().clone();
    slot.begin(listener.uri());
    let m = machine.clone();
    let receiver = std::thread::Builder::new()
        .name("incoming-migration".into())
        .spawn(move || receive(&m, &slot, listener))
        .map_err(|source| VmmError::Host {
            what: "starting the incoming migration thread",
            source,
        })?;
    control.keep_receiver(receiver);
    Ok(bound)
}

/// `vmm run --incoming URI` (or `defer`: QMP's `migrate-incoming` gives the URI later),
/// over mutual TLS with `tls`: builds the VM for the stream, serves its API and receives
/// the stream beside the main loop (see the module documentation), then runs the guest
/// until it ends, as `vmm run` does.
pub fn run_incoming(
    config: VmmConfig,
    uri: &str,
    tls: Option<&IncomingTls>,
) -> Result<GuestExit, RunIncomingError> {
    let uri: Option<MigrationUri> = match uri {
        "defer" => None,
        _ => Some(uri.parse()?),
    };
    let tls = tls
        .map(|t| TlsServer::load(&t.creds, t.authz.as_deref()))
        .transpose()?;
    let vmm = Vmm::new_incoming(config)?;
    let runner = Runner::start(vmm.into_parts(), Start::Parked)?;
    let machine = runner.machine().clone();
    let control = runner.control().clone();
    control.set_incoming_tls(tls);
    let mut bound = "defer".to_string();
    match &uri {
        Some(uri) => match start_receiving(&machine, &control, uri) {
            Ok(b) => bound = b,
            Err(e) => {
                let _ = runner.finish(Ok(()));
                return Err(e);
            }
        },
        None => {
            log::info!("incoming migration deferred: waiting for QMP's migrate-incoming");
            control.incoming().defer();
        }
    }
    let looped = runner.run_loop();
    // The loop ended: the guest, a quit or a signal (then a load under way is cut off
    // here), or the receiving thread's failure.
    control.incoming().abandon();
    let outcome = control.take_receiver().map(|r| r.join());
    if let Some(uri) = control.incoming().uri() {
        bound = uri;
    }
    drop((machine, control));
    let ended = runner.finish(looped);
    match outcome {
        Some(Ok(Outcome::Received(_))) => Ok(ended?),
        Some(Ok(Outcome::Failed(e))) => Err(e.into()),
        Some(Ok(Outcome::Abandoned)) | None => Err(RunIncomingError::Abandoned {
            uri: bound,
            by: ended_by(&ended),
        }),
        Some(Err(_)) => Err(RunIncomingError::Panicked),
    }
}
