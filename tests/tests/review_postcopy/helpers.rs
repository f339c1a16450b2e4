// Helpers shared by the review's reproduction files (included, not a module).

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

fn destination(uri: &str, api: &Path, extra: &[&str]) -> Running {
    let mut args = vec!["run"];
    args.extend(GUEST);
    args.extend(["--api-socket", s(api), "--incoming", uri]);
    args.extend(extra);
    let dst = Running::spawn(vmm(&args));
    minivmm_tests::wait_for_path(api, TIMEOUT);
    dst
}

fn status(api: &Path) -> Value {
    minivmm_tests::vmm_status(api)
}

/// The status, or None once the VMM is gone.
fn try_status(api: &Path) -> Option<Value> {
    let out = vmm(&["status", "--api-socket", s(api)]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn stage(api: &Path) -> String {
    try_status(api)
        .and_then(|v| v["incoming"]["stage"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < TIMEOUT, "never {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------

/// A proxy from `front` to `back` that, once the destination's `postcopy-running` reply
/// went by, watches the source: when the source has been quiet for `quiet` (it sent its
/// last page and its end marker and waits for `postcopy-done`), the source's side is cut
/// (the source is gone), the held-back last byte (the end marker) is delivered, and the
/// destination's side is closed too.
fn proxy_source_gone_after_end(
    front: PathBuf,
    back: PathBuf,
    quiet: Duration,
) -> thread::JoinHandle<bool> {
    let l = UnixListener::bind(&front).unwrap();
    thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = UnixStream::connect(&back).unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        // Destination to source: forwarded as is; arms on status 5.
        let back_pump = {
            let (mut from, mut to, armed) = (
                b.try_clone().unwrap(),
                a.try_clone().unwrap(),
                armed.clone(),
            );
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if buf[..n].windows(5).any(|w| w == b"MVMR\x05") {
                        armed.store(true, Ordering::Release);
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            })
        };
        // Source to destination: every byte but the last is forwarded at once.
        let mut from = a.try_clone().unwrap();
        let mut to = b.try_clone().unwrap();
        from.set_read_timeout(Some(quiet)).unwrap();
        let mut held: Option<u8> = None;
        let mut buf = vec![0u8; 64 << 10];
        let fired = loop {
            match from.read(&mut buf) {
                Ok(0) => break false,
                Ok(n) => {
                    let mut out = Vec::with_capacity(n + 1);
                    out.extend(held.take());
                    out.extend_from_slice(&buf[..n - 1]);
                    held = Some(buf[n - 1]);
                    if to.write_all(&out).is_err() {
                        break false;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if armed.load(Ordering::Acquire) && held == Some(0x04) {
                        // The source is gone; its end marker was on the way.
                        let _ = a.shutdown(std::net::Shutdown::Both);
                        let _ = to.write_all(&[0x04]);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                        break true;
                    }
                    if let Some(x) = held.take() {
                        if to.write_all(&[x]).is_err() {
                            break false;
                        }
                    }
                }
                Err(_) => break false,
            }
        };
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
        let _ = back_pump.join();
        fired
    })
}

// ---------------------------------------------------------------------------------------

/// A minimal QMP client: negotiates, turns migration events on, then hands every event
/// line it reads to `tx`.
fn qmp_events(path: PathBuf, tx: std::sync::mpsc::Sender<(Instant, Value)>) {
    thread::spawn(move || {
        let c = UnixStream::connect(&path).unwrap();
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        let mut line = String::new();
        r.read_line(&mut line).unwrap(); // greeting
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .unwrap();
        w.write_all(
            concat!(
                r#"{"execute":"migrate-set-capabilities","arguments":"#,
                r#"{"capabilities":[{"capability":"events","state":true}]}}"#,
                "\n"
            )
            .as_bytes(),
        )
        .unwrap();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v.get("event").is_some() && tx.send((Instant::now(), v)).is_err() {
                return;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------

/// Forwards one connection from `front` to `back` until `cut` is set, then shuts both
/// sides down.
fn cutting_proxy(front: &Path, back: &Path, cut: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let l = UnixListener::bind(front).unwrap();
    let back = back.to_path_buf();
    thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = UnixStream::connect(&back).unwrap();
        let pump = |mut from: UnixStream, mut to: UnixStream| {
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            })
        };
        let t1 = pump(a.try_clone().unwrap(), b.try_clone().unwrap());
        let t2 = pump(b.try_clone().unwrap(), a.try_clone().unwrap());
        while !cut.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(1));
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
        let _ = (t1.join(), t2.join());
    })
}

// ---------------------------------------------------------------------------------------

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// The offset of the first STATE section of a migration stream (docs/stream.md).
fn first_state(b: &[u8]) -> usize {
    let mut i = 8;
    loop {
        let kind = b[i];
        i += 1;
        match kind {
            0x01 => {
                i += 4;
                let n = be32(&b[i..]);
                i += 4;
                for _ in 0..n {
                    i += 1 + b[i] as usize + 8;
                }
            }
            0x02 => loop {
                let f = be64(&b[i..]) & 0xfff;
                i += 8;
                if f & 0x08 != 0 {
                    break;
                }
                if f & 0x30 != 0 {
                    i += 1 + b[i] as usize;
                    if f & 0x80 != 0 {
                        i += 8;
                    }
                    continue;
                }
                if f & 0x04 == 0 {
                    i += 1 + b[i] as usize;
                }
                if f & 0x02 != 0 {
                    if f & 0x40 != 0 {
                        let c = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
                        i += 2 + c * 4096;
                    } else {
                        i += 4096;
                    }
                }
            },
            0x03 => return i - 1,
            k => panic!("section kind {k:#x} at {}", i - 1),
        }
    }
}

/// CPU time (user + system, in clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are 12 and 13 after the state.
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------

/// Starts a post-copy migration through a cutting proxy (1 MB/s: seconds of background)
/// and cuts the link once the destination runs the guest; returns once both sides say
/// postcopy-paused. (The children live as long as the returned handles.)
fn paused_postcopy(d: &Scratch) -> (Running, Running, PathBuf, PathBuf) {
    let (front, back) = (d.path("front.sock"), d.path("mig.sock"));
    let (src_api, dst_api) = (d.path("src.api"), d.path("dst.api"));
    let dst = destination(&format!("unix:{}", s(&back)), &dst_api, &[]);
    minivmm_tests::wait_for_path(&back, TIMEOUT);
    let src = source(&src_api);
    let cut = Arc::new(AtomicBool::new(false));
    let proxy = cutting_proxy(&front, &back, cut.clone());
    let client = vmm(&[
        "migrate",
        "--api-socket",
        s(&src_api),
        "--to",
        &format!("unix:{}", s(&front)),
        "--postcopy",
        "--max-bandwidth",
        "1M",
        "--json",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    wait_until("postcopy-active on the destination", || {
        stage(&dst_api) == "postcopy-active"
    });
    cut.store(true, Ordering::Release);
    proxy.join().unwrap();
    let _ = client.wait_with_output();
    wait_until("both sides paused", || {
        stage(&dst_api) == "postcopy-paused"
            && status(&src_api)["migration"]["state"] == "postcopy-paused"
    });
    (src, dst, src_api, dst_api)
}

/// CPU time (clock ticks) of the thread of `pid` named `name`.
fn thread_ticks(pid: u32, name: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let rest = stat.rsplit(')').next().unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            return f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    0
}
