//! The API server on the main loop: the listening socket and each client are io handlers
//! of the [`EventLoop`]; each client has an idle timer on the loop's timer list.
//!
//! A client sends lines; each complete line gets exactly one answer line, in order. No
//! client can hold up another or the guest: sockets are non-blocking, a line longer than
//! [`Limits::max_line`] is answered with an error and the client dropped, a client that
//! sends no complete request for [`Limits::idle_timeout`] is told so and dropped, one that
//! does not read its answers is dropped once [`MAX_PENDING_OUTPUT`] bytes wait for it, and
//! clients beyond [`Limits::max_clients`] are answered with an error and closed at once.

use super::protocol::{answer_err, answer_ok, ApiError, Request};
use super::socket::ApiSocket;
use super::Control;
use crate::event_loop::{EventLoop, HandlerId, TimerId};
use serde_json::json;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;

/// Answers waiting for a client that does not read them, at most.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// How long the answer to `quit` may take to leave before the VMM exits anyway.
const QUIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the listener rests after an accept error (out of descriptors, say): epoll is
/// level-triggered, so retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Bytes read from one client per wake-up (epoll is level-triggered: the rest waits for
/// the next pass, so one busy client cannot starve the others).
const READ_CHUNK: usize = 16 << 10;

/// What the server tolerates from clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line, newline excluded.
    pub max_line: usize,
    /// Most clients connected at once.
    pub max_clients: usize,
    /// A client with no complete request for this long is dropped.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 64 << 10,
            max_clients: 64,
            idle_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// The defaults, with the idle timeout from `VMM_API_IDLE_TIMEOUT_MS` when set (for
    /// tests that watch a silent client being dropped).
    pub fn from_env() -> Limits {
        let mut limits = Limits::default();
        if let Some(ms) = std::env::var("VMM_API_IDLE_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            limits.idle_timeout = Duration::from_millis(ms.max(1));
        }
        limits
    }
}

/// State shared by the listener and every client handler.
struct Server {
    /// Taken (and the file removed) at shutdown.
    socket: Mutex<Option<ApiSocket>>,
    control: Arc<dyn Control>,
    limits: Limits,
    /// The connected clients, by handler.
    clients: Mutex<HashMap<HandlerId, Weak<Client>>>,
}

/// The running API server. [`ApiServer::shutdown`] ends it.
pub struct ApiServer {
    server: Arc<Server>,
    listener: HandlerId,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent; a panic cannot half-update it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ApiServer {
    /// Serves `socket` on `lp`, handing commands to `control`.
    pub fn start(
        lp: &EventLoop,
        socket: ApiSocket,
        control: Arc<dyn Control>,
        limits: Limits,
    ) -> io::Result<ApiServer> {
        let fd = socket.listener().as_raw_fd();
        let server = Arc::new(Server {
            socket: Mutex::new(Some(socket)),
            control,
            limits,
            clients: Mutex::new(HashMap::new()),
        });
        let s = server.clone();
        let listener = lp.add_io(
            fd,
            EventSet::IN,
            move |lp: &EventLoop, id: HandlerId, _: EventSet| s.accept_all(lp, id),
        )?;
        Ok(ApiServer { server, listener })
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        lock(&self.server.clients).len()
    }

    /// Stops listening, drops every client and removes the socket file.
    pub fn shutdown(self, lp: &EventLoop) {
        lp.remove_io(self.listener);
        let clients: Vec<_> = lock(&self.server.clients).drain().collect();
        for (id, client) in clients {
            if let Some(client) = client.upgrade() {
                client.close(lp, id);
            }
        }
        drop(lock(&self.server.socket).take());
    }
}

impl Server {
    fn accept_all(self: &Arc<Self>, lp: &EventLoop, listener: HandlerId) {
        loop {
            let accepted = match lock(&self.socket).as_ref() {
                Some(socket) => socket.listener().accept(),
                None => return,
            };
            match accepted {
                Ok((stream, _)) => self.admit(lp, stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("api: accept: {e}; not accepting for {ACCEPT_BACKOFF:?}");
                    if lp.set_events(listener, EventSet::empty()).is_ok() {
                        lp.arm_timer(
                            Instant::now() + ACCEPT_BACKOFF,
                            Arc::new(move |lp: &EventLoop| {
                                // Gone at shutdown: nothing to resume then.
                                let _ = lp.set_events(listener, EventSet::IN);
                            }),
                        );
                    }
                    return;
                }
            }
        }
    }

    fn admit(self: &Arc<Self>, lp: &EventLoop, stream: UnixStream) {
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("api: a client socket cannot be made non-blocking: {e}");
            return;
        }
        if lock(&self.clients).len() >= self.limits.max_clients {
            log::warn!("api: too many clients; refusing one");
            let answer = answer_err(&ApiError::TooManyClients(self.limits.max_clients));
            // Best effort: a fresh socket's buffer takes one short line.
            let _ = (&stream).write_all(answer.as_bytes());
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        let fd = stream.as_raw_fd();
        let client = Arc::new(Client {
            server: self.clone(),
            state: Mutex::new(ClientState {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                timer: None,
                closed: false,
            }),
        });
        let c = client.clone();
        let id = match lp.add_io(
            fd,
            EventSet::IN,
            move |lp: &EventLoop, id: HandlerId, ev: EventSet| c.ready(lp, id, ev),
        ) {
            Ok(id) => id,
            Err(e) => {
                log::warn!("api: cannot watch a client: {e}");
                return;
            }
        };
        let c = client.clone();
        let timer = lp.arm_timer(
            Instant::now() + self.limits.idle_timeout,
            Arc::new(move |lp: &EventLoop| c.idle(lp, id)),
        );
        lock(&client.state).timer = Some(timer);
        lock(&self.clients).insert(id, Arc::downgrade(&client));
    }
}

/// One connected client.
struct Client {
    server: Arc<Server>,
    state: Mutex<ClientState>,
}

struct ClientState {
    stream: UnixStream,
    /// Bytes received and not yet a complete line.
    input: Vec<u8>,
    /// Answers not yet written.
    output: Vec<u8>,
    timer: Option<TimerId>,
    closed: bool,
}

/// What reading left the client in.
enum After {
    Open,
    /// Close once the pending output is written (end of input, or a fatal error).
    Close,
    /// Quit: flush, close, and stop the loop.
    Quit,
}

impl Client {
    fn ready(&self, lp: &EventLoop, id: HandlerId, events: EventSet) {
        let mut state = lock(&self.state);
        if state.closed {
            return;
        }
        let after = if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.read(lp, &mut state)
        } else {
            After::Open
        };
        match after {
            After::Quit => {
                self.server.control.quit();
                flush_blocking(&mut state, QUIT_FLUSH_TIMEOUT);
                drop(state);
                self.close(lp, id);
                lp.stop();
            }
            After::Close => {
                // Best effort for the last answers; a client that left reads nothing.
                let _ = flush(&mut state);
                drop(state);
                self.close(lp, id);
            }
            After::Open => match flush(&mut state) {
                Ok(()) if state.output.len() > MAX_PENDING_OUTPUT => {
                    log::warn!("api: a client does not read its answers; dropping it");
                    drop(state);
                    self.close(lp, id);
                }
                Ok(()) => {
                    let want = if state.output.is_empty() {
                        EventSet::IN
                    } else {
                        EventSet::IN | EventSet::OUT
                    };
                    drop(state);
                    if let Err(e) = lp.set_events(id, want) {
                        log::warn!("api: watching a client: {e}");
                        self.close(lp, id);
                    }
                }
                Err(e) => {
                    log::debug!("api: writing to a client: {e}");
                    drop(state);
                    self.close(lp, id);
                }
            },
        }
    }

    /// Reads what is there (one chunk), answers every complete line.
    fn read(&self, lp: &EventLoop, state: &mut ClientState) -> After {
        let limits = self.server.limits;
        let mut buf = [0u8; 4096];
        let mut total = 0;
        let mut eof = false;
        while total < READ_CHUNK {
            match state.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    total += n;
                    state.input.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("api: reading from a client: {e}");
                    return After::Close;
                }
            }
        }
        let mut answered = false;
        while let Some(end) = state.input.iter().position(|&b| b == b'\n') {
            if end > limits.max_line {
                break;
            }
            let line: Vec<u8> = state.input.drain(..=end).collect();
            answered = true;
            match self.answer(&line[..end], &mut state.output) {
                After::Open => {}
                other => return other,
            }
        }
        if state.input.len() > limits.max_line {
            log::warn!("api: a request line exceeds {} bytes", limits.max_line);
            state.input.clear();
            let answer = answer_err(&ApiError::LineTooLong(limits.max_line));
            state.output.extend_from_slice(answer.as_bytes());
            return After::Close;
        }
        if eof {
            // A last request without its newline is still a request.
            let line = std::mem::take(&mut state.input);
            return match self.answer(&line, &mut state.output) {
                After::Quit => After::Quit,
                _ => After::Close,
            };
        }
        if answered {
            if let Some(timer) = state.timer {
                lp.rearm_timer(timer, Instant::now() + limits.idle_timeout);
            }
        }
        After::Open
    }

    /// Runs one request line and queues its answer. Blank lines are ignored.
    fn answer(&self, line: &[u8], output: &mut Vec<u8>) -> After {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return After::Open;
        }
        let control = &self.server.control;
        let request = Request::parse(line);
        log::debug!("api: request {request:?}");
        let mut after = After::Open;
        let answer = match request {
            Err(e) => Err(e),
            Ok(Request::Status) => Ok(answer_ok(&control.status())),
            Ok(Request::Pause) => control
                .pause()
                .map(|()| answer_ok(&json!({"state": "paused"}))),
            Ok(Request::Resume) => control
                .resume()
                .map(|()| answer_ok(&json!({"state": "running"}))),
            Ok(Request::Quit) => {
                after = After::Quit;
                Ok(answer_ok(&json!({"state": "stopping"})))
            }
            Ok(Request::RamAdd { id, size }) => control.ram_add(&id, size).map(|b| answer_ok(&b)),
            Ok(Request::RamRemove { id }) => control
                .ram_remove(&id)
                .map(|()| answer_ok(&json!({ "id": id }))),
            Ok(Request::Migrate(params)) => control
                .migrate(&params)
                .map(|()| answer_ok(&json!({"state": "migrating", "uri": params.uri}))),
        };
        let answer = answer.unwrap_or_else(|e| {
            log::info!("api: refused: {e}");
            answer_err(&e)
        });
        output.extend_from_slice(answer.as_bytes());
        after
    }

    /// The idle timer fired: the client said nothing complete for too long.
    fn idle(&self, lp: &EventLoop, id: HandlerId) {
        let mut state = lock(&self.state);
        if state.closed {
            return;
        }
        state.timer = None;
        let ms = self.server.limits.idle_timeout.as_millis() as u64;
        log::info!("api: dropping a client idle for {ms} ms");
        let answer = answer_err(&ApiError::IdleTimeout(ms));
        state.output.extend_from_slice(answer.as_bytes());
        let _ = flush(&mut state);
        drop(state);
        self.close(lp, id);
    }

    /// Unregisters the client and shuts its socket (the descriptor itself closes when the
    /// handler is freed, after a grace period).
    fn close(&self, lp: &EventLoop, id: HandlerId) {
        let mut state = lock(&self.state);
        if state.closed {
            return;
        }
        state.closed = true;
        if let Some(timer) = state.timer.take() {
            lp.cancel_timer(timer);
        }
        let _ = state.stream.shutdown(std::net::Shutdown::Both);
        drop(state);
        lp.remove_io(id);
        lock(&self.server.clients).remove(&id);
    }
}

/// Writes as much pending output as the socket takes now.
fn flush(state: &mut ClientState) -> io::Result<()> {
    while !state.output.is_empty() {
        match state.stream.write(&state.output) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                state.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all pending output, waiting at most `timeout` for the client to take it.
fn flush_blocking(state: &mut ClientState, timeout: Duration) {
    let blocking = state
        .stream
        .set_nonblocking(false)
        .and_then(|()| state.stream.set_write_timeout(Some(timeout)));
    let result = blocking.and_then(|()| state.stream.write_all(&state.output));
    if let Err(e) = result {
        log::warn!("api: the answer to quit was not delivered: {e}");
    }
    state.output.clear();
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
