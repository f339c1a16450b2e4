//! The API server on the main loop: the listening socket and each client are io handlers
//! of the [`EventLoop`]; each client has an idle timer on the loop's timer list. What the
//! bytes mean is the client's [`Codec`]'s business: JSON lines for `--api-socket`, QMP for
//! `--qmp`; with an [`EventBus`], the bus's descriptor is an io handler too, and every
//! event raised is handed to each client's codec.
//!
//! Each complete request gets exactly one answer, in order. No client can hold up another
//! or the guest: sockets are non-blocking, a request longer than [`Limits::max_line`] is
//! answered with an error and the client dropped, a client that sends no complete request
//! for [`Limits::idle_timeout`] is told so and dropped (not a QMP client, which may only
//! wait for events, as QEMU's may), one that does not read its answers
//! (or its events) is dropped once [`MAX_PENDING_OUTPUT`] bytes wait for it, and clients
//! beyond [`Limits::max_clients`] are answered with an error and closed at once.

use super::codec::{After, Codec, JsonLines};
use super::protocol::ApiError;
use super::socket::ApiSocket;
use super::Control;
use crate::event_loop::{EventLoop, HandlerId, TimerId};
use crate::events::EventBus;
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
/// How long the last events (`SHUTDOWN`) may take to leave when the server shuts down.
pub const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_millis(200);
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

/// Makes the codec of each new client.
pub type CodecFactory = Arc<dyn Fn() -> Box<dyn Codec> + Send + Sync>;

/// State shared by the listener and every client handler.
struct Server {
    /// Taken (and the file removed) at shutdown.
    socket: Mutex<Option<ApiSocket>>,
    control: Arc<dyn Control>,
    limits: Limits,
    codec: CodecFactory,
    events: Option<Arc<EventBus>>,
    /// The connected clients, by handler.
    clients: Mutex<HashMap<HandlerId, Weak<Client>>>,
}

/// The running API server. [`ApiServer::shutdown`] ends it.
pub struct ApiServer {
    server: Arc<Server>,
    listener: HandlerId,
    events: Option<HandlerId>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent; a panic cannot half-update it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ApiServer {
    /// Serves `socket` on `lp` in JSON lines, handing commands to `control`.
    pub fn start(
        lp: &EventLoop,
        socket: ApiSocket,
        control: Arc<dyn Control>,
        limits: Limits,
    ) -> io::Result<ApiServer> {
        let json_lines: CodecFactory = Arc::new(|| Box::new(JsonLines));
        ApiServer::start_with(lp, socket, control, limits, json_lines, None)
    }

    /// Serves `socket` on `lp`, each client through a codec `codec` makes, handing
    /// commands to `control`; with `events`, every event raised on the bus goes to each
    /// client's codec (from now on: the bus starts listening here).
    pub fn start_with(
        lp: &EventLoop,
        socket: ApiSocket,
        control: Arc<dyn Control>,
        limits: Limits,
        codec: CodecFactory,
        events: Option<Arc<EventBus>>,
    ) -> io::Result<ApiServer> {
        let fd = socket.listener().as_raw_fd();
        let server = Arc::new(Server {
            socket: Mutex::new(Some(socket)),
            control,
            limits,
            codec,
            events: events.clone(),
            clients: Mutex::new(HashMap::new()),
        });
        let s = server.clone();
        let listener = lp.add_io(
            fd,
            EventSet::IN,
            move |lp: &EventLoop, id: HandlerId, _: EventSet| s.accept_all(lp, id),
        )?;
        let events = match events {
            Some(bus) => {
                let s = server.clone();
                let watched = lp.add_io(
                    bus.fd(),
                    EventSet::IN,
                    move |lp: &EventLoop, _: HandlerId, _: EventSet| s.deliver_events(lp),
                );
                match watched {
                    Ok(id) => {
                        bus.listen();
                        Some(id)
                    }
                    Err(e) => {
                        lp.remove_io(listener);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        Ok(ApiServer {
            server,
            listener,
            events,
        })
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        lock(&self.server.clients).len()
    }

    /// Stops listening, hands the events still waiting (`SHUTDOWN`) to the clients
    /// (all of them within one [`SHUTDOWN_FLUSH_TIMEOUT`]), drops every client and
    /// removes the socket file.
    pub fn shutdown(self, lp: &EventLoop) {
        lp.remove_io(self.listener);
        if let Some(events) = self.events {
            lp.remove_io(events);
        }
        let pending = self
            .server
            .events
            .as_ref()
            .map(|bus| bus.drain())
            .unwrap_or_default();
        let clients: Vec<_> = lock(&self.server.clients).drain().collect();
        // One deadline for all: clients that do not read cannot add theirs up.
        let deadline = Instant::now() + SHUTDOWN_FLUSH_TIMEOUT;
        for (id, client) in clients {
            if let Some(client) = client.upgrade() {
                let mut state = lock(&client.state);
                let ClientState { codec, output, .. } = &mut *state;
                for event in &pending {
                    if let Some(line) = codec.event(event) {
                        output.extend_from_slice(line.as_bytes());
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if !state.closed && !state.output.is_empty() {
                    if left.is_zero() {
                        let _ = flush(&mut state);
                    } else {
                        flush_blocking(&mut state, left);
                    }
                }
                drop(state);
                client.close(lp, id);
            }
        }
        drop(lock(&self.server.socket).take());
    }
}

impl Server {
    /// Hands every event waiting on the bus to each client's codec.
    fn deliver_events(&self, lp: &EventLoop) {
        let Some(bus) = &self.events else {
            return;
        };
        let events = bus.drain();
        if events.is_empty() {
            return;
        }
        let clients: Vec<_> = lock(&self.clients)
            .iter()
            .filter_map(|(&id, c)| c.upgrade().map(|c| (id, c)))
            .collect();
        for (id, client) in clients {
            let mut state = lock(&client.state);
            if state.closed {
                continue;
            }
            let ClientState { codec, output, .. } = &mut *state;
            for event in &events {
                if let Some(line) = codec.event(event) {
                    output.extend_from_slice(line.as_bytes());
                }
            }
            client.settle(lp, id, state);
        }
    }

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
        let mut codec = (self.codec)();
        if lock(&self.clients).len() >= self.limits.max_clients {
            log::warn!("api: too many clients; refusing one");
            let answer = codec.refusal(&ApiError::TooManyClients(self.limits.max_clients));
            // Best effort: a fresh socket's buffer takes one short line.
            let _ = (&stream).write_all(answer.as_bytes());
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        let fd = stream.as_raw_fd();
        // Queued before anything the client sends is read: a client that speaks first
        // still gets the greeting first.
        let output = codec.greeting().map(String::into_bytes).unwrap_or_default();
        let interest = if output.is_empty() {
            EventSet::IN
        } else {
            EventSet::IN | EventSet::OUT
        };
        let client = Arc::new(Client {
            server: self.clone(),
            state: Mutex::new(ClientState {
                stream,
                codec,
                input: Vec::new(),
                output,
                timer: None,
                closed: false,
            }),
        });
        let c = client.clone();
        let id = match lp.add_io(
            fd,
            interest,
            move |lp: &EventLoop, id: HandlerId, ev: EventSet| c.ready(lp, id, ev),
        ) {
            Ok(id) => id,
            Err(e) => {
                log::warn!("api: cannot watch a client: {e}");
                return;
            }
        };
        if lock(&client.state).codec.idles_out() {
            let c = client.clone();
            let timer = lp.arm_timer(
                Instant::now() + self.limits.idle_timeout,
                Arc::new(move |lp: &EventLoop| c.idle(lp, id)),
            );
            lock(&client.state).timer = Some(timer);
        }
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
    codec: Box<dyn Codec>,
    /// Bytes received and not yet a complete line.
    input: Vec<u8>,
    /// Answers not yet written.
    output: Vec<u8>,
    timer: Option<TimerId>,
    closed: bool,
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
                // Left open: the server's shutdown hands it the last events (QMP's
                // `SHUTDOWN`, as QEMU sends it after `quit`'s answer) and closes it.
                let _ = lp.set_events(id, EventSet::empty());
                lp.stop();
            }
            After::Close => {
                // Best effort for the last answers; a client that left reads nothing.
                let _ = flush(&mut state);
                drop(state);
                self.close(lp, id);
            }
            After::Open => self.settle(lp, id, state),
        }
    }

    /// Writes what the socket takes of the pending output, then watches for what is left
    /// (or drops a client that lets too much pile up).
    fn settle(&self, lp: &EventLoop, id: HandlerId, mut state: MutexGuard<'_, ClientState>) {
        match flush(&mut state) {
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
        let ClientState {
            codec,
            input,
            output,
            ..
        } = &mut *state;
        let fed = codec.feed(input, eof, &*self.server.control, &limits, output);
        if fed.answered && fed.after == After::Open {
            if let Some(timer) = state.timer {
                lp.rearm_timer(timer, Instant::now() + limits.idle_timeout);
            }
        }
        fed.after
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
        let answer = state.codec.refusal(&ApiError::IdleTimeout(ms));
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
        log::warn!("api: the last answers or events for a client were not delivered: {e}");
    }
    state.output.clear();
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
