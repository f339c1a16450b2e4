//! Transports for the stream: [`connect`] (the source) and [`listen`] plus
//! [`Listener::accept`] (the destination) over unix sockets, TCP and snapshot files, each
//! giving a [`Connection`] of boxed reader and writer halves.
//!
//! A socket connection is two-way (the destination confirms on it that it runs); a file is
//! one-way: the source's connection reads nothing, the destination's writes nowhere. A
//! destination's `file:` that is not a regular file (a FIFO) is read through the `pipe`
//! module, so that read timeouts and shutdown bound its reads as they do a socket's.
//!
//! `tcp:` can run over mutual TLS ([`tls`]: [`connect_tls`], [`listen_tls`]); without it
//! the stream is trusted input: it must come from a trusted source over a trusted network.

mod pipe;
pub mod queue;
pub mod tls;
mod uri;

use pipe::{PipeControl, PipeReader};

pub use tls::{TlsClient, TlsError, TlsServer};
pub use uri::{MigrationUri, UriError};

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting (or creating the snapshot file) failed.
    #[error("cannot connect to {uri}: {source}")]
    Connect {
        /// The endpoint.
        uri: String,
        /// The system's error.
        source: io::Error,
    },
    /// Creating the snapshot file failed (a FIFO nobody reads fails at once, ENXIO).
    #[error("cannot create the snapshot {uri}: {source}")]
    Create {
        /// The endpoint.
        uri: String,
        /// The system's error.
        source: io::Error,
    },
    /// Binding (or opening the snapshot file) failed.
    #[error("cannot listen on {uri}: {source}")]
    Listen {
        /// The endpoint.
        uri: String,
        /// The system's error.
        source: io::Error,
    },
    /// A unix socket path that holds something else.
    #[error("cannot listen on {uri}: the path exists and is not a socket")]
    NotASocket {
        /// The endpoint.
        uri: String,
    },
    /// A unix socket path another process listens on (another destination).
    #[error("cannot listen on {uri}: the socket is in use (another process listens on it)")]
    InUse {
        /// The endpoint.
        uri: String,
    },
    /// Accepting failed.
    #[error("accepting on {uri} failed: {source}")]
    Accept {
        /// The endpoint.
        uri: String,
        /// The system's error.
        source: io::Error,
    },
    /// TLS was asked for on a transport other than `tcp:`.
    #[error("TLS needs a tcp: URI, not {uri}")]
    TlsNeedsTcp {
        /// The endpoint.
        uri: String,
    },
    /// The TLS handshake failed, or the peer's certificate was refused: nothing of its
    /// stream was read.
    #[error("TLS with {peer} on {uri} refused: {source}")]
    TlsRefused {
        /// The endpoint.
        uri: String,
        /// The peer's address.
        peer: String,
        /// What failed (rustls's reason, or the certificate's name for --tls-authz).
        source: io::Error,
    },
    /// Nobody connected in time.
    #[error("no connection on {uri} within {timeout:?}")]
    AcceptTimeout {
        /// The endpoint.
        uri: String,
        /// How long was waited.
        timeout: Duration,
    },
}

/// A socket behind a connection, kept for timeouts and shutdown (or a pipe's stand-in).
enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// A destination's snapshot pipe: one-way, its reads bounded through this.
    Pipe(Arc<PipeControl>),
}

/// A socket's reads, its read timeout said as such: the system reports it as EAGAIN
/// ("Resource temporarily unavailable"), which tells a user nothing.
struct TimedReads<S>(S);

/// The read timeout a socket has now.
pub(crate) trait ReadTimeout {
    fn current_read_timeout(&self) -> Option<Duration>;
}

impl ReadTimeout for UnixStream {
    fn current_read_timeout(&self) -> Option<Duration> {
        self.read_timeout().ok().flatten()
    }
}

impl ReadTimeout for TcpStream {
    fn current_read_timeout(&self) -> Option<Duration> {
        self.read_timeout().ok().flatten()
    }
}

impl<S: Read + ReadTimeout> Read for TimedReads<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                let within = self
                    .0
                    .current_read_timeout()
                    .map_or_else(String::new, |t| format!("{t:?} "));
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing received within the {within}read timeout"),
                )
            }
            _ => e,
        })
    }
}

/// One migration stream's transport: a reader and a writer half.
pub struct Connection {
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    socket: Option<Socket>,
    peer: String,
    /// The halves may be used from two threads at once (a plain socket; not TLS, whose
    /// halves share one session, nor a file).
    duplex: bool,
}

impl Connection {
    fn from_tls(tls: tls::TlsStream, tcp: TcpStream, peer: String) -> Connection {
        let (reader, writer) = tls.split();
        Connection {
            reader: Box::new(TimedReads(reader)),
            writer: Box::new(writer),
            socket: Some(Socket::Tcp(tcp)),
            peer,
            duplex: false,
        }
    }

    fn from_unix(s: UnixStream, peer: String) -> io::Result<Connection> {
        Ok(Connection {
            reader: Box::new(TimedReads(s.try_clone()?)),
            writer: Box::new(s.try_clone()?),
            socket: Some(Socket::Unix(s)),
            peer,
            duplex: true,
        })
    }

    fn from_tcp(s: TcpStream, peer: String) -> io::Result<Connection> {
        s.set_nodelay(true)?;
        queue::limit_unsent(&s)?;
        Ok(Connection {
            reader: Box::new(TimedReads(s.try_clone()?)),
            writer: Box::new(s.try_clone()?),
            socket: Some(Socket::Tcp(s)),
            peer,
            duplex: true,
        })
    }

    /// Whether the other end can answer: a socket (the destination confirms on it), not
    /// a snapshot file.
    pub fn is_two_way(&self) -> bool {
        matches!(self.socket, Some(Socket::Unix(_) | Socket::Tcp(_)))
    }

    /// Whether the reader and the writer half may wait at the same time in two threads
    /// (post-copy's return path is read while pages are written): plain sockets only.
    pub fn is_duplex(&self) -> bool {
        self.duplex
    }

    /// A handle that sets timeouts on and shuts down the socket from elsewhere (another
    /// thread, or after the connection was split); a file's does nothing.
    pub fn control(&self) -> io::Result<ConnectionControl> {
        let socket = match &self.socket {
            Some(Socket::Unix(s)) => Some(Socket::Unix(s.try_clone()?)),
            Some(Socket::Tcp(s)) => Some(Socket::Tcp(s.try_clone()?)),
            Some(Socket::Pipe(p)) => Some(Socket::Pipe(p.clone())),
            None => None,
        };
        Ok(ConnectionControl { socket })
    }

    /// Who is at the other end (the URI, or the TCP peer's address).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The reading half.
    pub fn reader(&mut self) -> &mut (dyn Read + Send) {
        &mut *self.reader
    }

    /// The writing half.
    pub fn writer(&mut self) -> &mut (dyn Write + Send) {
        &mut *self.writer
    }

    /// Both halves, to move to different threads.
    pub fn into_split(self) -> (Box<dyn Read + Send>, Box<dyn Write + Send>) {
        (self.reader, self.writer)
    }

    /// Bounds every read and write of a socket (None: wait forever); a regular file ignores
    /// it, a destination's pipe takes the read timeout.
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        set_timeouts(self.socket.as_ref(), read, write)
    }

    /// Shuts a socket down both ways (a blocked peer sees the end of the stream).
    pub fn shutdown(&self) -> io::Result<()> {
        shutdown(self.socket.as_ref())
    }

    /// A unix socket's first `buf.len()` bytes, left in the socket for whoever reads next
    /// (`MSG_PEEK`, waiting within the read timeout for the first message); `None` for
    /// other transports, or when the first message the peer sent is shorter (a peek stops
    /// at a message's end: a peer must send those bytes in one write to be recognised).
    pub fn peek_unix(&self, buf: &mut [u8]) -> io::Result<Option<()>> {
        let Some(Socket::Unix(s)) = &self.socket else {
            return Ok(None);
        };
        loop {
            // SAFETY: `buf` is valid for writes of its length; MSG_PEEK copies at most that.
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_WAITALL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok((n as usize == buf.len()).then_some(()));
        }
    }

    /// The unix socket under the connection (a local migration reads and writes it
    /// itself, to pass descriptors); `None` for other transports.
    pub fn into_unix(self) -> Option<UnixStream> {
        match self.socket {
            Some(Socket::Unix(s)) => Some(s),
            _ => None,
        }
    }
}

fn set_timeouts(
    socket: Option<&Socket>,
    read: Option<Duration>,
    write: Option<Duration>,
) -> io::Result<()> {
    match socket {
        Some(Socket::Unix(s)) => {
            s.set_read_timeout(read)?;
            s.set_write_timeout(write)
        }
        Some(Socket::Tcp(s)) => {
            s.set_read_timeout(read)?;
            s.set_write_timeout(write)
        }
        Some(Socket::Pipe(p)) => {
            p.set_read_timeout(read);
            Ok(())
        }
        None => Ok(()),
    }
}

fn shutdown(socket: Option<&Socket>) -> io::Result<()> {
    match socket {
        Some(Socket::Unix(s)) => s.shutdown(Shutdown::Both),
        Some(Socket::Tcp(s)) => s.shutdown(Shutdown::Both),
        Some(Socket::Pipe(p)) => p.shutdown(),
        None => Ok(()),
    }
}

/// Timeouts and shutdown of a connection's socket, usable after the connection was split
/// or from another thread (a watchdog). Timeouts apply to the socket, hence to both
/// halves.
pub struct ConnectionControl {
    socket: Option<Socket>,
}

impl ConnectionControl {
    /// As [`Connection::set_timeouts`].
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        set_timeouts(self.socket.as_ref(), read, write)
    }

    /// As [`Connection::shutdown`].
    pub fn shutdown(&self) -> io::Result<()> {
        shutdown(self.socket.as_ref())
    }

    /// What the socket holds that the peer has not taken yet, for pacing a background
    /// stream behind urgent data (post-copy): `None` for a file or a pipe.
    pub fn send_queue(&self) -> Option<queue::SendQueue> {
        match self.socket.as_ref()? {
            Socket::Unix(s) => queue::unix(s.as_raw_fd()),
            Socket::Tcp(s) => queue::tcp(s.as_raw_fd()),
            Socket::Pipe(_) => None,
        }
    }
}

/// The source's side: connects to a listening destination, or creates (truncating) a
/// snapshot file.
pub fn connect(uri: &MigrationUri) -> Result<Connection, TransportError> {
    let err = |source| TransportError::Connect {
        uri: uri.to_string(),
        source,
    };
    match uri {
        MigrationUri::Unix(path) => {
            let s = UnixStream::connect(path).map_err(err)?;
            Connection::from_unix(s, uri.to_string()).map_err(err)
        }
        MigrationUri::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).map_err(err)?;
            let peer = s
                .peer_addr()
                .map_or_else(|_| uri.to_string(), |a| a.to_string());
            Connection::from_tcp(s, peer).map_err(err)
        }
        MigrationUri::File(path) => {
            let f = create_snapshot(path).map_err(|source| TransportError::Create {
                uri: uri.to_string(),
                source,
            })?;
            Ok(Connection {
                reader: Box::new(io::empty()),
                writer: Box::new(f),
                socket: None,
                peer: uri.to_string(),
                duplex: false,
            })
        }
    }
}

/// The source's side over mutual TLS: connects to `tcp:HOST:PORT` and runs the handshake
/// with `tls` (the destination's certificate checked against HOST); refused for any other
/// transport.
pub fn connect_tls(uri: &MigrationUri, tls: &TlsClient) -> Result<Connection, TransportError> {
    let MigrationUri::Tcp { host, port } = uri else {
        return Err(TransportError::TlsNeedsTcp {
            uri: uri.to_string(),
        });
    };
    let err = |source| TransportError::Connect {
        uri: uri.to_string(),
        source,
    };
    let s = TcpStream::connect((host.as_str(), *port)).map_err(err)?;
    s.set_nodelay(true).map_err(err)?;
    queue::limit_unsent(&s).map_err(err)?;
    let peer = s
        .peer_addr()
        .map_or_else(|_| uri.to_string(), |a| a.to_string());
    let control = s.try_clone().map_err(err)?;
    let stream = tls
        .handshake(host, s)
        .map_err(|source| TransportError::TlsRefused {
            uri: uri.to_string(),
            peer: peer.clone(),
            source,
        })?;
    Ok(Connection::from_tls(stream, control, peer))
}

enum Listening {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    /// The snapshot's path, and the file opened by `listen` until `accept` takes it: a
    /// FIFO's writer pairs with that open, so closing it in between would leave the
    /// writer with no reader (EPIPE).
    File(PathBuf, std::sync::Mutex<Option<File>>),
}

/// The destination's side before a source connects.
pub struct Listener {
    listening: Listening,
    uri: MigrationUri,
    /// Mutual TLS on every connection accepted.
    tls: Option<TlsServer>,
}

/// The destination's side over mutual TLS: binds `tcp:HOST:PORT`; every connection
/// accepted runs the handshake with `tls` first, and one that fails it is refused
/// ([`TransportError::TlsRefused`]) with the listener still listening.
pub fn listen_tls(uri: &MigrationUri, tls: TlsServer) -> Result<Listener, TransportError> {
    if !matches!(uri, MigrationUri::Tcp { .. }) {
        return Err(TransportError::TlsNeedsTcp {
            uri: uri.to_string(),
        });
    }
    let mut listener = listen(uri)?;
    listener.tls = Some(tls);
    Ok(listener)
}

/// The destination's side: binds a socket (a stale unix socket file is replaced, as
/// QEMU does) or checks that the snapshot file opens.
pub fn listen(uri: &MigrationUri) -> Result<Listener, TransportError> {
    let err = |source| TransportError::Listen {
        uri: uri.to_string(),
        source,
    };
    let (listening, uri) = match uri {
        MigrationUri::Unix(path) => {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_socket() => {
                    if unix_path_listening(path) {
                        return Err(TransportError::InUse {
                            uri: uri.to_string(),
                        });
                    }
                    std::fs::remove_file(path).map_err(err)?
                }
                Ok(_) => {
                    return Err(TransportError::NotASocket {
                        uri: uri.to_string(),
                    })
                }
                Err(_) => {}
            }
            let l = UnixListener::bind(path).map_err(err)?;
            (Listening::Unix(l, path.clone()), uri.clone())
        }
        MigrationUri::Tcp { host, port } => {
            let l = TcpListener::bind((host.as_str(), *port)).map_err(err)?;
            let port = l.local_addr().map_err(err)?.port();
            let bound = MigrationUri::Tcp {
                host: host.clone(),
                port,
            };
            (Listening::Tcp(l), bound)
        }
        MigrationUri::File(path) => {
            let f = open_snapshot(path).map_err(err)?;
            (
                Listening::File(path.clone(), std::sync::Mutex::new(Some(f))),
                uri.clone(),
            )
        }
    };
    Ok(Listener {
        listening,
        uri,
        tls: None,
    })
}

impl Listener {
    /// Where it listens (for `tcp:HOST:0`, with the port the system chose).
    pub fn uri(&self) -> &MigrationUri {
        &self.uri
    }

    fn fd(&self) -> Option<RawFd> {
        match &self.listening {
            Listening::Unix(l, _) => Some(l.as_raw_fd()),
            Listening::Tcp(l) => Some(l.as_raw_fd()),
            Listening::File(..) => None,
        }
    }

    /// Waits for the source (or opens the snapshot file).
    pub fn accept(&self) -> Result<Connection, TransportError> {
        let err = |source| TransportError::Accept {
            uri: self.uri.to_string(),
            source,
        };
        match &self.listening {
            Listening::Unix(l, _) => {
                let (s, _) = l.accept().map_err(err)?;
                Connection::from_unix(s, self.uri.to_string()).map_err(err)
            }
            Listening::Tcp(l) => {
                let (s, peer) = l.accept().map_err(err)?;
                match &self.tls {
                    None => Connection::from_tcp(s, peer.to_string()).map_err(err),
                    Some(tls) => PendingTls {
                        tcp: s,
                        peer: peer.to_string(),
                        uri: self.uri.to_string(),
                        server: tls.clone(),
                    }
                    .finish(),
                }
            }
            Listening::File(path, opened) => {
                let first = opened.lock().unwrap_or_else(|e| e.into_inner()).take();
                let f = match first {
                    Some(f) => f,
                    None => open_snapshot(path).map_err(err)?,
                };
                let (reader, socket): (Box<dyn Read + Send>, _) =
                    if f.metadata().map_err(err)?.is_file() {
                        (Box::new(f), None)
                    } else {
                        let control = PipeControl::new().map_err(err)?;
                        let reader = PipeReader::new(f, control.clone());
                        (Box::new(reader), Some(Socket::Pipe(control)))
                    };
                Ok(Connection {
                    reader,
                    writer: Box::new(io::sink()),
                    socket,
                    peer: self.uri.to_string(),
                    duplex: false,
                })
            }
        }
    }

    /// [`accept_timeout`](Self::accept_timeout), but a TLS connection comes back with its
    /// handshake still to run ([`Accepted::Handshake`]), for the caller to run where it
    /// holds nobody up (a thread of its own), so that a peer that stalls its handshake
    /// cannot keep the right source out.
    pub fn accept_pending_timeout(&self, timeout: Duration) -> Result<Accepted, TransportError> {
        let (Listening::Tcp(l), Some(tls)) = (&self.listening, &self.tls) else {
            return self.accept_timeout(timeout).map(Accepted::Ready);
        };
        self.wait_readable(timeout)?;
        let (s, peer) = l.accept().map_err(|source| TransportError::Accept {
            uri: self.uri.to_string(),
            source,
        })?;
        Ok(Accepted::Handshake(PendingTls {
            tcp: s,
            peer: peer.to_string(),
            uri: self.uri.to_string(),
            server: tls.clone(),
        }))
    }

    /// [`accept`](Self::accept), giving up after `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Connection, TransportError> {
        if self.fd().is_none() {
            return self.accept();
        }
        self.wait_readable(timeout)?;
        self.accept()
    }

    /// Returns once a connection waits to be accepted, or fails after `timeout`.
    fn wait_readable(&self, timeout: Duration) -> Result<(), TransportError> {
        let Some(fd) = self.fd() else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd for the listener's open descriptor, which
            // `self` keeps open during the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return Ok(());
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(TransportError::Accept {
                        uri: self.uri.to_string(),
                        source: e,
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(TransportError::AcceptTimeout {
                    uri: self.uri.to_string(),
                    timeout,
                });
            }
        }
    }
}

/// What [`Listener::accept_pending_timeout`] gives.
pub enum Accepted {
    /// A connection ready for the stream.
    Ready(Connection),
    /// A TCP connection whose TLS handshake is still to run.
    Handshake(PendingTls),
}

/// An accepted TCP connection before its TLS handshake.
pub struct PendingTls {
    tcp: TcpStream,
    peer: String,
    uri: String,
    server: TlsServer,
}

impl PendingTls {
    /// Who connected.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// A handle that shuts the socket down from elsewhere (ending a handshake under way).
    pub fn control(&self) -> io::Result<ConnectionControl> {
        Ok(ConnectionControl {
            socket: Some(Socket::Tcp(self.tcp.try_clone()?)),
        })
    }

    /// Runs the handshake (within [`tls::HANDSHAKE_TIMEOUT`], all of it): the connection,
    /// or [`TransportError::TlsRefused`] with why.
    pub fn finish(self) -> Result<Connection, TransportError> {
        let PendingTls {
            tcp,
            peer,
            uri,
            server,
        } = self;
        let refused = |source| TransportError::TlsRefused {
            uri: uri.clone(),
            peer: peer.clone(),
            source,
        };
        tcp.set_nodelay(true).map_err(refused)?;
        queue::limit_unsent(&tcp).map_err(refused)?;
        let control = tcp.try_clone().map_err(refused)?;
        let stream = server.handshake(tcp).map_err(refused)?;
        Ok(Connection::from_tls(stream, control, peer))
    }
}

/// Opens a snapshot for reading without waiting: a FIFO opened plainly blocks until a
/// writer comes, out of reach of any timeout (its reads wait for the writer instead, within
/// the read timeout).
/// Whether some process listens on a unix socket bound at `path` (/proc/net/unix: flag
/// `__SO_ACCEPTCON`, 0x10000). Asked without connecting, as a probe connection would be
/// taken by a waiting destination for its source. A socket bound by a relative path
/// elsewhere is not recognised (then the path is replaced, as a stale one).
fn unix_path_listening(path: &std::path::Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let wanted = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let listening = fields
            .get(3)
            .and_then(|f| u32::from_str_radix(f, 16).ok())
            .is_some_and(|flags| flags & 0x10000 != 0);
        // A path with spaces comes split: join it back.
        listening && fields.len() > 7 && std::path::Path::new(&fields[7..].join(" ")) == wanted
    })
}

/// Creates (or truncates) a snapshot file for writing, for its owner only: it holds all of
/// guest memory. Opened non-blocking, so that a FIFO with no reader fails (ENXIO) instead
/// of blocking the migration forever; then blocking again for the writes.
fn create_snapshot(path: &std::path::Path) -> io::Result<File> {
    let f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor `f` owns and keeps open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an int argument on a descriptor `f` owns and keeps open.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

fn open_snapshot(path: &std::path::Path) -> io::Result<File> {
    File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listening::Unix(_, path) = &self.listening {
            let _ = std::fs::remove_file(path);
        }
    }
}
