//! The fuzz target's seed streams (migration/fuzz/seeds/load) load into the same
//! destination the target builds ("ram" 8 pages, "vga" 2 pages, anonymous hotplug), so the
//! fuzzer starts from streams that reach every record kind rather than from refusals.

use migration::load::{load, AnonymousHotplug, LoadOptions};
use ramlist::RamList;

#[test]
fn every_fuzz_seed_is_a_stream_the_loader_accepts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/load");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let ram = RamList::new();
        ram.alloc("ram", 8 * 4096).unwrap();
        ram.alloc("vga", 2 * 4096).unwrap();
        let opts = LoadOptions {
            max_state_len: 4096,
            max_state_total: 16384,
            max_new_block: 64 * 1024,
            pages_per_read_section: 5,
        };
        let r = load(&ram, &bytes[..], &mut AnonymousHotplug, &opts);
        assert!(r.is_ok(), "{}: {:?}", path.display(), r.err());
        seen += 1;
    }
    assert!(seen >= 2, "only {seen} seeds in {}", dir.display());
}
