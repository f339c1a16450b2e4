//! Mutual TLS for `tcp:` migrations (rustls, its `ring` provider): a stream nobody else can
//! join, read or change. Both ends are authenticated by certificates of one CA; the
//! destination may further limit which client certificate it takes ([`TlsServer`]'s
//! `authz`: a name the certificate must be valid for, QEMU's `tls-authz`). A peer without
//! the right certificate is refused during the handshake, before a byte of its stream is
//! read; a byte changed in flight fails the record's authentication, so the stream breaks
//! instead of carrying it.
//!
//! Credentials are a directory in QEMU's x509 layout: `ca-cert.pem`, `server-cert.pem` and
//! `server-key.pem` for the destination, `client-cert.pem` and `client-key.pem` for the
//! source. The source checks the destination's certificate against the host of the URI
//! (`tcp:HOST:PORT`: a DNS name or an IP address in the certificate's names).

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a handshake may take, all of it: a peer that connects and says nothing, or
/// trickles, holds its own handshake no longer (a destination runs each on a thread of
/// its own, so none holds up another source).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("TLS credentials: cannot read {}: {why}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A certificate file holds no certificate.
    #[error("TLS credentials: {} holds no PEM certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificates or key (a key that does not match its certificate,
    /// a CA that is not one).
    #[error("TLS credentials in {}: {why}", dir.display())]
    Refused {
        /// The directory.
        dir: PathBuf,
        /// rustls's reason.
        why: String,
    },
    /// `--tls-authz` is not a name a certificate can carry.
    #[error("--tls-authz {0:?} is not a DNS name or IP address a certificate can be valid for")]
    BadAuthz(String),
}

/// ring's provider, AES-128-GCM first: as safe as AES-256 for a migration's lifetime,
/// and a quarter fewer rounds per block on a stream of gigabytes.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            && s.suite() != rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            && s.suite() != rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    });
    Arc::new(p)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |e: rustls::pki_types::pem::Error| TlsError::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let path = dir.join("ca-cert.pem");
    let mut roots = RootCertStore::empty();
    for cert in certificates(&path)? {
        roots.add(cert).map_err(|e| TlsError::Refused {
            dir: dir.to_path_buf(),
            why: format!("ca-cert.pem: {e}"),
        })?;
    }
    Ok(roots)
}

fn refused(dir: &Path) -> impl Fn(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Refused {
        dir: dir.to_path_buf(),
        why: e.to_string(),
    }
}

/// The source's credentials: its client certificate, and the CA it trusts.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient")
    }
}

impl TlsClient {
    /// Reads `DIR/ca-cert.pem`, `DIR/client-cert.pem` and `DIR/client-key.pem`.
    pub fn load(dir: &Path) -> Result<TlsClient, TlsError> {
        let roots = roots(dir)?;
        let certs = certificates(&dir.join("client-cert.pem"))?;
        let key = private_key(&dir.join("client-key.pem"))?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(refused(dir))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(refused(dir))?;
        Ok(TlsClient {
            config: Arc::new(config),
        })
    }

    /// Runs the handshake on `tcp` as the client of `host` (bounded by
    /// [`HANDSHAKE_TIMEOUT`]); the stream, or why the destination was not accepted.
    pub(super) fn handshake(&self, host: &str, mut tcp: TcpStream) -> io::Result<TlsStream> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} cannot name a TLS server: {e}"),
            )
        })?;
        let mut conn =
            ClientConnection::new(self.config.clone(), name).map_err(io::Error::other)?;
        // TLS 1.3 finishes the client's side of the handshake before the destination has
        // checked our certificate: wait for its first word after it (a session ticket, or
        // the alert that refuses us), so a refusal is said here, before a byte of the
        // stream goes.
        within_deadline(&mut tcp, |tcp| {
            let settled = !conn.is_handshaking()
                && (conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3)
                    || conn.tls13_tickets_received() > 0);
            if settled {
                return Ok(true);
            }
            conn.complete_io(tcp)?;
            Ok(false)
        })?;
        Ok(TlsStream::new(
            Box::new(rustls::StreamOwned::new(conn, tcp.try_clone()?)),
            tcp,
        ))
    }
}

/// Why `--tls-authz` refused a certificate; rustls shows it with `{:?}`, so both say the
/// sentence alone.
struct AuthzRefused(String);

impl std::fmt::Debug for AuthzRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for AuthzRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AuthzRefused {}

/// WebPKI's client verification, then `--tls-authz`: the certificate must be valid for
/// `name`. Inside the handshake, so a refused source hears the alert at once.
#[derive(Debug)]
struct AuthzVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for AuthzVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let valid = webpki::EndEntityCert::try_from(end_entity)
            .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&self.name).is_ok());
        if !valid {
            let why = format!(
                "the client certificate is not valid for {:?} (--tls-authz)",
                self.name.to_str()
            );
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(AuthzRefused(why))),
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The destination's credentials: its server certificate, the CA its clients' certificates
/// must come from, and the client name it takes, if limited.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer")
    }
}

impl TlsServer {
    /// Reads `DIR/ca-cert.pem`, `DIR/server-cert.pem` and `DIR/server-key.pem`; every
    /// client must present a certificate from that CA, valid for `authz` when given.
    pub fn load(dir: &Path, authz: Option<&str>) -> Result<TlsServer, TlsError> {
        let authz = authz
            .map(|n| {
                ServerName::try_from(n.to_string()).map_err(|_| TlsError::BadAuthz(n.to_string()))
            })
            .transpose()?;
        let roots = Arc::new(roots(dir)?);
        let certs = certificates(&dir.join("server-cert.pem"))?;
        let key = private_key(&dir.join("server-key.pem"))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Refused {
                dir: dir.to_path_buf(),
                why: e.to_string(),
            })?;
        let verifier: Arc<dyn ClientCertVerifier> = match &authz {
            Some(name) => Arc::new(AuthzVerifier {
                inner: verifier,
                name: name.clone(),
            }),
            None => verifier,
        };
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(refused(dir))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(refused(dir))?;
        Ok(TlsServer {
            config: Arc::new(config),
        })
    }

    /// Runs the handshake on an accepted `tcp` (bounded by [`HANDSHAKE_TIMEOUT`]): the
    /// stream, or why the client is refused (no certificate, another CA's, a name
    /// `authz` does not allow, not TLS at all).
    pub(super) fn handshake(&self, mut tcp: TcpStream) -> io::Result<TlsStream> {
        let mut conn = ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        within_deadline(&mut tcp, |tcp| {
            if !conn.is_handshaking() {
                return Ok(true);
            }
            conn.complete_io(tcp)?;
            Ok(false)
        })?;
        Ok(TlsStream::new(
            Box::new(rustls::StreamOwned::new(conn, tcp.try_clone()?)),
            tcp,
        ))
    }
}

/// Calls `step` until it says done, all of it within [`HANDSHAKE_TIMEOUT`] (each wait on
/// the socket bounded by what is left: a peer that trickles a byte at a time gets no more
/// than that); then clears the socket's timeouts.
fn within_deadline(
    tcp: &mut TcpStream,
    mut step: impl FnMut(&mut TcpStream) -> io::Result<bool>,
) -> io::Result<()> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let late = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
        )
    };
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(late());
        }
        if let Err(e) = tcp
            .set_read_timeout(Some(left))
            .and_then(|()| tcp.set_write_timeout(Some(left)))
        {
            break Err(e);
        }
        match step(tcp) {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break Err(late())
            }
            Err(e) => break Err(e),
        }
    };
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    result
}

/// A TLS session's reads and writes (either end).
trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

/// A TLS stream, shared by the connection's reader and writer halves: the driver uses them
/// from one thread at a time, so the lock is never held across the other half's wait.
pub(super) struct TlsStream {
    session: Mutex<Box<dyn Duplex>>,
    /// The socket, for its read timeout in messages.
    tcp: TcpStream,
}

impl TlsStream {
    fn new(session: Box<dyn Duplex>, tcp: TcpStream) -> TlsStream {
        TlsStream {
            session: Mutex::new(session),
            tcp,
        }
    }

    fn session(&self) -> MutexGuard<'_, Box<dyn Duplex>> {
        // A panic inside rustls leaves a session that fails its next call: fine to reuse.
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reading half and the writing half.
    pub(super) fn split(self) -> (TlsHalf, TlsHalf) {
        let shared = Arc::new(self);
        (TlsHalf(shared.clone()), TlsHalf(shared))
    }
}

/// One half of a [`TlsStream`].
pub(super) struct TlsHalf(Arc<TlsStream>);

impl Read for TlsHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.session().read(buf)
    }
}

impl Write for TlsHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.session().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.session().flush()
    }
}

impl super::ReadTimeout for TlsHalf {
    fn current_read_timeout(&self) -> Option<Duration> {
        self.0.tcp.read_timeout().ok().flatten()
    }
}
