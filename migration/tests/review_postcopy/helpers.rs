// Helpers shared by the review's reproduction files (included, not a module).

const P: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;


fn path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mvm-review-pc-{}-{name}", std::process::id()))
}

fn list(ram: u64) -> Arc<RamList> {
    let l = Arc::new(RamList::new());
    l.alloc("ram", ram).unwrap();
    l
}

/// A destination VM that records what the driver did with it.
struct ReviewDest {
    ram: Arc<RamList>,
    hotplug: AnonymousHotplug,
    /// Its vCPUs were released (`resume`).
    resumed: Arc<AtomicBool>,
    /// `postcopy_failed` was called (the VMM stops the guest and ends).
    failed: Arc<AtomicBool>,
    on_pause: Option<Box<dyn FnMut() + Send>>,
    /// Where a source may reconnect, and how long one wait lasts.
    reconnect: Option<Listener>,
    reconnect_wait: Duration,
}

impl ReviewDest {
    fn new(ram: Arc<RamList>) -> ReviewDest {
        ReviewDest {
            ram,
            hotplug: AnonymousHotplug,
            resumed: Arc::default(),
            failed: Arc::default(),
            on_pause: None,
            reconnect: None,
            reconnect_wait: Duration::from_secs(20),
        }
    }
}

impl RestorableVm for ReviewDest {
    fn ram(&self) -> Arc<RamList> {
        self.ram.clone()
    }
    fn hotplug(&mut self) -> &mut dyn BlockHotplug {
        &mut self.hotplug
    }
    fn restore_state(&mut self, _: &[ComponentState]) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.resumed.store(true, Ordering::Release);
        Ok(())
    }
    fn postcopy_paused(&mut self, _why: &str) {
        if let Some(h) = self.on_pause.as_mut() {
            h();
        }
    }
    fn postcopy_reconnect(&mut self) -> Option<migration::transport::Connection> {
        let l = self.reconnect.as_ref()?;
        l.accept_timeout(self.reconnect_wait).ok()
    }
    fn postcopy_failed(&mut self) {
        self.failed.store(true, Ordering::Release);
    }
}

type DestResult = Result<IncomingStats, IncomingError>;

/// `incoming` on a thread, on the first connection to `uri`.
fn spawn_incoming(mut vm: ReviewDest, uri: &MigrationUri) -> thread::JoinHandle<DestResult> {
    let listener = listen(uri).unwrap();
    thread::spawn(move || {
        let conn = listener.accept_timeout(Duration::from_secs(20)).unwrap();
        incoming(&mut vm, conn, &IncomingOptions::default())
    })
}

/// The content a hostile source sends for page `p` of "ram".
fn page_data(p: u64) -> Vec<u8> {
    vec![(p as u8).wrapping_mul(7) | 1; P as usize]
}

const PAGES: u64 = 32;
/// The pages the hostile source says are missing at the switch.
const MISSING: (u64, u64) = (8, 16);

/// A hostile (but, up to the switch, well-formed) source on `path`: pre-copy sends every
/// page of "ram" (PAGES pages) except the MISSING run, then the switch package; it waits
/// for the destination's `postcopy-running` and returns the socket.
fn switch_then_wait_running(path: &std::path::Path) -> (UnixStream, StreamWriter<UnixStream>) {
    let t0 = Instant::now();
    let sock = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    let mut w = StreamWriter::new(sock.try_clone().unwrap());
    w.header().unwrap();
    w.ram_setup([("ram", PAGES * P)].into_iter()).unwrap();
    w.begin_ram().unwrap();
    for p in (0..PAGES).filter(|p| !(MISSING.0..MISSING.0 + MISSING.1).contains(p)) {
        w.page("ram", p * P, &page_data(p)).unwrap();
    }
    w.eos().unwrap();
    w.postcopy_switch(
        0x1234,
        &[BlockRuns {
            id: "ram".into(),
            len: PAGES * P,
            runs: vec![MISSING],
        }],
    )
    .unwrap();
    w.state("cpu0", b"{}").unwrap();
    w.end().unwrap();
    w.flush().unwrap();
    let mut r = sock.try_clone().unwrap();
    r.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let reply = Reply::read_from(&mut r).unwrap();
    assert!(
        matches!(reply, Reply::PostcopyRunning(_)),
        "the destination did not run the guest: {reply:?}"
    );
    (sock, w)
}

/// The missing pages, in one post-copy RAM section.
fn send_missing(w: &mut StreamWriter<UnixStream>) {
    w.begin_ram().unwrap();
    for p in MISSING.0..MISSING.0 + MISSING.1 {
        w.page("ram", p * P, &page_data(p)).unwrap();
    }
    w.eos().unwrap();
}

fn expected_ram() -> Vec<u8> {
    (0..PAGES).flat_map(page_data).collect()
}

// ---------------------------------------------------------------------------------------
// 1. A destination that has every page kills the guest when the source is gone at the end.
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// 2. The guest runs on both sides.
// ---------------------------------------------------------------------------------------

/// Forwards one connection from `front` to `back`; in the destination-to-source
/// direction, the first chunk holding the bytes `cut_on` is not forwarded: both sides are
/// shut down instead (the link broke just as that reply was on its way).
fn proxy_cutting_on(
    front: PathBuf,
    back: PathBuf,
    cut_on: &'static [u8],
) -> thread::JoinHandle<()> {
    let _ = std::fs::remove_file(&front);
    let l = UnixListener::bind(&front).unwrap();
    thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = UnixStream::connect(&back).unwrap();
        let (mut a_in, mut b_out) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let fwd = thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = a_in.read(&mut buf) {
                if n == 0 || b_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let (mut b_in, mut a_out) = (b.try_clone().unwrap(), a.try_clone().unwrap());
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = b_in.read(&mut buf) {
            if n == 0 {
                break;
            }
            if buf[..n].windows(cut_on.len()).any(|w| w == cut_on) {
                break;
            }
            if a_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
        let _ = fwd.join();
    })
}

fn busy_vm(ram: u64) -> FakeVm {
    let pages = ram / P;
    let vm = FakeVm::new(
        list(ram),
        Some(GuestLoad {
            pages,
            first: 0,
            working_set: pages,
            pages_per_sec: 0,
        }),
    );
    vm.prefill(0..pages);
    vm
}

fn switching() -> MigrateOptions {
    MigrateOptions {
        postcopy_after: Some(1),
        max_bandwidth: Some(20 * MIB),
        downtime_limit: Duration::from_micros(1),
        write_timeout: Duration::from_secs(5),
        ..MigrateOptions::default()
    }
}

// ---------------------------------------------------------------------------------------
// 3. An RCU read-side section held for as long as post-copy is paused.
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// 4. A hostile destination's list of missing pages on resume.
// ---------------------------------------------------------------------------------------

fn wait_state(progress: &MigrationProgress, state: MigrationState) {
    let t0 = Instant::now();
    while progress.state() != state {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never {state:?}: {:?}",
            progress.snapshot()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------------------
// 5. A cancel that "has no effect" in post-copy makes a later link break fatal.
// ---------------------------------------------------------------------------------------

/// Forwards one connection from `front` to `back` until `cut` is set, then shuts both
/// sides down.
fn cutting_proxy(front: PathBuf, back: PathBuf, cut: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let _ = std::fs::remove_file(&front);
    let l = UnixListener::bind(&front).unwrap();
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

/// A real source and destination through a cutting proxy; the destination reconnects
/// on `again`. Returns once both sides are in post-copy (active).
struct Paused {
    /// The source VM (kept alive while its migration runs).
    _vm: Arc<FakeVm>,
    progress: Arc<MigrationProgress>,
    m: thread::JoinHandle<Result<migration::live::MigrationStats, MigrationError>>,
    dest: thread::JoinHandle<DestResult>,
    cut: Arc<AtomicBool>,
    proxy: thread::JoinHandle<()>,
    paused_there: Arc<AtomicBool>,
    again: PathBuf,
}

fn postcopy_through_proxy(name: &str) -> Paused {
    let (front, back, again) = (
        path(&format!("{name}-front")),
        path(&format!("{name}-back")),
        path(&format!("{name}-again")),
    );
    let mut vm_dst = ReviewDest::new(list(16 * MIB));
    vm_dst.reconnect = Some(listen(&MigrationUri::Unix(again.clone())).unwrap());
    vm_dst.reconnect_wait = Duration::from_secs(30);
    let paused_there = Arc::new(AtomicBool::new(false));
    let p = paused_there.clone();
    vm_dst.on_pause = Some(Box::new(move || p.store(true, Ordering::Release)));
    let dest = spawn_incoming(vm_dst, &MigrationUri::Unix(back.clone()));
    let cut = Arc::new(AtomicBool::new(false));
    let proxy = cutting_proxy(front.clone(), back, cut.clone());
    let vm = Arc::new(busy_vm(16 * MIB));
    let progress = Arc::new(MigrationProgress::new());
    let m = {
        let (vm, progress) = (vm.clone(), progress.clone());
        let opts = MigrateOptions {
            // The background crawls: post-copy lasts seconds.
            max_bandwidth: Some(2 * MIB),
            ..switching()
        };
        thread::spawn(move || migrate_to_uri(&*vm, &MigrationUri::Unix(front), &opts, &progress))
    };
    wait_state(&progress, MigrationState::PostcopyActive);
    Paused {
        _vm: vm,
        progress,
        m,
        dest,
        cut,
        proxy,
        paused_there,
        again,
    }
}

impl Paused {
    fn cut_and_wait_paused(&mut self) {
        self.cut.store(true, Ordering::Release);
        let t0 = Instant::now();
        while !self.paused_there.load(Ordering::Acquire) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the destination never paused"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Resumes (if still paused) and waits for both ends.
    fn finish(
        self,
    ) -> (
        Result<migration::live::MigrationStats, MigrationError>,
        DestResult,
    ) {
        let _ = self.proxy.join();
        if self.progress.state() == MigrationState::PostcopyPaused {
            let _ = self
                .progress
                .resume_postcopy(MigrationUri::Unix(self.again.clone()));
        }
        let r = self.m.join().unwrap();
        (r, self.dest.join().unwrap())
    }
}

// ---------------------------------------------------------------------------------------
// 6. A peer that connects and says nothing delays (or defeats) the resume.
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// 7. Post-copy from a file.
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// 8. Refusing post-copy to a file destroys the file first.
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// 9. A resume's list of missing pages: unknown blocks piled up, not refused.
// ---------------------------------------------------------------------------------------
