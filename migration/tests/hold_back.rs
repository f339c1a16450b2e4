//! The first pass holds back the pages the VM says the guest wrote since the last sync
//! (`MigratableVm::recent_writes`, KVM's log peeked at), and they still arrive: the saver
//! marks them again, so they go in a later pass even when no sync reports them. Here the
//! VM claims writes the guest never made (an idle guest, so no sync reports anything): a
//! saver that dropped the held-back bits would leave those pages behind, and the memory
//! would differ. And they go while the guest runs, in the next pass, not in the pause.

mod common;
#[path = "common/fake_vm.rs"]
mod fake_vm;

use fake_vm::{FakeDest, FakeVm};
use migration::live::{
    incoming, migrate_to_uri, ComponentState, IncomingOptions, MigratableVm, MigrateOptions,
    MigrationProgress, VmError,
};
use migration::transport::{listen, MigrationUri};
use ramlist::dirty::RecentWrites;
use ramlist::RamList;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// Pages the guest wrote at boot...
const WRITTEN: u64 = 64;
/// ...and those of them the VM says were written lately: pages 8 to 40.
const CLAIMED: std::ops::Range<u64> = 8..40;

/// An idle VM that says pages `CLAIMED` of block "ram" were written since the last sync.
struct ClaimsWrites(FakeVm);

impl MigratableVm for ClaimsWrites {
    fn ram(&self) -> Arc<RamList> {
        self.0.ram()
    }
    fn start_dirty_log(&self) -> Result<(), VmError> {
        self.0.start_dirty_log()
    }
    fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.0.stop_dirty_log()
    }
    fn dirty_sync(&self) -> Result<u64, VmError> {
        self.0.dirty_sync()
    }
    fn recent_writes(&self) -> Result<Option<RecentWrites>, VmError> {
        let ram = self.0.ram();
        let offset = {
            let g = rcu::read_lock();
            ram.block_by_id(&g, "ram").ok_or("no block ram")?.offset()
        };
        let mut bits = vec![0u64; 1];
        for p in CLAIMED {
            bits[0] |= 1 << p;
        }
        let mut recent = RecentWrites::new();
        assert!(recent.add(offset, 64, bits));
        Ok(Some(recent))
    }
    fn pause(&self) -> Result<bool, VmError> {
        self.0.pause()
    }
    fn resume(&self) -> Result<(), VmError> {
        self.0.resume()
    }
    fn save_state(&self) -> Result<Vec<ComponentState>, VmError> {
        self.0.save_state()
    }
}

fn list() -> Arc<RamList> {
    let l = Arc::new(RamList::new());
    l.alloc("ram", 4 * MIB).unwrap();
    l.alloc("vga", MIB).unwrap();
    l
}

#[test]
fn pages_held_back_by_the_first_pass_still_arrive() {
    let (src, dst) = (list(), list());
    let vm = ClaimsWrites(FakeVm::new(src.clone(), None));
    vm.0.prefill(0..WRITTEN);
    let uri = MigrationUri::Unix(
        std::env::temp_dir().join(format!("mvm-hold-back-{}.sock", std::process::id())),
    );
    let listener = listen(&uri).unwrap();
    let d = dst.clone();
    let dest = thread::spawn(move || {
        let mut vm = FakeDest::new(d);
        let conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
        incoming(&mut vm, conn, &IncomingOptions::default())
    });
    let stats = migrate_to_uri(
        &vm,
        &uri,
        &MigrateOptions::default(),
        &MigrationProgress::new(),
    )
    .expect("migration");
    dest.join().unwrap().expect("incoming");

    let claimed = CLAIMED.end - CLAIMED.start;
    let first = &stats.per_iteration[0];
    assert_eq!(first.stage, "first");
    assert_eq!(
        first.pages,
        WRITTEN - claimed,
        "the first pass sent all but the claimed pages: {first:?}"
    );
    assert!(first.held_back_pages >= claimed, "{first:?}");
    // No sync reported them (the guest is idle): they went because the saver kept them
    // marked, in a pass of their own while the guest ran (a later pass holds nothing
    // back), not in the pause, though they would have fit the downtime limit at once.
    let second = &stats.per_iteration[1];
    assert_eq!(
        (second.stage, second.pages),
        ("iterate", claimed),
        "{:?}",
        stats.per_iteration
    );
    let last = stats.per_iteration.last().unwrap();
    assert_eq!((last.stage, last.pages), ("final", 0), "{last:?}");
    assert_eq!(stats.normal_pages, WRITTEN);
    for id in ["ram", "vga"] {
        assert!(
            common::read_block(&src, id) == common::read_block(&dst, id),
            "block {id} differs: a held-back page was lost"
        );
    }
}
