//! KVM slots and dirty logging against /dev/kvm: a real-mode vCPU writes chosen pages and
//! the migration bitmap must show exactly those; slot placement, refusal, removal and
//! reuse; per-client logging; writes through the vm-memory view mark pages dirty.
//!
//! Guest code runs emulated (~1000x slower) on these machines, so each guest program is a
//! handful of instructions (see `kvm_guest`).

mod kvm_guest;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_guest::{run_until_hlt, store_program, vm, writer_program};
use kvm_ioctls::VmFd;
use ramlist::dirty::{DirtyClient, PAGE_SIZE};
use ramlist::guest::GuestRam;
use ramlist::kvm::{DirtyLogMode, KvmRam, KvmRamError};
use ramlist::{RamBlockOptions, RamError, RamList};
use std::collections::BTreeSet;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MIB: u64 = 1 << 20;

fn kvm_ram(vm: &Arc<VmFd>, mode: Option<DirtyLogMode>) -> KvmRam {
    let ram = Arc::new(RamList::new());
    match mode {
        Some(m) => KvmRam::with_mode(ram, vm.clone(), m).unwrap(),
        None => KvmRam::new(ram, vm.clone()).unwrap(),
    }
}

/// Pages of `[start, start + len)` of the ram_addr space dirty for migration (page
/// numbers relative to `start`), without clearing them.
fn dirty_pages(ram: &KvmRam, start: u64, len: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    let mut at = start;
    while let Some(a) = ram
        .dirty()
        .find_next_dirty(DirtyClient::Migration, at, start + len)
    {
        set.insert((a - start) / PAGE_SIZE);
        at = a + PAGE_SIZE;
    }
    set
}

fn guest_writes_show_exactly(mode: Option<DirtyLogMode>) {
    let Some(vm) = vm() else { return };
    let ram = kvm_ram(&vm, mode);
    let size = MIB;
    let placed = ram
        .add("ram0", size, 0, RamBlockOptions::default())
        .unwrap();
    let mem = ram.guest_memory();
    mem.write_slice(&writer_program(&[3, 5, 9]), GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(&writer_program(&[4, 7]), GuestAddress(0x2000))
        .unwrap();
    let dirty = ram.dirty();
    ram.set_dirty_logging("ram0", DirtyClient::Migration, true)
        .unwrap();
    // A new block is dirty for everybody, and with the log initially set KVM reports
    // every page on the first sync: take it all, as a migration's first pass would.
    let first = ram.sync_dirty_log().unwrap();
    if ram.mode() == DirtyLogMode::ManualInitiallySet {
        assert_eq!(first.dirty_pages, size / PAGE_SIZE);
    }
    dirty.test_and_clear(DirtyClient::Migration, placed.ram_addr, size);
    assert!(dirty_pages(&ram, placed.ram_addr, size).is_empty());

    let mut vcpu = vm.create_vcpu(0).unwrap();
    run_until_hlt(&mut vcpu, 0x1000);
    let stats = ram.sync_dirty_log().unwrap();
    println!("{:?}: first run sync {stats:?}", ram.mode());
    assert_eq!(stats.dirty_pages, 3);
    assert_eq!(
        dirty_pages(&ram, placed.ram_addr, size),
        BTreeSet::from([3, 5, 9]),
        "the code page at 1 is only read"
    );
    let mut byte = [0u8];
    mem.read_slice(&mut byte, GuestAddress(0x5000)).unwrap();
    assert_eq!(byte[0], 0x5a, "the guest's store reached our mapping");

    let taken = dirty.test_and_clear(DirtyClient::Migration, placed.ram_addr, size);
    assert_eq!(taken, 3);
    let again = ram.sync_dirty_log().unwrap();
    assert_eq!(again.dirty_pages, 0, "the log was re-armed");
    assert!(dirty_pages(&ram, placed.ram_addr, size).is_empty());

    run_until_hlt(&mut vcpu, 0x2000);
    ram.sync_dirty_log().unwrap();
    assert_eq!(
        dirty_pages(&ram, placed.ram_addr, size),
        BTreeSet::from([4, 7])
    );
}

#[test]
fn guest_writes_show_exactly_those_pages_default_mode() {
    guest_writes_show_exactly(None);
}

#[test]
fn guest_writes_show_exactly_those_pages_manual_not_initially_set() {
    guest_writes_show_exactly(Some(DirtyLogMode::Manual));
}

#[test]
fn guest_writes_show_exactly_those_pages_get_clears() {
    guest_writes_show_exactly(Some(DirtyLogMode::GetClears));
}

#[test]
fn overlapping_guest_range_is_refused_and_leaves_nothing() {
    let Some(vm) = vm() else { return };
    let ram = kvm_ram(&vm, None);
    ram.add("low", 2 * MIB, 0, RamBlockOptions::default())
        .unwrap();
    let err = ram
        .add("clash", MIB, MIB, RamBlockOptions::default())
        .unwrap_err();
    match &err {
        KvmRamError::Ram(RamError::GuestOverlap {
            id, start, other, ..
        }) => {
            assert_eq!((id.as_str(), *start, other.as_str()), ("clash", MIB, "low"));
        }
        e => panic!("wrong error {e}"),
    }
    assert!(err.to_string().contains("0x100000"), "{err}");
    let guard = rcu::read_lock();
    assert!(ram.ram().block_by_id(&guard, "clash").is_none());
    assert_eq!(ram.placed().len(), 1);
}

#[test]
fn kvm_refusal_leaves_the_list_and_its_version_unchanged() {
    let Some(vm) = vm() else { return };
    let ram = kvm_ram(&vm, None);
    // A slot KvmRam does not know about, made behind its back: KVM refuses ours (EEXIST).
    let foreign = ramlist::RamList::new();
    foreign.alloc("foreign", MIB).unwrap();
    let host = {
        let g = rcu::read_lock();
        foreign.block_by_id(&g, "foreign").unwrap().host() as u64
    };
    let region = kvm_userspace_memory_region {
        slot: 200,
        flags: 0,
        guest_phys_addr: 16 * MIB,
        memory_size: MIB,
        userspace_addr: host,
    };
    // SAFETY: `foreign` stays mapped until the end of the test, and the slot is deleted
    // before it is dropped.
    unsafe { vm.set_user_memory_region(region).unwrap() };
    let version = ram.ram().version();
    let err = ram
        .add("victim", MIB, 16 * MIB, RamBlockOptions::default())
        .unwrap_err();
    match &err {
        KvmRamError::SetRegion {
            id,
            guest_addr,
            source,
            ..
        } => {
            assert_eq!((id.as_str(), *guest_addr), ("victim", 16 * MIB));
            assert_eq!(source.errno(), libc::EEXIST);
        }
        e => panic!("wrong error {e}"),
    }
    {
        let guard = rcu::read_lock();
        assert!(ram.ram().block_by_id(&guard, "victim").is_none());
    }
    assert!(ram.ram().is_empty());
    // KVM saw the block before it was linked: nothing was published, so the version is
    // unchanged (linking first and freeing after the refusal bumped it twice) and there
    // is no freed block waiting for a grace period.
    assert_eq!(
        ram.ram().version(),
        version,
        "a refused add changed the list"
    );
    assert_eq!(ram.ram().reclaim_pending(), 0);
    // An accepted add is one change.
    ram.add("fine", MIB, 32 * MIB, RamBlockOptions::default())
        .unwrap();
    assert_eq!(ram.ram().version(), version + 1);
    // SAFETY: deleting the slot (size 0) touches no memory.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            memory_size: 0,
            ..region
        })
        .unwrap()
    };
}

#[test]
fn remove_then_add_reuses_the_slot_and_the_range() {
    let Some(vm) = vm() else { return };
    let ram = kvm_ram(&vm, None);
    let opts = RamBlockOptions::default();
    let a = ram.add("a", MIB, 0, opts).unwrap();
    let b = ram.add("b", MIB, 4 * MIB, opts).unwrap();
    assert_ne!(a.slot, b.slot);
    ram.set_dirty_logging("a", DirtyClient::Migration, true)
        .unwrap();
    ram.remove("a").unwrap();
    assert!(matches!(ram.remove("a"), Err(KvmRamError::UnknownId(id)) if id == "a"));
    assert!(matches!(
        ram.set_dirty_logging("a", DirtyClient::Migration, true),
        Err(KvmRamError::UnknownId(_))
    ));
    // Same guest range: KVM would refuse (EEXIST) had the old slot not been deleted.
    let c = ram.add("c", 2 * MIB, 0, opts).unwrap();
    assert_eq!(c.slot, a.slot);
    assert!(!c.logging);
    let guard = rcu::read_lock();
    assert!(ram.ram().block_by_id(&guard, "a").is_none());
    assert!(ram.ram().block_by_id(&guard, "c").is_some());
    drop(guard);
    let ids: Vec<String> = ram.placed().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, ["c", "b"]);
}

#[test]
fn writes_through_the_guest_memory_view_mark_pages_dirty() {
    let Some(vm) = vm() else { return };
    let ram = kvm_ram(&vm, None);
    let opts = RamBlockOptions::default();
    ram.add("low", MIB, 0, opts).unwrap();
    let high = ram.add("high", MIB, 64 * MIB, opts).unwrap();
    assert_ne!(high.ram_addr, 0);
    let dirty = ram.dirty();
    for c in DirtyClient::ALL {
        dirty.test_and_clear(c, 0, u64::MAX);
    }
    let mem: GuestRam = ram.guest_memory();
    assert_eq!(mem.num_regions(), 2);
    assert!(mem.is_current());
    let r = mem.find_region(GuestAddress(64 * MIB + 5)).unwrap();
    assert_eq!(r.start_addr(), GuestAddress(64 * MIB));
    assert!(mem.find_region(GuestAddress(MIB)).is_none());

    // 32 bytes straddling pages 2 and 3 of "high".
    mem.write_slice(&[0xab; 32], GuestAddress(64 * MIB + 3 * PAGE_SIZE - 16))
        .unwrap();
    let mut back = [0u8; 32];
    mem.read_slice(&mut back, GuestAddress(64 * MIB + 3 * PAGE_SIZE - 16))
        .unwrap();
    assert_eq!(back, [0xab; 32]);
    for c in DirtyClient::ALL {
        assert_eq!(dirty.count_dirty(c, 0, u64::MAX), 2, "{c:?}");
        assert!(dirty.is_dirty(c, high.ram_addr + 2 * PAGE_SIZE));
        assert!(dirty.is_dirty(c, high.ram_addr + 3 * PAGE_SIZE));
    }
    // Reads mark nothing; writes outside every block are refused.
    dirty.test_and_clear(DirtyClient::Migration, 0, u64::MAX);
    mem.read_slice(&mut back, GuestAddress(100)).unwrap();
    assert_eq!(dirty.count_dirty(DirtyClient::Migration, 0, u64::MAX), 0);
    assert!(mem.write_slice(&[1], GuestAddress(2 * MIB)).is_err());

    // The snapshot keeps a removed block mapped, and says it is stale: with every grace
    // period it could wait for drained, the block is still pending reclamation, held by
    // the snapshot alone (the slot's reference went with the slot), and writes through
    // the snapshot land in its memory and read back.
    ram.remove("high").unwrap();
    assert!(!mem.is_current());
    assert_eq!(ram.guest_memory().num_regions(), 1);
    assert_eq!(
        ram.ram().drain_reclaim(),
        1,
        "the snapshot's reference keeps the removed block mapped"
    );
    mem.write_slice(&[1, 2, 3], GuestAddress(64 * MIB)).unwrap();
    let mut three = [0u8; 3];
    mem.read_slice(&mut three, GuestAddress(64 * MIB)).unwrap();
    assert_eq!(three, [1, 2, 3]);
    drop(mem);
    assert_eq!(
        ram.ram().drain_reclaim(),
        0,
        "the snapshot's drop reclaims the block"
    );
}

/// Dirty logging is wanted per client: the display's log survives a migration's end, and
/// the log feeds only the clients that want it.
#[test]
fn ending_one_clients_log_keeps_the_others() {
    let Some(vm) = vm() else { return };
    let ram = kvm_ram(&vm, Some(DirtyLogMode::Manual));
    let placed = ram.add("fb", MIB, 0, RamBlockOptions::default()).unwrap();
    ram.guest_memory()
        .write_slice(&writer_program(&[3]), GuestAddress(0x1000))
        .unwrap();
    let (m, vga) = (DirtyClient::Migration, DirtyClient::Vga);
    ram.set_dirty_logging("fb", vga, true).unwrap();
    ram.set_dirty_logging_all(m, true).unwrap();
    ram.set_dirty_logging("fb", vga, true).unwrap(); // idempotent per client
    assert_eq!(ram.find("fb").unwrap().log_clients, [m, vga]);
    ram.sync_dirty_log().unwrap();
    for c in DirtyClient::ALL {
        ram.dirty().test_and_clear(c, 0, u64::MAX);
    }

    // The migration ends; the display still wants the log.
    ram.set_dirty_logging_all(m, false).unwrap();
    let p = ram.find("fb").unwrap();
    assert!(
        p.logging,
        "the display's log was turned off with migration's"
    );
    assert_eq!(p.log_clients, [vga]);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    run_until_hlt(&mut vcpu, 0x1000);
    let stats = ram.sync_dirty_log().unwrap();
    assert_eq!(stats.dirty_pages, 1);
    let page3 = placed.ram_addr + 3 * PAGE_SIZE;
    assert!(
        ram.dirty().is_dirty(vga, page3),
        "the display missed a write"
    );
    assert!(
        !ram.dirty().is_dirty(m, page3),
        "no migration runs: its bitmap is not fed"
    );

    ram.set_dirty_logging("fb", vga, false).unwrap();
    assert!(!ram.find("fb").unwrap().logging);
    // KVM's log feeds neither translated-code invalidation nor ids we never placed.
    assert!(matches!(
        ram.set_dirty_logging("fb", DirtyClient::Code, true),
        Err(KvmRamError::NotKvmClient {
            client: DirtyClient::Code
        })
    ));
    assert!(matches!(
        ram.set_dirty_logging("nope", vga, true),
        Err(KvmRamError::UnknownId(id)) if id == "nope"
    ));
}

/// A block placed while a client logs every slot (a migration under way, and a
/// `ram-add` meanwhile) logs for it from the start: the guest's writes to it reach that
/// client's bitmap after the block's own pages were taken, in every log mode. Once the
/// client stops, later blocks do not log.
fn a_block_added_while_logging_all_is_logged(mode: DirtyLogMode) {
    let Some(vm) = vm() else { return };
    let ram = kvm_ram(&vm, Some(mode));
    let m = DirtyClient::Migration;
    ram.add("boot", 512 * 1024, 0, RamBlockOptions::default())
        .unwrap();
    ram.set_dirty_logging_all(m, true).unwrap();
    // Real mode reaches 1 MiB: the new block is the upper half of it.
    let hot = ram
        .add("hot", 512 * 1024, 512 * 1024, RamBlockOptions::default())
        .unwrap();
    let p = ram.find("hot").unwrap();
    assert!(
        p.logging,
        "{mode:?}: a block added mid-migration does not log"
    );
    assert_eq!(p.log_clients, [m]);
    ram.guest_memory()
        .write_slice(
            &store_program(&[0x80000 + 2 * 4096, 0x80000 + 9 * 4096]),
            GuestAddress(0x1000),
        )
        .unwrap();
    // The saver takes the block's pages (as its first pass does: no sync between the
    // add and its clear; KVM's initial log was taken by the add) ...
    ram.dirty().test_and_clear(m, 0, u64::MAX);
    // ... then the guest writes two of them.
    let mut vcpu = vm.create_vcpu(0).unwrap();
    run_until_hlt(&mut vcpu, 0x1000);
    ram.sync_dirty_log().unwrap();
    assert_eq!(
        dirty_pages(&ram, hot.ram_addr, 512 * 1024),
        BTreeSet::from([2, 9]),
        "{mode:?}: the guest's writes to the hot-added block were lost"
    );

    ram.set_dirty_logging_all(m, false).unwrap();
    ram.add("later", 1 << 20, 1 << 20, RamBlockOptions::default())
        .unwrap();
    assert!(!ram.find("later").unwrap().logging, "{mode:?}");
}

#[test]
fn a_block_added_while_logging_all_is_logged_get_clears() {
    a_block_added_while_logging_all_is_logged(DirtyLogMode::GetClears);
}

#[test]
fn a_block_added_while_logging_all_is_logged_manual() {
    a_block_added_while_logging_all_is_logged(DirtyLogMode::Manual);
}

#[test]
fn a_block_added_while_logging_all_is_logged_initially_set() {
    a_block_added_while_logging_all_is_logged(DirtyLogMode::ManualInitiallySet);
}
