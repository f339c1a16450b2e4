//! The `vmm` command: `vmm run` boots a guest, `vmm tiny-kernel PATH` writes the built-in
//! tiny guest out as an ELF. The command line only fills a [`VmmConfig`]; errors are one
//! line on stderr and a non-zero exit status.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm_core::config::{parse_size, DEFAULT_CMDLINE, DEFAULT_KVM_DEVICE};
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
    Run(RunArgs),
    /// Write the built-in tiny guest kernel (an ELF with a PVH note) to PATH.
    TinyKernel {
        /// Where to write it.
        path: PathBuf,
    },
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
}

impl RunArgs {
    fn config(self) -> Result<VmmConfig, VmmError> {
        let vcpus: u8 = self
            .vcpus
            .trim()
            .parse()
            .map_err(|_| VmmError::BadVcpus(self.vcpus.clone()))?;
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
        })
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Run(args) => {
            let vmm = args
                .config()
                .and_then(Vmm::new)
                .map_err(|e| e.to_string())?;
            let exit = vmm.run().map_err(|e| e.to_string())?;
            log::info!("guest ended: {exit:?}");
            Ok(())
        }
        Command::TinyKernel { path } => vmm_core::tiny::write_tiny_kernel(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
    }
}

fn main() -> ExitCode {
    vmm_core::logger::init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
