//! The transports with real sockets and files: a migration over `unix:`, `tcp:` and
//! `file:`, a stalled source that ends the loader by its read timeout instead of a hang, a
//! refused connection, and the rate limit holding a stream back.

mod common;

use common::*;
use migration::load::{load, LoadError, LoadOptions, NoHotplug};
use migration::save::RamSaver;
use migration::stream::{ReadError, StreamWriter, PAGE_SIZE};
use migration::transport::{connect, listen, MigrationUri, TransportError};
use ramlist::RamList;
use std::io::{Read, Write};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const P: u64 = PAGE_SIZE;

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("minivmm-mig-{}-{name}", std::process::id()))
}

fn two_lists() -> (Arc<RamList>, Arc<RamList>) {
    let src = Arc::new(RamList::new());
    let dst = Arc::new(RamList::new());
    for ram in [&src, &dst] {
        ram.alloc("ram", 64 * P).unwrap();
    }
    for i in (0..64).step_by(5) {
        write_block(&src, "ram", i * P, &page_of(i as u8));
    }
    (src, dst)
}

/// Saves `src` entirely into `w`: setup, everything, a state, the end marker.
fn save_all(src: &Arc<RamList>, w: Box<dyn Write + Send>) {
    let mut out = StreamWriter::new(w);
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    saver.complete(&mut out).unwrap();
    out.state("cpu0", b"state").unwrap();
    out.end().unwrap();
    out.flush().unwrap();
}

/// Migrates over `uri` (a socket): the destination listens and loads, then confirms with
/// one byte on the same connection.
fn migrate_over(uri: &str) {
    let (src, dst) = two_lists();
    let listener = listen(&uri.parse().unwrap()).unwrap();
    let bound = listener.uri().clone();
    let dest = thread::spawn(move || {
        let conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
        let (r, mut w) = conn.into_split();
        let s = load(&dst, r, &mut NoHotplug, &LoadOptions::default()).unwrap();
        w.write_all(b"K").unwrap();
        (s, dst)
    });
    let conn = connect(&bound).unwrap();
    let (mut r, w) = conn.into_split();
    save_all(&src, w);
    let mut ok = [0u8; 1];
    r.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"K");
    let (s, dst) = dest.join().unwrap();
    assert_eq!(s.states[0].data, b"state");
    assert_eq!(read_block(&src, "ram"), read_block(&dst, "ram"));
}

#[test]
fn migrate_over_a_unix_socket() {
    let path = temp_path("unix.sock");
    migrate_over(&format!("unix:{}", path.display()));
    assert!(!path.exists(), "the listener leaves its socket file behind");
}

#[test]
fn migrate_over_tcp_on_loopback() {
    migrate_over("tcp:127.0.0.1:0");
}

#[test]
fn snapshot_to_a_file_and_back() {
    let path = temp_path("snap");
    let uri: MigrationUri = format!("file:{}", path.display()).parse().unwrap();
    let (src, dst) = two_lists();
    let conn = connect(&uri).unwrap();
    save_all(&src, conn.into_split().1);
    let conn = listen(&uri).unwrap().accept().unwrap();
    let s = load(
        &dst,
        conn.into_split().0,
        &mut NoHotplug,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(s.bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(read_block(&src, "ram"), read_block(&dst, "ram"));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_stalled_source_ends_the_loader_by_its_read_timeout() {
    let path = temp_path("stall.sock");
    let uri: MigrationUri = format!("unix:{}", path.display()).parse().unwrap();
    let listener = listen(&uri).unwrap();
    let mut src = connect(&uri).unwrap();
    let conn = listener.accept().unwrap();
    conn.set_timeouts(Some(Duration::from_millis(200)), None)
        .unwrap();
    // The source sends a header and half a setup section, then stalls, socket open.
    src.writer().write_all(b"MVMS\0\0\0\x01\x01\0\0").unwrap();
    let dst = RamList::new();
    let t = Instant::now();
    let r = load(
        &dst,
        conn.into_split().0,
        &mut NoHotplug,
        &LoadOptions::default(),
    );
    let e = r.unwrap_err();
    // Said as a timeout, not as the system's EAGAIN ("Resource temporarily unavailable").
    let msg = e.to_string();
    assert!(
        msg.contains("nothing received within the 200ms read timeout"),
        "{msg}"
    );
    match e {
        LoadError::Read(ReadError::Io {
            offset: 9, what, ..
        }) => {
            assert_eq!(what, "page size")
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    drop(src);
}

#[test]
fn nobody_listening_is_a_typed_error() {
    let path = temp_path("nobody.sock");
    let uri: MigrationUri = format!("unix:{}", path.display()).parse().unwrap();
    assert!(matches!(connect(&uri), Err(TransportError::Connect { .. })));
    let l = listen(&uri).unwrap();
    assert!(matches!(
        l.accept_timeout(Duration::from_millis(50)),
        Err(TransportError::AcceptTimeout { .. })
    ));
    drop(l);
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(matches!(
        listen(&uri),
        Err(TransportError::NotASocket { .. })
    ));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn the_rate_limit_holds_a_stream_back() {
    // 400 KB at 1 MB/s with a 100 KB burst: at least 0.3 s, however fast the machine.
    let mut out = StreamWriter::with_capacity(std::io::sink(), 64 * 1024);
    out.set_rate_limit(Some(1_000_000));
    let t = Instant::now();
    let chunk = vec![1u8; 10_000];
    for _ in 0..40 {
        out.put_bytes(&chunk).unwrap();
    }
    out.flush().unwrap();
    assert_eq!(out.bytes_sent(), 400_000);
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t.elapsed()
    );
}

/// A `file:` destination on a FIFO holds the read end it opened in `listen` until
/// `accept` takes it: a writer that opens the FIFO in between pairs with that open, and
/// its bytes reach the loader. (Closing and reopening it left such a writer with no
/// reader: EPIPE on its first write.)
#[test]
fn a_fifo_writer_that_comes_between_listen_and_accept_is_read() {
    use std::os::unix::fs::OpenOptionsExt;
    let path = temp_path("between.fifo");
    let _ = std::fs::remove_file(&path);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let listener = listen(&MigrationUri::File(path.clone())).unwrap();
    // Non-blocking: refused at once (ENXIO) when no reader holds the FIFO open.
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .expect("no reader between listen and accept");
    w.write_all(b"MVMS").unwrap();
    drop(w);
    let mut conn = listener.accept().unwrap();
    let mut got = Vec::new();
    conn.reader().read_to_end(&mut got).unwrap();
    assert_eq!(got, b"MVMS");
    let _ = std::fs::remove_file(&path);
}
