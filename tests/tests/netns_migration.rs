//! Two hosts on one machine: a destination `vmm` in one network namespace, the source in
//! another, joined by a veth link shaped to 40 Mbit/s and 5 ms each way
//! (`scripts/netns-link.sh`, through `minivmm_tests::netns`): the tiny guest moves over
//! `tcp:` across the link, its ticks going on, and the namespaces are gone after the
//! test. The control sockets are bound inside the namespaces and used from outside them
//! (network namespaces do not isolate the filesystem), and `vmm migrate` runs outside
//! both: the source VMM makes the connection. A second test checks that the link is
//! really shaped: a TCP stream between the namespaces goes at about the configured rate,
//! and a connection takes at least the round trip the delay makes.

use minivmm_tests::netns::{netns_list, NetnsLink};
use minivmm_tests::{api_request, require_kvm, require_netns, ticks, vmm, Running, Scratch};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Guest code is emulated here; a loaded host may stall a child for seconds.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Any port: the destination's namespace is new and nothing else listens in it.
const PORT: u16 = 4444;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Polls `api`'s status (from this process, outside the namespace the VMM runs in)
/// until `incoming.stage` is `stage`.
fn wait_for_stage(api: &Path, stage: &str) -> Value {
    minivmm_tests::wait_for_path(api, TIMEOUT);
    let t0 = Instant::now();
    loop {
        let st = api_request(api, r#"{"cmd":"status"}"#);
        if st["incoming"]["stage"] == stage {
            return st;
        }
        assert!(t0.elapsed() < TIMEOUT, "never {stage}: {st}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `cmd` (already wrapped into a namespace) started with stdin closed.
fn spawn(mut cmd: Command) -> Running {
    cmd.stdin(Stdio::null());
    Running::spawn(cmd)
}

#[test]
fn the_tiny_guest_migrates_over_tcp_between_two_network_namespaces() {
    require_kvm!();
    let d = Scratch::new("netns-migration");
    let link = require_netns!("40mbit", "5ms");
    let prefix = link.prefix().to_string();
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let uri = format!("tcp:{}:{PORT}", link.dst_addr());

    let mut dst = spawn(link.in_dst(vmm(&[
        "run",
        "--memory",
        "64M",
        "--incoming",
        &uri,
        "--api-socket",
        s(&dst_api),
    ])));
    let st = wait_for_stage(&dst_api, "listening");
    assert_eq!(st["incoming"]["uri"], uri.as_str(), "{st}");
    let mut src = spawn(link.in_src(vmm(&[
        "run",
        "--memory",
        "64M",
        "--api-socket",
        s(&src_api),
    ])));
    src.expect_line("a tick on the source", TIMEOUT, |l| l.starts_with("tick "));

    let out = vmm(&[
        "migrate",
        "--api-socket",
        s(&src_api),
        "--to",
        &uri,
        "--json",
    ])
    .output()
    .expect("running vmm migrate");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vmm migrate failed: {out:?}\n{}",
        link.status()
    );
    let stats: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("vmm migrate --json printed {text:?}: {e}"));
    println!(
        "migrated over {uri}: {} bytes in {} ms, downtime {} ms, {} Mbit/s",
        stats["transferred_bytes"],
        stats["total_ms"],
        stats["downtime_ms"],
        stats["throughput_mbps"]
    );
    assert_eq!(stats["status"], "completed", "{stats}");
    assert!(
        stats["transferred_bytes"].as_u64().unwrap() > 0,
        "nothing sent: {stats}"
    );
    // The stream and the destination's confirmation cross the link: one round trip
    // (2 x 5 ms) at the very least.
    assert!(
        stats["total_ms"].as_f64().unwrap() >= 10.0,
        "faster than the link's round trip: {stats}"
    );

    let (status, src_lines, src_err) = src.wait(Duration::from_secs(10));
    assert!(
        status.success(),
        "the source exited with {status}: {src_err}"
    );
    let last_src = *ticks(&src_lines).last().expect("ticks on the source");
    for n in 0..5 {
        dst.expect_line(&format!("tick {n} of 5 on the destination"), TIMEOUT, |l| {
            l.starts_with("tick ")
        });
    }
    let dst_ticks = ticks(dst.seen());
    assert!(
        dst_ticks[0] > last_src,
        "ticks went back: source {last_src}, destination {dst_ticks:?}"
    );
    assert!(
        dst_ticks.windows(2).all(|w| w[0] < w[1]),
        "destination ticks not strictly increasing: {dst_ticks:?}"
    );
    let st = api_request(&dst_api, r#"{"cmd":"status"}"#);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["incoming"]["stage"], "completed", "{st}");

    drop(dst);
    drop(link);
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// Accepts `PROBES` connections (the sender times them), then one stream it counts,
/// timed from its first byte to its end; answers one byte and prints
/// `received BYTES SECONDS`.
const RECEIVER: &str = r#"
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
for _ in range(int(sys.argv[3])):
    server.accept()[0].close()
conn, _ = server.accept()
first, n = None, 0
while True:
    b = conn.recv(1 << 16)
    if not b:
        break
    first = first or time.monotonic()
    n += len(b)
elapsed = time.monotonic() - first
conn.sendall(b"k")
conn.close()
print(f"received {n} {elapsed:.6f}", flush=True)
"#;

/// Connects `PROBES` times, printing `connect_ms MS...`, then sends `BYTES` and waits
/// for the receiver's answer.
const SENDER: &str = r#"
import socket, sys, time
addr = (sys.argv[1], int(sys.argv[2]))
ms = []
for _ in range(int(sys.argv[3])):
    t = time.monotonic()
    socket.create_connection(addr).close()
    ms.append((time.monotonic() - t) * 1000)
print("connect_ms", *(f"{m:.3f}" for m in ms), flush=True)
conn = socket.create_connection(addr)
left, chunk = int(sys.argv[4]), b"x" * 65536
while left > 0:
    conn.sendall(chunk[:left])
    left -= min(left, len(chunk))
conn.shutdown(socket.SHUT_WR)
assert conn.recv(1) == b"k"
"#;

fn python(link: &NetnsLink, src_side: bool, code: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(code).args(args);
    let mut cmd = if src_side {
        link.in_src(cmd)
    } else {
        link.in_dst(cmd)
    };
    cmd.stdin(Stdio::null());
    cmd
}

/// 2.5 MB over an 8 Mbit/s link with 10 ms each way: about 2.5 s, and connections that
/// take at least 20 ms (measured on the delay line: 7.7 Mbit/s, 20.6 ms).
#[test]
fn the_link_between_the_namespaces_is_shaped() {
    const RATE_MBIT: f64 = 8.0;
    const DELAY_MS: f64 = 10.0;
    const BYTES: u64 = 2_500_000;
    const PROBES: &str = "5";
    if Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_err()
    {
        println!("SKIPPED: no python3");
        return;
    }
    let link = require_netns!("8mbit", "10ms");
    let port = PORT.to_string();
    let bytes = BYTES.to_string();
    let mut receiver = Running::spawn(python(
        &link,
        false,
        RECEIVER,
        &[link.dst_addr(), &port, PROBES],
    ));
    receiver.expect_line("the receiver listening", TIMEOUT, |l| l == "listening");
    let t0 = Instant::now();
    let sender = python(
        &link,
        true,
        SENDER,
        &[link.dst_addr(), &port, PROBES, &bytes],
    )
    .output()
    .expect("running the python3 sender");
    assert!(
        sender.status.success(),
        "the sender failed: {sender:?}\n{}",
        link.status()
    );
    assert!(
        t0.elapsed() < TIMEOUT,
        "the transfer took {:?}",
        t0.elapsed()
    );
    let (status, lines, err) = receiver.wait(Duration::from_secs(10));
    assert!(status.success(), "the receiver failed: {status}: {err}");

    let sent = String::from_utf8_lossy(&sender.stdout);
    let connect_ms: Vec<f64> = sent
        .lines()
        .find_map(|l| l.strip_prefix("connect_ms "))
        .unwrap_or_else(|| panic!("no connect_ms line from the sender: {sent}"))
        .split_whitespace()
        .map(|m| m.parse().expect("a connect time in ms"))
        .collect();
    let received = lines
        .iter()
        .find_map(|l| l.strip_prefix("received "))
        .unwrap_or_else(|| panic!("no received line from the receiver: {lines:?}"));
    let (n, secs) = received.split_once(' ').expect("received BYTES SECONDS");
    let n: u64 = n.parse().expect("a byte count");
    let secs: f64 = secs.parse().expect("seconds");
    let mbit = n as f64 * 8.0 / secs / 1e6;
    let rtt = connect_ms.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{n} bytes in {secs:.3} s: {mbit:.2} Mbit/s over a {RATE_MBIT} Mbit/s link; \
         connect {connect_ms:?} ms (round trip {} ms)",
        2.0 * DELAY_MS
    );
    assert_eq!(n, BYTES, "the receiver got {n} of {BYTES} bytes");
    assert!(
        mbit < 1.5 * RATE_MBIT,
        "{mbit:.2} Mbit/s over a {RATE_MBIT} Mbit/s link: not shaped\n{}",
        link.status()
    );
    assert!(
        mbit > 0.25 * RATE_MBIT,
        "{mbit:.2} Mbit/s over a {RATE_MBIT} Mbit/s link: the link loses or stalls\n{}",
        link.status()
    );
    assert!(
        rtt >= 2.0 * DELAY_MS,
        "a connection in {rtt:.2} ms, under the round trip of 2 x {DELAY_MS} ms: no delay"
    );
    assert!(
        rtt < 2.0 * DELAY_MS + 100.0,
        "a connection in {rtt:.2} ms over a 2 x {DELAY_MS} ms round trip"
    );
}
