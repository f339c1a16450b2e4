//! The destination driver against sources that misbehave: one that stalls is cut off by
//! the read timeout, one that trickles forever by the deadline, each within its bound and
//! with a typed error; a VM that refuses the states, or whose guest does not start, is
//! reported back to the source, which names the destination's message and resumes its
//! guest; and the confirmation leaves only after the VM's resume returned.

mod common;
#[path = "common/fake_vm.rs"]
mod fake_vm;

use fake_vm::{FakeDest, FakeVm};
use migration::live::{
    incoming, migrate_to_uri, IncomingError, IncomingOptions, MigrateOptions, MigrationError,
    MigrationProgress, Reply,
};
use migration::load::LoadError;
use migration::stream::{ReadError, StreamWriter};
use migration::transport::{connect, listen, MigrationUri};
use ramlist::RamList;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn uri(name: &str) -> MigrationUri {
    MigrationUri::Unix(
        std::env::temp_dir().join(format!("mvm-incoming-{}-{name}.sock", std::process::id())),
    )
}

fn list() -> Arc<RamList> {
    let l = Arc::new(RamList::new());
    l.alloc("ram", 4 * MIB).unwrap();
    l.alloc("vga", MIB).unwrap();
    l
}

/// Runs `incoming` on `uri` with `opts` while `source` plays the source; returns the
/// destination's result and how long it took.
fn against(
    uri: &MigrationUri,
    opts: IncomingOptions,
    source: impl FnOnce(MigrationUri) + Send + 'static,
) -> (FakeDest, Result<(), IncomingError>, Duration) {
    let listener = listen(uri).unwrap();
    let u = uri.clone();
    let src = thread::spawn(move || source(u));
    let mut vm = FakeDest::new(list());
    let conn = listener.accept_timeout(Duration::from_secs(5)).unwrap();
    let t = Instant::now();
    let r = incoming(&mut vm, conn, &opts).map(|_| ());
    let took = t.elapsed();
    src.join().unwrap();
    (vm, r, took)
}

#[test]
fn a_stalled_source_is_cut_off_by_the_read_timeout() {
    let opts = IncomingOptions {
        stall_timeout: Duration::from_millis(200),
        ..IncomingOptions::default()
    };
    let (vm, r, took) = against(&uri("stall"), opts, |u| {
        let mut c = connect(&u).unwrap();
        let mut w = StreamWriter::new(c.writer());
        w.header().unwrap();
        w.flush().unwrap();
        drop(w);
        thread::sleep(Duration::from_millis(600));
    });
    let e = r.unwrap_err();
    println!("{e} (after {took:?})");
    assert!(
        matches!(
            e,
            IncomingError::Load(LoadError::Read(ReadError::Io { offset: 8, .. }))
        ),
        "{e:?}"
    );
    assert!(took < Duration::from_millis(550), "{took:?}");
    assert!(!vm.resumed);
}

#[test]
fn a_trickling_source_is_cut_off_by_the_deadline() {
    let opts = IncomingOptions {
        stall_timeout: Duration::from_secs(5),
        deadline: Some(Duration::from_millis(300)),
        ..IncomingOptions::default()
    };
    let (vm, r, took) = against(&uri("trickle"), opts, |u| {
        let mut c = connect(&u).unwrap();
        // One byte of a valid stream every 20 ms (a header, a setup of one block whose
        // 255-byte idstr takes 5 s to arrive), never stalling long enough for the read
        // timeout, never finishing or going wrong before the deadline.
        let mut valid = b"MVMS\0\0\0\x01\x01\0\0\x10\0\0\0\0\x01\xff".to_vec();
        valid.extend([b'a'; 255]);
        for b in valid.into_iter().take(100) {
            if c.writer().write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let e = r.unwrap_err();
    println!("{e} (after {took:?})");
    assert!(
        matches!(e, IncomingError::Deadline(d) if d == Duration::from_millis(300)),
        "{e:?}"
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!vm.resumed);
}

#[test]
fn a_destination_vm_refusing_the_states_is_reported_to_the_source() {
    let (src, dst) = (list(), list());
    let vm = FakeVm::new(src, None);
    vm.prefill(0..8);
    let u = uri("refuse-state");
    let listener = listen(&u).unwrap();
    let dest = thread::spawn(move || {
        let mut d = FakeDest::new(dst);
        d.refuse_restore = Some("cpu0: unknown MSR 0x1234");
        let conn = listener.accept().unwrap();
        incoming(&mut d, conn, &IncomingOptions::default()).map(|_| ())
    });
    let err = migrate_to_uri(
        &vm,
        &u,
        &MigrateOptions::default(),
        &MigrationProgress::new(),
    )
    .unwrap_err();
    let derr = dest.join().unwrap().unwrap_err();
    println!("source: {err}\ndestination: {derr}");
    assert!(matches!(derr, IncomingError::Restore(_)));
    assert!(
        matches!(&err, MigrationError::DestinationFailed { message, .. }
            if message.contains("unknown MSR 0x1234")),
        "{err:?}"
    );
    assert!(err.to_string().contains("confirmation"), "{err}");
    assert_eq!(
        vm.calls(),
        [
            "start_dirty_log",
            "pause",
            "save_state",
            "stop_dirty_log",
            "resume"
        ]
    );
    assert!(!vm.is_paused());
}

/// A whole stream from the fake source, written to a file, to feed by hand.
fn stream_bytes(name: &str) -> Vec<u8> {
    let vm = FakeVm::new(list(), None);
    vm.prefill(0..8);
    let path = std::env::temp_dir().join(format!("mvm-incoming-{}-{name}.bin", std::process::id()));
    let file = MigrationUri::File(path.clone());
    migrate_to_uri(
        &vm,
        &file,
        &MigrateOptions::default(),
        &MigrationProgress::new(),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
}

/// The confirmation says the guest runs: it must not leave before `resume` returned.
/// The VM's `resume` looks at the source's end of the socket: no reply there yet.
#[test]
fn the_confirmation_goes_out_only_after_resume_returned() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let bytes = stream_bytes("order");
    let u = uri("order");
    let listener = listen(&u).unwrap();
    let MigrationUri::Unix(path) = &u else {
        unreachable!("uri() is a unix socket")
    };
    let mut src = UnixStream::connect(path).unwrap();
    let peek = src.try_clone().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let s = seen.clone();
    let dest = thread::spawn(move || {
        let mut d = FakeDest::new(list());
        d.on_resume = Some(Box::new(move || {
            use std::io::Read;
            // Nothing else reads this socket now: the test thread waits in join. A byte
            // read here fails the test anyway.
            peek.set_nonblocking(true).unwrap();
            let early = !matches!((&peek).read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            peek.set_nonblocking(false).unwrap();
            *s.lock().unwrap() = Some(early);
            Ok(())
        }));
        let conn = listener.accept().unwrap();
        incoming(&mut d, conn, &IncomingOptions::default()).map(|_| ())
    });
    src.write_all(&bytes).unwrap();
    dest.join().unwrap().unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        Some(false),
        "a reply was there before resume returned"
    );
    assert_eq!(Reply::read_from(&mut src).unwrap(), Reply::Running);
}

/// A destination whose guest does not start answers with a failure, never "running",
/// and the source resumes its own guest.
#[test]
fn a_destination_vm_that_cannot_start_is_reported_and_the_source_resumes() {
    let (src, dst) = (list(), list());
    let vm = FakeVm::new(src, None);
    vm.prefill(0..8);
    let u = uri("no-start");
    let listener = listen(&u).unwrap();
    let dest = thread::spawn(move || {
        let mut d = FakeDest::new(dst);
        d.on_resume = Some(Box::new(|| Err("1 of 1 vCPUs still parked".into())));
        let conn = listener.accept().unwrap();
        incoming(&mut d, conn, &IncomingOptions::default()).map(|_| ())
    });
    let err = migrate_to_uri(
        &vm,
        &u,
        &MigrateOptions::default(),
        &MigrationProgress::new(),
    )
    .unwrap_err();
    let derr = dest.join().unwrap().unwrap_err();
    println!("source: {err}\ndestination: {derr}");
    assert!(matches!(derr, IncomingError::Resume(_)), "{derr:?}");
    assert!(
        matches!(&err, MigrationError::DestinationFailed { message, .. }
            if message.contains("still parked")),
        "{err:?}"
    );
    assert_eq!(vm.calls().last().copied(), Some("resume"));
    assert!(!vm.is_paused());
}
