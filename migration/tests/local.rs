//! Local migration (the memory handed over with SCM_RIGHTS, no page copied) between two
//! threads over a real unix socket: a guest thread keeps writing memfd-backed RAM on the
//! source; the destination maps the very same memory, so after the hand-over a write on
//! one side is seen on the other; blocks added and removed during the hand-over move too;
//! a destination that dies before `ready` leaves the source running, one that dies after
//! `go` leaves it paused with the guest declared lost; anonymous RAM and tcp: are refused
//! before anything is sent; and hostile layouts (a file shorter than its block, a socket
//! for a file, a block the destination has with another length) are refused before
//! anything is mapped, the source resuming its guest.

mod common;
#[path = "common/fake_vm.rs"]
mod fake_vm;

use fake_vm::{FakeDest, FakeVm, GuestLoad};
use migration::live::local::wire::{header, send_record, RecordOut};
use migration::live::local::{incoming_any, migrate_local, migrate_local_to_uri, SharedBlock};
use migration::live::{
    IncomingError, IncomingOptions, MigratableVm, MigrateOptions, MigrationError,
    MigrationProgress, Reply, RestorableVm,
};
use migration::load::{AnonymousHotplug, BlockHotplug, HotplugError};
use migration::transport::{listen, MigrationUri};
use ramlist::{RamBlockOptions, RamList};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A memfd of `len` bytes, sealed against shrinking and growing (as the VMM's).
fn memfd(len: u64) -> OwnedFd {
    let fd = unsealed_memfd(len);
    // SAFETY: F_ADD_SEALS on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(r, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    fd
}

fn unsealed_memfd(len: u64) -> OwnedFd {
    // SAFETY: a valid NUL-terminated name; the call makes a new descriptor.
    let fd = unsafe {
        libc::memfd_create(
            c"local-test".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just made and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    File::from(fd.try_clone().unwrap()).set_len(len).unwrap();
    fd
}

/// A list whose blocks are memfds: "ram" (what the fake guest writes) and "vga".
fn shared_list() -> Arc<RamList> {
    let l = Arc::new(RamList::new());
    for (id, len) in [("ram", 4 * MIB), ("vga", MIB)] {
        let fd = memfd(len);
        l.alloc_from_fd(id, len, fd.as_fd(), 0, RamBlockOptions::default())
            .unwrap();
    }
    l
}

/// The destination: anonymous blocks of the same ids and lengths, replaced by the
/// source's memory.
fn dest_list() -> Arc<RamList> {
    let l = Arc::new(RamList::new());
    l.alloc("ram", 4 * MIB).unwrap();
    l.alloc("vga", MIB).unwrap();
    l
}

fn uri(name: &str) -> MigrationUri {
    MigrationUri::Unix(
        std::env::temp_dir().join(format!("mvm-local-{}-{name}.sock", std::process::id())),
    )
}

fn quick() -> MigrateOptions {
    MigrateOptions {
        confirm_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
        ..MigrateOptions::default()
    }
}

fn incoming_opts() -> IncomingOptions {
    IncomingOptions {
        stall_timeout: Duration::from_secs(5),
        ..IncomingOptions::default()
    }
}

/// Byte `off` of block `id`.
fn byte(ram: &RamList, id: &str, off: u64) -> u8 {
    let g = rcu::read_lock();
    let b = ram.block_by_id(&g, id).expect("the block");
    assert!(off < b.len());
    // SAFETY: inside the block, which the guard keeps mapped; a plain read of a byte.
    unsafe { b.host().add(off as usize).read_volatile() }
}

fn set_byte(ram: &RamList, id: &str, off: u64, v: u8) {
    let g = rcu::read_lock();
    let b = ram.block_by_id(&g, id).expect("the block");
    assert!(off < b.len());
    // SAFETY: inside the block, which the guard keeps mapped; the tests' guests are
    // paused or write other pages.
    unsafe { b.host().add(off as usize).write_volatile(v) }
}

/// Runs the destination on `uri` with `dest` while the source migrates `vm` locally.
fn migrate_between(
    name: &str,
    vm: &FakeVm,
    mut dest: impl RestorableVm + Send + 'static,
) -> (
    Result<migration::live::MigrationStats, MigrationError>,
    Result<(), IncomingError>,
    impl RestorableVm,
) {
    let u = uri(name);
    let listener = listen(&u).unwrap();
    let d = thread::spawn(move || {
        let conn = listener.accept_timeout(Duration::from_secs(5)).unwrap();
        let r = incoming_any(&mut dest, conn, &incoming_opts()).map(|_| ());
        (r, dest)
    });
    let progress = MigrationProgress::new();
    let s = migrate_local_to_uri(vm, &u, &quick(), &progress);
    let (r, dest) = d.join().unwrap();
    (s, r, dest)
}

#[test]
fn the_memory_is_handed_over_and_no_page_is_copied() {
    let src = shared_list();
    let vm = FakeVm::new(
        src.clone(),
        Some(GuestLoad {
            pages: 1024,
            first: 0,
            working_set: 256,
            pages_per_sec: 0,
        }),
    );
    assert!(vm.wait_for_writes(512, Duration::from_secs(5)));
    let dest = FakeDest::new(dest_list());
    let dram = dest.ram.clone();
    let (s, r, dest) = migrate_between("handover", &vm, dest);
    let stats = s.expect("the local migration");
    r.expect("the destination");
    assert!(stats.local && stats.shared_blocks == 2, "{stats:?}");
    assert_eq!(stats.normal_pages + stats.zero_pages, 0);
    assert!(
        stats.transferred_bytes < 4096,
        "{} bytes went for a guest whose memory was handed over",
        stats.transferred_bytes
    );
    // The source gave the guest up: paused, never resumed.
    assert!(vm.is_paused());
    assert!(!vm.calls().contains(&"resume"), "{:?}", vm.calls());
    assert!(!vm.calls().contains(&"start_dirty_log"), "{:?}", vm.calls());
    // The same memory: what the guest wrote is there, and a write on one side shows on
    // the other.
    for off in [0, 4096 * 7 + 13, 4096 * 255] {
        assert_eq!(byte(&src, "ram", off), byte(&dram, "ram", off));
    }
    assert_ne!(
        byte(&dram, "ram", 8),
        0,
        "the guest's pages are not on the destination"
    );
    set_byte(&dram, "ram", 4 * MIB - 1, 0x5a);
    assert_eq!(byte(&src, "ram", 4 * MIB - 1), 0x5a);
    // The destination's blocks are the source's files, and its guest runs.
    let g = rcu::read_lock();
    assert!(dram.blocks(&g).all(|b| b.fd().is_some()));
    drop(g);
    let _ = dest;
}

/// Hotplug that, while the first layout is mapped, adds "late" to and removes "vga" from
/// the source's list: the changes the paused layout must carry.
struct ChangingSource {
    inner: AnonymousHotplug,
    src: Arc<RamList>,
    late: Option<OwnedFd>,
}

impl BlockHotplug for ChangingSource {
    fn add_block(&mut self, ram: &RamList, id: &str, len: u64) -> Result<(), HotplugError> {
        self.inner.add_block(ram, id, len)
    }

    fn remove_block(&mut self, ram: &RamList, id: &str) -> Result<(), HotplugError> {
        self.inner.remove_block(ram, id)
    }

    fn map_shared(&mut self, ram: &RamList, block: &SharedBlock) -> Result<(), HotplugError> {
        self.inner.map_shared(ram, block)?;
        if let Some(fd) = self.late.take() {
            self.src
                .alloc_from_fd("late", 2 * MIB, fd.as_fd(), 0, RamBlockOptions::default())
                .unwrap();
            self.src.free("vga").unwrap();
        }
        Ok(())
    }
}

struct Dest {
    inner: FakeDest,
    hotplug: ChangingSource,
}

impl RestorableVm for Dest {
    fn ram(&self) -> Arc<RamList> {
        self.inner.ram.clone()
    }
    fn hotplug(&mut self) -> &mut dyn BlockHotplug {
        &mut self.hotplug
    }
    fn restore_state(
        &mut self,
        states: &[migration::live::ComponentState],
    ) -> Result<(), migration::live::VmError> {
        self.inner.restore_state(states)
    }
    fn resume(&mut self) -> Result<(), migration::live::VmError> {
        self.inner.resume()
    }
}

#[test]
fn blocks_added_and_removed_during_the_hand_over_move_the_same_way() {
    let src = shared_list();
    let vm = FakeVm::new(src.clone(), None);
    let dest = Dest {
        inner: FakeDest::new(dest_list()),
        hotplug: ChangingSource {
            inner: AnonymousHotplug,
            src: src.clone(),
            late: Some(memfd(2 * MIB)),
        },
    };
    let dram = dest.inner.ram.clone();
    let (s, r, _dest) = migrate_between("changes", &vm, dest);
    let stats = s.expect("the local migration");
    r.expect("the destination");
    assert_eq!(stats.shared_blocks, 3, "ram, vga, then late: {stats:?}");
    let g = rcu::read_lock();
    let mut ids: Vec<_> = dram.blocks(&g).map(|b| b.id().to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["late", "ram"]);
    drop(g);
    set_byte(&src, "late", 5, 9);
    assert_eq!(byte(&dram, "late", 5), 9, "late is not the source's memory");
}

#[test]
fn anonymous_ram_and_other_uris_are_refused_before_anything_is_sent() {
    let anon = dest_list();
    let vm = FakeVm::new(anon, None);
    let u = uri("anon");
    let listener = listen(&u).unwrap();
    let e = migrate_local_to_uri(&vm, &u, &quick(), &MigrationProgress::new()).unwrap_err();
    assert!(
        matches!(e, MigrationError::NotShareable { ref id } if id == "ram" || id == "vga"),
        "{e}"
    );
    // Shared but not sealed: refused too.
    let l = Arc::new(RamList::new());
    let fd = unsealed_memfd(MIB);
    l.alloc_from_fd("ram", MIB, fd.as_fd(), 0, RamBlockOptions::default())
        .unwrap();
    let e = migrate_local_to_uri(
        &FakeVm::new(l, None),
        &u,
        &quick(),
        &MigrationProgress::new(),
    )
    .unwrap_err();
    assert!(matches!(e, MigrationError::NotSealed { .. }), "{e}");
    assert!(e.to_string().contains("--memory-backend memfd"), "{e}");
    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
    drop(listener);

    let vm = FakeVm::new(shared_list(), None);
    let tcp: MigrationUri = "tcp:127.0.0.1:9".parse().unwrap();
    let e = migrate_local_to_uri(&vm, &tcp, &quick(), &MigrationProgress::new()).unwrap_err();
    assert!(matches!(e, MigrationError::LocalNeedsUnix { .. }), "{e}");
    assert!(e.to_string().contains("unix:"), "{e}");
}

/// Plays a destination on `b` that answers `mapped`, reads to the end of the stream, then
/// does `then`.
fn fake_destination(b: UnixStream, then: impl FnOnce(&mut UnixStream) + Send + 'static) {
    thread::spawn(move || {
        let mut b = b;
        let mut buf = vec![0u8; 64 << 10];
        // The first layout ends with DONE (0x03) and waits for our answer.
        let n = b.read(&mut buf).unwrap();
        assert!(n >= 8);
        thread::sleep(Duration::from_millis(50));
        Reply::Mapped.write_to(&mut b).unwrap();
        then(&mut b);
    });
}

#[test]
fn a_destination_gone_before_ready_leaves_the_source_running_on_its_memory() {
    let src = shared_list();
    let vm = FakeVm::new(src.clone(), None);
    let (a, b) = UnixStream::pair().unwrap();
    fake_destination(b, |b| {
        // Reads what comes after mapped, then dies without a word.
        let mut buf = [0u8; 4096];
        let _ = b.read(&mut buf);
    });
    let e = migrate_local(&vm, a, &quick(), &MigrationProgress::new()).unwrap_err();
    assert!(matches!(e, MigrationError::DestinationClosed { .. }), "{e}");
    let calls = vm.calls();
    assert_eq!(calls.last(), Some(&"resume"), "{calls:?}");
    assert!(!vm.is_paused());
    // Its memory is its own as before.
    set_byte(&src, "ram", 0, 1);
    assert_eq!(byte(&src, "ram", 0), 1);
}

#[test]
fn a_destination_gone_after_go_leaves_the_source_paused_and_the_guest_declared_lost() {
    let vm = FakeVm::new(shared_list(), None);
    let (a, b) = UnixStream::pair().unwrap();
    fake_destination(b, |b| {
        // Everything read, ready, then `go`... and the destination dies.
        let mut buf = vec![0u8; 64 << 10];
        let _ = b.read(&mut buf);
        Reply::Ready.write_to(b).unwrap();
        let mut go = [0u8; 4];
        b.read_exact(&mut go).unwrap();
        assert_eq!(&go, b"MVMG");
    });
    let e = migrate_local(&vm, a, &quick(), &MigrationProgress::new()).unwrap_err();
    assert!(matches!(e, MigrationError::HandedOver { .. }), "{e}");
    assert!(e.to_string().contains("not resumed here"), "{e}");
    assert!(!vm.calls().contains(&"resume"), "{:?}", vm.calls());
    assert!(vm.is_paused());
}

/// Sends a hand-made first layout to a real destination and returns its error.
fn refused(records: impl FnOnce(&UnixStream)) -> String {
    let (a, b) = UnixStream::pair().unwrap();
    (&a).write_all(&header()).unwrap();
    records(&a);
    send_record(&a, &RecordOut::Done, None).unwrap();
    let mut dest = FakeDest::new(dest_list());
    let listener_less = migration::live::local::incoming_local(&mut dest, b, &incoming_opts());
    let e = listener_less.map(|_| ()).unwrap_err().to_string();
    assert!(!dest.resumed);
    // The reply went back to the source.
    let mut a = a;
    match Reply::read_from(&mut a) {
        Ok(Reply::Failed(m)) => assert_eq!(m, e),
        other => panic!("{other:?}"),
    }
    // Nothing of the source's was mapped: the destination's blocks are its own.
    let g = rcu::read_lock();
    assert!(dest.ram.blocks(&g).all(|b| b.fd().is_none()));
    drop(g);
    e
}

#[test]
fn hostile_layouts_are_refused_before_anything_is_mapped() {
    let add = |id: &'static str, len: u64| RecordOut::Add {
        id,
        len,
        guest_addr: None,
        offset: 0,
    };
    // A file shorter than its block: the guest's first touch past its end would fault.
    let e = refused(|a| {
        let short = memfd(MIB);
        send_record(a, &add("ram", 4 * MIB), Some(short.as_fd())).unwrap();
    });
    assert!(e.contains("short of offset 0x0 + length 0x400000"), "{e}");
    // A socket where a file should be.
    let e = refused(|a| {
        let (x, _y) = UnixStream::pair().unwrap();
        send_record(a, &add("ram", 4 * MIB), Some(x.as_fd())).unwrap();
    });
    assert!(e.contains("not a regular file"), "{e}");
    // The destination's block of that id has another length.
    let e = refused(|a| {
        let f = memfd(8 * MIB);
        send_record(a, &add("ram", 8 * MIB), Some(f.as_fd())).unwrap();
    });
    assert!(e.contains("0x400000 bytes"), "{e}");
    // A block removed that the destination never had.
    let e = refused(|a| {
        send_record(a, &RecordOut::Del("nope"), None).unwrap();
    });
    assert!(e.contains("nope"), "{e}");
    // A file its source could cut short under the guest.
    let e = refused(|a| {
        let f = unsealed_memfd(4 * MIB);
        send_record(a, &add("ram", 4 * MIB), Some(f.as_fd())).unwrap();
    });
    assert!(e.contains("not sealed against shrinking"), "{e}");
}

/// Hands `ram`'s memfd over to a real destination, then sends `stream` as the paused
/// part: returns the destination's error and the memfd, whose bytes must be as they were.
fn hostile_stream(stream: Vec<u8>) -> (String, OwnedFd) {
    let (a, b) = UnixStream::pair().unwrap();
    let fd = memfd(4 * MIB);
    let f = File::from(fd.try_clone().unwrap());
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xab; 4096], 0).unwrap();
    let dest = thread::spawn(move || {
        let mut dest = FakeDest::new(dest_list());
        let e = migration::live::local::incoming_local(&mut dest, b, &incoming_opts())
            .map(|_| ())
            .unwrap_err();
        assert!(!dest.resumed);
        e.to_string()
    });
    (&a).write_all(&header()).unwrap();
    let rec = RecordOut::Add {
        id: "ram",
        len: 4 * MIB,
        guest_addr: None,
        offset: 0,
    };
    send_record(&a, &rec, Some(fd.as_fd())).unwrap();
    send_record(&a, &RecordOut::Done, None).unwrap();
    let mut a = a;
    assert_eq!(Reply::read_from(&mut a).unwrap(), Reply::Mapped);
    send_record(&a, &RecordOut::Done, None).unwrap();
    let _ = (&a).write_all(&stream);
    (dest.join().unwrap(), fd)
}

#[test]
fn a_stream_with_pages_or_zero_skipped_blocks_is_refused_before_a_byte_is_written() {
    use migration::stream::{BlockFlags, StreamWriter};
    let setup = |flags: BlockFlags, page: bool| {
        let mut w = StreamWriter::new(Vec::new());
        w.header().unwrap();
        w.ram_setup_flagged([("ram", 4 * MIB, flags)].into_iter())
            .unwrap();
        if page {
            w.begin_ram().unwrap();
            w.page("ram", 0, &[0x55; 4096]).unwrap();
            w.eos().unwrap();
        }
        w.end().unwrap();
        w.into_inner().unwrap()
    };
    for (what, stream) in [
        ("ZERO_SKIPPED", setup(BlockFlags::ZERO_SKIPPED, false)),
        ("a page", setup(BlockFlags::NONE, true)),
    ] {
        let (e, fd) = hostile_stream(stream);
        assert!(e.contains("loading"), "{what}: {e}");
        let mut first = [0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&File::from(fd), &mut first, 0).unwrap();
        assert!(
            first.iter().all(|&b| b == 0xab),
            "{what} changed the handed-over memory"
        );
    }
}

#[test]
fn a_guest_resumed_after_its_state_went_gets_no_go_and_runs_on_here() {
    let vm = FakeVm::new(shared_list(), None);
    let (a, b) = UnixStream::pair().unwrap();
    thread::scope(|s| {
        s.spawn(|| {
            let mut b = b;
            let mut buf = vec![0u8; 64 << 10];
            let _ = b.read(&mut buf).unwrap();
            Reply::Mapped.write_to(&mut b).unwrap();
            b.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            while b.read(&mut buf).is_ok_and(|n| n > 0) {}
            // Someone lets the guest run while the source waits for ready.
            vm.resume().unwrap();
            Reply::Ready.write_to(&mut b).unwrap();
            // No go comes: the source closes.
            b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut go = [0u8; 4];
            assert!(b.read_exact(&mut go).is_err(), "go after a resume: {go:?}");
        });
        let e = migrate_local(&vm, a, &quick(), &MigrationProgress::new()).unwrap_err();
        assert!(
            e.to_string().contains("resumed after its state was sent"),
            "{e}"
        );
    });
    assert!(!vm.is_paused(), "the guest runs on here");
}

#[test]
fn a_pre_copy_stream_on_the_same_listener_still_loads() {
    // incoming_any takes ordinary streams too: a unix socket whose first bytes are not
    // the local header goes to the ordinary loader.
    let src = Arc::new(RamList::new());
    src.alloc("ram", 4 * MIB).unwrap();
    src.alloc("vga", MIB).unwrap();
    let vm = FakeVm::new(src, None);
    vm.prefill(0..16);
    let u = uri("precopy");
    let listener = listen(&u).unwrap();
    let d = thread::spawn(move || {
        let mut dest = FakeDest::new(dest_list());
        let conn = listener.accept_timeout(Duration::from_secs(5)).unwrap();
        let r = incoming_any(&mut dest, conn, &incoming_opts());
        (r.map(|s| s.summary.pages), dest.resumed)
    });
    let stats = migration::live::migrate_to_uri(&vm, &u, &quick(), &MigrationProgress::new())
        .expect("pre-copy");
    let (pages, resumed) = d.join().unwrap();
    assert_eq!(pages.expect("the destination"), 16);
    assert!(resumed && !stats.local);
}
