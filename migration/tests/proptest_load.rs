//! Property tests of the loader: random valid streams (pages, zero pages, section breaks,
//! a block added and removed) load to exactly the contents a model predicts, and random
//! mutations of them never panic and never write outside a block (the destination's
//! blocks sit between guard pages).

mod common;

use common::*;
use migration::load::load;
use migration::stream::{StreamWriter, PAGE_SIZE};
use proptest::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

const P: u64 = PAGE_SIZE;
const JUNK: u8 = 0xee;
const BLOCKS: [(&str, u64); 3] = [("ram", 16), ("vga", 4), ("hot", 2)];

/// One step of a generated stream.
#[derive(Debug, Clone)]
enum Op {
    /// A page of `fill` at `page` (modulo the block's size) of block `block`.
    Page { block: usize, page: u64, fill: u8 },
    /// A zero page.
    Zero { block: usize, page: u64 },
    /// A run of `n` pages filled `fill`, `fill + 1`, ... (clipped to the block).
    Run {
        block: usize,
        page: u64,
        n: u64,
        fill: u8,
    },
    /// EOS, then a new RAM section.
    Break,
    /// BLOCK_ADD "hot" if it is absent, BLOCK_DEL if present.
    Hot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 0..16u64, any::<u8>()).prop_map(|(block, page, fill)| Op::Page { block, page, fill }),
        4 => (0..3usize, 0..16u64).prop_map(|(block, page)| Op::Zero { block, page }),
        2 => (0..3usize, 0..16u64, 2..6u64, any::<u8>())
            .prop_map(|(block, page, n, fill)| Op::Run { block, page, n, fill }),
        1 => Just(Op::Break),
        1 => Just(Op::Hot),
    ]
}

/// The arenas of one test function, made once (they are never unmapped).
struct Arenas {
    ram: Arena,
    vga: Arena,
    hot: Vec<Arena>,
}

fn arenas(cell: &'static OnceLock<Arenas>) -> &'static Arenas {
    cell.get_or_init(|| Arenas {
        ram: Arena::new(16 * P, JUNK),
        vga: Arena::new(4 * P, JUNK),
        hot: (0..32).map(|_| Arena::new(2 * P, 0)).collect(),
    })
}

/// Encodes `ops` as a stream and returns it with the block contents it should produce
/// (None for a block absent at the end).
fn encode(ops: &[Op]) -> (Vec<u8>, Vec<Option<Vec<u8>>>) {
    let mut model: Vec<Option<Vec<u8>>> = vec![
        Some(vec![JUNK; (16 * P) as usize]),
        Some(vec![JUNK; (4 * P) as usize]),
        None,
    ];
    let mut w = StreamWriter::new(Vec::new());
    w.header().unwrap();
    w.ram_setup([("ram", 16 * P), ("vga", 4 * P)].into_iter())
        .unwrap();
    w.begin_ram().unwrap();
    let mut adds = 0;
    for op in ops {
        match *op {
            Op::Page { block, page, .. } | Op::Zero { block, page } if model[block].is_some() => {
                let (id, pages) = BLOCKS[block];
                let off = (page % pages) * P;
                let data = match *op {
                    Op::Page { fill, .. } => page_of(fill),
                    _ => vec![0; P as usize],
                };
                if matches!(op, Op::Page { .. }) {
                    w.page(id, off, &data).unwrap();
                } else {
                    w.zero_page(id, off).unwrap();
                }
                let m = model[block].as_mut().unwrap();
                m[off as usize..(off + P) as usize].copy_from_slice(&data);
            }
            Op::Run {
                block,
                page,
                n,
                fill,
            } if model[block].is_some() => {
                let (id, pages) = BLOCKS[block];
                let first = page % pages;
                let n = n.min(pages - first);
                let data: Vec<u8> = (0..n)
                    .flat_map(|i| page_of(fill.wrapping_add(i as u8)))
                    .collect();
                let off = first * P;
                if n == 1 {
                    w.page(id, off, &data).unwrap();
                } else {
                    w.page_run(id, off, &data).unwrap();
                }
                let m = model[block].as_mut().unwrap();
                m[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            Op::Page { .. } | Op::Zero { .. } | Op::Run { .. } => {}
            Op::Break => {
                w.eos().unwrap();
                w.begin_ram().unwrap();
            }
            Op::Hot if model[2].is_some() => {
                w.block_del("hot").unwrap();
                model[2] = None;
            }
            Op::Hot if adds < 32 => {
                adds += 1;
                w.block_add("hot", 2 * P).unwrap();
                model[2] = Some(vec![0; (2 * P) as usize]);
            }
            Op::Hot => {}
        }
    }
    w.eos().unwrap();
    w.state("cpu0", b"x").unwrap();
    w.end().unwrap();
    (w.into_inner().unwrap(), model)
}

/// A fresh destination list over the arenas (refilled with junk) and its hotplug.
fn destination(a: &Arenas) -> (std::sync::Arc<ramlist::RamList>, ArenaHotplug) {
    a.ram.fill(JUNK);
    a.vga.fill(JUNK);
    let ram = fenced_list(&[("ram", a.ram), ("vga", a.vga)]);
    (
        ram,
        ArenaHotplug {
            pool: a.hot.clone(),
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn valid_streams_load_to_the_expected_contents(ops in prop::collection::vec(op(), 0..48)) {
        static A: OnceLock<Arenas> = OnceLock::new();
        let a = arenas(&A);
        let (stream, model) = encode(&ops);
        let (ram, mut hp) = destination(a);
        let s = load(&ram, &stream[..], &mut hp, &small_opts()).unwrap();
        prop_assert_eq!(s.bytes, stream.len() as u64);
        let g = rcu::read_lock();
        let present: Vec<bool> = BLOCKS.iter().map(|(id, _)| ram.block_by_id(&g, id).is_some()).collect();
        drop(g);
        for (i, (id, _)) in BLOCKS.iter().enumerate() {
            prop_assert_eq!(present[i], model[i].is_some(), "block {}", id);
            if let Some(want) = &model[i] {
                prop_assert!(read_block(&ram, id) == *want, "contents of {}", id);
            }
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn mutated_streams_never_panic(
        ops in prop::collection::vec(op(), 0..24),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0..5u8, any::<u8>()), 1..6),
    ) {
        static A: OnceLock<Arenas> = OnceLock::new();
        let a = arenas(&A);
        let (mut stream, _) = encode(&ops);
        for (at, kind, byte) in edits {
            if stream.is_empty() {
                break;
            }
            let i = at.index(stream.len());
            match kind {
                0 => stream[i] ^= 1 << (byte % 8),
                1 => stream[i] = byte,
                2 => stream.insert(i, byte),
                3 => { stream.remove(i); }
                _ => stream.truncate(i),
            }
        }
        let (ram, mut hp) = destination(a);
        let r = catch_unwind(AssertUnwindSafe(|| load(&ram, &stream[..], &mut hp, &small_opts())));
        prop_assert!(r.is_ok(), "the loader panicked");
    }
}
