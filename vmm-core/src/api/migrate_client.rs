//! `vmm migrate`: the thin client that starts a migration through the control API and
//! follows it by polling `status` until it ends. With `--json` it prints one JSON object
//! at the end (the source's `MigrationStats`); on a terminal without it, a live progress
//! bar (transferred, remaining, dirty rate, iteration). It fails (non-zero) when the
//! migration failed, naming what failed.

use super::client::{print_line, request, ClientError};
use super::{MigrationParams, Request};
use indicatif::{ProgressBar, ProgressStyle};
use migration::transport::MigrationUri;
use serde_json::Value;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the client polls `status`: every [`POLL_FIRST`] during the first
/// [`FIRST_PHASE`] (a local migration, or an idle guest's, ends within milliseconds: the
/// client should not take 50 times longer to notice), every [`POLL`] after.
const POLL: Duration = Duration::from_millis(50);
const POLL_FIRST: Duration = Duration::from_millis(10);
const FIRST_PHASE: Duration = Duration::from_millis(200);

/// What `vmm migrate` was asked.
#[derive(Debug, Clone)]
pub struct MigrateArgs {
    /// `unix:PATH`, `tcp:HOST:PORT` or `file:PATH`.
    pub uri: String,
    /// The downtime limit in ms.
    pub downtime_ms: Option<u64>,
    /// A bandwidth cap in bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Throttle the guest's vCPUs when it dirties memory faster than it goes (on unless
    /// `--no-auto-converge`).
    pub auto_converge: bool,
    /// Print the final stats as one JSON object.
    pub json: bool,
    /// Hand the memory over instead of copying it (`--local`).
    pub local: bool,
    /// Switch to post-copy after this many iterations (`--postcopy`: 1).
    pub postcopy_after: Option<u32>,
    /// Go on with a paused post-copy on `uri` (`--resume`).
    pub resume: bool,
    /// Mutual TLS: the source's credentials directory (made absolute here: the VMM reads
    /// it).
    pub tls_creds: Option<PathBuf>,
}

/// Why `vmm migrate` failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateClientError {
    /// The control API refused or broke.
    #[error(transparent)]
    Api(#[from] ClientError),
    /// The VMM went away before reporting how the migration ended.
    #[error("the VMM ended before reporting the migration's end: {0}")]
    Vanished(ClientError),
    /// The stats could not be printed.
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
    /// The migration ended without success.
    #[error("migration {status}: {error}")]
    Failed {
        /// failed or cancelled.
        status: String,
        /// What failed.
        error: String,
    },
}

fn migration_of(status: &Value) -> Option<&Value> {
    status.get("migration").filter(|m| m.is_object())
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

/// A relative `file:` or `unix:` path is the client's (as `--api-socket` is, and as `cp`
/// would take it), not the VMM's: made absolute here. Anything else goes as given (an
/// unparsable URI for the VMM to refuse with its reason).
fn absolute_uri(uri: &str) -> String {
    let abs = |p: &Path| std::path::absolute(p).ok();
    match uri.parse::<MigrationUri>() {
        Ok(MigrationUri::File(p)) if p.is_relative() => {
            abs(&p).map(|a| MigrationUri::File(a).to_string())
        }
        Ok(MigrationUri::Unix(p)) if p.is_relative() => {
            abs(&p).map(|a| MigrationUri::Unix(a).to_string())
        }
        _ => None,
    }
    .unwrap_or_else(|| uri.to_string())
}

/// Resume attempts the migration had ended before this client asked for one.
fn resume_attempts(status: &Value) -> u64 {
    migration_of(status).map_or(0, |m| num(m, "postcopy_resume_attempts") as u64)
}

/// What a post-copy paused by a broken link means for the user.
const PAUSED_HINT: &str = "the guest runs on the destination with pages only this side has, and waits for them: `vmm migrate --resume --to URI` goes on once the destination listens again (on its --incoming URI); if the destination is gone, the guest is lost";

/// Runs `vmm migrate`; prints as the module documentation says.
pub fn run(api: &Path, args: &MigrateArgs) -> Result<(), MigrateClientError> {
    let attempts_before = if args.resume {
        resume_attempts(&request(api, &Request::Status)?)
    } else {
        0
    };
    request(
        api,
        &Request::Migrate(MigrationParams {
            uri: absolute_uri(&args.uri),
            downtime_ms: args.downtime_ms,
            max_bandwidth: args.max_bandwidth,
            auto_converge: Some(args.auto_converge),
            tls_creds: args.tls_creds.as_deref().map(|d| {
                std::path::absolute(d)
                    .unwrap_or_else(|_| d.to_path_buf())
                    .to_string_lossy()
                    .into_owned()
            }),
            local: args.local,
            postcopy_after: args.postcopy_after,
            resume: args.resume,
        }),
    )?;
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    let t0 = Instant::now();
    let stats = loop {
        let status = match request(api, &Request::Status) {
            Ok(s) => s,
            Err(e @ (ClientError::Connect { .. } | ClientError::NoAnswer(_))) => {
                return Err(MigrateClientError::Vanished(e))
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(m) = migration_of(&status) {
            if let Some(stats) = m.get("stats").filter(|s| s.is_object()) {
                break stats.clone();
            }
            let paused = m.get("state").and_then(Value::as_str) == Some("postcopy-paused");
            if paused && (!args.resume || resume_attempts(&status) > attempts_before) {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                let error = format!(
                    "{}; {PAUSED_HINT}",
                    m.get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("the link broke")
                );
                if args.json {
                    let mut v = m.clone();
                    v["status"] = "postcopy-paused".into();
                    print_line(&v.to_string()).map_err(MigrateClientError::Stdout)?;
                }
                return Err(MigrateClientError::Failed {
                    status: "postcopy-paused".into(),
                    error,
                });
            }
            if let Some(bar) = &bar {
                let sent = num(m, "transferred_bytes") as u64;
                let left = num(m, "remaining_bytes") as u64;
                bar.set_length(sent + left.max(1));
                bar.set_position(sent);
                bar.set_message(format!(
                    "remaining {} MiB, dirty {:.0} pages/s, iteration {}, vCPU throttle {}%",
                    left >> 20,
                    num(m, "dirty_pages_rate"),
                    num(m, "iteration"),
                    num(m, "cpu_throttle_percent")
                ));
            }
        }
        std::thread::sleep(if t0.elapsed() < FIRST_PHASE {
            POLL_FIRST
        } else {
            POLL
        });
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let status = stats
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    if args.json {
        print_line(&stats.to_string()).map_err(MigrateClientError::Stdout)?;
    } else {
        print_line(&format!(
            "migration {status} in {:.1} ms (downtime {:.1} ms, {} bytes, {} iterations, {:.0} Mbit/s, vCPU throttle up to {}%)",
            num(&stats, "total_ms"),
            num(&stats, "downtime_ms"),
            num(&stats, "transferred_bytes") as u64,
            num(&stats, "iterations") as u64,
            num(&stats, "throughput_mbps"),
            num(&stats, "cpu_throttle_percent"),
        ))
        .map_err(MigrateClientError::Stdout)?;
    }
    log::debug!("migrate client: {:?}", t0.elapsed());
    if status == "completed" {
        Ok(())
    } else {
        Err(MigrateClientError::Failed {
            status,
            error: stats
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_string(),
        })
    }
}
