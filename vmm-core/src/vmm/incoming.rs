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

use super::runner::Runner;
use super::Vmm;
use crate::config::VmmConfig;
use crate::error::VmmError;
use crate::live::destination::{receive, Outcome};
use crate::machine::Start;
use crate::vcpu::GuestExit;
use migration::live::IncomingError;
use migration::transport::{listen, listen_tls, MigrationUri, TlsError, TlsServer, UriError};
use std::path::PathBuf;

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

/// `vmm run --incoming URI`, over mutual TLS with `tls`: builds the VM for the stream, serves its API and receives
/// the stream beside the main loop (see the module documentation), then runs the guest
/// until it ends, as `vmm run` does.
pub fn run_incoming(
    config: VmmConfig,
    uri: &str,
    tls: Option<&IncomingTls>,
) -> Result<GuestExit, RunIncomingError> {
    let uri: MigrationUri = uri.parse()?;
    let tls = tls
        .map(|t| TlsServer::load(&t.creds, t.authz.as_deref()))
        .transpose()?;
    let vmm = Vmm::new_incoming(config)?;
    let runner = Runner::start(vmm.into_parts(), Start::Parked)?;
    let machine = runner.machine().clone();
    let slot = runner.control().incoming().clone();
    let listened = match tls {
        Some(tls) => listen_tls(&uri, tls),
        None => listen(&uri),
    };
    let listener = match listened {
        Ok(l) => l,
        Err(e) => {
            let _ = runner.finish(Ok(()));
            return Err(IncomingError::Transport(e).into());
        }
    };
    // For tcp:HOST:0, with the port the system chose.
    let bound = listener.uri().to_string();
    log::info!("waiting for the incoming migration on {bound}");
    slot.begin(listener.uri());
    let (m, s) = (machine.clone(), slot.clone());
    let receiver = std::thread::Builder::new()
        .name("incoming-migration".into())
        .spawn(move || receive(&m, &s, listener));
    let receiver = match receiver {
        Ok(r) => r,
        Err(e) => {
            let _ = runner.finish(Ok(()));
            return Err(VmmError::Host {
                what: "starting the incoming migration thread",
                source: e,
            }
            .into());
        }
    };
    let looped = runner.run_loop();
    // The loop ended: the guest, a quit or a signal (then a load under way is cut off
    // here), or the receiving thread's failure.
    slot.abandon();
    let outcome = receiver.join();
    drop((machine, slot));
    let ended = runner.finish(looped);
    match outcome {
        Ok(Outcome::Received(_)) => Ok(ended?),
        Ok(Outcome::Failed(e)) => Err(e.into()),
        Ok(Outcome::Abandoned) => Err(RunIncomingError::Abandoned {
            uri: bound,
            by: ended_by(&ended),
        }),
        Err(_) => Err(RunIncomingError::Panicked),
    }
}
