//! An outside review of the migration crate: attacks written against its public API only
//! (`stream`, `save`, `load`, `live`, `transport`, with `ramlist` and `rcu`), each checking
//! one promise of DESIGN.md ("Migration stream", "Send only what the guest ever wrote",
//! "Concurrency rules"), docs/stream.md or the module docs: fields at their boundaries,
//! records in hostile orders, a writer that fails or panics half-way, a final stage after
//! batches cut short, a RAM list changed by another thread between batches, untouched RAM
//! that must stay untouched on both sides, and transports that stall.

mod common;
#[path = "outside_review/source.rs"]
mod source;

use common::*;
use migration::live::{incoming_from_uri, ComponentState, IncomingOptions, RestorableVm, VmError};
use migration::load::{load, AnonymousHotplug, BlockHotplug, HotplugError, LoadError, LoadOptions};
use migration::save::RamSaver;
use migration::stream::{StreamWriter, MAX_ID_LEN, MAX_RUN_PAGES, PAGE_SIZE};
use migration::transport::MigrationUri;
use ramlist::pagemap::{PageMap, PageScan};
use ramlist::RamList;
use std::collections::BTreeMap;
use std::io::{self, IoSlice, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

const P: u64 = PAGE_SIZE;
/// Longer than any of these cases takes: reaching it means a hang.
const HANG: Duration = Duration::from_secs(20);

/// Every block of `ram` by id, with its bytes.
fn contents(ram: &RamList) -> BTreeMap<String, Vec<u8>> {
    let ids: Vec<String> = {
        let g = rcu::read_lock();
        ram.blocks(&g).map(|b| b.id().to_string()).collect()
    };
    ids.into_iter()
        .map(|id| (id.clone(), read_block(ram, &id)))
        .collect()
}

/// A list of anonymous blocks (id, pages).
fn list_of(blocks: &[(&str, u64)]) -> Arc<RamList> {
    let ram = Arc::new(RamList::new());
    for (id, pages) in blocks {
        ram.alloc(id, pages * P).unwrap();
    }
    ram
}

/// A stream (header, setup of `blocks`), then `rest`, encoded with the crate's writer.
fn stream(blocks: &[(&str, u64)], rest: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    w.ram_setup(blocks.iter().map(|&(id, pages)| (id, pages * P)))
        .unwrap();
    rest(&mut w);
    w.into_inner().unwrap()
}

fn load_into(ram: &RamList, s: &[u8]) -> Result<migration::load::LoadSummary, LoadError> {
    load(ram, s, &mut AnonymousHotplug, &LoadOptions::default())
}

/// Pages at the very end of a block load; one page further is refused before any write,
/// and offsets near 2^64 neither wrap nor panic. Blocks sit between PROT_NONE guards.
#[test]
fn records_at_the_block_end_and_one_past_it() {
    const PAGES: u64 = 300;
    let arena = Arena::new(PAGES * P, 0xee);
    let dst = fenced_list(&[("ram", arena)]);
    let run: Vec<u8> = (0..MAX_RUN_PAGES as u64)
        .flat_map(|i| page_of(i as u8))
        .collect();
    let last = (PAGES - 1) * P;
    let good = stream(&[("ram", PAGES)], |w| {
        w.begin_ram().unwrap();
        w.page_run("ram", (PAGES - 256) * P, &run).unwrap();
        w.page("ram", last, &page_of(0x77)).unwrap();
        w.zero_page("ram", 0).unwrap();
        w.zero_page("ram", P).unwrap();
        w.eos().unwrap();
        w.end().unwrap();
    });
    let s = load_into(&dst, &good).unwrap();
    assert_eq!(
        s.bytes,
        good.len() as u64,
        "bytes read, end marker included"
    );
    let got = arena.bytes();
    assert_eq!(
        &got[(PAGES - 256) as usize * P as usize..][..P as usize],
        &page_of(0)[..]
    );
    assert_eq!(&got[last as usize..], &page_of(0x77)[..]);
    assert!(got[..2 * P as usize].iter().all(|&b| b == 0));
    assert_eq!(
        s.zero_pages_written, 2,
        "two junk pages cleared by ZERO records"
    );

    let hdr = stream(&[("ram", PAGES)], |w| w.begin_ram().unwrap());
    let rec = |word: u64, tail: &[u8]| {
        let mut s = hdr.clone();
        s.extend_from_slice(&word.to_be_bytes());
        s.extend_from_slice(tail);
        s.extend_from_slice(&vec![0xab; (MAX_RUN_PAGES as u64 * P) as usize]);
        s
    };
    let runs_of = |n: u16| [b"\x03ram".as_slice(), &n.to_be_bytes()].concat();
    let bad = [
        ("page at the end", rec((PAGES * P) | 0x02, b"\x03ram")),
        ("zero page at the end", rec((PAGES * P) | 0x01, b"\x03ram")),
        (
            "run one page over",
            rec(((PAGES - 255) * P) | 0x42, &runs_of(256)),
        ),
        (
            "run at 2^64 - 2 pages",
            rec((0u64.wrapping_sub(2 * P)) | 0x42, &runs_of(2)),
        ),
        (
            "run at 2^64 - 1 page",
            rec((0u64.wrapping_sub(P)) | 0x42, &runs_of(256)),
        ),
        (
            "page at 2^64 - 1 page",
            rec((0u64.wrapping_sub(P)) | 0x02, b"\x03ram"),
        ),
    ];
    for (name, s) in bad {
        arena.fill(0xee);
        let e = load_into(&dst, &s).expect_err(name);
        assert!(
            matches!(e, LoadError::OffsetOutOfBlock { .. }),
            "{name}: {e}"
        );
        assert!(arena.bytes().iter().all(|&b| b == 0xee), "{name}: written");
    }
}

/// The longest idstr (255 bytes, here of 4-byte characters) travels through the saver
/// and the loader; one byte more is refused by ramlist and by the writer alike.
#[test]
fn the_longest_idstr_round_trips() {
    let id = format!("{}abc", "😀".repeat(63));
    assert_eq!(id.len(), MAX_ID_LEN);
    let src = list_of(&[(&id, 4)]);
    let dst = list_of(&[(&id, 4)]);
    write_block(&src, &id, 3 * P, &page_of(3));
    let mut out = StreamWriter::new(Vec::new());
    let mut saver = RamSaver::new(src.clone());
    out.header().unwrap();
    saver.setup(&mut out).unwrap();
    saver.complete(&mut out).unwrap();
    out.end().unwrap();
    load_into(&dst, &out.into_inner().unwrap()).unwrap();
    assert_eq!(contents(&src), contents(&dst));
    let longer = format!("{id}x");
    assert!(src.alloc(&longer, P).is_err());
    assert!(StreamWriter::new(Vec::new()).put_idstr(&longer).is_err());
}

/// Bad idstrs are refused wherever they appear: in page records, BLOCK_ADD, BLOCK_DEL
/// and state names, not only in the setup.
#[test]
fn bad_idstrs_are_refused_in_every_record() {
    let dst = list_of(&[("ram", 4)]);
    let before = contents(&dst);
    for (what, id) in [
        ("empty", &b""[..]),
        ("not UTF-8", b"\xc3\x28"),
        ("NUL", b"ra\0m"),
        ("overlong UTF-8", b"\xc0\xafram"),
    ] {
        for (kind, word) in [("page", 0x02u64), ("add", P | 0x10), ("del", 0x20)] {
            let mut s = stream(&[("ram", 4)], |w| w.begin_ram().unwrap());
            s.extend_from_slice(&word.to_be_bytes());
            s.push(id.len() as u8);
            s.extend_from_slice(id);
            s.extend_from_slice(&[0x11; P as usize]);
            let e = load_into(&dst, &s).expect_err(what);
            assert!(
                matches!(e, LoadError::BadId { .. } | LoadError::BadIdLen { .. }),
                "{kind} {what}: {e}"
            );
        }
        let mut s = stream(&[("ram", 4)], |_| {});
        s.push(0x03);
        s.push(id.len() as u8);
        s.extend_from_slice(id);
        s.extend_from_slice(&[0, 0, 0, 1, 9, 0x04]);
        let e = load_into(&dst, &s).expect_err(what);
        assert!(
            matches!(e, LoadError::BadId { .. } | LoadError::BadIdLen { .. }),
            "state {what}: {e}"
        );
    }
    assert_eq!(contents(&dst), before);
}

/// A hotplug that reports success but makes a block of another size.
struct Liar;
impl BlockHotplug for Liar {
    fn add_block(&mut self, ram: &RamList, id: &str, len: u64) -> Result<(), HotplugError> {
        ram.alloc(id, len + P)?;
        Ok(())
    }
    fn remove_block(&mut self, ram: &RamList, id: &str) -> Result<(), HotplugError> {
        ram.free(id)?;
        Ok(())
    }
}

/// Blocks removed and re-created in every order: DEL then ADD of the same id with another
/// size (its pages then land in the new block), ADD of a block the destination has but
/// the setup did not list, ADD of nearly 2^64 bytes with no limit set, a hotplug that
/// lies about what it made, CONTINUE right after an ADD.
#[test]
fn blocks_removed_and_added_in_hostile_orders() {
    let dst = list_of(&[("ram", 4), ("vga", 2), ("rom", 1)]);
    let s = stream(&[("ram", 4), ("vga", 2)], |w| {
        w.begin_ram().unwrap();
        w.page("vga", P, &page_of(1)).unwrap();
        w.block_del("vga").unwrap();
        w.block_add("vga", 8 * P).unwrap();
        w.page("vga", 7 * P, &page_of(2)).unwrap();
        w.eos().unwrap();
        w.end().unwrap();
    });
    let sum = load_into(&dst, &s).unwrap();
    assert_eq!((sum.blocks_removed.len(), sum.blocks_added.len()), (1, 1));
    let vga = read_block(&dst, "vga");
    assert_eq!(vga.len() as u64, 8 * P);
    assert_eq!(&vga[7 * P as usize..], &page_of(2)[..]);
    assert!(vga[..7 * P as usize].iter().all(|&b| b == 0));

    let dst = list_of(&[("ram", 4), ("rom", 1)]);
    let with = |word: u64, id: &str| {
        let mut s = stream(&[("ram", 4)], |w| w.begin_ram().unwrap());
        s.extend_from_slice(&word.to_be_bytes());
        s.push(id.len() as u8);
        s.extend_from_slice(id.as_bytes());
        s.extend_from_slice(&(0x01u64 | 0x04).to_be_bytes());
        s.extend_from_slice(&0x08u64.to_be_bytes());
        s.push(0x04);
        s
    };
    let e = load_into(&dst, &with(P | 0x10, "rom")).unwrap_err();
    assert!(matches!(e, LoadError::BlockExists { .. }), "{e}");
    let no_limit = LoadOptions {
        max_new_block: u64::MAX,
        ..LoadOptions::default()
    };
    let huge = with(!0xfff | 0x10, "huge");
    let e = load(&dst, &huge[..], &mut AnonymousHotplug, &no_limit).unwrap_err();
    assert!(matches!(e, LoadError::Hotplug { .. }), "{e}");
    let e = load(&dst, &with(P | 0x10, "new")[..], &mut Liar, &no_limit).unwrap_err();
    assert!(e.to_string().contains("0x2000 bytes"), "{e}");
    let e = load_into(&dst, &with((2 * P) | 0x10, "new2")).unwrap_err();
    assert!(matches!(e, LoadError::ContinueWithoutBlock { .. }), "{e}");
}

/// A setup of no blocks and a setup entry of length 0 for an existing block: the first
/// loads and leaves the destination's blocks as they are, the second is a mismatch.
#[test]
fn empty_setups_and_zero_lengths() {
    let dst = list_of(&[("ram", 2)]);
    write_block(&dst, "ram", 0, &page_of(5));
    let s = stream(&[], |w| w.end().unwrap());
    load_into(&dst, &s).unwrap();
    assert_eq!(&read_block(&dst, "ram")[..P as usize], &page_of(5)[..]);
    let s = stream(&[("ram", 0)], |w| w.end().unwrap());
    let e = load_into(&dst, &s).unwrap_err();
    assert!(
        matches!(e, LoadError::LengthMismatch { stream: 0, .. }),
        "{e}"
    );
}

/// A record method that refuses its arguments must leave nothing of the record behind:
/// the writer's doc says it "refuses what a loader would", and a caller that goes on after
/// the error must still produce a stream that loads.
#[test]
fn a_refused_record_leaves_nothing_half_written() {
    let long = "x".repeat(MAX_ID_LEN + 1);
    let s = stream(&[("ram", 2)], |w| {
        w.begin_ram().unwrap();
        let before = w.bytes_written();
        assert!(w.zero_page("", 0).is_err());
        assert!(w.page(&long, 0, &page_of(1)).is_err());
        assert!(w.block_add("a\0b", P).is_err());
        assert!(w.block_del("").is_err());
        let page = page_of(9);
        // SAFETY: `page` outlives the writer's next flush (`into_inner` below).
        assert!(unsafe { w.pages_lent("", 0, page.as_ptr(), 1) }.is_err());
        assert!(w.state("", b"x").is_err());
        assert_eq!(w.bytes_written(), before, "refused records were encoded");
        w.page("ram", P, &page_of(2)).unwrap();
        w.eos().unwrap();
        w.end().unwrap();
    });
    let dst = list_of(&[("ram", 2)]);
    load_into(&dst, &s).unwrap();
    assert_eq!(&read_block(&dst, "ram")[P as usize..], &page_of(2)[..]);
}

/// Yields every entry but says, through `len`, that it has one fewer.
struct Lying<'a>(std::slice::Iter<'a, (&'a str, u64)>);
impl<'a> Iterator for Lying<'a> {
    type Item = (&'a str, u64);
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().copied()
    }
}
impl ExactSizeIterator for Lying<'_> {
    fn len(&self) -> usize {
        self.0.len().saturating_sub(1)
    }
}

/// A setup's count is the number of entries written, whatever the iterator's `len` says
/// (a safe trait that may be wrong): the stream still loads.
#[test]
fn a_setup_counts_what_it_writes() {
    let blocks = [("ram", 2 * P), ("vga", P)];
    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    w.ram_setup(Lying(blocks.iter())).unwrap();
    w.begin_ram().unwrap();
    w.page("vga", 0, &page_of(3)).unwrap();
    w.eos().unwrap();
    w.end().unwrap();
    let dst = list_of(&[("ram", 2), ("vga", 1)]);
    load_into(&dst, &w.into_inner().unwrap()).unwrap();
    assert_eq!(read_block(&dst, "vga"), page_of(3));
}

/// A transport that hands out one byte per read.
struct Trickle<'a>(&'a [u8]);
impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match (self.0.split_first(), buf.first_mut()) {
            (Some((b, rest)), Some(d)) => {
                *d = *b;
                self.0 = rest;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

/// Runs read straight into guest memory past the loader's buffer: a stream that arrives
/// one byte per read loads exactly as one that arrives whole, and says the same offsets.
#[test]
fn a_stream_arriving_byte_by_byte_loads_the_same() {
    let run: Vec<u8> = (0..MAX_RUN_PAGES as u64)
        .flat_map(|i| page_of(i as u8 ^ 0x21))
        .collect();
    let s = stream(&[("ram", 300)], |w| {
        w.begin_ram().unwrap();
        w.page("ram", 0, &page_of(1)).unwrap();
        w.page_run("ram", 10 * P, &run).unwrap();
        w.page_run("ram", 290 * P, &run[..10 * P as usize]).unwrap();
        w.eos().unwrap();
        w.state("cpu", &[9; 70_000]).unwrap();
        w.end().unwrap();
    });
    let (a, b) = (list_of(&[("ram", 300)]), list_of(&[("ram", 300)]));
    let whole = load_into(&a, &s).unwrap();
    let trickled = load(
        &b,
        Trickle(&s),
        &mut AnonymousHotplug,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(contents(&a), contents(&b));
    assert_eq!((whole.bytes, whole.pages), (trickled.bytes, trickled.pages));
    assert_eq!(whole.states, trickled.states);
    let cut = &s[..s.len() - 70_000 - 2];
    let e = load(
        &b,
        Trickle(cut),
        &mut AnonymousHotplug,
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), load_into(&a, cut).unwrap_err().to_string());
}

/// "It drops the guard at every EOS": a source that stalls between two sections holds no
/// grace period on the destination; `synchronize` on another thread returns while the
/// loader waits (it would wait for the stall to end if the loader kept its guard).
#[test]
fn a_loader_waiting_between_sections_holds_no_grace_period() {
    let dst = list_of(&[("ram", 4)]);
    let s = stream(&[("ram", 4)], |w| {
        w.begin_ram().unwrap();
        w.page("ram", 0, &page_of(1)).unwrap();
        w.eos().unwrap();
    });
    let (mut near, far) = std::os::unix::net::UnixStream::pair().unwrap();
    near.write_all(&s).unwrap();
    let loader = {
        let dst = dst.clone();
        thread::spawn(move || load(&dst, far, &mut AnonymousHotplug, &LoadOptions::default()))
    };
    // Once the page is there, the loader has read the section (up to its EOS, or close).
    while read_block(&dst, "ram")[..P as usize] != page_of(1)[..] {
        thread::yield_now();
    }
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        rcu::synchronize();
        tx.send(()).unwrap();
    });
    let r = rx.recv_timeout(HANG);
    near.write_all(&[0x04]).unwrap();
    loader.join().unwrap().unwrap();
    r.expect("synchronize waited for the stalled loader");
}
