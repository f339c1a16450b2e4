//! What a VM is made of, as plain data: [`VmmConfig`] is filled by the command line (or a
//! test, or a future API) and handed to [`crate::Vmm::new`], which checks it
//! ([`VmmConfig::validate`], with the limits defined here). Nothing in the crate is below
//! it: it imports none of it.

use std::path::PathBuf;
use std::str::FromStr;

/// Guest RAM when `--memory` is not given (QEMU's and Firecracker's default).
pub const DEFAULT_MEMORY: u64 = 128 << 20;
/// Smallest guest RAM accepted: the boot area, a kernel at 1 MiB and some room.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Largest guest RAM accepted (the host may still refuse less).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most vCPUs accepted.
pub const MAX_VCPUS: u8 = 64;
/// Kernel command line when `--cmdline` is not given: Linux's console on COM1, and its
/// early console there too (Linux's real console comes up minutes into a boot when guest
/// code is emulated; the early one prints the banner and memory map within tens of seconds),
/// reboot through the keyboard controller and reboot 1 s after a panic, which end the VM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1";
/// The KVM device when `VMM_KVM_DEVICE` does not name another (tests point it elsewhere).
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Why a configuration (or one of its values as typed) is refused: each variant a
/// sentence that names the value and what would be accepted. The limits it quotes are the
/// ones [`VmmConfig::validate`] checks, defined above.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size (`--memory`, `ram-add`'s, `--max-bandwidth`) does not parse.
    #[error("bad size {0:?}: expected bytes with an optional K, M, G or T suffix")]
    BadSize(String),
    /// `--memory` is out of range or not page aligned.
    #[error(
        "bad memory size {0} bytes: it must be a multiple of 4 KiB between {min} MiB and {max} GiB",
        min = MIN_MEMORY >> 20,
        max = MAX_MEMORY >> 30
    )]
    BadMemory(u64),
    /// `--vcpus` is out of range.
    #[error("bad vCPU count {0}: it must be a number between 1 and {MAX_VCPUS}")]
    BadVcpus(String),
    /// `--serial` is neither `stdio` nor `file:PATH`.
    #[error("bad serial output {0:?}: expected stdio or file:PATH")]
    BadSerial(String),
    /// `--memory-backend` is none of `anon`, `memfd`, `file:DIR`.
    #[error("bad memory backend {0:?}: expected anon, memfd or file:DIR")]
    BadMemoryBackend(String),
    /// `--qmp` is not `unix:PATH`.
    #[error("bad --qmp {0:?}: expected unix:PATH (QEMU's ,server and ,wait=off are accepted)")]
    BadQmp(String),
}

/// The path of a `--qmp` chardev: `unix:PATH`, with QEMU's `,server`, `,server=on`,
/// `,nowait` and `,wait=off` accepted (this VMM always listens and never waits).
pub fn parse_qmp(s: &str) -> Result<PathBuf, ConfigError> {
    let bad = || ConfigError::BadQmp(s.to_string());
    let rest = s.strip_prefix("unix:").ok_or_else(bad)?;
    let mut parts = rest.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
    for opt in parts {
        if !matches!(opt, "server" | "server=on" | "nowait" | "wait=off") {
            return Err(bad());
        }
    }
    Ok(PathBuf::from(path))
}

/// What backs guest RAM (`--memory-backend`): every block, boot and hot-added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Private anonymous memory (the default).
    #[default]
    Anon,
    /// A memfd per block, mapped shared: memory another process can map.
    Memfd,
    /// A file per block in this directory (tmpfs or hugetlbfs), mapped shared.
    File(PathBuf),
}

impl FromStr for MemoryBackend {
    type Err = ConfigError;

    /// `anon`, `memfd` or `file:DIR`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "anon" => Ok(MemoryBackend::Anon),
            "memfd" => Ok(MemoryBackend::Memfd),
            _ => match s.strip_prefix("file:") {
                Some(dir) if !dir.is_empty() => Ok(MemoryBackend::File(dir.into())),
                _ => Err(ConfigError::BadMemoryBackend(s.to_string())),
            },
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdio,
    /// A file, created or truncated.
    File(PathBuf),
}

impl FromStr for SerialOutput {
    type Err = ConfigError;

    /// `stdio` or `file:PATH`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(SerialOutput::Stdio),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialOutput::File(path.into())),
                _ => Err(ConfigError::BadSerial(s.to_string())),
            },
        }
    }
}

/// What kernel to boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KernelSource {
    /// The tiny guest built into the binary ([`crate::boot::tiny::TINY_KERNEL`]).
    #[default]
    Tiny,
    /// An ELF kernel with a PVH entry note, or a bzImage.
    Path(PathBuf),
}

/// Everything [`crate::Vmm::new`] needs to build a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmConfig {
    /// The kernel to boot.
    pub kernel: KernelSource,
    /// The initrd (initramfs) to hand the kernel.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes (a multiple of 4 KiB, [`MIN_MEMORY`]..=[`MAX_MEMORY`]).
    pub memory: u64,
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u8,
    /// Where the serial console goes (and, for stdio, where its input comes from).
    pub serial: SerialOutput,
    /// The KVM device to open.
    pub kvm_device: PathBuf,
    /// The control API's unix socket, if any (see [`crate::api`]).
    pub api_socket: Option<PathBuf>,
    /// The QMP socket, if any (see [`crate::api::qmp`]).
    pub qmp: Option<PathBuf>,
    /// What backs guest RAM.
    pub memory_backend: MemoryBackend,
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            kernel: KernelSource::Tiny,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory: DEFAULT_MEMORY,
            vcpus: 1,
            serial: SerialOutput::Stdio,
            kvm_device: DEFAULT_KVM_DEVICE.into(),
            api_socket: None,
            qmp: None,
            memory_backend: MemoryBackend::Anon,
        }
    }
}

impl VmmConfig {
    /// Refuses a memory size or vCPU count the VM cannot have.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory < MIN_MEMORY || self.memory > MAX_MEMORY || !self.memory.is_multiple_of(4096)
        {
            return Err(ConfigError::BadMemory(self.memory));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::BadVcpus(self.vcpus.to_string()));
        }
        Ok(())
    }
}

/// Parses a size: a number of bytes with an optional `K`, `M`, `G` or `T` suffix (powers of
/// 1024, case-insensitive, an optional trailing `iB`/`B`), e.g. `512M`, `2GiB`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .or_else(|| t.strip_suffix(['B', 'b']))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("64KB").unwrap(), 64 << 10);
        for bad in [
            "",
            "M",
            "-1",
            "1.5G",
            "12X",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn memory_backends() {
        assert_eq!(
            "anon".parse::<MemoryBackend>().unwrap(),
            MemoryBackend::Anon
        );
        assert_eq!(
            "memfd".parse::<MemoryBackend>().unwrap(),
            MemoryBackend::Memfd
        );
        assert_eq!(
            "file:/dev/shm/g".parse::<MemoryBackend>().unwrap(),
            MemoryBackend::File("/dev/shm/g".into())
        );
        for bad in ["", "file:", "shm", "Memfd"] {
            assert!(bad.parse::<MemoryBackend>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn qmp() {
        assert_eq!(parse_qmp("unix:/tmp/q").unwrap(), PathBuf::from("/tmp/q"));
        assert_eq!(
            parse_qmp("unix:/tmp/q,server,nowait").unwrap(),
            PathBuf::from("/tmp/q")
        );
        assert_eq!(
            parse_qmp("unix:/tmp/q,server=on,wait=off").unwrap(),
            PathBuf::from("/tmp/q")
        );
        for bad in [
            "/tmp/q",
            "unix:",
            "tcp:1.2.3.4:5",
            "unix:/q,wait=on",
            "unix:/q,telnet",
        ] {
            assert!(parse_qmp(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn serial() {
        assert_eq!(
            "stdio".parse::<SerialOutput>().unwrap(),
            SerialOutput::Stdio
        );
        assert_eq!(
            "file:/tmp/x".parse::<SerialOutput>().unwrap(),
            SerialOutput::File("/tmp/x".into())
        );
        assert!("file:".parse::<SerialOutput>().is_err());
        assert!("tty".parse::<SerialOutput>().is_err());
    }

    #[test]
    fn validate() {
        assert!(VmmConfig::default().validate().is_ok());
        let c = |memory, vcpus| VmmConfig {
            memory,
            vcpus,
            ..VmmConfig::default()
        };
        assert!(c(1 << 20, 1).validate().is_err());
        assert!(c((128 << 20) + 1, 1).validate().is_err());
        assert!(c(128 << 20, 0).validate().is_err());
        assert!(c(128 << 20, 65).validate().is_err());
    }
}
