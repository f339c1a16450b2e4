//! Two hosts on one machine: a pair of network namespaces joined by a shaped veth link,
//! made by `scripts/netns-link.sh` (the source's side 10.77.0.1, the destination's
//! 10.77.0.2, RATE and DELAY each way), for tests that move a guest across a real,
//! slow network rather than a loopback.
//!
//! Each [`NetnsLink`] gets namespaces of its own (`mvm{pid}x{n}-src` and `-dst`: nextest
//! runs tests in parallel processes), and removes them when dropped, after a failed test
//! too. Inside, every link looks the same: the interfaces (`veth0`, and `delay0` where the
//! delay is a user-space delay line) are made in their namespaces under those fixed
//! names, far from the 15-character limit, with the same addresses.
//! Namespaces a killed test process left behind (its `Drop` never ran) are removed by the
//! next [`NetnsLink::up`] of any test process, once their owner's pid is gone.
//!
//! A test asks for a link with [`require_netns!`](crate::require_netns), which prints
//! `SKIPPED: no network namespaces` and returns where the host does not allow them, and
//! runs its processes on either side with [`NetnsLink::in_src`] / [`NetnsLink::in_dst`].
//! Declare the link before the processes that run in it, so that they are dropped
//! (killed) first:
//!
//! ```no_run
//! use minivmm_tests::{require_netns, vmm, Running};
//!
//! fn a_test() {
//!     let link = require_netns!("40mbit", "5ms");
//!     let uri = format!("tcp:{}:4444", link.dst_addr());
//!     let dst = Running::spawn(link.in_dst(vmm(&["run", "--incoming", &uri])));
//!     // ...
//! }
//! ```
//!
//! Only the network is apart: the filesystem is shared, so a unix socket one side binds
//! (`--api-socket`) is reached from the other and from the test itself.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

/// The source side's address on the link (`/24`).
pub const SRC_ADDR: &str = "10.77.0.1";
/// The destination side's address on the link (`/24`).
pub const DST_ADDR: &str = "10.77.0.2";

/// What `scripts/netns-link.sh up` exits with where namespaces cannot be made.
const SKIP_STATUS: i32 = 77;

/// Prefixes this helper makes start so; the rest is `{pid}x{n}`.
const PREFIX_HEAD: &str = "mvm";

/// Two network namespaces joined by a shaped veth link, removed on drop.
#[derive(Debug)]
pub struct NetnsLink {
    prefix: String,
    src: String,
    dst: String,
}

impl NetnsLink {
    /// Makes the link: RATE each way as tc spells it (`5mbit`, `40mbit`), DELAY one way
    /// (`20ms`; a round trip takes twice that). `None`, after printing
    /// `SKIPPED: no network namespaces`, where this host does not allow them (no
    /// CAP_NET_ADMIN, no `ip`); panics with the script's stderr on any other failure.
    pub fn up(rate: &str, delay: &str) -> Option<NetnsLink> {
        static SWEEP: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        SWEEP.call_once(remove_stale_links);
        let prefix = format!(
            "{PREFIX_HEAD}{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = script(&prefix, &["up", rate, delay]);
        if out.status.code() == Some(SKIP_STATUS) {
            println!("SKIPPED: no network namespaces");
            eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim_end());
            return None;
        }
        assert!(
            out.status.success(),
            "scripts/netns-link.sh up {rate} {delay} (prefix {prefix}) failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(NetnsLink {
            src: format!("{prefix}-src"),
            dst: format!("{prefix}-dst"),
            prefix,
        })
    }

    /// The namespaces' common prefix (`ip netns list` shows `PREFIX-src`, `PREFIX-dst`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The source side's namespace.
    pub fn src_netns(&self) -> &str {
        &self.src
    }

    /// The destination side's namespace.
    pub fn dst_netns(&self) -> &str {
        &self.dst
    }

    /// The source side's address, [`SRC_ADDR`].
    pub fn src_addr(&self) -> &'static str {
        SRC_ADDR
    }

    /// The destination side's address, [`DST_ADDR`].
    pub fn dst_addr(&self) -> &'static str {
        DST_ADDR
    }

    /// `cmd` run in the source's namespace (`ip netns exec NAME PROGRAM ARGS...`, which
    /// execs the program: the child's pid is the program's), with its environment
    /// changes and directory. Its stdio settings do not carry over (`Command` does not
    /// show them): set them on the command returned.
    pub fn in_src(&self, cmd: Command) -> Command {
        in_netns(&self.src, cmd)
    }

    /// `cmd` run in the destination's namespace, as [`NetnsLink::in_src`].
    pub fn in_dst(&self, cmd: Command) -> Command {
        in_netns(&self.dst, cmd)
    }

    /// `scripts/netns-link.sh status`: the namespaces, addresses, qdiscs and delay lines.
    pub fn status(&self) -> String {
        let out = script(&self.prefix, &["status"]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for NetnsLink {
    fn drop(&mut self) {
        // No panic here: the test may be unwinding already.
        let out = script(&self.prefix, &["down"]);
        if !out.status.success() {
            eprintln!(
                "scripts/netns-link.sh down (prefix {}) failed ({}): {}",
                self.prefix,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Makes a [`NetnsLink`] with RATE and DELAY, or returns from the calling test after
/// printing `SKIPPED: no network namespaces`; evaluates to the link.
#[macro_export]
macro_rules! require_netns {
    ($rate:expr, $delay:expr) => {
        match $crate::netns::NetnsLink::up($rate, $delay) {
            Some(link) => link,
            None => return,
        }
    };
}

/// The names `ip netns list` shows (empty where it cannot run).
pub fn netns_list() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `cmd` behind `ip netns exec NETNS`, with its program, arguments, environment changes
/// and directory. Its stdio settings (which `Command` does not show) and an `env_clear`
/// do not carry over: set them on the command returned.
fn in_netns(netns: &str, cmd: Command) -> Command {
    let mut wrapped = Command::new("ip");
    wrapped
        .args(["netns", "exec", netns])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// `scripts/netns-link.sh ARGS` for PREFIX, its output captured. The delay lines it may
/// start end by themselves once this process is gone (`NETNS_OWNER_PID`).
fn script(prefix: &str, args: &[&str]) -> Output {
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("..");
    let path = root.join("scripts/netns-link.sh");
    Command::new("bash")
        .arg(&path)
        .args(args)
        .env("NETNS_PREFIX", prefix)
        .env("NETNS_OWNER_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running bash {}: {e}", path.display()))
}

/// The prefix of a namespace this helper made (`mvm{pid}x{n}-src|dst`) and its owner's
/// pid.
fn owned_prefix(netns: &str) -> Option<(&str, u32)> {
    let prefix = netns
        .strip_suffix("-src")
        .or_else(|| netns.strip_suffix("-dst"))?;
    let (pid, n) = prefix.strip_prefix(PREFIX_HEAD)?.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(n) || !digits(pid) {
        return None;
    }
    Some((prefix, pid.parse().ok()?))
}

/// Removes the links of test processes that are gone (killed before their `Drop` ran).
fn remove_stale_links() {
    let mut done: Vec<String> = Vec::new();
    for netns in netns_list() {
        let Some((prefix, pid)) = owned_prefix(&netns) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists()
            || done.iter().any(|d| d == prefix)
        {
            continue;
        }
        // Another process may be sweeping it at the same time: failures are theirs.
        let _ = script(prefix, &["down"]);
        done.push(prefix.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn only_this_helpers_namespaces_are_swept() {
        assert_eq!(owned_prefix("mvm1234x0-src"), Some(("mvm1234x0", 1234)));
        assert_eq!(owned_prefix("mvm1234x17-dst"), Some(("mvm1234x17", 1234)));
        for other in [
            "mvm-src",
            "mvmx1-src",
            "mvm12x-dst",
            "mvm12x3",
            "foo12x3-src",
        ] {
            assert_eq!(owned_prefix(other), None, "{other}");
        }
    }

    #[test]
    fn a_wrapped_command_keeps_its_program_arguments_and_environment() {
        let mut cmd = Command::new("/bin/echo");
        cmd.args(["a", "b"]).env("X", "1").env_remove("Y");
        let w = in_netns("ns1", cmd);
        assert_eq!(w.get_program(), "ip");
        let args: Vec<&OsStr> = w.get_args().collect();
        assert_eq!(args, ["netns", "exec", "ns1", "/bin/echo", "a", "b"]);
        let envs: Vec<_> = w.get_envs().collect();
        assert!(envs.contains(&(os("X"), Some(os("1")))), "{envs:?}");
        assert!(envs.contains(&(os("Y"), None)), "{envs:?}");
    }
}
