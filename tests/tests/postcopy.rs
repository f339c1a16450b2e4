//! Post-copy between real `vmm` processes over a unix socket, the destination's guest RAM
//! behind a real userfaultfd: the dirtying tiny guest (512 MiB, dirty_mb=8) switched after
//! the first pass verifies ok on the destination and ticks on with no tick lost, both
//! sides showing `postcopy-active` while the pages come; `vmm start-postcopy` switches a
//! migration under way; a destination killed after the switch leaves the source paused,
//! saying the guest is lost, and refusing to run it again. The two-namespace case (a link
//! slower than the guest dirties) is in `netns_migration.rs`.

use minivmm_tests::{require_kvm, require_uffd, ticks, vmm, Running, Scratch};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

/// Guest code is emulated here; a loaded host may stall a child for seconds.
const TIMEOUT: Duration = Duration::from_secs(60);
const GUEST: [&str; 4] = ["--memory", "512M", "--cmdline", "dirty_mb=8"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn source(api: &Path) -> Running {
    let mut args = vec!["run"];
    args.extend(GUEST);
    args.extend(["--api-socket", s(api)]);
    let mut src = Running::spawn(vmm(&args));
    src.expect_line("verify ok on the source", TIMEOUT, |l| {
        l.contains("verify ok")
    });
    src
}

fn destination(uri: &str, api: &Path) -> Running {
    let mut args = vec!["run"];
    args.extend(GUEST);
    args.extend(["--api-socket", s(api), "--incoming", uri]);
    let dst = Running::spawn(vmm(&args));
    minivmm_tests::wait_for_path(api, TIMEOUT);
    dst
}

fn spawn_migrate(api: &Path, uri: &str, extra: &[&str]) -> Child {
    let mut args = vec!["migrate", "--api-socket", s(api), "--to", uri, "--json"];
    args.extend(extra);
    vmm(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn status(api: &Path) -> Value {
    minivmm_tests::vmm_status(api)
}

/// The source's migration state and the destination's incoming stage, polled until
/// `done` says so; returns every pair seen.
fn watch(
    src: &Path,
    dst: &Path,
    mut done: impl FnMut(&str, &str) -> bool,
) -> Vec<(String, String)> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let a = status(src)["migration"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let b = status(dst)["incoming"]["stage"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let stop = done(&a, &b);
        seen.push((a, b));
        if stop {
            return seen;
        }
        assert!(t0.elapsed() < TIMEOUT, "gave up watching: {seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON `vmm migrate --json` printed.
fn stats_of(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{text:?}: {e}; {out:?}"))
}

/// The destination's ticks go on from the source's: none repeated, none going back, and
/// no jump but what the guest's own clock explains. The tiny guest prints the tick its
/// clock is at, so a vCPU that waited `max_wait_ms` on a missing page (or that the host
/// did not schedule) may skip a number for every 100 ms of that wait; a tick line cut by
/// the switch, half on each side, is one more.
fn check_ticks(src_lines: &[String], dst: &mut Running, max_wait_ms: f64) {
    let last_src = *ticks(src_lines).last().expect("ticks on the source");
    for n in 0..5 {
        dst.expect_line(&format!("tick {n} of 5 on the destination"), TIMEOUT, |l| {
            l.starts_with("tick ")
        });
    }
    let t = ticks(dst.seen());
    let allowance = 2 + (max_wait_ms / 100.0).ceil() as u64;
    assert!(
        t[0] > last_src && t[0] - last_src <= allowance,
        "ticks went back or jumped across the switch (allowance {allowance}): source \
         {last_src}, destination {t:?}"
    );
    assert!(
        t.windows(2)
            .all(|w| w[1] > w[0] && w[1] - w[0] <= allowance),
        "destination ticks repeat, go back or jump (allowance {allowance}): {t:?}"
    );
}

#[test]
fn the_dirtying_guest_moves_by_postcopy_verifies_ok_and_ticks_on() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("postcopy");
    let uri = format!("unix:{}", s(&d.path("mig.sock")));
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let mut dst = destination(&uri, &dst_api);
    let src = source(&src_api);
    // 4 MB/s: slower than the guest dirties, so the first pass leaves megabytes behind;
    // after the switch the background goes at that cap too, long enough to be seen.
    let client = spawn_migrate(&src_api, &uri, &["--postcopy", "--max-bandwidth", "4M"]);
    let seen = watch(&src_api, &dst_api, |a, b| {
        a == "completed" || a == "failed" || b == "completed" || b == "failed"
    });
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "vmm migrate failed: {out:?}");
    let stats = stats_of(&out);
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(stats["postcopy"], true, "it did not switch: {stats}");
    assert!(
        stats["postcopy_missing_pages"].as_u64().unwrap() > 0,
        "{stats}"
    );
    for k in [
        "postcopy_requests",
        "postcopy_blocktime_ms",
        "postcopy_fault_p50_ms",
        "postcopy_fault_p99_ms",
    ] {
        assert!(stats[k].is_number(), "no {k}: {stats}");
    }
    assert!(
        seen.iter().any(|(a, _)| a == "postcopy-active"),
        "the source never showed postcopy-active: {seen:?}"
    );
    assert!(
        seen.iter().any(|(_, b)| b == "postcopy-active"),
        "the destination never showed postcopy-active: {seen:?}"
    );
    let (st, src_lines, src_err) = src.wait(Duration::from_secs(10));
    assert!(st.success(), "the source exited with {st}: {src_err}");
    dst.expect_line("verify ok after the move", TIMEOUT, |l| {
        l.contains("verify ok")
    });
    check_ticks(
        &src_lines,
        &mut dst,
        stats["postcopy_fault_max_ms"].as_f64().unwrap_or(0.0),
    );
    let all: Vec<&String> = src_lines.iter().chain(dst.seen()).collect();
    assert!(all.iter().all(|l| !l.contains("verify FAIL")), "{all:?}");
    let st = status(&dst_api);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["incoming"]["stage"], "completed", "{st}");
    let pc = &st["incoming"]["stats"]["postcopy"];
    assert_eq!(
        pc["missing_pages"], stats["postcopy_missing_pages"],
        "both sides count the same pages: {st}"
    );
}

#[test]
fn start_postcopy_switches_a_migration_under_way() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("postcopy-start");
    let uri = format!("unix:{}", s(&d.path("mig.sock")));
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let no = vmm(&["start-postcopy", "--api-socket", s(&src_api)]);
    let mut dst = destination(&uri, &dst_api);
    let src = source(&src_api);
    let out = { no }.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no migration is under way"),
        "{out:?}"
    );
    // Capped and with a 1 ms downtime limit it would iterate until its 30th pass.
    let client = spawn_migrate(
        &src_api,
        &uri,
        &[
            "--max-bandwidth",
            "4M",
            "--downtime-ms",
            "1",
            "--no-auto-converge",
        ],
    );
    let t0 = Instant::now();
    while status(&src_api)["migration"]["state"] != "active" {
        assert!(t0.elapsed() < TIMEOUT, "never active");
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = vmm(&["start-postcopy", "--api-socket", s(&src_api)])
        .output()
        .unwrap();
    assert!(asked.status.success(), "{asked:?}");
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "vmm migrate failed: {out:?}");
    let stats = stats_of(&out);
    assert_eq!(stats["postcopy"], true, "{stats}");
    let (st, src_lines, src_err) = src.wait(Duration::from_secs(10));
    assert!(st.success(), "{src_err}");
    dst.expect_line("verify ok after the move", TIMEOUT, |l| {
        l.contains("verify ok")
    });
    check_ticks(
        &src_lines,
        &mut dst,
        stats["postcopy_fault_max_ms"].as_f64().unwrap_or(0.0),
    );
}

#[test]
fn a_destination_killed_after_the_switch_leaves_the_source_postcopy_paused_saying_the_guest_is_lost(
) {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("postcopy-kill");
    let uri = format!("unix:{}", s(&d.path("mig.sock")));
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let dst = destination(&uri, &dst_api);
    let mut src = source(&src_api);
    // 1 MB/s: the background takes seconds after the switch.
    let client = spawn_migrate(&src_api, &uri, &["--postcopy", "--max-bandwidth", "1M"]);
    watch(&src_api, &dst_api, |_, b| b == "postcopy-active");
    let pid = dst.pid();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let out = client.wait_with_output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("postcopy-paused") && err.contains("guest is lost"),
        "{err}"
    );
    let stats = stats_of(&out);
    assert_eq!(stats["status"], "postcopy-paused", "{stats}");
    // The source lives on, paused, and will not run the guest again.
    assert!(
        src.is_running(),
        "the source must stay up (its memory is the guest's)"
    );
    let st = status(&src_api);
    assert_eq!(st["migration"]["state"], "postcopy-paused", "{st}");
    let resume = vmm(&["resume", "--api-socket", s(&src_api)])
        .output()
        .unwrap();
    assert!(!resume.status.success(), "{resume:?}");
    assert!(
        String::from_utf8_lossy(&resume.stderr).contains("must not run here again"),
        "{resume:?}"
    );
}

/// Forwards one connection from `front` to `back`, both ways, until `cut` is set; then
/// shuts both sides down: a link that broke, as each end sees it.
fn cutting_proxy(
    front: &Path,
    back: &Path,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::Ordering;
    let l = UnixListener::bind(front).unwrap();
    let back = back.to_path_buf();
    std::thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = UnixStream::connect(&back).unwrap();
        let pump = |mut from: UnixStream, mut to: UnixStream| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match std::io::Read::read(&mut from, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
        };
        let t1 = pump(a.try_clone().unwrap(), b.try_clone().unwrap());
        let t2 = pump(b.try_clone().unwrap(), a.try_clone().unwrap());
        while !cut.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
        let _ = (t1.join(), t2.join());
    })
}

#[test]
fn a_link_cut_after_the_switch_pauses_both_sides_and_migrate_resume_finishes_the_move() {
    require_kvm!();
    require_uffd!();
    let d = Scratch::new("postcopy-resume");
    let (front, back) = (d.path("front.sock"), d.path("mig.sock"));
    let uri = format!("unix:{}", s(&back));
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let mut dst = destination(&uri, &dst_api);
    minivmm_tests::wait_for_path(&back, TIMEOUT);
    let src = source(&src_api);
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = cutting_proxy(&front, &back, cut.clone());
    // 1 MB/s: seconds of background after the switch, for the cut to fall in.
    let client = spawn_migrate(
        &src_api,
        &format!("unix:{}", s(&front)),
        &["--postcopy", "--max-bandwidth", "1M"],
    );
    watch(&src_api, &dst_api, |_, b| b == "postcopy-active");
    cut.store(true, std::sync::atomic::Ordering::Release);
    proxy.join().unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(stats_of(&out)["status"], "postcopy-paused", "{out:?}");
    let seen = watch(&src_api, &dst_api, |a, b| {
        a == "postcopy-paused" && b == "postcopy-paused"
    });
    println!("states after the cut: {:?}", seen.last());
    // The destination listens on its --incoming URI again.
    minivmm_tests::wait_for_path(&back, TIMEOUT);
    let out = vmm(&[
        "migrate",
        "--api-socket",
        s(&src_api),
        "--resume",
        "--to",
        &uri,
        "--json",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "vmm migrate --resume failed: {out:?}");
    let stats = stats_of(&out);
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(stats["postcopy"], true, "{stats}");
    println!(
        "resumed: total {} ms, {} requests, blocktime {} ms",
        stats["total_ms"], stats["postcopy_requests"], stats["postcopy_blocktime_ms"]
    );
    let (st, src_lines, src_err) = src.wait(Duration::from_secs(10));
    assert!(st.success(), "the source exited with {st}: {src_err}");
    dst.expect_line("verify ok after the resumed move", TIMEOUT, |l| {
        l.contains("verify ok")
    });
    check_ticks(
        &src_lines,
        &mut dst,
        stats["postcopy_fault_max_ms"].as_f64().unwrap_or(0.0),
    );
    let all: Vec<&String> = src_lines.iter().chain(dst.seen()).collect();
    assert!(all.iter().all(|l| !l.contains("verify FAIL")), "{all:?}");
    let st = status(&dst_api);
    assert_eq!(st["incoming"]["stage"], "completed", "{st}");
}
