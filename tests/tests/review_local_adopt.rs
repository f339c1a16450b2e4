//! Review of commit 89d2477 (boot RAM given the source's memfd in place on a local migration's
//! destination): a destination that took the source's memfd over its own boot RAM must
//! go on like any VM — migrate locally again (its blocks are the memfd now, recorded as
//! such, their descriptors kept), and be snapshotted and restored.

use minivmm_tests::{require_kvm, ticks, vmm, vmm_status, wait_for_path, Running, Scratch};
use std::path::Path;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(api: &Path, extra: &[&str]) -> Running {
    let mut args = vec![
        "run",
        "--memory",
        "256M",
        "--cmdline",
        "dirty_mb=4",
        "--api-socket",
        s(api),
        "--serial",
        "stdio",
    ];
    args.extend(extra);
    Running::spawn(vmm(&args))
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

fn migrate_local(api: &Path, uri: &str) -> serde_json::Value {
    let out = vmm(&[
        "migrate",
        "--api-socket",
        s(api),
        "--to",
        uri,
        "--json",
        "--local",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "vmm migrate --local: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn review_a_destination_that_took_memory_in_place_migrates_on_and_snapshots() {
    require_kvm!();
    let d = Scratch::new("review-replace");
    let (a_api, b_api, c_api) = (d.path("a.api"), d.path("b.api"), d.path("c.api"));
    let (m1, m2) = (d.path("m1.sock"), d.path("m2.sock"));
    let (u1, u2) = (format!("unix:{}", s(&m1)), format!("unix:{}", s(&m2)));

    let mut b = run(&b_api, &["--incoming", &u1]);
    let mut a = run(&a_api, &["--memory-backend", "memfd"]);
    verified_after(&mut a, "on the first source");
    wait_for_path(&m1, TIMEOUT);
    let stats = migrate_local(&a_api, &u1);
    assert_eq!(stats["status"], "completed", "{stats}");
    // SAFETY: a plain kill(2) of our child; the guest is not its any more.
    unsafe { libc::kill(a.pid() as i32, libc::SIGKILL) };
    verified_after(&mut b, "on the first destination");

    // Second hop: b's boot RAM is the first source's memfd now, so b can go locally too.
    let mut c = run(&c_api, &["--incoming", &u2]);
    wait_for_path(&m2, TIMEOUT);
    let last_b = ticks(b.seen()).last().copied().unwrap_or(0);
    let stats = migrate_local(&b_api, &u2);
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(stats["normal_pages"], 0, "{stats}");
    // SAFETY: as above.
    unsafe { libc::kill(b.pid() as i32, libc::SIGKILL) };
    verified_after(&mut c, "on the second destination");
    c.expect_line("ticks on after the second hop", TIMEOUT, |l| {
        l.strip_prefix("tick ")
            .and_then(|n| n.trim().parse::<u64>().ok())
            .is_some_and(|n| n > last_b + 2)
    });

    // A snapshot of it restores and verifies.
    let snap = d.path("snap");
    let out = vmm(&["snapshot", "--api-socket", s(&c_api), "--to", s(&snap)])
        .output()
        .unwrap();
    assert!(out.status.success(), "vmm snapshot: {out:?}");
    assert_eq!(vmm_status(&c_api)["state"], "paused");
    let _ = vmm(&["quit", "--api-socket", s(&c_api)]).output();
    let (st, _, err) = c.wait(Duration::from_secs(20));
    assert!(st.success(), "{err}");
    let r_api = d.path("r.api");
    let mut r = Running::spawn(vmm(&[
        "run",
        "--restore",
        s(&snap),
        "--api-socket",
        s(&r_api),
        "--serial",
        "stdio",
    ]));
    verified_after(&mut r, "restored from the second destination's snapshot");
    let _ = vmm(&["quit", "--api-socket", s(&r_api)]).output();
    let (st, _, err) = r.wait(Duration::from_secs(20));
    assert!(st.success(), "{err}");
}
