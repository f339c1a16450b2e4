//! The `vmm` command: `vmm run` boots a guest, `vmm tiny-kernel PATH` writes the built-in
//! tiny guest out as an ELF, and `vmm status|pause|resume|quit|ram-add|ram-remove` are thin
//! clients of a running VMM's control API; `vmm migrate` moves its guest to another VMM
//! started with `vmm run --incoming URI`. The command line only fills a [`VmmConfig`]
//! (or one API request); errors are one line on stderr and a non-zero exit status.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm_core::api::Request;
use vmm_core::config::{
    parse_qmp, parse_size, ConfigError, MemoryBackend, DEFAULT_CMDLINE, DEFAULT_KVM_DEVICE,
};
use vmm_core::vmm::IncomingTls;
use vmm_core::{KernelSource, SerialOutput, Vmm, VmmConfig, VmmError};

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A miniature KVM virtual machine monitor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (the built-in tiny guest when no --kernel is given).
    Run(Box<RunArgs>),
    /// Write the built-in tiny guest kernel (an ELF with a PVH note) to PATH.
    TinyKernel {
        /// Where to write it.
        path: PathBuf,
    },
    /// Print a running VMM's status (JSON).
    Status(ApiArgs),
    /// Stop a running VMM's vCPUs.
    Pause(ApiArgs),
    /// Let a paused VMM's vCPUs run again.
    Resume(ApiArgs),
    /// End a running VMM (it exits with status 0).
    Quit(ApiArgs),
    /// Hot-add a RAM block to a running VMM.
    RamAdd {
        #[command(flatten)]
        api: ApiArgs,
        /// The block's id.
        #[arg(long, value_name = "NAME")]
        id: String,
        /// Its size (bytes, or with a K/M/G/T suffix).
        #[arg(long, value_name = "SIZE")]
        size: String,
    },
    /// Hot-remove a RAM block from a running VMM.
    RamRemove {
        #[command(flatten)]
        api: ApiArgs,
        /// The block's id.
        #[arg(long, value_name = "NAME")]
        id: String,
    },
    /// Pause a running VMM's guest and write a snapshot restored by mapping into DIR:
    /// DIR/state and a sparse DIR/memory (`vmm run --restore DIR` runs it again). The guest
    /// stays paused (`vmm resume` or `vmm quit` decide).
    Snapshot {
        #[command(flatten)]
        api: ApiArgs,
        /// The directory (made if missing; a snapshot there is replaced).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Write only the pages the guest wrote since BASE: the guest must have been
        /// restored (`vmm run --restore`) from BASE or from a snapshot stacked on it.
        /// `vmm run --restore DIR` then stacks DIR on BASE.
        #[arg(long, value_name = "BASE")]
        diff_from: Option<PathBuf>,
    },
    /// Live-migrate a running VMM's guest (or snapshot it to file:PATH).
    Migrate {
        #[command(flatten)]
        api: ApiArgs,
        /// Where to: unix:PATH, tcp:HOST:PORT or file:PATH.
        #[arg(long, value_name = "URI")]
        to: String,
        /// The longest pause of the guest, in ms (default 300).
        #[arg(long, value_name = "N")]
        downtime_ms: Option<u64>,
        /// A bandwidth cap, in bytes per second (or with a K/M/G suffix: `100M`).
        #[arg(long, value_name = "BYTES_PER_S")]
        max_bandwidth: Option<String>,
        /// Never throttle the guest's vCPUs. By default (auto-converge, as QEMU's but on)
        /// a guest that dirties memory faster than the link carries it is slowed down,
        /// 20% and then 10% more at a time up to 99%, until the rest fits the downtime
        /// limit; the throttle is lifted when the migration ends.
        #[arg(long)]
        no_auto_converge: bool,
        /// Print one JSON object with the migration's figures at the end.
        #[arg(long)]
        json: bool,
        /// Mutual TLS (tcp: only): DIR holds ca-cert.pem, client-cert.pem and
        /// client-key.pem (QEMU's x509 layout); the destination's certificate must be
        /// valid for the URI's host.
        #[arg(long, value_name = "DIR")]
        tls_creds: Option<PathBuf>,
        /// Hand the guest's memory over instead of copying it: unix: only, and the
        /// VM's RAM must be memory another process can map (--memory-backend memfd or
        /// file:DIR). The descriptors go over the socket; only the vCPU and device state
        /// travel, and no page.
        #[arg(long)]
        local: bool,
        /// Post-copy: start as pre-copy, then, after the first pass (unless it
        /// converged), move the guest to the destination and send the pages it still
        /// misses there after it: those it touches first, on request. Choose it when the
        /// guest dirties memory faster than the link carries it. A link that breaks after
        /// the switch loses the guest. Plain unix: or tcp: only.
        #[arg(long)]
        postcopy: bool,
        /// With --postcopy, switch after N iterations instead of after the first pass (0:
        /// at once, before any page is sent: every page the guest touches first is then
        /// fetched on demand).
        #[arg(long, value_name = "N", requires = "postcopy")]
        postcopy_after: Option<u32>,
        /// Go on with a post-copy whose link broke (status `postcopy-paused`): reconnect
        /// to --to, where the destination listens again (its --incoming URI), send what
        /// it still misses, and finish as the migration would have.
        #[arg(long, conflicts_with_all = ["postcopy", "local", "tls_creds", "downtime_ms", "max_bandwidth", "no_auto_converge"])]
        resume: bool,
    },
    /// Switch the migration under way to post-copy at the end of its iteration (QEMU's
    /// migrate-start-postcopy).
    StartPostcopy {
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Where a running VMM's control API is.
#[derive(clap::Args)]
struct ApiArgs {
    /// The VMM's --api-socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel: an ELF vmlinux with a PVH entry note, or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initrd (initramfs) for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM (bytes, or with a K/M/G/T suffix).
    #[arg(long, value_name = "SIZE", default_value = "128M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1")]
    vcpus: String,
    /// Serial console: stdio or file:PATH.
    #[arg(long, value_name = "stdio|file:PATH", default_value = "stdio")]
    serial: String,
    /// Serve the control API on this unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// What backs guest RAM: anon (private anonymous memory, the default), memfd (shareable
    /// with another process), or file:DIR (a file per RAM block in DIR, on tmpfs or
    /// hugetlbfs).
    #[arg(long, value_name = "anon|memfd|file:DIR", default_value = "anon")]
    memory_backend: String,
    /// Serve QMP (QEMU's machine protocol) on this unix socket: unix:PATH.
    #[arg(long, value_name = "unix:PATH")]
    qmp: Option<String>,
    /// Receive the guest from a migration source (unix:PATH, tcp:HOST:PORT) or a snapshot
    /// (file:PATH) instead of booting a kernel.
    #[arg(long, value_name = "URI")]
    incoming: Option<String>,
    /// Mutual TLS for --incoming tcp:...: DIR holds ca-cert.pem, server-cert.pem and
    /// server-key.pem (QEMU's x509 layout); a source must show a certificate of that CA.
    #[arg(long, value_name = "DIR", requires = "incoming")]
    tls_creds: Option<PathBuf>,
    /// With --tls-creds: the only name (DNS name or IP address) a source's certificate
    /// may be valid for.
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    tls_authz: Option<String>,
    /// Run the guest of the snapshot in DIR (written by `vmm snapshot`): DIR/memory is
    /// mapped copy-on-write as guest RAM, read on the guest's first touch. Memory and vCPUs
    /// are the snapshot's.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["incoming", "kernel", "initrd", "memory", "vcpus", "cmdline"]
    )]
    restore: Option<PathBuf>,
    /// With --restore: read all of DIR/memory in before the guest runs.
    #[arg(long, requires = "restore")]
    restore_prefault: bool,
}

impl RunArgs {
    fn config(self) -> Result<VmmConfig, VmmError> {
        let vcpus: u8 = self
            .vcpus
            .trim()
            .parse()
            .map_err(|_| VmmError::from(ConfigError::BadVcpus(self.vcpus.clone())))?;
        Ok(VmmConfig {
            kernel: self.kernel.map_or(KernelSource::Tiny, KernelSource::Path),
            initrd: self.initrd,
            cmdline: self.cmdline,
            memory: parse_size(&self.memory)?,
            vcpus,
            serial: self.serial.parse::<SerialOutput>()?,
            // Hidden on purpose: tests point it at a missing device.
            kvm_device: std::env::var_os("VMM_KVM_DEVICE")
                .map_or_else(|| DEFAULT_KVM_DEVICE.into(), PathBuf::from),
            api_socket: self.api_socket,
            qmp: self.qmp.as_deref().map(parse_qmp).transpose()?,
            memory_backend: self.memory_backend.parse::<MemoryBackend>()?,
        })
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Run(mut args) if args.incoming.is_some() => {
            let uri = args.incoming.take().unwrap_or_default();
            let tls = args.tls_creds.take().map(|creds| IncomingTls {
                creds,
                authz: args.tls_authz.take(),
            });
            let config = args.config().map_err(|e| e.to_string())?;
            let exit = vmm_core::vmm::run_incoming(config, &uri, tls.as_ref())
                .map_err(|e| e.to_string())?;
            log::info!("guest ended: {exit:?}");
            Ok(())
        }
        Command::Run(mut args) if args.restore.is_some() => {
            let dir = args.restore.take().unwrap_or_default();
            let prefault = args.restore_prefault;
            let config = args.config().map_err(|e| e.to_string())?;
            let exit =
                vmm_core::vmm::run_restore(config, &dir, prefault).map_err(|e| e.to_string())?;
            log::info!("guest ended: {exit:?}");
            Ok(())
        }
        Command::Run(args) => {
            let vmm = args
                .config()
                .and_then(Vmm::new)
                .map_err(|e| e.to_string())?;
            let exit = vmm.run().map_err(|e| e.to_string())?;
            log::info!("guest ended: {exit:?}");
            Ok(())
        }
        Command::TinyKernel { path } => vmm_core::boot::tiny::write_tiny_kernel(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
        Command::Status(api) => client(api, Request::Status),
        Command::Pause(api) => client(api, Request::Pause),
        Command::Resume(api) => client(api, Request::Resume),
        Command::Quit(api) => client(api, Request::Quit),
        Command::RamAdd { api, id, size } => {
            let size = parse_size(&size).map_err(|e| e.to_string())?;
            client(api, Request::RamAdd { id, size })
        }
        Command::RamRemove { api, id } => client(api, Request::RamRemove { id }),
        Command::StartPostcopy { api } => client(api, Request::StartPostcopy),
        Command::Snapshot { api, to, diff_from } => {
            // The VMM reads and writes them: relative paths are the client's.
            let abs = |p: PathBuf| {
                std::path::absolute(&p)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .into_owned()
            };
            client(
                api,
                Request::Snapshot {
                    dir: abs(to),
                    diff_from: diff_from.map(abs),
                },
            )
        }
        Command::Migrate {
            api,
            to,
            downtime_ms,
            max_bandwidth,
            no_auto_converge,
            json,
            tls_creds,
            local,
            postcopy,
            postcopy_after,
            resume,
        } => {
            let max_bandwidth = max_bandwidth
                .map(|b| parse_size(&b))
                .transpose()
                .map_err(|e| format!("--max-bandwidth: {e}"))?;
            let args = vmm_core::api::migrate_client::MigrateArgs {
                uri: to,
                downtime_ms,
                max_bandwidth,
                auto_converge: !no_auto_converge,
                json,
                tls_creds,
                local,
                postcopy_after: postcopy.then(|| postcopy_after.unwrap_or(1)),
                resume,
            };
            vmm_core::api::migrate_client::run(&api.api_socket, &args).map_err(|e| e.to_string())
        }
    }
}

/// Sends one request to a running VMM and prints its answer.
fn client(api: ApiArgs, request: Request) -> Result<(), String> {
    let out = vmm_core::api::client::run(&api.api_socket, &request).map_err(|e| e.to_string())?;
    vmm_core::api::client::print_line(&out).map_err(|e| format!("writing to stdout: {e}"))
}

fn main() -> ExitCode {
    vmm_core::host::logger::init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
