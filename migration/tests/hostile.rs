//! Hostile streams against the loader: a small valid stream truncated at every byte and
//! with bits flipped, hand-made bad streams, random bytes. Every one ends with a typed error
//! (or, for flips inside page data, a load), never a panic, never a write outside the
//! destination's blocks (they sit between PROT_NONE guard pages), within bounded time.

mod common;

use common::*;
use migration::load::{load, LoadError, LoadSummary};
use migration::stream::{ReadError, StreamWriter, PAGE_SIZE};
use ramlist::RamList;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

const P: u64 = PAGE_SIZE;
/// What the destination's blocks hold before a load.
const JUNK: u8 = 0xee;
/// A case taking longer than this is a hang, whatever the machine.
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// The small destination: "ram" and "vga" over fenced arenas, two fenced arenas for the
/// source's hot-added block. One list serves every case (making a list costs more than a
/// load): each case starts from it reset to "ram" and "vga", filled with junk.
struct Dest {
    ram: Arena,
    vga: Arena,
    hot: Vec<Arena>,
    list: Arc<RamList>,
}

impl Dest {
    fn new() -> Dest {
        let (ram, vga) = (
            Arena::new(RAM_PAGES * P, JUNK),
            Arena::new(VGA_PAGES * P, JUNK),
        );
        Dest {
            ram,
            vga,
            hot: vec![Arena::new(HOT_PAGES * P, 0), Arena::new(HOT_PAGES * P, 0)],
            list: fenced_list(&[("ram", ram), ("vga", vga)]),
        }
    }

    /// Back to "ram" and "vga" only, both junk.
    fn reset(&self) {
        let ids: Vec<String> = {
            let g = rcu::read_lock();
            self.list.blocks(&g).map(|b| b.id().to_string()).collect()
        };
        for id in &ids {
            if id != "ram" && id != "vga" {
                self.list.free(id).unwrap();
            }
        }
        for (id, arena) in [("ram", self.ram), ("vga", self.vga)] {
            if !ids.iter().any(|i| i == id) {
                arena.add_to(&self.list, id);
            }
        }
        self.ram.fill(JUNK);
        self.vga.fill(JUNK);
    }

    /// Loads `stream` into the reset list, timing it.
    fn load(&self, stream: &[u8]) -> (Result<LoadSummary, LoadError>, Arc<RamList>) {
        self.reset();
        let mut hp = ArenaHotplug {
            pool: self.hot.clone(),
        };
        let t = Instant::now();
        let r = load(&self.list, stream, &mut hp, &small_opts());
        assert!(t.elapsed() < CASE_LIMIT, "a load took {:?}", t.elapsed());
        (r, self.list.clone())
    }

    /// Whether the fixed blocks still hold only junk.
    fn untouched(&self) -> bool {
        self.ram.bytes().iter().all(|&b| b == JUNK) && self.vga.bytes().iter().all(|&b| b == JUNK)
    }
}

#[test]
fn the_small_stream_loads_as_written() {
    let d = Dest::new();
    let (r, ram) = d.load(&small_stream());
    let s = r.unwrap();
    let got = read_block(&ram, "ram");
    let page = |i: u64| &got[(i * P) as usize..((i + 1) * P) as usize];
    assert_eq!(page(0), page_of(4).as_slice());
    for zero in [1, 2, 3, 7] {
        assert!(page(zero).iter().all(|&b| b == 0), "page {zero}");
    }
    assert_eq!(page(4), page_of(5).as_slice());
    assert_eq!(page(5), page_of(6).as_slice());
    assert!(page(6).iter().all(|&b| b == JUNK), "page 6");
    let hot = read_block(&ram, "hot");
    assert!(hot[..P as usize].iter().all(|&b| b == 0));
    assert_eq!(&hot[P as usize..], page_of(3).as_slice());
    let g = rcu::read_lock();
    assert!(ram.block_by_id(&g, "vga").is_none());
    drop(g);
    assert_eq!((s.pages, s.zero_pages), (6, 6));
    // The junk pages that had to become zero: ram 1, 7, 2, 3 and vga 0; hot's page 0
    // was known fresh and never touched.
    assert_eq!(s.zero_pages_written, 5);
    assert_eq!(s.blocks_added, ["hot"]);
    assert_eq!(s.blocks_removed, ["vga"]);
    assert_eq!(s.states.len(), 2);
    assert_eq!(s.states[0].data, b"registers");
    assert_eq!(s.bytes, small_stream().len() as u64);
}

#[test]
fn truncated_at_every_byte_is_an_eof_error() {
    let d = Dest::new();
    let s = small_stream();
    for n in 0..s.len() {
        let (r, _) = d.load(&s[..n]);
        match r {
            Err(LoadError::Read(ReadError::Eof { offset, what })) => {
                assert!(offset <= n as u64, "cut {n}: offset {offset} ({what})")
            }
            other => panic!("cut at {n}: {other:?}"),
        }
    }
    println!("{} truncations, each an end-of-stream error", s.len());
}

#[test]
fn bit_flips_never_panic_or_escape_a_block() {
    let d = Dest::new();
    let s = small_stream();
    let data = page_data_ranges(&s);
    assert_eq!(data.len(), 6);
    let (mut cases, mut errors, mut framing) = (0u64, 0u64, 0u64);
    let mut worst = Duration::ZERO;
    for bit in 0..s.len() * 8 {
        let at = bit / 8;
        // Every bit of the framing; every 13th of the page data (any flip there loads).
        if data.iter().any(|r| r.contains(&at)) {
            if bit % 13 != 0 {
                continue;
            }
        } else {
            framing += 1;
        }
        let mut m = s.clone();
        m[at] ^= 1 << (bit % 8);
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| d.load(&m).0));
        worst = worst.max(t.elapsed());
        match r {
            Err(_) => panic!("the loader panicked with bit {bit} flipped"),
            Ok(Err(e)) => {
                errors += 1;
                assert!(!e.to_string().is_empty());
            }
            Ok(Ok(_)) => {}
        }
        cases += 1;
    }
    println!(
        "{cases} bit flips ({framing} in framing): {errors} refused, the rest loaded; \
         slowest {worst:?}"
    );
    assert!(
        errors > framing / 2,
        "too few flips were refused: {errors} of {framing} in framing"
    );
}

/// A stream with the header and the setup of the small destination, then `rest`.
fn after_setup(rest: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    w.ram_setup([("ram", RAM_PAGES * P), ("vga", VGA_PAGES * P)].into_iter())
        .unwrap();
    rest(&mut w);
    w.into_inner().unwrap()
}

/// A stream of the header, then `rest`.
fn after_header(rest: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    rest(&mut w);
    w.into_inner().unwrap()
}

/// A RAM section holding one raw record word followed by `tail` bytes.
fn raw_record(word: u64, tail: &[u8]) -> Vec<u8> {
    after_setup(|w| {
        w.put_u8(0x02).unwrap();
        w.put_u64(word).unwrap();
        w.put_bytes(tail).unwrap();
    })
}

fn setup_of(blocks: &[(&[u8], u64)]) -> Vec<u8> {
    after_header(|w| {
        w.put_u8(0x01).unwrap();
        w.put_u32(P as u32).unwrap();
        w.put_u32(blocks.len() as u32).unwrap();
        for (id, len) in blocks {
            w.put_u8(id.len() as u8).unwrap();
            w.put_bytes(id).unwrap();
            w.put_u64(*len).unwrap();
        }
    })
}

#[test]
fn hand_made_streams_are_refused_before_any_write() {
    let page = page_of(9);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "end of stream while reading magic"),
        ("bad magic", b"QEVM\0\0\0\x01".to_vec(), "bad magic"),
        (
            "bad version",
            b"MVMS\0\0\0\x02\x01".to_vec(),
            "stream version 2",
        ),
        (
            "unknown section",
            after_header(|w| w.put_u8(0x99).unwrap()),
            "unknown section kind 0x99",
        ),
        (
            "RAM before setup",
            after_header(|w| w.begin_ram().unwrap()),
            "cannot come before the RAM setup",
        ),
        (
            "setup twice",
            after_setup(|w| w.ram_setup([("ram", RAM_PAGES * P)].into_iter()).unwrap()),
            "twice",
        ),
        (
            "RAM after state",
            after_setup(|w| {
                w.state("cpu", b"x").unwrap();
                w.begin_ram().unwrap();
            }),
            "after state",
        ),
        (
            "page size",
            after_header(|w| {
                w.put_u8(0x01).unwrap();
                w.put_u32(8192).unwrap();
            }),
            "page size 8192",
        ),
        (
            "too many blocks",
            after_header(|w| {
                w.put_u8(0x01).unwrap();
                w.put_u32(P as u32).unwrap();
                w.put_u32(u32::MAX).unwrap();
            }),
            "4294967295 RAM blocks",
        ),
        ("idstr length 0", setup_of(&[(b"", 0)]), "idstr length 0"),
        (
            "idstr longer than the stream",
            after_header(|w| {
                w.put_bytes(&[0x01, 0, 0, 0x10, 0, 0, 0, 0, 1, 255, b'a'])
                    .unwrap();
            }),
            "while reading block idstr",
        ),
        (
            "idstr not UTF-8",
            setup_of(&[(b"\xff\xfe", P)]),
            "not UTF-8",
        ),
        ("idstr with NUL", setup_of(&[(b"ra\0m", P)]), "NUL"),
        (
            "wrong idstr",
            setup_of(&[(b"nope", P)]),
            "unknown ramblock \"nope\"",
        ),
        (
            "wrong length",
            setup_of(&[(b"ram", 9 * P)]),
            "length mismatch for ramblock \"ram\": stream 0x9000, destination 0x8000",
        ),
        (
            "huge length",
            setup_of(&[(b"ram", !0xfff)]),
            "stream 0xfffffffffffff000",
        ),
        (
            "unknown setup flags",
            setup_of(&[(b"ram", u64::MAX)]),
            "ramblock \"ram\": unknown setup flags 0xfff",
        ),
        (
            "block twice",
            setup_of(&[(b"ram", 8 * P), (b"ram", 8 * P)]),
            "listed twice",
        ),
        (
            "page of a block not in the setup",
            {
                let mut s = setup_of(&[(b"ram", 8 * P)]);
                s.push(0x02);
                s.extend_from_slice(&0x02u64.to_be_bytes());
                s.extend_from_slice(b"\x03vga");
                s.extend_from_slice(&page);
                s
            },
            "unknown ramblock \"vga\"",
        ),
        (
            "page of an unknown block",
            raw_record(0x02, b"\x03rom"),
            "unknown ramblock \"rom\"",
        ),
        (
            "offset past the block",
            raw_record((8 * P) | 0x02, b"\x03ram"),
            "run past the end of ramblock \"ram\"",
        ),
        (
            "zero page past the block",
            raw_record((2 * P) | 0x01, b"\x03vga"),
            "page(s) at 0x2000 run past",
        ),
        (
            "huge offset",
            raw_record(!0xfff | 0x02, b"\x03ram"),
            "at 0xfffffffffffff000 run past",
        ),
        (
            "offset not aligned",
            raw_record(0x800 | 0x02, b"\x03ram"),
            "unknown flags",
        ),
        (
            "run of 0 pages",
            raw_record(0x42, b"\x03ram\0\0"),
            "a run of 0 pages",
        ),
        (
            "run of 1 page",
            raw_record(0x42, b"\x03ram\0\x01"),
            "a run of 1 pages",
        ),
        (
            "run of too many pages",
            raw_record(0x42, b"\x03ram\x01\x01"),
            "a run of 257 pages",
        ),
        (
            "run past the block",
            raw_record((7 * P) | 0x42, b"\x03ram\0\x02"),
            "2 page(s) at 0x7000 run past",
        ),
        (
            "run shorter than said",
            raw_record(0x42, b"\x03ram\0\x03\xee\xee"),
            "while reading page data",
        ),
        (
            "MANY with ZERO",
            raw_record(0x41, b"\x03ram"),
            "MANY only goes with PAGE",
        ),
        (
            "unknown flags",
            raw_record(0x100 | 0x02, b"\x03ram"),
            "unknown flags",
        ),
        (
            "PLACED with PAGE",
            raw_record(0x80 | 0x02, b"\x03ram"),
            "PLACED only goes with BLOCK_ADD",
        ),
        (
            "two kinds",
            raw_record(0x03, b"\x03ram"),
            "more than one record kind",
        ),
        ("no kind", raw_record(0, b""), "no record kind"),
        (
            "CONTINUE first",
            raw_record(0x02 | 0x04, &page),
            "CONTINUE with no previous block",
        ),
        (
            "CONTINUE on EOS",
            raw_record(0x08 | 0x04, b""),
            "CONTINUE only goes with",
        ),
        (
            "EOS with a value",
            raw_record(P | 0x08, b""),
            "non-zero value",
        ),
        (
            "CONTINUE after BLOCK_DEL",
            after_setup(|w| {
                w.begin_ram().unwrap();
                // A page equal to what the destination holds: "written", yet untouched.
                w.page("vga", 0, &[JUNK; P as usize]).unwrap();
                w.block_del("ram").unwrap();
                w.put_u64(0x01 | 0x04).unwrap();
            }),
            "CONTINUE with no previous block",
        ),
        (
            "CONTINUE across sections",
            after_setup(|w| {
                w.begin_ram().unwrap();
                w.page("vga", 0, &[JUNK; P as usize]).unwrap();
                w.eos().unwrap();
                w.begin_ram().unwrap();
                w.put_u64(P | 0x01 | 0x04).unwrap();
            }),
            "CONTINUE with no previous block",
        ),
        (
            "add an existing block",
            raw_record(P | 0x10, b"\x03ram"),
            "\"ram\": it already exists",
        ),
        (
            "add a block of no pages",
            raw_record(0x10, b"\x03new"),
            "no pages",
        ),
        (
            "add a huge block",
            raw_record(1 << 50 | 0x10, b"\x03new"),
            "over the limit",
        ),
        (
            "hotplug refuses",
            raw_record((64 * P) | 0x10, b"\x03new"),
            "adding ramblock \"new\" failed: no arena",
        ),
        (
            "add a block at a misaligned guest address",
            raw_record(P | 0x10 | 0x80, b"\x03new\0\0\0\x01\0\0\0\x08"),
            "guest address 0x100000008 is not page-aligned",
        ),
        (
            "add a block ending past 2^64",
            raw_record(
                (2 * P) | 0x10 | 0x80,
                b"\x03new\xff\xff\xff\xff\xff\xff\xf0\0",
            ),
            "past 2^64",
        ),
        (
            "add a block, its guest address cut",
            raw_record(P | 0x10 | 0x80, b"\x03new\0\0\0"),
            "block guest address",
        ),
        (
            "remove an unknown block",
            raw_record(0x20, b"\x03rom"),
            "unknown ramblock \"rom\"",
        ),
        (
            "page of a removed block",
            after_setup(|w| {
                w.begin_ram().unwrap();
                w.block_del("vga").unwrap();
                w.zero_page("vga", 0).unwrap();
            }),
            "unknown ramblock \"vga\"",
        ),
        (
            "state too large",
            after_setup(|w| {
                w.put_bytes(b"\x03\x03cpu").unwrap();
                w.put_u32(5000).unwrap();
            }),
            "5000 bytes exceeds the limit of 4096",
        ),
        (
            "state of u32::MAX bytes",
            after_setup(|w| {
                w.put_bytes(b"\x03\x03cpu").unwrap();
                w.put_u32(u32::MAX).unwrap();
            }),
            "exceeds the limit",
        ),
        (
            "states too large together",
            after_setup(|w| {
                w.state("a", &[1; 4096]).unwrap();
                w.state("b", &[1; 4096]).unwrap();
                w.state("c", &[1; 1]).unwrap();
            }),
            "limit of 8192",
        ),
        (
            "state twice",
            after_setup(|w| {
                w.state("a", b"1").unwrap();
                w.state("a", b"2").unwrap();
            }),
            "sent twice",
        ),
        (
            "state shorter than said",
            after_setup(|w| {
                w.put_bytes(b"\x03\x03cpu").unwrap();
                w.put_u32(4000).unwrap();
                w.put_bytes(&[0; 10]).unwrap();
            }),
            "while reading state data",
        ),
        (
            "no end marker",
            after_setup(|w| w.state("a", b"1").unwrap()),
            "while reading section kind",
        ),
    ];
    let d = Dest::new();
    for (name, stream, want) in &cases {
        let (r, _) = d.load(stream);
        let e = match r {
            Err(e) => e,
            Ok(_) => panic!("{name}: loaded"),
        };
        let msg = e.to_string();
        assert!(msg.contains(want), "{name}: {msg:?} does not say {want:?}");
        assert!(msg.contains("byte "), "{name}: {msg:?} names no offset");
        assert!(
            e.offset() <= stream.len() as u64,
            "{name}: offset {}",
            e.offset()
        );
        assert!(d.untouched(), "{name}: the destination was written");
    }
    println!("{} hand-made streams refused", cases.len());
}

#[test]
fn random_bytes_never_panic() {
    let d = Dest::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let prefix = after_setup(|_| {});
    let mut loaded = 0;
    let n = 3000;
    for i in 0..n {
        let len = rng.random_range(0..600);
        let mut s: Vec<u8> = if i % 2 == 0 {
            prefix.clone()
        } else {
            Vec::new()
        };
        s.extend((0..len).map(|_| rng.random::<u8>()));
        // Random bytes that happen to start a RAM section: steer some toward records.
        if i % 4 == 0 && s.len() > prefix.len() {
            s[prefix.len()] = 0x02;
        }
        let r = catch_unwind(AssertUnwindSafe(|| d.load(&s).0));
        match r {
            Err(_) => panic!("the loader panicked on random stream {i}"),
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(_)) => {}
        }
    }
    println!("{n} random streams: {loaded} loaded (an END byte right after the setup)");
    assert!(loaded < n / 10);
}
