//! What the host can give a VM, checked before any of it is asked for: guest RAM against
//! the host's RAM and swap (a `--memory 1T` is refused at once instead of booting into
//! an overcommitted mapping), and the vCPU count against KVM's limit.

use crate::error::VmmError;

/// MemTotal + SwapTotal from `/proc/meminfo` in bytes, or `None` when it cannot be read.
pub fn memory_and_swap() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

/// MemTotal + SwapTotal of a `/proc/meminfo` text.
fn parse_meminfo(text: &str) -> Option<u64> {
    let kib = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) * 1024)
}

/// Refuses `memory` bytes of guest RAM when the host has less RAM and swap together.
pub fn check_memory(memory: u64) -> Result<(), VmmError> {
    match memory_and_swap() {
        Some(host) if memory > host => Err(VmmError::MemoryExceedsHost {
            mib: memory >> 20,
            host_mib: host >> 20,
        }),
        _ => Ok(()),
    }
}

/// Refuses `count` vCPUs when KVM allows fewer (`max`, KVM_CAP_MAX_VCPUS).
pub fn check_vcpus(count: u8, max: usize) -> Result<(), VmmError> {
    if usize::from(count) > max {
        return Err(VmmError::TooManyVcpus { count, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let text = "MemTotal:       24000000 kB\nMemFree: 1 kB\nSwapTotal:       1000 kB\n";
        assert_eq!(parse_meminfo(text), Some(24_001_000 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 4 kB\n"), Some(4096));
        assert_eq!(parse_meminfo("nothing"), None);
        assert!(memory_and_swap().is_some());
    }

    #[test]
    fn limits() {
        assert!(check_memory(1 << 20).is_ok());
        assert!(check_memory(1 << 60).is_err());
        assert!(check_vcpus(2, 4).is_ok());
        assert!(check_vcpus(5, 4).is_err());
    }
}
