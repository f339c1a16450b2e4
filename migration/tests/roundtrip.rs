//! Save → load between two RAM lists in one process, the loader on another thread at the
//! far end of a unix socket pair: contents arrive equal, zero pages travel as flags, blocks
//! added and removed on the source during the migration reach the destination, and pages
//! a "guest" writes while the saver runs are sent again.

mod common;

use common::*;
use migration::load::{load, AnonymousHotplug, LoadOptions, LoadSummary};
use migration::save::RamSaver;
use migration::stream::{StreamWriter, PAGE_SIZE};
use ramlist::RamList;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const P: u64 = PAGE_SIZE;

/// Starts a loader into `dst` on another thread, reading the far end of a socket pair;
/// returns the near end and the loader's thread.
fn spawn_loader(
    dst: Arc<RamList>,
) -> (
    UnixStream,
    thread::JoinHandle<Result<LoadSummary, migration::load::LoadError>>,
) {
    let (near, far) = UnixStream::pair().unwrap();
    let h = thread::spawn(move || load(&dst, far, &mut AnonymousHotplug, &LoadOptions::default()));
    (near, h)
}

/// Every block of `ram` by id, with its bytes.
fn contents(ram: &RamList) -> BTreeMap<String, Vec<u8>> {
    let ids: Vec<String> = {
        let g = rcu::read_lock();
        ram.blocks(&g).map(|b| b.id().to_string()).collect()
    };
    ids.into_iter()
        .map(|id| {
            let v = read_block(ram, &id);
            (id, v)
        })
        .collect()
}

fn page_with(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; P as usize];
    for (i, c) in v.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64 | 1).to_le_bytes());
    }
    v
}

#[test]
fn round_trip_with_zero_pages_as_flags_and_hotplug() {
    let src = Arc::new(RamList::new());
    let dst = Arc::new(RamList::new());
    for ram in [&src, &dst] {
        ram.alloc("ram", 1024 * P).unwrap();
        ram.alloc("vga", 64 * P).unwrap();
        ram.alloc("rom", 16 * P).unwrap();
    }
    // Source: a third of "ram" data, a third written zero, a third never touched.
    let mut data_pages = 0;
    for i in 0..1024 {
        match i % 3 {
            0 => {
                write_block(&src, "ram", i * P, &page_with(i));
                data_pages += 1;
            }
            1 => write_block(&src, "ram", i * P, &[0; P as usize]),
            _ => {}
        }
    }
    write_block(&src, "rom", 3 * P, &page_with(77));
    // Destination: junk where the source has zeros, so zero pages must clear it.
    for i in 0..200 {
        write_block(&dst, "ram", i * P, &[0x77; P as usize]);
    }

    let (sock, loader) = spawn_loader(dst.clone());
    let mut out = StreamWriter::new(sock);
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    let first = saver.complete(&mut out).unwrap();
    assert_eq!(first.pages, data_pages + 1);
    // Written zero: present, read, sent as ZERO records. Never touched (the last third of
    // "ram", "vga", 15 pages of "rom"): skipped by the first pass, neither read nor sent.
    let written_zero = (0..1024).filter(|i| i % 3 == 1).count() as u64;
    assert_eq!(first.zero_pages, written_zero);
    let fp = saver.stats().first_pass;
    assert_eq!(fp.marked_pages, first.pages + first.zero_pages);
    assert_eq!(
        fp.absent_pages + fp.known_zero_pages,
        (1024 + 64 + 16) - fp.marked_pages
    );
    assert_eq!(saver.remaining_pages(), 0);

    // The "guest" writes on; a block is added and one removed.
    for i in [1, 2, 500, 1023] {
        write_block(&src, "ram", i * P, &page_with(1000 + i));
    }
    write_block(&src, "ram", 0, &[0; P as usize]);
    src.alloc("hot", 32 * P).unwrap();
    write_block(&src, "hot", 5 * P, &page_with(5));
    src.free("vga").unwrap();
    let second = saver.complete(&mut out).unwrap();
    assert_eq!(second.pages, 4 + 1);
    // The new block goes through pagemap like the first pass: its 31 untouched pages
    // are neither read nor sent (the destination creates it reading as zero).
    assert_eq!(second.zero_pages, 1);
    assert_eq!(
        (saver.stats().blocks_added, saver.stats().blocks_removed),
        (1, 1)
    );

    out.state("cpu0", b"regs").unwrap();
    out.end().unwrap();
    let total = out.bytes_written();
    drop(out.into_inner().unwrap());
    let s = loader.join().unwrap().unwrap();

    assert_eq!(contents(&src), contents(&dst));
    assert_eq!(s.bytes, total);
    assert_eq!(s.pages, first.pages + second.pages);
    assert_eq!(s.zero_pages, first.zero_pages + second.zero_pages);
    assert_eq!((s.blocks_added.len(), s.blocks_removed.len()), (1, 1));
    assert_eq!(s.states[0].data, b"regs");
    // Zero pages cost their word (and at most an idstr), never a page of data.
    let zeros = s.zero_pages;
    assert!(
        total < s.pages * (P + 8 + 4) + zeros * 8 + 4096,
        "{total} bytes for {} pages and {zeros} zero pages",
        s.pages
    );
    // "ram" is ZERO_SKIPPED: the loader cleared the junk before any page came, so the
    // zero records found zeros (all but page 0, which the first pass had filled).
    assert_eq!(s.stale_pages_cleared, 200, "junk left on the destination");
    assert_eq!(s.zero_pages_written, 1);
}

/// A block left out of the RAM setup (hot-added before the migration, which a destination
/// built from the same configuration does not have) is announced by BLOCK_ADD at the start
/// of the first batch, with its guest address, created by the destination's hotplug, and
/// filled: only the pages that hold anything are sent.
#[test]
fn a_block_left_out_of_the_setup_is_created_by_the_destination() {
    let src = Arc::new(RamList::new());
    let dst = Arc::new(RamList::new());
    for ram in [&src, &dst] {
        ram.alloc("ram", 256 * P).unwrap();
    }
    let placed = ramlist::RamBlockOptions {
        guest_addr: Some(1 << 32),
        ..Default::default()
    };
    src.alloc_with("hot", 512 * P, placed).unwrap();
    write_block(&src, "ram", 7 * P, &page_with(7));
    for i in [0, 100, 511] {
        write_block(&src, "hot", i * P, &page_with(i));
    }
    write_block(&src, "hot", 200 * P, &[0; P as usize]);
    // The guest read a page: it maps the zero page, known zero without a read.
    let _ = read_block(&src, "hot");

    let (sock, loader) = spawn_loader(dst.clone());
    let mut out = StreamWriter::new(sock);
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup_with(&mut out, |b| b.id() != "hot").unwrap();
    let sent = saver.complete(&mut out).unwrap();
    assert_eq!(saver.stats().blocks_added, 1);
    assert_eq!(sent.pages, 1 + 3, "data pages of ram and hot");
    assert_eq!(sent.zero_pages, 1, "the page written zero");
    out.end().unwrap();
    drop(out.into_inner().unwrap());
    let s = loader.join().unwrap().unwrap();
    assert_eq!(s.blocks_added, ["hot"]);
    assert_eq!(contents(&src), contents(&dst));
    let g = rcu::read_lock();
    let hot = dst.block_by_id(&g, "hot").unwrap();
    assert_eq!(hot.len(), 512 * P);
    assert_eq!(
        hot.guest_addr(),
        Some(1 << 32),
        "placed where the source had it"
    );
}

/// Batches of one window each, with blocks added, removed and re-created (same id, new
/// size) between them: the walk restarts, last_seen_block survives its block's removal,
/// and the destination ends with exactly the source's blocks and bytes.
#[test]
fn hotplug_between_tiny_batches() {
    let src = Arc::new(RamList::new());
    let dst = Arc::new(RamList::new());
    for ram in [&src, &dst] {
        ram.alloc("ram", 256 * P).unwrap();
        ram.alloc("a", 64 * P).unwrap();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for i in 0..256 {
        if rng.random_bool(0.5) {
            write_block(&src, "ram", i * P, &page_with(i));
        }
    }
    let (sock, loader) = spawn_loader(dst.clone());
    let mut out = StreamWriter::new(sock);
    let mut saver = RamSaver::new(src.clone());
    saver.set_batch_limit(Duration::ZERO);
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    let mut n = 0;
    for round in 0..60u64 {
        saver.iterate(&mut out).unwrap();
        match round % 6 {
            1 => {
                n += 1;
                let pages = rng.random_range(1..40);
                src.alloc(&format!("h{n}"), pages * P).unwrap();
                write_block(&src, &format!("h{n}"), (pages - 1) * P, &page_with(n));
            }
            3 if n > 1 => {
                let _ = src.free(&format!("h{}", n - 1));
            }
            4 => {
                // Same id, another size (and another memory).
                src.free("a").unwrap();
                src.alloc("a", rng.random_range(1..80) * P).unwrap();
                write_block(&src, "a", 0, &page_with(round));
            }
            _ => {
                let i = rng.random_range(0..256);
                write_block(&src, "ram", i * P, &page_with(round * 1000 + i));
            }
        }
    }
    saver.complete(&mut out).unwrap();
    out.end().unwrap();
    drop(out.into_inner().unwrap());
    let s = loader.join().unwrap().unwrap();
    assert_eq!(contents(&src), contents(&dst));
    assert!(saver.stats().walk_restarts > 10, "{:?}", saver.stats());
    assert!(!s.blocks_added.is_empty() && !s.blocks_removed.is_empty());
    assert_eq!(
        src.drain_reclaim(),
        0,
        "the saver still holds a freed block"
    );
}

/// A "guest" thread rewrites pages (and marks them dirty after each write) while the
/// saver iterates; once it stops, the final stage leaves the destination equal.
#[test]
fn pages_written_during_the_migration_are_sent_again() {
    let src = Arc::new(RamList::new());
    let dst = Arc::new(RamList::new());
    for ram in [&src, &dst] {
        ram.alloc("ram", 512 * P).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (src, stop) = (src.clone(), stop.clone());
        thread::spawn(move || {
            let mut gen = 0u64;
            while !stop.load(Ordering::Acquire) {
                gen += 1;
                let i = gen.wrapping_mul(2_654_435_761) % 512;
                write_block(&src, "ram", i * P, &page_with(gen));
            }
            gen
        })
    };
    let (sock, loader) = spawn_loader(dst.clone());
    let mut out = StreamWriter::new(sock);
    let mut saver = RamSaver::new(src.clone());
    saver.set_batch_limit(Duration::from_millis(2));
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    for _ in 0..30 {
        saver.iterate(&mut out).unwrap();
    }
    stop.store(true, Ordering::Release);
    let writes = guest.join().unwrap();
    saver.complete(&mut out).unwrap();
    out.end().unwrap();
    drop(out.into_inner().unwrap());
    loader.join().unwrap().unwrap();
    assert_eq!(
        contents(&src),
        contents(&dst),
        "after {writes} guest writes"
    );
}

/// A VMM whose hotplug hands over memory that is not zero (against the trait's contract).
struct JunkHotplug;

impl migration::load::BlockHotplug for JunkHotplug {
    fn add_block(
        &mut self,
        ram: &RamList,
        id: &str,
        len: u64,
    ) -> Result<(), migration::load::HotplugError> {
        ram.alloc(id, len)?;
        write_block(ram, id, 0, &vec![0x5a; len as usize]);
        Ok(())
    }

    fn remove_block(
        &mut self,
        ram: &RamList,
        id: &str,
    ) -> Result<(), migration::load::HotplugError> {
        ram.free(id)?;
        Ok(())
    }
}

/// The source sends nothing for a new block's untouched pages, so the loader makes the
/// block the VMM created read as zero before any page of it arrives, as for a
/// ZERO_SKIPPED setup block: a hotplug that leaves junk behind does not leak it into the
/// guest.
#[test]
fn a_new_block_with_junk_in_it_is_cleared_before_its_pages_arrive() {
    let src = Arc::new(RamList::new());
    let dst = Arc::new(RamList::new());
    for ram in [&src, &dst] {
        ram.alloc("ram", 16 * P).unwrap();
    }
    src.alloc("hot", 32 * P).unwrap();
    write_block(&src, "hot", 3 * P, &page_with(3));
    let (near, far) = UnixStream::pair().unwrap();
    let d = dst.clone();
    let loader = thread::spawn(move || load(&d, far, &mut JunkHotplug, &LoadOptions::default()));
    let mut out = StreamWriter::new(near);
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup_with(&mut out, |b| b.id() != "hot").unwrap();
    let sent = saver.complete(&mut out).unwrap();
    assert_eq!((sent.pages, sent.zero_pages), (1, 0));
    out.end().unwrap();
    drop(out.into_inner().unwrap());
    let s = loader.join().unwrap().unwrap();
    assert_eq!(s.stale_pages_cleared, 32, "the junk pages were not cleared");
    assert_eq!(contents(&src), contents(&dst));
}

/// A rate-limited batch stops before a window whose bytes the limit would not let go at
/// once, so that no send inside its read-side section sleeps: at 4 MB/s (a 400 kB
/// bucket) one window of 64 data pages (262 kB) fits, a second would not. Without the
/// check the batch went on, and its full buffer waited for the limit inside the section.
#[test]
fn a_rate_limited_batch_ends_before_a_window_that_would_wait() {
    let src = Arc::new(RamList::new());
    src.alloc("ram", 1024 * P).unwrap();
    for i in 0..1024 {
        write_block(&src, "ram", i * P, &page_with(i));
    }
    let mut out = StreamWriter::new(std::io::sink());
    out.set_rate_limit(Some(4_000_000));
    let mut saver = RamSaver::new(src);
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    let first = saver.iterate(&mut out).unwrap();
    assert_eq!(first.pages, 64, "one window, then the batch ends");
    assert!(!first.clean);
}
