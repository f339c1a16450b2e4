//! KVM slots keep their blocks' memory mapped (issue 10 point 9): a block placed in a slot
//! and then freed with `RamList::free` directly must stay mapped while KVM maps it, so a
//! new block mmapped at the same host address never receives the guest's stores; the slot
//! goes at the next call into `KvmRam`, and only then is the block reclaimed.

mod kvm_guest;

use kvm_guest::{run, store_program, vm, RunEnd, STORED};
use ramlist::kvm::{KvmRam, KvmRamError};
use ramlist::{RamBlockOptions, RamList};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

const KIB: u64 = 1 << 10;
/// Where the freed block sits in guest-physical space, and its size.
const VICTIM_GPA: u64 = 0x40000;
const VICTIM_SIZE: u64 = 256 * KIB;
/// Offsets in the freed block the guest stores to.
const OFFSETS: [u64; 3] = [0, 7 * 4096, VICTIM_SIZE - 1];

/// The whole memory of block `id` of `list`, copied out under a read guard.
fn contents(list: &RamList, id: &str) -> Vec<u8> {
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, id).unwrap();
    let mut out = vec![0u8; b.len() as usize];
    // SAFETY: the block is mapped for `len` bytes while the guard is held; guest memory
    // may change under us (no vCPU runs now), so the copy is plain bytes.
    unsafe { std::ptr::copy_nonoverlapping(b.host(), out.as_mut_ptr(), out.len()) };
    out
}

fn host_of(list: &RamList, id: &str) -> u64 {
    let g = rcu::read_lock();
    list.block_by_id(&g, id).unwrap().host() as u64
}

#[test]
fn a_freed_placed_block_stays_mapped_until_its_slot_is_gone() {
    let Some(vm) = vm() else { return };
    let list = Arc::new(RamList::new());
    let ram = KvmRam::new(list.clone(), vm.clone()).unwrap();
    let opts = RamBlockOptions::default();
    ram.add("code", 64 * KIB, 0, opts).unwrap();
    ram.add("victim", VICTIM_SIZE, VICTIM_GPA, opts).unwrap();
    let addrs: Vec<u32> = OFFSETS.iter().map(|o| (VICTIM_GPA + o) as u32).collect();
    ram.guest_memory()
        .write_slice(&store_program(&addrs), GuestAddress(0x1000))
        .unwrap();
    let old_host = host_of(&list, "victim");

    // Freed behind KvmRam's back, with every grace period drained: without the slot's
    // counted reference the memory would be unmapped now.
    list.free("victim").unwrap();
    let pending = list.drain_reclaim();

    // New blocks of the same size: mmap hands out the hole the victim left, if any.
    let mut reused = false;
    for i in 0..4 {
        let id = format!("new{i}");
        list.alloc(&id, VICTIM_SIZE).unwrap();
        reused |= host_of(&list, &id) == old_host;
    }
    println!("a new block got the freed block's host address: {reused}");

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let end = run(&mut vcpu, 0x1000);
    assert_eq!(
        end,
        RunEnd::Halted,
        "the guest's stores hit a slot whose memory is gone"
    );
    for i in 0..4 {
        let id = format!("new{i}");
        let bytes = contents(&list, &id);
        assert!(
            bytes.iter().all(|&b| b == 0),
            "a guest store through the freed block's slot landed in {id}"
        );
    }
    assert_eq!(pending, 1, "the slot's reference keeps the freed block");

    // The next call into KvmRam retires the slot (memory listener, lazily)...
    let ids: Vec<String> = ram.placed().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, ["code"]);
    assert!(matches!(
        ram.remove("victim"),
        Err(KvmRamError::UnknownId(_))
    ));
    // ...which lets the block go...
    assert_eq!(list.drain_reclaim(), 0);
    // ...and KVM no longer maps anything there: the first store exits to us.
    assert_eq!(run(&mut vcpu, 0x1000), RunEnd::MmioWrite(VICTIM_GPA));
    for i in 0..4 {
        assert!(contents(&list, &format!("new{i}")).iter().all(|&b| b == 0));
    }
    // The guest range is free again for a new placement.
    ram.add("again", VICTIM_SIZE, VICTIM_GPA, opts).unwrap();
    assert_eq!(run(&mut vcpu, 0x1000), RunEnd::Halted);
    let again = contents(&list, "again");
    for o in OFFSETS {
        assert_eq!(again[o as usize], STORED);
    }
}

/// `KvmRam::remove` after the block was freed behind its back (and a new block took its
/// id) deletes the stale slot but never frees the newcomer.
#[test]
fn remove_never_frees_a_newcomer_with_the_same_id() {
    let Some(vm) = vm() else { return };
    let list = Arc::new(RamList::new());
    let ram = KvmRam::new(list.clone(), vm).unwrap();
    let opts = RamBlockOptions::default();
    ram.add("dup", 64 * KIB, 0, opts).unwrap();
    list.free("dup").unwrap();
    list.alloc("dup", 128 * KIB).unwrap();
    assert!(matches!(ram.remove("dup"), Err(KvmRamError::UnknownId(id)) if id == "dup"));
    let g = rcu::read_lock();
    assert_eq!(list.block_by_id(&g, "dup").unwrap().len(), 128 * KIB);
    drop(g);
    assert!(ram.placed().is_empty());
    assert_eq!(list.drain_reclaim(), 0);
}
