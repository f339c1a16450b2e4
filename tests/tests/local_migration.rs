//! `vmm migrate --local`: the guest's memory handed over to another `vmm` process (memfd
//! descriptors over the unix socket), no page copied. The dirtying tiny guest moves,
//! verifies ok and keeps ticking on the destination, which maps the very memfds the source
//! made (the same inodes in both processes' maps), and runs on after the source is killed;
//! a hot-added block moves the same way; a destination that dies before confirming (a
//! real one killed, and one that answers `mapped` and then closes while the source's guest
//! is paused) leaves the source running and verifying on its own memory; anonymous RAM,
//! a tcp: URI, TLS and RAM in files of a directory (which cannot be sealed) are refused
//! with a clear error, the guest running on. The destination takes the source's memory
//! for its boot RAM in place: the very host range its own RAM had (so its KVM slot,
//! keyed by that address, stays as it was) now maps the source's memfd.

use minivmm_tests::{require_kvm, ticks, vmm, vmm_status, wait_for_path, Running, Scratch};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The inodes of the process's memfd mappings of guest RAM.
fn memfd_inodes(pid: u32) -> BTreeSet<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|l| l.contains("/memfd:minivmm-"))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect()
}

/// The `(range, path)` of the process's one mapping of exactly `len` bytes (the 256 MiB
/// boot RAM: no other mapping of the VMM has that size).
fn mapping_of_len(pid: u32, len: u64) -> Option<(String, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let found: Vec<_> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let (a, b) = range.split_once('-')?;
            let size = u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?;
            let path = f.nth(4).unwrap_or("").to_string();
            (size == len).then(|| (range.to_string(), path))
        })
        .collect();
    assert!(
        found.len() <= 1,
        "several mappings of {len:#x} bytes: {found:?}"
    );
    found.into_iter().next()
}

fn source(api: &Path, backend: &str) -> Running {
    Running::spawn(vmm(&[
        "run",
        "--memory",
        "256M",
        "--cmdline",
        "dirty_mb=4",
        "--memory-backend",
        backend,
        "--api-socket",
        s(api),
        "--serial",
        "stdio",
    ]))
}

fn destination(api: &Path, uri: &str) -> Running {
    // Anonymous RAM here: the source's memory replaces it.
    Running::spawn(vmm(&[
        "run",
        "--memory",
        "256M",
        "--cmdline",
        "dirty_mb=4",
        "--api-socket",
        s(api),
        "--incoming",
        uri,
    ]))
}

fn migrate(api: &Path, uri: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["migrate", "--api-socket", s(api), "--to", uri, "--json"];
    args.extend(extra);
    vmm(&args).output().unwrap()
}

fn verified_after(guest: &mut Running, what: &str) {
    let seen = guest.seen().len();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let line = guest
            .next_line(deadline)
            .unwrap_or_else(|| panic!("no verify ok {what}: {:?}", guest.seen()));
        assert!(!line.contains("verify FAIL"), "{what}: {line}");
        if line.contains("verify ok") && guest.seen().len() > seen {
            return;
        }
    }
}

#[test]
fn the_dirtying_guest_moves_by_its_memory_and_runs_on_after_the_source_is_killed() {
    require_kvm!();
    let d = Scratch::new("local-move");
    let (src_api, dst_api, mig) = (d.path("src.api"), d.path("dst.api"), d.path("mig.sock"));
    let uri = format!("unix:{}", s(&mig));
    let mut dst = destination(&dst_api, &uri);
    let mut src = source(&src_api, "memfd");
    src.expect_line("verify ok on the source", TIMEOUT, |l| {
        l.contains("verify ok")
    });
    let out = vmm(&[
        "ram-add",
        "--api-socket",
        s(&src_api),
        "--id",
        "extra",
        "--size",
        "64M",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "ram-add: {out:?}");
    let inodes = memfd_inodes(src.pid());
    assert_eq!(inodes.len(), 2, "two memfd blocks on the source");
    wait_for_path(&mig, TIMEOUT);
    // The destination's own boot RAM, anonymous, before the migration.
    let (boot_range, path) = mapping_of_len(dst.pid(), 256 << 20).expect("boot RAM mapped");
    assert!(!path.contains("memfd"), "{path}");
    let out = migrate(&src_api, &uri, &["--local"]);
    assert!(out.status.success(), "vmm migrate --local: {out:?}");
    // The same host range now maps the source's memfd (the slot stayed as it was).
    let (range, path) = mapping_of_len(dst.pid(), 256 << 20).expect("boot RAM mapped");
    assert_eq!(
        range, boot_range,
        "the boot RAM moved to another host address"
    );
    assert!(path.contains("/memfd:minivmm-ram-below-4g"), "{path}");
    // The source ends on its own; kill it anyway, at once: the guest is not its.
    // SAFETY: a plain kill(2) of our child.
    unsafe { libc::kill(src.pid() as i32, libc::SIGKILL) };
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(stats["local"], true, "{stats}");
    assert_eq!(stats["shared_blocks"], 2, "{stats}");
    assert_eq!(stats["normal_pages"], 0, "{stats}");
    let sent = stats["transferred_bytes"].as_u64().unwrap();
    assert!(sent < 100 << 10, "{sent} bytes sent for a local migration");
    println!(
        "local migration: {} ms total, {} ms downtime, {sent} bytes",
        stats["total_ms"], stats["downtime_ms"]
    );
    let last_src = ticks(src.seen()).last().copied().unwrap_or(0);
    // The destination maps the source's memfds themselves: nothing was copied.
    assert_eq!(
        memfd_inodes(dst.pid()),
        inodes,
        "other memory on the destination"
    );
    verified_after(&mut dst, "on the destination");
    dst.expect_line("ticks after the source died", TIMEOUT, |l| {
        l.strip_prefix("tick ")
            .and_then(|n| n.trim().parse::<u64>().ok())
            .is_some_and(|n| n > last_src + 3)
    });
    verified_after(&mut dst, "after the source died");
    let t = ticks(dst.seen());
    assert!(t.windows(2).all(|w| w[0] < w[1]), "ticks went back: {t:?}");
    let st = vmm_status(&dst_api);
    assert_eq!(st["state"], "running", "{st}");
    let ids: Vec<_> = st["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&"extra".to_string()), "{st}");
    let _ = vmm(&["quit", "--api-socket", s(&dst_api)]).output();
    let (st, _, err) = dst.wait(Duration::from_secs(20));
    assert!(st.success(), "{err}");
}

/// Plays a destination that takes the first layout, answers `mapped`, reads what the
/// paused source sends, and closes without a word: it dies before confirming.
fn dying_destination(listener: UnixListener) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let drain = |c: &mut std::os::unix::net::UnixStream| {
            let mut n = 0;
            let mut buf = [0u8; 65536];
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k;
            }
            n
        };
        let first = drain(&mut c);
        c.write_all(b"MVMR\x02\x00\x00").unwrap();
        first + drain(&mut c)
    })
}

#[test]
fn a_destination_dying_before_it_confirms_leaves_the_source_running_on_its_memory() {
    require_kvm!();
    let d = Scratch::new("local-die");
    let src_api = d.path("src.api");
    let mut src = source(&src_api, "memfd");
    src.expect_line("verify ok on the source", TIMEOUT, |l| {
        l.contains("verify ok")
    });

    // 1. A real destination, stopped, then killed while the source waits for it.
    let (dst_api, mig) = (d.path("dst.api"), d.path("mig.sock"));
    let uri = format!("unix:{}", s(&mig));
    let dst = destination(&dst_api, &uri);
    wait_for_path(&mig, TIMEOUT);
    // SAFETY: plain kill(2)s of our child.
    unsafe { libc::kill(dst.pid() as i32, libc::SIGSTOP) };
    let client = {
        let (api, uri) = (src_api.clone(), uri.clone());
        std::thread::spawn(move || migrate(&api, &uri, &["--local"]))
    };
    // Killed once the source is connected and waits for it (the hand-over under way).
    let t0 = Instant::now();
    while vmm_status(&src_api)["state"] != "migrating" {
        assert!(t0.elapsed() < TIMEOUT, "the migration never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    unsafe { libc::kill(dst.pid() as i32, libc::SIGKILL) };
    let out = client.join().unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("destination"), "{err}");
    drop(dst);
    verified_after(&mut src, "after the killed destination");

    // 2. One that answers `mapped` (the source pauses its guest and sends the rest),
    //    then closes without `ready`.
    let fake = d.path("fake.sock");
    let read = dying_destination(UnixListener::bind(&fake).unwrap());
    let out = migrate(&src_api, &format!("unix:{}", s(&fake)), &["--local"]);
    assert!(!out.status.success(), "{out:?}");
    let got = read.join().unwrap();
    assert!(got > 100, "the fake destination read only {got} bytes");
    let st = vmm_status(&src_api);
    assert_eq!(st["state"], "running", "{st}");
    let last = ticks(src.seen()).last().copied().unwrap_or(0);
    src.expect_line("ticks after the failed hand-over", TIMEOUT, |l| {
        l.strip_prefix("tick ")
            .and_then(|n| n.trim().parse::<u64>().ok())
            .is_some_and(|n| n > last + 1)
    });
    verified_after(&mut src, "after the destination closed");
    let _ = vmm(&["quit", "--api-socket", s(&src_api)]).output();
    let (st, _, err) = src.wait(Duration::from_secs(20));
    assert!(st.success(), "{err}");
}

#[test]
fn local_is_refused_for_private_ram_tcp_and_tls_and_the_guest_runs_on() {
    require_kvm!();
    let d = Scratch::new("local-refused");
    let api = d.path("anon.api");
    let mut anon = source(&api, "anon");
    anon.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    let sock = format!("unix:{}", s(&d.path("nobody.sock")));
    let out = migrate(&api, &sock, &["--local"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--memory-backend memfd"), "{err}");
    assert!(err.contains("ram-below-4g"), "{err}");
    let out = migrate(&api, "tcp:127.0.0.1:9", &["--local"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a unix: URI"), "{err}");
    let out = migrate(&api, &sock, &["--local", "--tls-creds", "/nonexistent"]);
    assert!(!out.status.success());
    let st = vmm_status(&api);
    assert_eq!(st["state"], "running", "{st}");
    // RAM in files of a directory is shared but cannot be sealed against shrinking: a
    // destination must not map what its source could cut short.
    let ramdir = d.path("ramdir");
    std::fs::create_dir_all(&ramdir).unwrap();
    let file_api = d.path("file.api");
    let mut filed = source(&file_api, &format!("file:{}", s(&ramdir)));
    filed.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    let out = migrate(&file_api, &sock, &["--local"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot be sealed"), "{err}");
    let _ = vmm(&["quit", "--api-socket", s(&file_api)]).output();
    let (st, _, err) = filed.wait(Duration::from_secs(20));
    assert!(st.success(), "{err}");
    let last = ticks(anon.seen()).last().copied().unwrap_or(0);
    anon.expect_line("ticks on", TIMEOUT, |l| {
        l.strip_prefix("tick ")
            .and_then(|n| n.trim().parse::<u64>().ok())
            .is_some_and(|n| n > last)
    });
    let _ = vmm(&["quit", "--api-socket", s(&api)]).output();
    let (st, _, err) = anon.wait(Duration::from_secs(20));
    assert!(st.success(), "{err}");
}
