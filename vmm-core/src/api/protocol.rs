//! The control API's wire format: a [`Request`] parsed from one JSON line, answers written
//! as one line, and [`ApiError`] — every refusal, each with a stable class name.

use crate::config::parse_size;
use ramlist::kvm::KvmRamError;
use ramlist::RamError;
use serde::Serialize;
use serde_json::{Map, Value};

/// One command, as parsed from a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `{"cmd":"status"}`
    Status,
    /// `{"cmd":"pause"}`
    Pause,
    /// `{"cmd":"resume"}`
    Resume,
    /// `{"cmd":"quit"}`
    Quit,
    /// `{"cmd":"ram-add","id":ID,"size":BYTES|"SIZE"}`
    RamAdd {
        /// The new block's id.
        id: String,
        /// Its size in bytes.
        size: u64,
    },
    /// `{"cmd":"ram-remove","id":ID}`
    RamRemove {
        /// The block's id.
        id: String,
    },
    /// `{"cmd":"migrate","uri":URI,"downtime_ms":N?,"max_bandwidth":N?,
    /// "auto_converge":BOOL?, "local":BOOL?}`: starts a live migration (or a snapshot to `file:`) on its
    /// own thread; `status` follows it.
    Migrate(MigrationParams),
    /// `{"cmd":"start-postcopy"}`: the migration under way switches to post-copy at the
    /// end of its iteration (QEMU's `migrate-start-postcopy`).
    StartPostcopy,
    /// `{"cmd":"snapshot","dir":DIR,"diff_from":BASE?}`: pauses the guest (it stays
    /// paused) and writes `DIR/state` and the sparse `DIR/memory` (with `diff_from`, only
    /// the pages written since BASE); answers with the snapshot's figures.
    Snapshot {
        /// The directory (made if missing).
        dir: String,
        /// The snapshot a diff snapshot is a diff of.
        diff_from: Option<String>,
    },
}

/// The `migrate` command's arguments: where to, and how (each `None` takes the default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationParams {
    /// `unix:PATH`, `tcp:HOST:PORT` or `file:PATH`.
    pub uri: String,
    /// The downtime limit in ms (default 300).
    pub downtime_ms: Option<u64>,
    /// A bandwidth cap in bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Throttle the vCPUs while the guest dirties memory faster than it goes (default
    /// true).
    pub auto_converge: Option<bool>,
    /// Mutual TLS (`tcp:` only): the directory of the source's credentials (QEMU's x509
    /// layout: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`), read by the VMM.
    pub tls_creds: Option<String>,
    /// Hand the guest's memory over instead of copying it (`unix:` only, RAM another
    /// process can map): a local migration (default false).
    pub local: bool,
    /// Switch to post-copy after this many iterations (1: after the first pass) unless
    /// converged by then (`vmm migrate --postcopy`; None: only on `start-postcopy`).
    pub postcopy_after: Option<u32>,
    /// Go on with a post-copy paused by a broken link, reconnecting to `uri` (where the
    /// destination listens again) instead of starting a migration (default false).
    pub resume: bool,
}

impl Request {
    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Quit => "quit",
            Request::RamAdd { .. } => "ram-add",
            Request::RamRemove { .. } => "ram-remove",
            Request::Migrate(_) => "migrate",
            Request::Snapshot { .. } => "snapshot",
            Request::StartPostcopy => "start-postcopy",
        }
    }

    /// Parses one line (without its newline). Unknown arguments are refused, as QMP does.
    pub fn parse(line: &[u8]) -> Result<Request, ApiError> {
        let value: Value = serde_json::from_slice(line).map_err(ApiError::Malformed)?;
        let Value::Object(mut args) = value else {
            return Err(ApiError::NotARequest);
        };
        let cmd = match args.remove("cmd") {
            Some(Value::String(cmd)) => cmd,
            _ => return Err(ApiError::NotARequest),
        };
        let request = match cmd.as_str() {
            "status" => Request::Status,
            "pause" => Request::Pause,
            "resume" => Request::Resume,
            "quit" => Request::Quit,
            "ram-add" => Request::RamAdd {
                id: take_id(&mut args, "ram-add")?,
                size: take_size(&mut args, "ram-add")?,
            },
            "ram-remove" => Request::RamRemove {
                id: take_id(&mut args, "ram-remove")?,
            },
            "migrate" => Request::Migrate(MigrationParams {
                uri: take_string(&mut args, "migrate", "uri")?,
                downtime_ms: take_opt_u64(&mut args, "migrate", "downtime_ms")?,
                max_bandwidth: take_opt_u64(&mut args, "migrate", "max_bandwidth")?,
                auto_converge: take_opt_bool(&mut args, "migrate", "auto_converge")?,
                tls_creds: take_opt_string(&mut args, "migrate", "tls_creds")?,
                local: take_opt_bool(&mut args, "migrate", "local")?.unwrap_or(false),
                postcopy_after: take_opt_u64(&mut args, "migrate", "postcopy_after")?
                    .map(|n| {
                        u32::try_from(n).map_err(|_| ApiError::BadArgument {
                            cmd: "migrate",
                            what: format!("postcopy_after {n} is over {}", u32::MAX),
                        })
                    })
                    .transpose()?,
                resume: take_opt_bool(&mut args, "migrate", "resume")?.unwrap_or(false),
            }),
            "start-postcopy" => Request::StartPostcopy,
            "snapshot" => Request::Snapshot {
                dir: take_string(&mut args, "snapshot", "dir")?,
                diff_from: take_opt_string(&mut args, "snapshot", "diff_from")?,
            },
            _ => return Err(ApiError::UnknownCommand(cmd)),
        };
        if let Some(extra) = args.keys().next() {
            return Err(ApiError::BadArgument {
                cmd: request.name(),
                what: format!("unexpected argument {extra:?}"),
            });
        }
        Ok(request)
    }

    /// The request as one JSON line, newline included (what the thin clients send).
    pub fn to_line(&self) -> String {
        let value = match self {
            Request::RamAdd { id, size } => {
                serde_json::json!({"cmd": self.name(), "id": id, "size": size})
            }
            Request::RamRemove { id } => serde_json::json!({"cmd": self.name(), "id": id}),
            Request::Snapshot { dir, diff_from } => {
                let mut v = serde_json::json!({"cmd": self.name(), "dir": dir});
                if let Some(base) = diff_from {
                    v["diff_from"] = base.clone().into();
                }
                v
            }
            Request::Migrate(MigrationParams {
                uri,
                downtime_ms,
                max_bandwidth,
                auto_converge,
                tls_creds,
                local,
                postcopy_after,
                resume,
            }) => {
                let mut v = serde_json::json!({"cmd": self.name(), "uri": uri});
                if let Some(d) = downtime_ms {
                    v["downtime_ms"] = (*d).into();
                }
                if let Some(b) = max_bandwidth {
                    v["max_bandwidth"] = (*b).into();
                }
                if let Some(a) = auto_converge {
                    v["auto_converge"] = (*a).into();
                }
                if let Some(t) = tls_creds {
                    v["tls_creds"] = t.clone().into();
                }
                if *local {
                    v["local"] = true.into();
                }
                if let Some(n) = postcopy_after {
                    v["postcopy_after"] = (*n).into();
                }
                if *resume {
                    v["resume"] = true.into();
                }
                v
            }
            _ => serde_json::json!({"cmd": self.name()}),
        };
        format!("{value}\n")
    }
}

fn take_id(args: &mut Map<String, Value>, cmd: &'static str) -> Result<String, ApiError> {
    match args.remove("id") {
        Some(Value::String(id)) => Ok(id),
        Some(_) => Err(ApiError::BadArgument {
            cmd,
            what: "\"id\" must be a string".into(),
        }),
        None => Err(ApiError::BadArgument {
            cmd,
            what: "missing argument \"id\"".into(),
        }),
    }
}

fn take_string(
    args: &mut Map<String, Value>,
    cmd: &'static str,
    name: &str,
) -> Result<String, ApiError> {
    match args.remove(name) {
        Some(Value::String(v)) => Ok(v),
        Some(_) => Err(ApiError::BadArgument {
            cmd,
            what: format!("{name:?} must be a string"),
        }),
        None => Err(ApiError::BadArgument {
            cmd,
            what: format!("missing argument {name:?}"),
        }),
    }
}

fn take_opt_string(
    args: &mut Map<String, Value>,
    cmd: &'static str,
    name: &str,
) -> Result<Option<String>, ApiError> {
    match args.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(v)) => Ok(Some(v)),
        Some(_) => Err(ApiError::BadArgument {
            cmd,
            what: format!("{name:?} must be a string"),
        }),
    }
}

fn take_opt_u64(
    args: &mut Map<String, Value>,
    cmd: &'static str,
    name: &str,
) -> Result<Option<u64>, ApiError> {
    match args.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| ApiError::BadArgument {
            cmd,
            what: format!("{name:?} must be a whole number, not {n}"),
        }),
        Some(_) => Err(ApiError::BadArgument {
            cmd,
            what: format!("{name:?} must be a whole number"),
        }),
    }
}

fn take_opt_bool(
    args: &mut Map<String, Value>,
    cmd: &'static str,
    name: &str,
) -> Result<Option<bool>, ApiError> {
    match args.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(other) => Err(ApiError::BadArgument {
            cmd,
            what: format!("{name:?} must be true or false, not {other}"),
        }),
    }
}

fn take_size(args: &mut Map<String, Value>, cmd: &'static str) -> Result<u64, ApiError> {
    let bad = |what: String| ApiError::BadArgument { cmd, what };
    match args.remove("size") {
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
            bad(format!(
                "size {n} is not a whole number of bytes (or a string like \"512M\")"
            ))
        }),
        Some(Value::String(s)) => parse_size(&s).map_err(|e| bad(e.to_string())),
        Some(_) => Err(bad(
            "\"size\" must be a number of bytes or a string like \"512M\"".into(),
        )),
        None => Err(bad("missing argument \"size\"".into())),
    }
}

/// What the VM is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// The vCPUs run the guest.
    Running,
    /// Every vCPU is parked; `resume` continues.
    Paused,
    /// A live migration is under way (the guest runs until its final stage).
    Migrating,
    /// The VM is ending (quit, or the guest reset or powered off).
    Stopping,
    /// A migration destination (`vmm run --incoming`) waiting for or loading the stream:
    /// no guest code has run here yet (QEMU's `inmigrate` run state). Only `status` and
    /// `quit` work; `quit` abandons the migration (the source's guest runs on).
    Inmigrate,
}

/// One RAM block as `status` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockInfo {
    /// The block's id.
    pub id: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where the guest sees it, if placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_addr: Option<u64>,
    /// Added through the API (removable), rather than the boot RAM.
    pub hotplugged: bool,
}

/// The answer to `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    /// Running, paused or stopping.
    pub state: VmState,
    /// Bytes of RAM in all blocks.
    pub memory_bytes: u64,
    /// Bytes of RAM the guest booted with (`--memory`).
    pub boot_memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The RAM blocks, biggest first.
    pub blocks: Vec<BlockInfo>,
    /// The vCPU throttle in force, in percent: above 0 only while a migration's
    /// auto-converge slows the guest down.
    pub cpu_throttle_percent: u8,
    /// The last migration's progress (and its final `stats` once it ended), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<Value>,
    /// On a migration destination: the incoming migration's `uri`, `stage` (listening,
    /// loading, restoring, starting, completed, failed) and, once completed, its `stats`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incoming: Option<Value>,
}

/// Why a request was refused: the `error` of an `{"ok":false}` answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The line is not JSON.
    #[error("malformed JSON: {0}")]
    Malformed(serde_json::Error),
    /// JSON, but not an object with a `cmd` string.
    #[error("a request is a JSON object with a \"cmd\" string, e.g. {{\"cmd\":\"status\"}}")]
    NotARequest,
    /// A `cmd` nobody knows.
    #[error("unknown command {0:?}; the commands are status, pause, resume, quit, ram-add, ram-remove, migrate and snapshot")]
    UnknownCommand(String),
    /// A missing, mistyped or unexpected argument.
    #[error("{cmd}: {what}")]
    BadArgument {
        /// The command.
        cmd: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A line longer than the server accepts; the client is dropped after this answer.
    #[error("request line longer than {0} bytes; closing the connection")]
    LineTooLong(usize),
    /// A client sent no complete request for too long; it is dropped after this answer.
    #[error("no request for {0} ms; closing the connection")]
    IdleTimeout(u64),
    /// The server has its fill of clients; this one is dropped after the answer.
    #[error("too many api clients (at most {0}); closing the connection")]
    TooManyClients(usize),
    /// The RAM list or KVM refused a RAM block change.
    #[error(transparent)]
    Ram(#[from] KvmRamError),
    /// `ram-remove` of the RAM the guest booted with.
    #[error("RAM block {0:?} is the guest's boot RAM and cannot be removed")]
    BootRam(String),
    /// `ram-add` with the id of a boot RAM block.
    #[error("RAM block id {0:?} is reserved for the guest's boot RAM")]
    ReservedId(String),
    /// No guest-physical range is left for the block.
    #[error("RAM block {id:?}: no free guest-physical range of {size:#x} bytes")]
    NoGuestSpace {
        /// The block's id.
        id: String,
        /// Its size.
        size: u64,
    },
    /// A block larger than a migration destination accepts: the VM could not move.
    #[error(
        "RAM block {id:?}: {size:#x} bytes is over the {max:#x} a migration destination accepts"
    )]
    BlockTooLarge {
        /// The block's id.
        id: String,
        /// Its size.
        size: u64,
        /// The destination's limit.
        max: u64,
    },
    /// Some vCPU did not stop in time; the pause was withdrawn.
    #[error("only {parked} of {vcpus} vCPUs paused within {timeout_ms} ms; the VM runs on")]
    PauseTimeout {
        /// vCPUs that parked.
        parked: usize,
        /// vCPUs in all.
        vcpus: usize,
        /// How long the pause waited.
        timeout_ms: u64,
    },
    /// The VM is ending; nothing more can be done to it.
    #[error("the VM is stopping")]
    Stopping,
    /// `migrate` refused: a bad URI, or a migration already under way.
    #[error("migrate: {0}")]
    Migration(String),
    /// `snapshot` failed (the guest runs on if it ran before).
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// More than the host can give (all guest RAM past its RAM and swap).
    #[error("{0}")]
    HostLimit(String),
    /// The reset failed.
    #[error("system_reset: {0}")]
    Reset(String),
    /// A command that needs the guest, while the incoming migration has not started it.
    #[error("{0}: refused while the incoming migration has not started the guest here (state inmigrate); only status and quit work until then")]
    Inmigrate(&'static str),
}

impl ApiError {
    /// A stable name for programs (the answer's `class`).
    pub fn class(&self) -> &'static str {
        match self {
            ApiError::Malformed(_) => "malformed-json",
            ApiError::NotARequest => "not-a-request",
            ApiError::UnknownCommand(_) => "unknown-command",
            ApiError::BadArgument { .. } => "bad-argument",
            ApiError::LineTooLong(_) => "line-too-long",
            ApiError::TooManyClients(_) => "too-many-clients",
            ApiError::IdleTimeout(_) => "idle-timeout",
            ApiError::Ram(KvmRamError::UnknownId(_)) => "unknown-id",
            ApiError::Ram(KvmRamError::Ram(e)) => ram_class(e),
            ApiError::Ram(_) => "kvm",
            ApiError::BootRam(_) => "boot-ram",
            ApiError::ReservedId(_) => "reserved-id",
            ApiError::NoGuestSpace { .. } => "no-guest-space",
            ApiError::BlockTooLarge { .. } => "bad-size",
            ApiError::PauseTimeout { .. } => "pause-timeout",
            ApiError::Stopping => "stopping",
            ApiError::Migration(_) => "migration",
            ApiError::Snapshot(_) => "snapshot",
            ApiError::Reset(_) => "reset",
            ApiError::HostLimit(_) => "host-limit",
            ApiError::Inmigrate(_) => "inmigrate",
        }
    }
}

fn ram_class(e: &RamError) -> &'static str {
    match e {
        RamError::DuplicateId(_) => "duplicate-id",
        RamError::EmptyId | RamError::IdTooLong { .. } | RamError::IdHasNul(_) => "bad-id",
        RamError::ZeroSize { .. }
        | RamError::UnalignedSize { .. }
        | RamError::SizeTooLarge { .. } => "bad-size",
        RamError::UnknownId(_) => "unknown-id",
        RamError::Mmap { .. } | RamError::Prealloc { .. } | RamError::Backing { .. } => "no-memory",
        _ => "ram",
    }
}

#[derive(Serialize)]
struct Accepted<'a, T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct Refusal<'a> {
    ok: bool,
    class: &'a str,
    error: String,
}

/// `{"ok":true, ...body's fields}` and a newline; `body` must serialize as a map.
pub fn answer_ok<T: Serialize>(body: &T) -> String {
    let line = serde_json::to_string(&Accepted { ok: true, body })
        // Our answer types are plain structs of strings and numbers.
        .unwrap_or_else(|e| format!("{{\"ok\":true,\"warning\":\"unencodable answer: {e}\"}}"));
    line + "\n"
}

/// `{"ok":false,"class":...,"error":...}` and a newline.
pub fn answer_err(e: &ApiError) -> String {
    let refusal = Refusal {
        ok: false,
        class: e.class(),
        error: e.to_string(),
    };
    let line = serde_json::to_string(&refusal)
        .unwrap_or_else(|_| "{\"ok\":false,\"error\":\"unencodable error\"}".to_string());
    line + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(line: &str) -> &'static str {
        Request::parse(line.as_bytes()).unwrap_err().class()
    }

    #[test]
    fn parses_every_command() {
        for (line, req) in [
            (r#"{"cmd":"status"}"#, Request::Status),
            (r#" {"cmd": "pause"} "#, Request::Pause),
            (r#"{"cmd":"resume"}"#, Request::Resume),
            (r#"{"cmd":"quit"}"#, Request::Quit),
            (
                r#"{"cmd":"ram-add","id":"a","size":4096}"#,
                Request::RamAdd {
                    id: "a".into(),
                    size: 4096,
                },
            ),
            (
                r#"{"size":"16M","cmd":"ram-add","id":"b"}"#,
                Request::RamAdd {
                    id: "b".into(),
                    size: 16 << 20,
                },
            ),
            (
                r#"{"cmd":"ram-remove","id":"a"}"#,
                Request::RamRemove { id: "a".into() },
            ),
            (
                r#"{"cmd":"migrate","uri":"unix:/x","downtime_ms":50}"#,
                Request::Migrate(MigrationParams {
                    uri: "unix:/x".into(),
                    downtime_ms: Some(50),
                    max_bandwidth: None,
                    auto_converge: None,
                    tls_creds: None,
                    local: false,
                    postcopy_after: None,
                    resume: false,
                }),
            ),
            (
                r#"{"cmd":"migrate","uri":"unix:/x","auto_converge":false,"local":true}"#,
                Request::Migrate(MigrationParams {
                    uri: "unix:/x".into(),
                    downtime_ms: None,
                    max_bandwidth: None,
                    auto_converge: Some(false),
                    tls_creds: None,
                    local: true,
                    postcopy_after: None,
                    resume: false,
                }),
            ),
        ] {
            assert_eq!(Request::parse(line.as_bytes()).unwrap(), req, "{line}");
            let round = req.to_line();
            assert!(round.ends_with('\n'));
            assert_eq!(Request::parse(round.trim_end().as_bytes()).unwrap(), req);
        }
    }

    #[test]
    fn refuses_bad_requests_by_class() {
        assert_eq!(class(r#"{"cmd": "ram-add", "id": "#), "malformed-json");
        assert_eq!(class("\u{1}"), "malformed-json");
        assert_eq!(class("[1,2]"), "not-a-request");
        assert_eq!(class(r#"{"command":"status"}"#), "not-a-request");
        assert_eq!(class(r#"{"cmd":7}"#), "not-a-request");
        assert_eq!(class(r#"{"cmd":"reboot"}"#), "unknown-command");
        assert_eq!(class(r#"{"cmd":"status","x":1}"#), "bad-argument");
        assert_eq!(class(r#"{"cmd":"ram-add","id":"a"}"#), "bad-argument");
        assert_eq!(
            class(r#"{"cmd":"ram-add","id":"a","size":-1}"#),
            "bad-argument"
        );
        assert_eq!(
            class(r#"{"cmd":"ram-add","id":"a","size":1.5}"#),
            "bad-argument"
        );
        assert_eq!(
            class(r#"{"cmd":"ram-add","id":"a","size":"12X"}"#),
            "bad-argument"
        );
        assert_eq!(
            class(r#"{"cmd":"ram-add","id":3,"size":1}"#),
            "bad-argument"
        );
        assert_eq!(class(r#"{"cmd":"ram-remove"}"#), "bad-argument");
    }

    #[test]
    fn answers_are_one_line_with_ok_first() {
        let status = Status {
            state: VmState::Paused,
            memory_bytes: 1,
            boot_memory_bytes: 1,
            vcpus: 2,
            cpu_throttle_percent: 0,
            blocks: vec![BlockInfo {
                id: "ram\n".into(),
                size: 1,
                guest_addr: None,
                hotplugged: false,
            }],
            migration: None,
            incoming: None,
        };
        let line = answer_ok(&status);
        assert!(
            line.starts_with(r#"{"ok":true,"state":"paused","#),
            "{line}"
        );
        assert_eq!(line.matches('\n').count(), 1);
        let err = answer_err(&ApiError::UnknownCommand("x\ny".into()));
        assert!(
            err.starts_with(r#"{"ok":false,"class":"unknown-command","#),
            "{err}"
        );
        assert_eq!(err.matches('\n').count(), 1);
        let v: Value = serde_json::from_str(&err).unwrap();
        assert!(v["error"].as_str().unwrap().contains("unknown command"));
    }
}
