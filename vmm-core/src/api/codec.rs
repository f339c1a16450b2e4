//! How a client's bytes become commands and answers: the [`Codec`] the server runs for
//! each connection. The server owns the connection (non-blocking socket, limits, idle
//! timer, output buffer); the codec owns the framing and the wire format. Two codecs serve
//! the same [`Control`]: [`JsonLines`] (one JSON object per line, `--api-socket`) and QMP
//! ([`super::qmp`], `--qmp`), so a command has one implementation whichever socket it
//! came through.

use super::protocol::{answer_err, answer_ok, ApiError, Request};
use super::server::Limits;
use super::Control;
use crate::events::Timestamped;
use serde_json::json;

/// What handling input left the client in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Keep serving it.
    Open,
    /// Close once the pending output is written (end of input, or a fatal error).
    Close,
    /// Quit: flush, close, and stop the loop.
    Quit,
}

/// What [`Codec::feed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fed {
    /// What to do with the client now.
    pub after: After,
    /// Whether at least one complete request was handled (the idle timer restarts).
    pub answered: bool,
}

/// One connection's protocol: see the module documentation.
pub trait Codec: Send {
    /// What the server sends as soon as the client connects (QMP's greeting), if anything.
    fn greeting(&mut self) -> Option<String> {
        None
    }

    /// Handles the complete requests at the front of `input` (removing them) and appends
    /// their answers to `output`; what is left is an incomplete request. `eof`: the client
    /// will send nothing more. Input that can never be a request within
    /// [`Limits::max_line`] is answered with an error and closes the client.
    fn feed(
        &mut self,
        input: &mut Vec<u8>,
        eof: bool,
        control: &dyn Control,
        limits: &Limits,
        output: &mut Vec<u8>,
    ) -> Fed;

    /// Whether a client that sends no complete request for [`Limits::idle_timeout`] is
    /// dropped. QMP's are not: a monitor client may only wait for events, as QEMU lets it.
    fn idles_out(&self) -> bool {
        true
    }

    /// The answer that tells a client why the server drops it (too many clients, idle).
    fn refusal(&self, e: &ApiError) -> String;

    /// `event` in this protocol, or `None` when this client does not take events.
    fn event(&mut self, event: &Timestamped) -> Option<String> {
        let _ = event;
        None
    }
}

/// The JSON-lines protocol of `--api-socket`: `{"cmd":...}` per line, one answer line
/// `{"ok":...}` per request, in order; blank lines ignored; no events.
#[derive(Debug, Default)]
pub struct JsonLines;

impl JsonLines {
    /// Runs one request line and queues its answer.
    fn answer(&self, line: &[u8], control: &dyn Control, output: &mut Vec<u8>) -> After {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return After::Open;
        }
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
            Ok(Request::Quit) => match control.quit_refused() {
                Some(why) => Err(ApiError::Migration(why)),
                None => {
                    after = After::Quit;
                    Ok(answer_ok(&json!({"state": "stopping"})))
                }
            },
            Ok(Request::RamAdd { id, size }) => control.ram_add(&id, size).map(|b| answer_ok(&b)),
            Ok(Request::RamRemove { id }) => control
                .ram_remove(&id)
                .map(|()| answer_ok(&json!({ "id": id }))),
            Ok(Request::Migrate(params)) => control
                .migrate(&params)
                .map(|()| answer_ok(&json!({"state": "migrating", "uri": params.uri}))),
            Ok(Request::StartPostcopy) => control
                .migrate_start_postcopy()
                .map(|()| answer_ok(&json!({"postcopy": "requested"}))),
            Ok(Request::Snapshot { dir, diff_from }) => control
                .snapshot(&dir, diff_from.as_deref())
                .map(|s| answer_ok(&s)),
        };
        let answer = answer.unwrap_or_else(|e| {
            log::info!("api: refused: {e}");
            answer_err(&e)
        });
        output.extend_from_slice(answer.as_bytes());
        after
    }
}

impl Codec for JsonLines {
    fn feed(
        &mut self,
        input: &mut Vec<u8>,
        eof: bool,
        control: &dyn Control,
        limits: &Limits,
        output: &mut Vec<u8>,
    ) -> Fed {
        let mut answered = false;
        while let Some(end) = input.iter().position(|&b| b == b'\n') {
            if end > limits.max_line {
                break;
            }
            let line: Vec<u8> = input.drain(..=end).collect();
            answered = true;
            match self.answer(&line[..end], control, output) {
                After::Open => {}
                after => return Fed { after, answered },
            }
        }
        if input.len() > limits.max_line {
            log::warn!("api: a request line exceeds {} bytes", limits.max_line);
            input.clear();
            let answer = answer_err(&ApiError::LineTooLong(limits.max_line));
            output.extend_from_slice(answer.as_bytes());
            return Fed {
                after: After::Close,
                answered,
            };
        }
        if eof {
            // A last request without its newline is still a request.
            let line = std::mem::take(input);
            let after = match self.answer(&line, control, output) {
                After::Quit => After::Quit,
                _ => After::Close,
            };
            return Fed { after, answered };
        }
        Fed {
            after: After::Open,
            answered,
        }
    }

    fn refusal(&self, e: &ApiError) -> String {
        answer_err(e)
    }
}
