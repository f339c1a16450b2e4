//! A whole RAM migration of non-zero pages over `tcp:` on loopback, in plain TCP and in
//! mutual TLS (rustls, ring's AES-GCM), in the same run: the saver and the checked loader
//! on either end of the transport's own connections ([`connect`]/[`listen`] against
//! [`connect_tls`]/[`listen_tls`], handshake included). Every copy goes into a fresh
//! destination list, as a migration's destination is a fresh process.
//!
//! `cargo bench -p migration --bench tls` — `MIGRATION_BENCH_MIB` (default 2048: 2 GiB)
//! and `MIGRATION_BENCH_ROUNDS` (default 5) set the size and the rounds; plain and TLS
//! alternate, and the medians and their ratio are printed. Target: TLS at least 0.7 of
//! plain.

use migration::load::{load, LoadOptions, NoHotplug};
use migration::save::RamSaver;
use migration::stream::{StreamWriter, PAGE_SIZE};
use migration::transport::{
    connect, connect_tls, listen, listen_tls, Connection, Listener, MigrationUri, TlsClient,
    TlsServer,
};
use minivmm_tests::tls::Ca;
use ramlist::RamList;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A list with one block of `bytes`, every page non-zero (and different).
fn filled_list(bytes: u64) -> Arc<RamList> {
    let ram = Arc::new(RamList::new());
    ram.alloc("ram", bytes).unwrap();
    let g = rcu::read_lock();
    let b = ram.block_by_id(&g, "ram").unwrap();
    // SAFETY: the whole block, mapped while the guard lives; nothing else uses it yet.
    let mem = unsafe { std::slice::from_raw_parts_mut(b.host(), bytes as usize) };
    for (i, page) in mem.chunks_mut(PAGE_SIZE as usize).enumerate() {
        page.fill(0x5a);
        page[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    drop(g);
    ram
}

/// One migration of `src` into a fresh list through `listener` and the connection
/// `dial` makes; its time (handshake included) and the stream's size.
fn migrate(
    src: &Arc<RamList>,
    bytes: u64,
    listener: Listener,
    dial: impl FnOnce() -> Connection,
) -> (Duration, u64) {
    let dst = Arc::new(RamList::new());
    dst.alloc("ram", bytes).unwrap();
    let t = Instant::now();
    let loader = thread::spawn(move || {
        let conn = listener.accept().unwrap();
        let (mut reader, _writer) = conn.into_split();
        load(&dst, &mut reader, &mut NoHotplug, &LoadOptions::default()).unwrap();
    });
    let (_reader, writer) = dial().into_split();
    let mut out = StreamWriter::new(writer);
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    saver.complete(&mut out).unwrap();
    out.end().unwrap();
    let written = out.bytes_written();
    drop(out.into_inner().unwrap());
    loader.join().unwrap();
    (t.elapsed(), written)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let bytes = env_u64("MIGRATION_BENCH_MIB", 2048) * MIB;
    let rounds = env_u64("MIGRATION_BENCH_ROUNDS", 5).max(1);
    let dir = std::env::temp_dir().join(format!("tls-bench-{}", std::process::id()));
    let ca = Ca::new("bench CA").unwrap();
    ca.write_all(&dir, &["localhost", "127.0.0.1"], "bench-source")
        .unwrap();
    let client = TlsClient::load(&dir).unwrap();
    let server = TlsServer::load(&dir, Some("bench-source")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let src = filled_list(bytes);
    let any: MigrationUri = "tcp:127.0.0.1:0".parse().unwrap();
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    let mut stream_bytes = 0;
    for round in 0..rounds {
        let l = listen(&any).unwrap();
        let uri = l.uri().clone();
        let (d, n) = migrate(&src, bytes, l, || connect(&uri).unwrap());
        plain.push(d);
        let l = listen_tls(&any, server.clone()).unwrap();
        let uri = l.uri().clone();
        let (t, m) = migrate(&src, bytes, l, || connect_tls(&uri, &client).unwrap());
        tls.push(t);
        // The same pages either way; the stream's bytes differ only by the few batch
        // boundaries timing decides.
        stream_bytes = n.max(m);
        println!(
            "round {}: plain {:.0} ms ({n} bytes), tls {:.0} ms ({m} bytes)",
            round + 1,
            d.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e3
        );
    }
    let (p, t) = (median(&mut plain), median(&mut tls));
    let gbps = |d: Duration| stream_bytes as f64 / d.as_secs_f64() / 1e9;
    println!(
        "{} MiB of non-zero pages ({stream_bytes} stream bytes), medians of {rounds}:",
        bytes / MIB
    );
    println!(
        "plain tcp  {:>8.1} ms  {:.2} GB/s",
        p.as_secs_f64() * 1e3,
        gbps(p)
    );
    println!(
        "mutual TLS {:>8.1} ms  {:.2} GB/s",
        t.as_secs_f64() * 1e3,
        gbps(t)
    );
    let ratio = gbps(t) / gbps(p);
    println!(
        "TLS / plain throughput: {ratio:.2}x (target at least 0.7x: {})",
        if ratio >= 0.7 { "MET" } else { "NOT MET" }
    );
}
