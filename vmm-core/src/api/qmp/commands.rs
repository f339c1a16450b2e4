//! The QMP commands this VMM serves, with QEMU's names and argument shapes, each run
//! through the same [`Control`] as the JSON-lines API. Extensions that QEMU does not have
//! carry the `x-` prefix, QMP's convention: `x-ram-add` and `x-ram-remove` (RAM blocks
//! hot-added and removed; `query-memory-devices` lists them as QEMU lists DIMMs).
//!
//! Arguments are checked as QEMU's generated marshallers check them: a missing one is
//! `Parameter 'x' is missing`, a wrong type `Invalid parameter type for 'x', expected: T`,
//! an unknown one `Parameter 'x' is unexpected` — all `GenericError`, and nothing runs.

use super::params::{query_migrate, Settings};
use super::{ErrorClass, QmpError, QEMU_VERSION};
use crate::api::codec::After;
use crate::api::{Control, VmState};
use crate::config::parse_size;
use migration::live::MigrationState;
use serde_json::{json, Map, Value};

/// Every command served, for `query-commands`.
pub const COMMANDS: [&str; 21] = [
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-kvm",
    "query-status",
    "stop",
    "cont",
    "quit",
    "system_reset",
    "query-migrate",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "migrate-start-postcopy",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "query-memory-devices",
    "x-ram-add",
    "x-ram-remove",
];

/// A command's arguments, taken one by one; [`Args::done`] refuses what is left.
struct Args(Map<String, Value>);

fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

fn bad_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl Args {
    fn string(&mut self, name: &str) -> Result<String, QmpError> {
        match self.0.remove(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(bad_type(name, "string")),
            None => Err(missing(name)),
        }
    }

    fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.0.remove(name) {
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(bad_type(name, "boolean")),
            None => Ok(None),
        }
    }

    /// A size: an integer of bytes, or a string with a K/M/G/T suffix.
    fn size(&mut self, name: &str) -> Result<u64, QmpError> {
        match self.0.remove(name) {
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| bad_type(name, "size")),
            Some(Value::String(s)) => {
                parse_size(&s).map_err(|e| QmpError::generic(format!("Parameter '{name}': {e}")))
            }
            Some(_) => Err(bad_type(name, "size")),
            None => Err(missing(name)),
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name)
    }

    fn done(self) -> Result<(), QmpError> {
        match self.0.keys().next() {
            Some(extra) => Err(QmpError::generic(format!(
                "Parameter '{extra}' is unexpected"
            ))),
            None => Ok(()),
        }
    }
}

/// `qmp_capabilities`: `enable` may list capabilities; this server offers none.
pub fn capabilities(args: Map<String, Value>) -> Result<(), QmpError> {
    let mut args = Args(args);
    if let Some(enable) = args.take("enable") {
        let list = enable
            .as_array()
            .ok_or_else(|| bad_type("enable", "array"))?;
        if let Some(cap) = list.first() {
            let name = cap
                .as_str()
                .ok_or_else(|| bad_type("enable", "array of strings"))?;
            return Err(QmpError::generic(format!(
                "Capability '{name}' not available"
            )));
        }
    }
    args.done()
}

/// QMP's run state and whether the vCPUs run (`query-status`).
fn run_status(control: &dyn Control) -> (&'static str, bool) {
    let running = control.is_running();
    let migrated_away = || {
        control
            .migration_progress()
            .and_then(|p| p.last_stats())
            .is_some_and(|s| s.status == MigrationState::Completed)
    };
    let status = match control.status().state {
        VmState::Stopping => "shutdown",
        VmState::Inmigrate => "inmigrate",
        VmState::Paused if migrated_away() => "postmigrate",
        VmState::Paused => "paused",
        VmState::Migrating if !running => "finish-migrate",
        VmState::Migrating | VmState::Running => "running",
    };
    (status, running)
}

/// Runs command `name` (negotiation done): its `return` value and what the server does
/// next, or why it was refused.
pub fn run(
    name: &str,
    args: Map<String, Value>,
    control: &dyn Control,
    settings: &Settings,
) -> Result<(Value, After), QmpError> {
    let mut args = Args(args);
    let open = |v: Value| Ok((v, After::Open));
    match name {
        "query-commands" => {
            args.done()?;
            open(COMMANDS.iter().map(|n| json!({ "name": n })).collect())
        }
        "query-version" => {
            args.done()?;
            let (major, minor, micro) = QEMU_VERSION;
            open(json!({
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": format!("minivmm {}", env!("CARGO_PKG_VERSION")),
            }))
        }
        "query-kvm" => {
            args.done()?;
            open(json!({"enabled": true, "present": true}))
        }
        "query-status" => {
            args.done()?;
            let (status, running) = run_status(control);
            open(json!({"status": status, "running": running, "singlestep": false}))
        }
        "stop" => {
            args.done()?;
            control.pause()?;
            open(json!({}))
        }
        "cont" => {
            args.done()?;
            control.resume()?;
            open(json!({}))
        }
        "quit" => {
            args.done()?;
            if let Some(why) = control.quit_refused() {
                return Err(QmpError::generic(why));
            }
            Ok((json!({}), After::Quit))
        }
        "system_reset" => {
            args.done()?;
            control.system_reset()?;
            open(json!({}))
        }
        "query-migrate" => {
            args.done()?;
            open(query_migrate(control.migration_progress().as_deref()))
        }
        "migrate" => {
            let uri = args.string("uri")?;
            // Always detached, as QEMU's QMP migrate is; the rest only where it says no.
            args.opt_bool("detach")?;
            for unsupported in ["blk", "inc", "resume"] {
                if args.opt_bool(unsupported)? == Some(true) {
                    return Err(QmpError::generic(format!(
                        "Parameter '{unsupported}': not supported by this VMM"
                    )));
                }
            }
            args.done()?;
            control.migrate(&settings.migration(uri))?;
            open(json!({}))
        }
        "migrate-incoming" => {
            let uri = args.string("uri")?;
            args.done()?;
            control.migrate_incoming(&uri)?;
            open(json!({}))
        }
        "migrate_cancel" => {
            args.done()?;
            control.migrate_cancel()?;
            open(json!({}))
        }
        "migrate-start-postcopy" => {
            args.done()?;
            if !settings.postcopy_ram() {
                return Err(QmpError::generic(
                    "Enable postcopy with migrate_set_capability before the start of migration",
                ));
            }
            control.migrate_start_postcopy()?;
            open(json!({}))
        }
        "migrate-set-parameters" => {
            settings.set_parameters(args.0)?;
            open(json!({}))
        }
        "query-migrate-parameters" => {
            args.done()?;
            open(settings.parameters_json())
        }
        "migrate-set-capabilities" => {
            let caps = args
                .take("capabilities")
                .ok_or_else(|| missing("capabilities"))?;
            args.done()?;
            settings.set_capabilities(&caps)?;
            open(json!({}))
        }
        "query-migrate-capabilities" => {
            args.done()?;
            open(settings.capabilities_json())
        }
        "query-memory-devices" => {
            args.done()?;
            let blocks = control.status().blocks;
            let dimms: Vec<Value> = blocks
                .iter()
                .filter(|b| b.hotplugged)
                .enumerate()
                .map(|(slot, b)| {
                    json!({"type": "dimm", "data": {
                        "id": b.id,
                        "addr": b.guest_addr.unwrap_or(0),
                        "size": b.size,
                        "slot": slot,
                        "node": 0,
                        "memdev": format!("/objects/{}", b.id),
                        "hotplugged": true,
                        "hotpluggable": true,
                    }})
                })
                .collect();
            open(Value::Array(dimms))
        }
        "x-ram-add" => {
            let id = args.string("id")?;
            let size = args.size("size")?;
            args.done()?;
            let block = control.ram_add(&id, size)?;
            open(json!({
                "id": block.id,
                "size": block.size,
                "addr": block.guest_addr,
            }))
        }
        "x-ram-remove" => {
            let id = args.string("id")?;
            args.done()?;
            control.ram_remove(&id)?;
            open(json!({}))
        }
        _ => Err(QmpError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {name} has not been found"),
        }),
    }
}
