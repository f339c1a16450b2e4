//! The source's side of the outside review, and the transports: byte counts under a rate
//! limit, loans that must end when a transport panics, the final stage after batches cut
//! short, a RAM list changed by another thread during every batch, block references that
//! outlive their list, untouched RAM left untouched, snapshot pipes, URIs.

use super::*;

/// Counts the bytes that pass through it.
struct Counting<R>(R, Arc<AtomicU64>);
impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// With a rate limit, lent pages, a blob larger than the (smallest) buffer and a real
/// socket, the writer's two counts agree with what a counting reader on the far end receives, and
/// with what the loader says it read. The loader returns at END although the source keeps
/// its socket open (it must not wait for more).
#[test]
fn byte_counts_match_what_arrives_and_the_loader_stops_at_end() {
    let src = list_of(&[("ram", 128), ("vga", 16)]);
    let dst = list_of(&[("ram", 128), ("vga", 16)]);
    for i in (0..128).step_by(3) {
        write_block(&src, "ram", i * P, &page_of(i as u8));
    }
    let (near, far) = std::os::unix::net::UnixStream::pair().unwrap();
    let counted = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let loader = {
        let (dst, counted) = (dst.clone(), counted.clone());
        thread::spawn(move || {
            let r = load(
                &dst,
                Counting(far, counted),
                &mut AnonymousHotplug,
                &LoadOptions::default(),
            );
            tx.send(r.map(|s| s.bytes)).unwrap();
        })
    };
    let mut out = StreamWriter::with_capacity(near.try_clone().unwrap(), 0);
    out.set_rate_limit(Some(8 << 20));
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    saver.complete(&mut out).unwrap();
    out.state("big", &vec![3; 200_000]).unwrap();
    out.end().unwrap();
    out.flush().unwrap();
    let (written, sent) = (out.bytes_written(), out.bytes_sent());
    let loaded = rx
        .recv_timeout(HANG)
        .expect("the loader waits past END")
        .unwrap();
    loader.join().unwrap();
    assert_eq!(written, sent);
    assert_eq!(counted.load(Ordering::Relaxed), sent);
    assert_eq!(loaded, sent);
    assert_eq!(contents(&src), contents(&dst));
    drop(near);
}

/// A transport that panics on its first vectored write (with `armed`), and records what
/// it is given.
struct PanicOnce {
    armed: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<u8>>>,
}
impl Write for PanicOnce {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.got.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("transport panics mid-write");
        }
        let mut n = 0;
        for b in bufs {
            self.got.lock().unwrap().extend_from_slice(b);
            n += b.len();
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Pages lent to the writer must not stay lent once the batch that lent them is gone: a
/// transport panics in the middle of a batch, the caller catches it, drops the saver and
/// frees the block (the block's memory is the test's again, and it reuses it), then
/// flushes the writer. Nothing of the reused memory may reach the transport: that would
/// be a read of memory after its lender released it (with an anonymous block: unmapped).
#[test]
fn a_panicking_transport_ends_every_loan() {
    let arena = Arena::new(128 * P, 0x11);
    let src = fenced_list(&[("ram", arena)]);
    let (armed, got) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let t = PanicOnce {
        armed: armed.clone(),
        got: got.clone(),
    };
    let mut out = StreamWriter::with_capacity(t, 0);
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    armed.store(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(|| saver.iterate(&mut out)));
    assert!(
        r.is_err(),
        "the transport did not panic: the test needs a vectored write"
    );
    drop(saver);
    src.free("ram").unwrap();
    assert_eq!(src.drain_reclaim(), 0, "the block is reclaimed");
    arena.fill(0xab);
    got.lock().unwrap().clear();
    let _ = out.flush();
    let after = got.lock().unwrap();
    assert!(
        !after.windows(64).any(|w| w.iter().all(|&b| b == 0xab)),
        "the writer sent {} bytes read from memory released before the flush",
        after.iter().filter(|&&b| b == 0xab).count()
    );
}

/// The final stage must send every page dirty when it starts. Batches cut short by their
/// time limit (here zero: one window each) walk part of the list clean; the guest then
/// writes a page the walk already passed (a live iteration, then the final sync), and
/// `complete` runs.
#[test]
fn complete_sends_a_page_dirtied_behind_a_batch_cut_short() {
    let src = list_of(&[("a", 256), ("b", 128)]);
    let dst = list_of(&[("a", 256), ("b", 128)]);
    write_block(&src, "a", 0, &page_of(1));
    let mut out = StreamWriter::new(Vec::new());
    let mut saver = RamSaver::new(src.clone());
    saver.set_batch_limit(Duration::ZERO);
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    for _ in 0..3 {
        let b = saver.iterate(&mut out).unwrap();
        assert!(!b.clean);
    }
    // The guest writes block "b", which the last batch walked clean; the final sync marks it.
    write_block(&src, "b", 5 * P, &page_of(7));
    assert_eq!(saver.remaining_pages(), 1);
    saver.complete(&mut out).unwrap();
    assert_eq!(
        saver.remaining_pages(),
        0,
        "complete() left a dirty page unsent"
    );
    out.end().unwrap();
    load_into(&dst, &out.into_inner().unwrap()).unwrap();
    assert_eq!(contents(&src), contents(&dst));
}

/// Another thread adds, removes and re-creates blocks (and writes them) while batches run,
/// one change per batch, concurrently with it; after the changes stop (the last one a
/// change to the list) the final stage leaves the destination with exactly the source's
/// blocks and bytes, and the saver holds no freed block.
#[test]
fn a_list_changed_by_another_thread_during_every_batch_arrives() {
    let src = list_of(&[("ram", 256), ("a", 32)]);
    let dst = list_of(&[("ram", 256), ("a", 32)]);
    for i in (0..256).step_by(7) {
        write_block(&src, "ram", i * P, &page_of(i as u8));
    }
    let (go, todo) = mpsc::channel::<u64>();
    let (ack, done) = mpsc::channel::<()>();
    let changer = {
        let src = src.clone();
        thread::spawn(move || {
            for round in todo {
                let id = format!("h{round}");
                let pages = 1 + round % 37;
                src.alloc(&id, pages * P).unwrap();
                write_block(&src, &id, (pages - 1) * P, &page_of(round as u8));
                write_block(&src, "ram", (round * 31 % 256) * P, &page_of(!round as u8));
                if round >= 2 {
                    let _ = src.free(&format!("h{}", round - 2));
                }
                if round % 5 == 0 {
                    src.free("a").unwrap();
                    src.alloc("a", (1 + round % 40) * P).unwrap();
                    write_block(&src, "a", 0, &page_of(round as u8 ^ 0x33));
                }
                ack.send(()).unwrap();
            }
        })
    };
    let (sock, far) = std::os::unix::net::UnixStream::pair().unwrap();
    let loader = {
        let dst = dst.clone();
        thread::spawn(move || load(&dst, far, &mut AnonymousHotplug, &LoadOptions::default()))
    };
    let mut out = StreamWriter::new(sock);
    let mut saver = RamSaver::new(src.clone());
    saver.set_batch_limit(Duration::from_micros(200));
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    for round in 0..120 {
        go.send(round).unwrap();
        saver.iterate(&mut out).unwrap();
        done.recv().unwrap();
    }
    drop(go);
    changer.join().unwrap();
    saver.complete(&mut out).unwrap();
    out.end().unwrap();
    drop(out.into_inner().unwrap());
    let s = loader.join().unwrap().unwrap();
    assert_eq!(contents(&src), contents(&dst));
    assert!(
        s.blocks_added.len() > 20 && s.blocks_removed.len() > 20,
        "{s:?}"
    );
    drop(saver);
    assert_eq!(src.drain_reclaim(), 0, "a freed block is still held");
}

/// A counted reference outlives its list: the block's memory stays readable and holds what
/// was written (the list gone and call_rcu drained), and the reference drops cleanly.
#[test]
fn a_block_reference_outlives_its_list() {
    let r = {
        let ram = list_of(&[("ram", 4)]);
        write_block(&ram, "ram", P, &page_of(4));
        let g = rcu::read_lock();
        ram.block_ref(&g, "ram").unwrap()
    };
    rcu::drain_call_rcu();
    // SAFETY: the counted reference keeps the block mapped; nothing else uses it now.
    let page = unsafe { std::slice::from_raw_parts(r.host().add(P as usize), P as usize) };
    assert_eq!(page, &page_of(4)[..]);
    assert_eq!((r.id(), r.len()), ("ram", 4 * P));
    drop(r);
}

/// "Send only what the guest ever wrote": RAM never touched on the source is neither read
/// by the saver (it stays absent in pagemap) nor sent, and on a fresh destination the
/// loader touches nothing but the pages that came.
#[test]
fn untouched_ram_stays_untouched_on_both_sides() {
    const PAGES: u64 = 16 << 10;
    let src = list_of(&[("big", PAGES)]);
    let dst = list_of(&[("big", PAGES)]);
    for i in [0, 1000, PAGES - 1] {
        write_block(&src, "big", i * P, &page_of(i as u8));
    }
    let Ok(mut map) = PageMap::open() else {
        println!("SKIPPED: no pagemap");
        return;
    };
    let absent = |ram: &RamList, map: &mut PageMap| {
        let g = rcu::read_lock();
        let mut scan = PageScan::new();
        map.scan(ram.block_by_id(&g, "big").unwrap(), &mut scan)
            .unwrap();
        scan.absent_pages()
    };
    let before = absent(&src, &mut map);
    assert!(before >= PAGES - 3);
    let mut out = StreamWriter::new(Vec::new());
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    let b = saver.complete(&mut out).unwrap();
    out.end().unwrap();
    let s = out.into_inner().unwrap();
    assert_eq!((b.pages, b.zero_pages), (3, 0));
    assert!(s.len() < 4 * P as usize, "{} bytes for 3 pages", s.len());
    assert_eq!(
        absent(&src, &mut map),
        before,
        "the saver faulted in untouched pages"
    );
    load_into(&dst, &s).unwrap();
    assert_eq!(
        absent(&dst, &mut map),
        before,
        "the loader touched pages that never came"
    );
    assert_eq!(contents(&src), contents(&dst));
}

/// A FIFO at a fresh path, for `file:` snapshots read from a pipe.
fn fifo(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("mig-review-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    path
}

/// Runs `incoming_from_uri` on `file:path` into a 2-page "ram" on a thread while `source`
/// writes the pipe; returns its result (None: it hung) and the destination list.
fn incoming_from_pipe(
    path: &std::path::Path,
    source: impl FnOnce(std::fs::File),
) -> (Option<Result<(), String>>, Arc<RamList>) {
    let (tx, rx) = mpsc::channel();
    let uri = MigrationUri::File(path.to_path_buf());
    let dst = list_of(&[("ram", 2)]);
    let dest = {
        let dst = dst.clone();
        thread::spawn(move || {
            let mut vm = Dest(dst, AnonymousHotplug);
            let opts = IncomingOptions {
                stall_timeout: Duration::from_millis(300),
                deadline: Some(Duration::from_secs(2)),
                accept_timeout: Some(Duration::from_secs(2)),
                ..IncomingOptions::default()
            };
            let r = incoming_from_uri(&mut vm, &uri, &opts);
            tx.send(r.map(|_| ()).map_err(|e| e.to_string())).unwrap();
        })
    };
    let w = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut held = w.try_clone().unwrap();
    source(w);
    let r = rx.recv_timeout(HANG).ok();
    // Lets a hung loader see the end of the stream, so that the thread ends.
    held.flush().unwrap();
    drop(held);
    dest.join().unwrap();
    let _ = std::fs::remove_file(path);
    (r, dst)
}

/// The destination of a `file:` snapshot read from a pipe (a FIFO, as `file:/dev/stdin`
/// would be): a writer that stalls must end the load by the stall timeout, as a socket
/// does, not hang it; a writer that sends a whole snapshot restores it.
#[test]
fn a_snapshot_pipe_that_stalls_ends_by_the_stall_timeout() {
    let (r, _) = incoming_from_pipe(&fifo("stall"), |mut w| {
        w.write_all(b"MVMS\0\0\0\x01\x01").unwrap();
    });
    let e = r.expect("the load hung on a stalled pipe").unwrap_err();
    assert!(e.contains("byte 9 while reading page size"), "{e}");
    let src = list_of(&[("ram", 2)]);
    write_block(&src, "ram", P, &page_of(8));
    let (r, dst) = incoming_from_pipe(&fifo("whole"), |w| {
        let mut out = StreamWriter::new(w);
        let mut saver = RamSaver::new(src.clone());
        out.header().unwrap();
        saver.setup(&mut out).unwrap();
        saver.complete(&mut out).unwrap();
        out.end().unwrap();
        out.flush().unwrap();
    });
    r.expect("the load hung on a whole snapshot").unwrap();
    assert_eq!(contents(&src), contents(&dst));
}

/// A destination VM for `incoming`: a list and a hotplug.
struct Dest(Arc<RamList>, AnonymousHotplug);
impl RestorableVm for Dest {
    fn ram(&self) -> Arc<RamList> {
        self.0.clone()
    }
    fn hotplug(&mut self) -> &mut dyn BlockHotplug {
        &mut self.1
    }
    fn restore_state(&mut self, _: &[ComponentState]) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        Ok(())
    }
}

/// A port is digits: "+80" is not a port, and what is accepted prints back the same.
#[test]
fn a_tcp_port_is_digits_only() {
    for bad in ["tcp:host:+80", "tcp:host:-0", "tcp:[::1]:+1"] {
        assert!(bad.parse::<MigrationUri>().is_err(), "{bad} parsed");
    }
}

/// The final stage on a stopped guest while another thread still adds and removes blocks
/// (the VMM's control API does not stop with the vCPUs): `complete` ends once the changes
/// do, and a second `complete` after them leaves the destination equal to the source.
#[test]
fn complete_ends_while_the_list_changes_under_it() {
    let src = list_of(&[("ram", 64)]);
    let dst = list_of(&[("ram", 64)]);
    write_block(&src, "ram", 3 * P, &page_of(3));
    let (sock, far) = std::os::unix::net::UnixStream::pair().unwrap();
    let loader = {
        let dst = dst.clone();
        thread::spawn(move || load(&dst, far, &mut AnonymousHotplug, &LoadOptions::default()))
    };
    let mut out = StreamWriter::new(sock);
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    let changer = {
        let src = src.clone();
        thread::spawn(move || {
            for i in 0..300u64 {
                let id = format!("c{}", i % 4);
                let _ = src.free(&id);
                src.alloc(&id, (1 + i % 9) * P).unwrap();
                write_block(&src, &id, 0, &page_of(i as u8));
            }
        })
    };
    let (tx, rx) = mpsc::channel();
    let saving = thread::spawn(move || {
        saver.complete(&mut out).unwrap();
        tx.send(()).unwrap();
        (saver, out)
    });
    changer.join().unwrap();
    rx.recv_timeout(HANG)
        .expect("complete() did not end after the changes did");
    let (mut saver, mut out) = saving.join().unwrap();
    saver.complete(&mut out).unwrap();
    out.end().unwrap();
    drop(out.into_inner().unwrap());
    loader.join().unwrap().unwrap();
    assert_eq!(contents(&src), contents(&dst));
}
