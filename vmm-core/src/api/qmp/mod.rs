//! QMP, the QEMU Machine Protocol, as a [`Codec`] over the same [`Control`] as the JSON-lines
//! socket: `vmm run --qmp unix:PATH`, for the clients that already speak it (QEMU's
//! python `qemu.qmp` and `qmp-shell`, libvirt-style harnesses).
//!
//! The wire, as QEMU speaks it:
//! - on connect the server sends the greeting,
//!   `{"QMP":{"version":{"qemu":{"major":7,"minor":2,"micro":0},"package":"minivmm ..."},
//!   "capabilities":[]}}` (the QEMU version whose QMP this follows);
//! - the client sends JSON objects, with or without whitespace or newlines between them
//!   (`qemu.qmp` sends none): `{"execute":NAME,"arguments":{...},"id":ANY}`;
//! - until `qmp_capabilities` every other command is refused with `CommandNotFound`
//!   (capabilities negotiation mode), and no event is sent;
//! - an answer is `{"return":VALUE,"id":ANY}` or
//!   `{"error":{"class":CLASS,"desc":TEXT},"id":ANY}` (the `id` echoed when given);
//! - events are `{"event":NAME,"data":{...},"timestamp":{"seconds":S,"microseconds":U}}`;
//!   `MIGRATION` and `MIGRATION_PASS` only with the `events` migration capability on, as
//!   in QEMU.
//!
//! Input that is not JSON gets a `GenericError` and the rest of that line is dropped; a
//! request that grows past [`Limits::max_line`] without ending is refused and the client
//! dropped. The commands are in [`commands`]; `migrate`'s parameters and capabilities,
//! shared by every QMP client as QEMU's are by its monitors, in [`params`].

pub mod commands;
pub mod params;

use super::codec::{After, Codec, Fed};
use super::protocol::ApiError;
use super::server::Limits;
use super::Control;
use crate::events::{Timestamped, VmEvent};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The QEMU version whose QMP this server follows (its greeting says so).
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// QMP's error classes (QEMU's `QapiErrorClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything but the classes below.
    GenericError,
    /// No such command (or not yet: before `qmp_capabilities`).
    CommandNotFound,
    /// No such device (a RAM block `x-ram-remove` names).
    DeviceNotFound,
}

impl ErrorClass {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// A refused command: its class and QEMU-style description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    /// The class.
    pub class: ErrorClass,
    /// One sentence.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
}

impl From<ApiError> for QmpError {
    fn from(e: ApiError) -> QmpError {
        let class = match &e {
            ApiError::Ram(ramlist::kvm::KvmRamError::UnknownId(_)) => ErrorClass::DeviceNotFound,
            _ => ErrorClass::GenericError,
        };
        QmpError {
            class,
            desc: e.to_string(),
        }
    }
}

/// Encodes `{"error":...}` for `id`.
pub fn error_answer(e: &QmpError, id: Option<&Value>) -> String {
    let mut v = json!({"error": {"class": e.class.name(), "desc": e.desc}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    format!("{v}\r\n")
}

/// Encodes `{"return":...}` for `id`.
pub fn return_answer(value: Value, id: Option<&Value>) -> String {
    let mut v = json!({ "return": value });
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    format!("{v}\r\n")
}

/// The greeting, sent as soon as a client connects.
pub fn greeting() -> String {
    let (major, minor, micro) = QEMU_VERSION;
    let v = json!({"QMP": {
        "version": {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": format!("minivmm {}", env!("CARGO_PKG_VERSION")),
        },
        "capabilities": [],
    }});
    format!("{v}\r\n")
}

/// One QMP connection: see the module documentation.
pub struct QmpSession {
    /// `qmp_capabilities` was accepted: commands run and events flow.
    negotiated: bool,
    settings: Arc<params::Settings>,
}

impl QmpSession {
    /// A new connection, in capabilities negotiation mode; `settings` are the migration
    /// parameters and capabilities every QMP client shares.
    pub fn new(settings: Arc<params::Settings>) -> QmpSession {
        QmpSession {
            negotiated: false,
            settings,
        }
    }

    /// Runs one request object; returns its answer and what to do next.
    fn request(&mut self, value: Value, control: &dyn Control) -> (String, After) {
        let Value::Object(mut msg) = value else {
            let e = QmpError::generic("QMP input must be a JSON object");
            return (error_answer(&e, None), After::Open);
        };
        let id = msg.remove("id");
        match self.envelope(&mut msg) {
            Err(e) => (error_answer(&e, id.as_ref()), After::Open),
            Ok((name, args)) => match self.execute(&name, args, control) {
                Ok((value, after)) => (return_answer(value, id.as_ref()), after),
                Err(e) => {
                    log::info!("qmp: {name} refused: {}", e.desc);
                    (error_answer(&e, id.as_ref()), After::Open)
                }
            },
        }
    }

    /// The command's name and arguments, or why the object is not a command.
    fn envelope(
        &self,
        msg: &mut Map<String, Value>,
    ) -> Result<(String, Map<String, Value>), QmpError> {
        if msg.contains_key("exec-oob") {
            return Err(QmpError::generic(
                "QMP input member 'exec-oob' is not supported: out-of-band execution was not negotiated",
            ));
        }
        let name = match msg.remove("execute") {
            Some(Value::String(name)) => name,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        };
        let args = match msg.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(args)) => args,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };
        if let Some(extra) = msg.keys().next() {
            return Err(QmpError::generic(format!(
                "QMP input member '{extra}' is unexpected"
            )));
        }
        Ok((name, args))
    }

    fn execute(
        &mut self,
        name: &str,
        args: Map<String, Value>,
        control: &dyn Control,
    ) -> Result<(Value, After), QmpError> {
        if name == "qmp_capabilities" {
            if self.negotiated {
                return Err(QmpError {
                    class: ErrorClass::CommandNotFound,
                    desc: "Capabilities negotiation is already complete, command ignored".into(),
                });
            }
            commands::capabilities(args)?;
            self.negotiated = true;
            return Ok((json!({}), After::Open));
        }
        if !self.negotiated {
            return Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            });
        }
        commands::run(name, args, control, &self.settings)
    }
}

impl Codec for QmpSession {
    fn greeting(&mut self) -> Option<String> {
        Some(greeting())
    }

    fn feed(
        &mut self,
        input: &mut Vec<u8>,
        eof: bool,
        control: &dyn Control,
        limits: &Limits,
        output: &mut Vec<u8>,
    ) -> Fed {
        let mut answered = false;
        loop {
            let start = input
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(input.len());
            input.drain(..start);
            if input.is_empty() {
                break;
            }
            let mut stream = serde_json::Deserializer::from_slice(input).into_iter::<Value>();
            match stream.next() {
                Some(Ok(value)) => {
                    let used = stream.byte_offset();
                    input.drain(..used);
                    answered = true;
                    let (answer, after) = self.request(value, control);
                    output.extend_from_slice(answer.as_bytes());
                    if after != After::Open {
                        return Fed { after, answered };
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    // Not JSON: say so, and drop the rest of the line it is on.
                    let bad = QmpError::generic(format!("JSON parse error, {e}"));
                    output.extend_from_slice(error_answer(&bad, None).as_bytes());
                    answered = true;
                    match input.iter().position(|&b| b == b'\n') {
                        Some(nl) => drop(input.drain(..=nl)),
                        None => input.clear(),
                    }
                }
                None => break,
            }
        }
        if input.len() > limits.max_line {
            input.clear();
            let e = QmpError::generic(format!(
                "JSON request longer than {} bytes; closing the connection",
                limits.max_line
            ));
            output.extend_from_slice(error_answer(&e, None).as_bytes());
            return Fed {
                after: After::Close,
                answered,
            };
        }
        let after = if eof { After::Close } else { After::Open };
        Fed { after, answered }
    }

    fn idles_out(&self) -> bool {
        false
    }

    fn refusal(&self, e: &ApiError) -> String {
        error_answer(&QmpError::from_refusal(e), None)
    }

    fn event(&mut self, event: &Timestamped) -> Option<String> {
        if !self.negotiated {
            return None;
        }
        let migration_event = matches!(
            event.event,
            VmEvent::Migration { .. } | VmEvent::MigrationPass { .. }
        );
        if migration_event && !self.settings.migration_events() {
            return None;
        }
        let (name, data) = match &event.event {
            VmEvent::Stop => ("STOP", None),
            VmEvent::Resume => ("RESUME", None),
            VmEvent::Reset => (
                "RESET",
                Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
            ),
            VmEvent::Shutdown(cause) => (
                "SHUTDOWN",
                Some(json!({"guest": cause.by_guest(), "reason": cause.name()})),
            ),
            VmEvent::Migration { status } => ("MIGRATION", Some(json!({ "status": status }))),
            VmEvent::MigrationPass { pass } => ("MIGRATION_PASS", Some(json!({ "pass": pass }))),
        };
        let mut v = json!({
            "event": name,
            "timestamp": {"seconds": event.seconds, "microseconds": event.microseconds},
        });
        if let Some(data) = data {
            v["data"] = data;
        }
        Some(format!("{v}\r\n"))
    }
}

impl QmpError {
    /// A server-side refusal (too many clients, idle) as QMP says it.
    fn from_refusal(e: &ApiError) -> QmpError {
        QmpError::generic(e.to_string())
    }
}

#[cfg(test)]
mod tests;
