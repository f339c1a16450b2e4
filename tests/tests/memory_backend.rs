//! `--memory-backend`: guest RAM another process can map. With `memfd` every block, boot
//! and hot-added, is a memfd (seen in /proc/PID/maps); with `file:DIR` a file per block in
//! DIR, unlinked at once (mapped, and nothing left behind); the dirtying guest on memfd RAM moves to another `vmm` and
//! verifies ok, its hot-added block with it, the memfd's holes neither read nor sent; a
//! bad backend is one clear error.

use minivmm_tests::{require_kvm, vmm, vmm_status, Running, Scratch};
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn maps(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

fn ram_add(api: &Path, id: &str, size: &str) {
    let out = vmm(&[
        "ram-add",
        "--api-socket",
        s(api),
        "--id",
        id,
        "--size",
        size,
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "ram-add: {out:?}");
}

fn quit(api: &Path, guest: Running) {
    let _ = vmm(&["quit", "--api-socket", s(api)]).output();
    let (st, _, err) = guest.wait(Duration::from_secs(20));
    assert!(st.success(), "{err}");
}

#[test]
fn memfd_backs_every_block_boot_and_hot_added() {
    require_kvm!();
    let d = Scratch::new("memfd");
    let api = d.path("api");
    let mut guest = Running::spawn(vmm(&[
        "run",
        "--memory-backend",
        "memfd",
        "--api-socket",
        s(&api),
    ]));
    guest.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    let m = maps(guest.pid());
    assert!(m.contains("/memfd:minivmm-ram-below-4g"), "{m}");
    ram_add(&api, "extra", "64M");
    let m = maps(guest.pid());
    assert!(m.contains("/memfd:minivmm-extra"), "{m}");
    assert!(
        !m.lines()
            .any(|l| l.contains("minivmm-") && !l.contains(" rw-s ")),
        "not shared: {m}"
    );
    guest.expect_line("ticks after the hotplug", TIMEOUT, |l| {
        l.starts_with("tick ")
    });
    quit(&api, guest);
}

#[test]
fn file_backend_makes_an_unlinked_file_per_block() {
    require_kvm!();
    let d = Scratch::new("filemem");
    let dir = d.path("ram");
    std::fs::create_dir_all(&dir).unwrap();
    let api = d.path("api");
    let backend = format!("file:{}", dir.display());
    let mut guest = Running::spawn(vmm(&[
        "run",
        "--memory",
        "64M",
        "--memory-backend",
        &backend,
        "--api-socket",
        s(&api),
    ]));
    guest.expect_line("a tick", TIMEOUT, |l| l.starts_with("tick "));
    ram_add(&api, "extra", "32M");
    let m = maps(guest.pid());
    let pid = guest.pid();
    for id in ["ram-below-4g", "extra"] {
        let name = format!("{}/minivmm-{pid}-{id} (deleted)", dir.display());
        let line = m.lines().find(|l| l.ends_with(&name));
        let line = line.unwrap_or_else(|| panic!("no shared mapping of {name}: {m}"));
        assert!(line.contains(" rw-s "), "{line}");
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "RAM files left in the directory: {left:?}");
    quit(&api, guest);
}

#[test]
fn the_dirtying_guest_on_memfd_ram_moves_and_verifies_ok() {
    require_kvm!();
    let d = Scratch::new("memfd-move");
    let (src_api, dst_api, mig) = (d.path("src.api"), d.path("dst.api"), d.path("mig.sock"));
    let uri = format!("unix:{}", s(&mig));
    let args = [
        "--memory",
        "256M",
        "--cmdline",
        "dirty_mb=4",
        "--memory-backend",
        "memfd",
    ];
    let mut dst_args = vec!["run"];
    dst_args.extend(args);
    dst_args.extend(["--api-socket", s(&dst_api), "--incoming", &uri]);
    let mut dst = Running::spawn(vmm(&dst_args));
    let mut src_args = vec!["run"];
    src_args.extend(args);
    src_args.extend(["--api-socket", s(&src_api)]);
    let mut src = Running::spawn(vmm(&src_args));
    src.expect_line("verify ok on the source", TIMEOUT, |l| {
        l.contains("verify ok")
    });
    ram_add(&src_api, "extra", "64M");
    minivmm_tests::wait_for_path(&mig, TIMEOUT);
    let out = vmm(&[
        "migrate",
        "--api-socket",
        s(&src_api),
        "--to",
        &uri,
        "--json",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "vmm migrate: {out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The memfd's holes (pages never written) are not read or sent: most of 320 MiB.
    let skipped = stats["skipped_pages"].as_u64().unwrap();
    assert!(skipped > 60_000, "only {skipped} pages skipped: {stats}");
    println!(
        "memfd guest moved: {} ms, {} bytes, {skipped} pages skipped",
        stats["total_ms"], stats["transferred_bytes"]
    );
    let (st, _, err) = src.wait(Duration::from_secs(10));
    assert!(st.success(), "{err}");
    dst.expect_line("verify ok after the move", TIMEOUT, |l| {
        l.contains("verify ok")
    });
    assert!(dst.seen().iter().all(|l| !l.contains("verify FAIL")));
    let m = maps(dst.pid());
    assert!(
        m.contains("/memfd:minivmm-extra"),
        "the hot-added block is not memfd here: {m}"
    );
    let st = vmm_status(&dst_api);
    assert_eq!(st["state"], "running", "{st}");
    quit(&dst_api, dst);
}

#[test]
fn a_bad_backend_is_one_clear_error() {
    let out = vmm(&["run", "--memory-backend", "shm"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad memory backend \"shm\""), "{err}");
    require_kvm!();
    let out = vmm(&["run", "--memory-backend", "file:/nonexistent/dir"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("creating its file in /nonexistent/dir"),
        "{err}"
    );
}
