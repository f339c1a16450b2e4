//! Auto-converge through the live driver, with the test VM's guest thread obeying the
//! throttle: a guest that dirties its working set four times faster than the link carries
//! it never converges without throttling (the iteration limit ends it) and converges
//! within the downtime limit with it, the throttle rising 20%, 30%, ... and lifted at the
//! end; a migration that fails under a throttle lifts it before the guest runs on; a VM
//! that cannot throttle still migrates.

mod common;
#[path = "common/fake_vm.rs"]
mod fake_vm;

use common::read_block;
use fake_vm::{FakeDest, FakeVm, GuestLoad};
use migration::live::{
    incoming, migrate_to_uri, ComponentState, IncomingOptions, MigratableVm, MigrateOptions,
    MigrationError, MigrationProgress, MigrationState, MigrationStats, VmError,
};
use migration::stream::PAGE_SIZE;
use migration::transport::{listen, MigrationUri};
use ramlist::RamList;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// The working set: 2 MiB.
const WORKING_SET: u64 = 512;

fn path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mvm-ac-{}-{name}", std::process::id()))
}

fn list() -> Arc<RamList> {
    let l = Arc::new(RamList::new());
    l.alloc("ram", 16 * MIB).unwrap();
    l
}

/// A guest rewriting 2 MiB at 16000 pages/s of running time (64 MB/s): four times what
/// the 16 MB/s link of [`tight`] carries.
fn dirtying_guest(ram: Arc<RamList>) -> FakeVm {
    let vm = FakeVm::new(
        ram,
        Some(GuestLoad {
            pages: 16 * MIB / PAGE_SIZE,
            first: 0,
            working_set: WORKING_SET,
            pages_per_sec: 16000,
        }),
    );
    assert!(
        vm.wait_for_writes(1000, Duration::from_secs(5)),
        "guest runs"
    );
    vm
}

/// 16 MB/s and a 20 ms downtime limit: at most 78 pages may be left for the final stage.
fn tight(auto_converge: bool) -> MigrateOptions {
    MigrateOptions {
        max_bandwidth: Some(16_000_000),
        downtime_limit: Duration::from_millis(20),
        batch_limit: Duration::from_millis(5),
        auto_converge,
        ..MigrateOptions::default()
    }
}

/// Migrates `vm` to a fresh destination list; checks the memory arrived whole.
fn migrate_to_fresh(
    vm: &FakeVm,
    src: &RamList,
    name: &str,
    opts: &MigrateOptions,
) -> MigrationStats {
    let dst = list();
    let uri = MigrationUri::Unix(path(name));
    let listener = listen(&uri).unwrap();
    let d = dst.clone();
    let dest = thread::spawn(move || {
        let mut vm = FakeDest::new(d);
        let conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
        incoming(&mut vm, conn, &IncomingOptions::default())
    });
    let stats = migrate_to_uri(vm, &uri, opts, &MigrationProgress::new()).expect("migration");
    dest.join().unwrap().expect("incoming");
    assert!(
        read_block(src, "ram") == read_block(&dst, "ram"),
        "memory differs"
    );
    println!(
        "{name}: converged {}, {} iterations, throttle {}% (per iteration {:?}), expected \
         downtime {:.1} ms, downtime {:.1} ms, total {:.0} ms",
        stats.converged,
        stats.iterations,
        stats.cpu_throttle_percent,
        stats
            .per_iteration
            .iter()
            .map(|i| i.cpu_throttle_percent)
            .collect::<Vec<_>>(),
        stats.expected_downtime_ms,
        stats.downtime_ms,
        stats.total_ms
    );
    stats
}

#[test]
fn without_throttling_a_fast_writer_hits_the_iteration_limit() {
    let src = list();
    let vm = dirtying_guest(src.clone());
    let opts = tight(false);
    let stats = migrate_to_fresh(&vm, &src, "off.sock", &opts);
    assert_eq!(stats.status, MigrationState::Completed);
    assert!(!stats.converged, "converged without throttling: {stats:?}");
    assert_eq!(stats.iterations, opts.max_iterations + 1);
    assert!(stats.expected_downtime_ms > 20.0);
    assert!(!stats.auto_converge);
    assert_eq!(stats.cpu_throttle_percent, 0);
    assert!(vm.throttles().is_empty(), "{:?}", vm.throttles());
}

#[test]
fn auto_converge_throttles_a_fast_writer_until_it_converges() {
    let src = list();
    let vm = dirtying_guest(src.clone());
    let opts = tight(true);
    let stats = migrate_to_fresh(&vm, &src, "on.sock", &opts);
    assert_eq!(stats.status, MigrationState::Completed);
    assert!(stats.auto_converge);
    assert!(
        stats.converged,
        "not converged under auto-converge: {stats:?}"
    );
    assert!(stats.iterations <= opts.max_iterations);
    assert!(stats.expected_downtime_ms <= 20.0);
    // The pause itself is timed by the host's scheduler (a loaded CI host stalls
    // threads for tens of ms): only a gross overrun, a pause with MiBs left, fails.
    assert!(stats.downtime_ms < 1000.0, "{} ms", stats.downtime_ms);
    // The throttle rose by the rule (20, then 10 more each time), then was lifted.
    let set = vm.throttles();
    assert!(set.len() >= 2, "{set:?}");
    let (last, raised) = set.split_last().unwrap();
    assert_eq!(*last, 0, "not lifted at the end: {set:?}");
    // 20, 30, ... and at most 99 (a loaded host may take it that far).
    let want: Vec<u8> = (0..raised.len())
        .map(|i| (20 + 10 * i).min(99) as u8)
        .collect();
    assert_eq!(raised, want.as_slice());
    assert_eq!(stats.cpu_throttle_percent, *raised.last().unwrap());
    assert_eq!(vm.throttle(), 0);
    // Per iteration: the first pass unthrottled, never going down, the peak reached.
    let per: Vec<u8> = stats
        .per_iteration
        .iter()
        .map(|i| i.cpu_throttle_percent)
        .collect();
    assert_eq!(per[0], 0);
    assert!(per.windows(2).all(|w| w[0] <= w[1]), "{per:?}");
    assert_eq!(*per.last().unwrap(), stats.cpu_throttle_percent);
    let json = serde_json::to_value(&stats).unwrap();
    assert_eq!(json["cpu_throttle_percent"], stats.cpu_throttle_percent);
}

#[test]
fn a_migration_failing_under_a_throttle_lifts_it_before_the_guest_runs_on() {
    let src = list();
    let vm = dirtying_guest(src.clone());
    let uri = MigrationUri::Unix(path("fails.sock"));
    let listener = listen(&uri).unwrap();
    let progress = Arc::new(MigrationProgress::new());
    let p = progress.clone();
    // Reads the stream until the source throttles its guest, then goes away.
    let dest = thread::spawn(move || {
        let mut conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        while p.snapshot().cpu_throttle_percent == 0 {
            if conn.reader().read(&mut buf).unwrap() == 0 {
                panic!("the source ended the stream before throttling");
            }
        }
    });
    let err = migrate_to_uri(&vm, &uri, &tight(true), &progress).unwrap_err();
    dest.join().unwrap();
    println!("error: {err}; throttles set {:?}", vm.throttles());
    assert!(
        matches!(err, MigrationError::DestinationClosed { .. }),
        "{err:?}"
    );
    assert_eq!(vm.throttles().first(), Some(&20));
    assert_eq!(vm.throttles().last(), Some(&0), "not lifted");
    assert_eq!(vm.throttle(), 0);
    assert!(!vm.is_paused() && !vm.is_logging());
    let last = progress.last_stats().unwrap();
    assert_eq!(last.status, MigrationState::Failed);
    assert!(last.cpu_throttle_percent >= 20);
    assert_eq!(progress.snapshot().cpu_throttle_percent, 0);
}

/// A VM that leaves `set_throttle` to the trait's default.
struct NoThrottle(FakeVm);

impl MigratableVm for NoThrottle {
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

#[test]
fn a_vm_that_cannot_throttle_migrates_without_auto_converge() {
    let (src, dst) = (list(), list());
    let vm = NoThrottle(dirtying_guest(src.clone()));
    let uri = MigrationUri::Unix(path("unsupported.sock"));
    let listener = listen(&uri).unwrap();
    let d = dst.clone();
    let dest = thread::spawn(move || {
        let mut vm = FakeDest::new(d);
        let conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
        incoming(&mut vm, conn, &IncomingOptions::default())
    });
    let opts = MigrateOptions {
        max_iterations: 6,
        ..tight(true)
    };
    let stats = migrate_to_uri(&vm, &uri, &opts, &MigrationProgress::new()).expect("migration");
    dest.join().unwrap().expect("incoming");
    assert!(!stats.converged);
    assert_eq!(stats.iterations, 7, "the iteration limit ended it");
    assert_eq!(stats.cpu_throttle_percent, 0);
    assert!(stats
        .per_iteration
        .iter()
        .all(|i| i.cpu_throttle_percent == 0));
    assert!(read_block(&src, "ram") == read_block(&dst, "ram"));
}
