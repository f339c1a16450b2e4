//! The destination of a live migration (`vmm run --incoming`) as a real process: its
//! control API answers while the stream loads (state `inmigrate`), refuses what needs the
//! guest, and `quit` abandons the migration with an error; it confirms "running" only
//! once its guest runs (a stream fed by hand, the reply read by the test); and an idle
//! 2 GiB guest moves over unix: with only the little it wrote.

use minivmm_tests::{api_request, require_kvm, ticks, vmm, Running, Scratch};
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// Guest code is emulated here; a loaded host may stall a child for seconds.
const TIMEOUT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn migrate(api: &Path, uri: &str) -> Output {
    vmm(&["migrate", "--api-socket", s(api), "--to", uri, "--json"])
        .output()
        .unwrap()
}

fn status(api: &Path) -> Value {
    minivmm_tests::vmm_status(api)
}

fn wait_for_path(p: &Path) {
    minivmm_tests::wait_for_path(p, TIMEOUT);
}

/// Polls the destination's status until `incoming.stage` is `stage`.
fn wait_for_stage(api: &Path, stage: &str) -> Value {
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

/// The destination's one reply on the return path (docs/stream.md): status and message.
fn read_reply(c: &mut UnixStream) -> (u8, String) {
    use std::io::Read;
    let mut head = [0u8; 7];
    c.read_exact(&mut head)
        .expect("a reply from the destination");
    assert_eq!(&head[..4], b"MVMR", "not a reply: {head:02x?}");
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes([head[5], head[6]]))];
    c.read_exact(&mut msg).unwrap();
    (head[4], String::from_utf8_lossy(&msg).into_owned())
}

/// A real stream to feed by hand: a plain tiny guest (128 MiB) snapshotted to a file;
/// the stream's bytes and the source's last tick.
fn snapshot_stream(d: &Scratch) -> (Vec<u8>, u64) {
    let api = d.path("src.api");
    let mut src = Running::spawn(vmm(&["run", "--api-socket", s(&api)]));
    src.expect_line("a tick on the source", TIMEOUT, |l| l.starts_with("tick "));
    let file = d.path("snap.bin");
    let out = migrate(&api, &format!("file:{}", s(&file)));
    assert!(out.status.success(), "snapshot failed: {out:?}");
    // Paused: nothing more to read.
    while src
        .next_line(Instant::now() + Duration::from_millis(300))
        .is_some()
    {}
    let last = *ticks(src.seen()).last().expect("source ticks");
    (std::fs::read(&file).unwrap(), last)
}

/// A destination for [`snapshot_stream`]'s guest with its API at `api`, waiting on
/// `sock`, both sockets there.
fn listening_destination(sock: &Path, api: &Path) -> Running {
    let uri = format!("unix:{}", s(sock));
    let dst = Running::spawn(vmm(&["run", "--api-socket", s(api), "--incoming", &uri]));
    wait_for_path(sock);
    wait_for_path(api);
    dst
}

#[test]
fn the_destination_serves_its_api_while_the_stream_loads_and_confirms_only_once_running() {
    require_kvm!();
    let d = Scratch::new("in-loading");
    let (stream, last_src) = snapshot_stream(&d);
    let (sock, api) = (d.path("mig.sock"), d.path("dst.api"));
    let mut dst = listening_destination(&sock, &api);
    let st = wait_for_stage(&api, "listening");
    assert_eq!(st["state"], "inmigrate", "{st}");
    // The setup and part of the pages, then the source stalls.
    let mut src = UnixStream::connect(&sock).unwrap();
    src.write_all(&stream[..stream.len() / 2]).unwrap();
    let st = wait_for_stage(&api, "loading");
    assert_eq!(st["state"], "inmigrate", "{st}");
    assert_eq!(st["memory_bytes"], 128u64 << 20, "{st}");
    // What needs the guest is refused, clearly, and changes nothing.
    for cmd in [
        vec!["pause"],
        vec!["resume"],
        vec!["ram-add", "--id", "x", "--size", "4M"],
        vec!["ram-remove", "--id", "x"],
        vec!["migrate", "--to", "file:/nonexistent/x"],
    ] {
        let mut args = vec![cmd[0], "--api-socket", s(&api)];
        args.extend(&cmd[1..]);
        let out = vmm(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} went through: {out:?}");
        assert!(
            err.contains("refused while the incoming migration") && err.contains("inmigrate"),
            "{cmd:?}: {err}"
        );
    }
    assert_eq!(wait_for_stage(&api, "loading")["state"], "inmigrate");
    assert!(dst.is_running());
    // The rest: the destination confirms, and by then its guest runs.
    src.write_all(&stream[stream.len() / 2..]).unwrap();
    let (code, msg) = read_reply(&mut src);
    assert_eq!((code, msg.as_str()), (0, "running"));
    let st = api_request(&api, r#"{"cmd":"status"}"#);
    assert_eq!(st["state"], "running", "confirmed, but: {st}");
    assert_eq!(st["incoming"]["stage"], "completed", "{st}");
    let first = dst.expect_line("a tick after the load", TIMEOUT, |l| l.starts_with("tick "));
    let first: u64 = first[5..].trim().parse().unwrap();
    assert!(first > last_src, "{first} after {last_src}");
    // Now a running VM like any other.
    let paused = api_request(&api, r#"{"cmd":"pause"}"#);
    assert_eq!(paused["ok"], true, "{paused}");
    let st = api_request(&api, r#"{"cmd":"status"}"#);
    assert_eq!(st["state"], "paused", "{st}");
}

#[test]
fn quit_during_an_incoming_migration_ends_the_destination_with_an_error() {
    require_kvm!();
    let d = Scratch::new("in-quit");
    // Quit while listening, then while loading (a source connected that sends nothing).
    for connect in [false, true] {
        let (sock, api) = (d.path("mig.sock"), d.path("dst.api"));
        let dst = listening_destination(&sock, &api);
        let src = connect.then(|| UnixStream::connect(&sock).unwrap());
        let stage = if connect { "loading" } else { "listening" };
        wait_for_stage(&api, stage);
        let t0 = Instant::now();
        let quit = vmm(&["quit", "--api-socket", s(&api)]).output().unwrap();
        assert!(quit.status.success(), "{quit:?}");
        let (st, lines, err) = dst.wait(TIMEOUT);
        // Well within the 10 s a stalled source is given: the quit cut it off.
        assert!(t0.elapsed() < Duration::from_secs(5), "{stage}: slow quit");
        assert!(!st.success(), "{stage}: exited with {st}");
        assert!(
            ticks(&lines).is_empty(),
            "{stage}: the guest ran: {lines:?}"
        );
        let errs: Vec<&str> = err.lines().filter(|l| l.starts_with("vmm: ")).collect();
        assert_eq!(errs.len(), 1, "{stage}: one error line: {err}");
        assert!(
            errs[0].contains("abandoned: quit through the control API, before the guest ran"),
            "{stage}: {err}"
        );
        assert!(
            !sock.exists() && !api.exists(),
            "{stage}: sockets left behind"
        );
        if let Some(mut src) = src {
            // The source sees its destination go, never a "running".
            use std::io::Read;
            let mut rest = Vec::new();
            let _ = src.read_to_end(&mut rest);
            assert!(
                !rest.windows(7).any(|w| w == b"MVMR\0\0\x07"),
                "{rest:02x?}"
            );
        }
    }
}

#[test]
fn an_idle_2g_guest_moves_with_only_what_it_wrote() {
    require_kvm!();
    let d = Scratch::new("in-idle2g");
    let sock = d.path("mig.sock");
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let uri = format!("unix:{}", s(&sock));
    let mut dst = Running::spawn(vmm(&[
        "run",
        "--memory",
        "2G",
        "--api-socket",
        s(&dst_api),
        "--incoming",
        &uri,
    ]));
    let mut src = Running::spawn(vmm(&["run", "--memory", "2G", "--api-socket", s(&src_api)]));
    src.expect_line("a tick on the source", TIMEOUT, |l| l.starts_with("tick "));
    wait_for_path(&sock);
    let out = migrate(&src_api, &uri);
    assert!(out.status.success(), "vmm migrate failed: {out:?}");
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["status"], "completed", "{stats}");
    println!(
        "idle 2 GiB over unix: total {} ms, downtime {} ms, {} bytes, {} iterations",
        stats["total_ms"], stats["downtime_ms"], stats["transferred_bytes"], stats["iterations"]
    );
    let sent = stats["transferred_bytes"]
        .as_u64()
        .expect("transferred_bytes");
    assert!(sent < 1 << 20, "{sent} bytes for an idle guest: {stats}");
    let (st, src_lines, src_err) = src.wait(Duration::from_secs(10));
    assert!(st.success(), "the source exited with {st}: {src_err}");
    // The source is gone: the destination runs the guest, and says so.
    let now = status(&dst_api);
    assert_eq!(now["state"], "running", "{now}");
    assert_eq!(now["memory_bytes"], 2u64 << 30, "{now}");
    let last_src = *ticks(&src_lines).last().expect("source ticks");
    let first = dst.expect_line("a tick on the destination", TIMEOUT, |l| {
        l.starts_with("tick ")
    });
    let first: u64 = first[5..].trim().parse().unwrap();
    assert!(first > last_src, "ticks went back: {last_src} then {first}");
}
