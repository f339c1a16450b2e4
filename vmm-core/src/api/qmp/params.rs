//! `migrate`'s parameters and capabilities as QMP sets them (`migrate-set-parameters`,
//! `migrate-set-capabilities`; QEMU keeps them per VM, for every monitor), and
//! `query-migrate`'s answer built from the driver's progress, with QEMU's field names.

use super::QmpError;
use crate::api::MigrationParams;
use migration::live::{MigrationProgress, MigrationState};
use serde_json::{json, Map, Value};
use std::sync::{Mutex, MutexGuard};

/// Page size the RAM figures count in.
const PAGE_SIZE: u64 = 4096;

/// The migration settings every QMP client of one VMM shares.
#[derive(Debug)]
pub struct Settings {
    inner: Mutex<Values>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Values {
    /// `downtime-limit`, ms (`None`: the driver's default, 300).
    downtime_limit_ms: Option<u64>,
    /// `max-bandwidth`, bytes per second (`None` or 0: no cap).
    max_bandwidth: Option<u64>,
    /// The `auto-converge` capability (on by default here, as `vmm migrate` has it).
    auto_converge: bool,
    /// The `events` capability: `MIGRATION` and `MIGRATION_PASS` are sent (off by
    /// default, as in QEMU).
    events: bool,
    /// The `x-ignore-shared` capability: RAM another process maps is not sent. Here it
    /// makes `migrate` a local migration (`--local`: the memory's descriptors are handed
    /// over on a `unix:` URI), which is what QEMU's capability is for.
    ignore_shared: bool,
    /// The `postcopy-ram` capability: `migrate-start-postcopy` may switch the migration
    /// to post-copy (off by default, as in QEMU).
    postcopy_ram: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            inner: Mutex::new(Values {
                downtime_limit_ms: None,
                max_bandwidth: None,
                auto_converge: true,
                events: false,
                ignore_shared: false,
                postcopy_ram: false,
            }),
        }
    }
}

/// The capabilities `migrate-set-capabilities` knows, and whether this VMM has them.
const CAPABILITIES: [(&str, bool); 4] = [
    ("auto-converge", true),
    ("events", true),
    ("postcopy-ram", true),
    ("x-ignore-shared", true),
];

impl Settings {
    fn values(&self) -> MutexGuard<'_, Values> {
        // Plain values, each set in one assignment.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `migrate` to `uri` asks the VMM for.
    pub fn migration(&self, uri: String) -> MigrationParams {
        let v = *self.values();
        MigrationParams {
            uri,
            downtime_ms: v.downtime_limit_ms,
            max_bandwidth: v.max_bandwidth,
            auto_converge: Some(v.auto_converge),
            tls_creds: None,
            local: v.ignore_shared,
            postcopy_after: None,
            resume: false,
        }
    }

    /// `migrate-set-parameters`: `downtime-limit` (ms) and `max-bandwidth` (bytes/s);
    /// any other parameter is refused, and nothing is set unless all are good.
    pub fn set_parameters(&self, args: Map<String, Value>) -> Result<(), QmpError> {
        let mut next = *self.values();
        for (name, value) in args {
            let n = value.as_u64().ok_or_else(|| {
                QmpError::generic(format!(
                    "Invalid parameter type for '{name}', expected: integer"
                ))
            })?;
            match name.as_str() {
                "downtime-limit" => {
                    if n == 0 || n > 2_000_000 {
                        return Err(QmpError::generic(
                            "Parameter 'downtime-limit' expects an integer in the range of 1 to 2000000 milliseconds",
                        ));
                    }
                    next.downtime_limit_ms = Some(n);
                }
                "max-bandwidth" => next.max_bandwidth = (n > 0).then_some(n),
                _ => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{name}' is unexpected"
                    )))
                }
            }
        }
        *self.values() = next;
        Ok(())
    }

    /// `migrate-set-capabilities`: `{"capabilities":[{"capability":NAME,"state":BOOL}]}`.
    pub fn set_capabilities(&self, caps: &Value) -> Result<(), QmpError> {
        let list = caps.as_array().ok_or_else(|| {
            QmpError::generic("Invalid parameter type for 'capabilities', expected: array")
        })?;
        let mut next = *self.values();
        for cap in list {
            let (name, state) = match (cap.get("capability"), cap.get("state")) {
                (Some(Value::String(n)), Some(Value::Bool(s))) => (n.as_str(), *s),
                _ => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'capabilities', expected: array of {capability: string, state: bool}",
                    ))
                }
            };
            match CAPABILITIES.iter().find(|(n, _)| *n == name) {
                None => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'capability' does not accept value '{name}'"
                    )))
                }
                Some((_, false)) if state => {
                    return Err(QmpError::generic(format!(
                        "Migration capability '{name}' is not supported by this VMM"
                    )))
                }
                Some(_) => match name {
                    "auto-converge" => next.auto_converge = state,
                    "events" => next.events = state,
                    "x-ignore-shared" => next.ignore_shared = state,
                    "postcopy-ram" => next.postcopy_ram = state,
                    _ => {}
                },
            }
        }
        *self.values() = next;
        Ok(())
    }

    /// Whether the `postcopy-ram` capability is on.
    pub fn postcopy_ram(&self) -> bool {
        self.values().postcopy_ram
    }

    /// Whether the `events` capability is on (`MIGRATION` and `MIGRATION_PASS` sent).
    pub fn migration_events(&self) -> bool {
        self.values().events
    }

    /// `query-migrate-parameters`.
    pub fn parameters_json(&self) -> Value {
        let v = *self.values();
        json!({
            "downtime-limit": v.downtime_limit_ms.unwrap_or(300),
            "max-bandwidth": v.max_bandwidth.unwrap_or(0),
        })
    }

    /// `query-migrate-capabilities`.
    pub fn capabilities_json(&self) -> Value {
        let v = *self.values();
        CAPABILITIES
            .iter()
            .map(|&(name, _)| {
                let state = match name {
                    "auto-converge" => v.auto_converge,
                    "events" => v.events,
                    "x-ignore-shared" => v.ignore_shared,
                    "postcopy-ram" => v.postcopy_ram,
                    _ => false,
                };
                json!({"capability": name, "state": state})
            })
            .collect()
    }
}

/// `query-migrate`'s answer: `{}` before any migration, else QEMU's `MigrationInfo`.
pub fn query_migrate(progress: Option<&MigrationProgress>) -> Value {
    let Some(progress) = progress else {
        return json!({});
    };
    let snap = progress.snapshot();
    let stats = progress.last_stats();
    let state = stats.as_ref().map_or(snap.state, |s| s.status);
    if state == MigrationState::None {
        return json!({});
    }
    let (normal, zero): (u64, u64) = match &stats {
        Some(s) => (s.normal_pages, s.zero_pages),
        None => snap
            .iterations
            .iter()
            .fold((0, 0), |(n, z), i| (n + i.pages, z + i.zero_pages)),
    };
    let total_ms = stats.as_ref().map_or(snap.elapsed_ms, |s| s.total_ms);
    let mbps = match &stats {
        Some(s) => s.throughput_mbps,
        None => snap.bandwidth_bytes_per_s * 8.0 / 1e6,
    };
    let mut v = json!({
        "status": state.name(),
        "total-time": total_ms.round() as u64,
        "expected-downtime": snap.expected_downtime_ms.round() as u64,
        "ram": {
            "transferred": stats.as_ref().map_or(snap.transferred_bytes, |s| s.transferred_bytes),
            "remaining": if state == MigrationState::Completed { 0 } else { snap.remaining_bytes },
            "total": snap.ram_bytes,
            "duplicate": zero,
            "skipped": 0,
            "normal": normal,
            "normal-bytes": normal * PAGE_SIZE,
            "dirty-pages-rate": snap.dirty_pages_rate.round() as u64,
            "mbps": mbps,
            "dirty-sync-count": snap.iterations.len(),
            "page-size": PAGE_SIZE,
        },
    });
    if let Some(s) = &stats {
        v["setup-time"] = (s.setup_ms.round() as u64).into();
        if s.status == MigrationState::Completed {
            v["downtime"] = (s.downtime_ms.round() as u64).into();
        }
        if let Some(e) = &s.error {
            v["error-desc"] = e.clone().into();
        }
    } else if let Some(e) = &snap.error {
        v["error-desc"] = e.clone().into();
    }
    if snap.cpu_throttle_percent > 0 {
        v["cpu-throttle-percentage"] = snap.cpu_throttle_percent.into();
    }
    v
}
