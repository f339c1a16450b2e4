//! Review reproductions for giving a block another file's memory in place
//! (`RamListWriter::adopt_fd`, `KvmRam::adopt_fd`), through the crate's public API only.
//!
//! They were written against a first design (89d2477) that linked a new block in the old
//! one's place: a counted reference to the old block then kept neither its memory mapped
//! nor its span reserved, a replace made on the list broke the KVM slot that held the old
//! block, the old block was unlinked before the version bump (a lookup could be handed it
//! and see it freed under its guard), and the range was counted twice for a while. The
//! design now keeps the block (the same object; only its mapping and recorded backing
//! change), and these tests hold the same contracts against it. The race of a lookup
//! with the unlink has no counterpart any more: nothing is unlinked.
//!
//! Tests that touch the process-wide `mapped_blocks()` counters are serialized by `SERIAL`.

mod kvm_guest;

use kvm_guest::{run, store_program, vm, RunEnd, STORED};
use ramlist::kvm::KvmRam;
use ramlist::{mapped_blocks, page_size, RamBlockOptions, RamBlockRef, RamList};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::{Bytes, GuestAddress};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A memfd of `len` bytes.
fn memfd(len: u64) -> std::fs::File {
    // SAFETY: a NUL-terminated name and valid flags; the call makes a new descriptor.
    let fd = unsafe { libc::memfd_create(c"review-replace".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned to us and nothing else owns it.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len).unwrap();
    f
}

/// Whether every page of `host..host + len` is mapped in this process (mincore answers
/// ENOMEM for a range with an unmapped page; it reads no byte of the range).
fn mapped(host: *mut u8, len: u64) -> bool {
    let mut v = vec![0u8; (len / page_size()) as usize];
    // SAFETY: mincore only writes one byte per page into `v`, which has room for them.
    unsafe { libc::mincore(host.cast(), len as usize, v.as_mut_ptr()) == 0 }
}

/// A reference to the block that was replaced must keep its memory mapped after the block
/// that replaced it is freed and reclaimed (RamBlockRef's contract; migration's
/// `last_seen_block`, a `GuestRam` snapshot and a KVM slot all rely on it).
#[test]
fn review_a_reference_to_the_replaced_block_keeps_its_memory_mapped() {
    let _s = serial();
    let p = page_size();
    let len = 16 * p;
    let list = RamList::new();
    list.alloc("a", len).unwrap();
    let old: RamBlockRef = {
        let g = rcu::read_lock();
        list.block_ref(&g, "a").unwrap()
    };
    let file = memfd(len);
    list.lock()
        .adopt_fd("a", len, file.as_fd(), 0)
        .expect("replace in place");
    assert!(mapped(old.host(), old.len()));
    // The block goes from the list; the reference holds it (pending, still mapped).
    list.free("a").unwrap();
    assert_eq!(list.drain_reclaim(), 1);
    rcu::drain_call_rcu();
    let still = mapped(old.host(), old.len());
    assert!(
        still,
        "the memory of block {:?} (ram_addr {:#x}) was unmapped while a RamBlockRef to it lives",
        old.id(),
        old.offset()
    );
    drop(old);
    assert_eq!(list.drain_reclaim(), 0);
}

/// ... and its ram_addr span stays reserved until it is reclaimed (list.rs's rule: no new
/// block is placed on a span a reader or a reference may still hold, so its dirty bits
/// stay its own).
#[test]
fn review_a_reference_to_the_replaced_block_keeps_its_span_reserved() {
    let _s = serial();
    let p = page_size();
    let len = 16 * p;
    let list = RamList::new();
    let off = list.alloc("a", len).unwrap();
    let old = {
        let g = rcu::read_lock();
        list.block_ref(&g, "a").unwrap()
    };
    let file = memfd(len);
    list.lock().adopt_fd("a", len, file.as_fd(), 0).unwrap();
    list.free("a").unwrap();
    assert_eq!(list.drain_reclaim(), 1, "the reference holds the block");
    rcu::drain_call_rcu();
    let reserved = list.reserved_spans();
    let newcomer = list.alloc("b", len).unwrap();
    // The old block's span, as it reads it, now holds the newcomer's dirty bits.
    let dirty_seen_by_old = list
        .dirty()
        .is_dirty(ramlist::dirty::DirtyClient::Migration, old.offset());
    println!(
        "reserved {reserved:x?}; newcomer at {newcomer:#x}; old block's first page dirty: {dirty_seen_by_old}"
    );
    assert!(
        reserved.contains(&(off, len)) && newcomer != off,
        "span {off:#x}+{len:#x} of a block a RamBlockRef still holds was given to a new block \
         (reserved: {reserved:x?}, new block at {newcomer:#x})"
    );
    drop(old);
    list.free("b").unwrap();
    assert_eq!(list.drain_reclaim(), 0);
}

const KIB: u64 = 1 << 10;
const VICTIM_GPA: u64 = 0x40000;
const VICTIM_SIZE: u64 = 256 * KIB;
const OFFSETS: [u64; 3] = [0, 7 * 4096, VICTIM_SIZE - 1];

fn contents(list: &RamList, id: &str) -> Vec<u8> {
    let g = rcu::read_lock();
    let b = list.block_by_id(&g, id).unwrap();
    let mut out = vec![0u8; b.len() as usize];
    // SAFETY: the block is mapped for `len` bytes while the guard is held; no vCPU runs.
    unsafe { std::ptr::copy_nonoverlapping(b.host(), out.as_mut_ptr(), out.len()) };
    out
}

fn host_of(list: &RamList, id: &str) -> u64 {
    let g = rcu::read_lock();
    list.block_by_id(&g, id).unwrap().host() as u64
}

/// A slot keeps its memory mapped (kvm.rs's rule, which holds for a block freed behind
/// KvmRam's back): a replace made on the list leaves the slot holding the moved block;
/// freeing the successor then unmaps the range KVM still maps, and a new block mapped
/// there receives the guest's stores.
#[test]
fn review_a_slot_keeps_its_memory_mapped_after_a_replace_made_on_the_list() {
    let _s = serial();
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
    let file = memfd(VICTIM_SIZE);
    // The list's public writer, not KvmRam: nothing tells KvmRam.
    list.lock()
        .adopt_fd("victim", VICTIM_SIZE, file.as_fd(), 0)
        .unwrap();
    // Freed behind KvmRam's back, as kvm_slots.rs does (allowed: "safe all the same").
    list.free("victim").unwrap();
    let pending = list.drain_reclaim();
    rcu::drain_call_rcu();
    let still_mapped = mapped(old_host as *mut u8, VICTIM_SIZE);
    let mut reused = false;
    for i in 0..4 {
        let id = format!("new{i}");
        list.alloc(&id, VICTIM_SIZE).unwrap();
        reused |= host_of(&list, &id) == old_host;
    }
    println!(
        "pending {pending}, range still mapped: {still_mapped}, a new block got its host address: {reused}"
    );
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let end = run(&mut vcpu, 0x1000);
    let mut landed = Vec::new();
    for i in 0..4 {
        let id = format!("new{i}");
        let bytes = contents(&list, &id);
        if OFFSETS.iter().any(|&o| bytes[o as usize] == STORED) {
            landed.push(id);
        }
    }
    assert!(
        still_mapped && end == RunEnd::Halted && landed.is_empty(),
        "KVM's slot outlived its memory: range mapped {still_mapped}, run ended {end:?}, \
         guest stores landed in {landed:?}"
    );
}

/// A block replaced on the list (still linked, same id, same guest address) keeps its
/// slot: KvmRam must not take the moved block for a freed one and delete the slot, leaving
/// the guest with no RAM where the list says it has some.
#[test]
fn review_kvmram_keeps_the_slot_of_a_block_replaced_on_the_list() {
    let _s = serial();
    let Some(vm) = vm() else { return };
    let list = Arc::new(RamList::new());
    let ram = KvmRam::new(list.clone(), vm).unwrap();
    let placed = ram
        .add("ram0", VICTIM_SIZE, VICTIM_GPA, RamBlockOptions::default())
        .unwrap();
    let file = memfd(VICTIM_SIZE);
    list.lock()
        .adopt_fd("ram0", VICTIM_SIZE, file.as_fd(), 0)
        .unwrap();
    {
        let g = rcu::read_lock();
        let b = list.block_by_id(&g, "ram0").unwrap();
        assert_eq!(
            b.guest_addr(),
            Some(VICTIM_GPA),
            "still on the list, placed"
        );
    }
    // Any call into KvmRam retires "freed" slots first.
    let now = ram.find("ram0");
    assert_eq!(
        now.as_ref().map(|p| (p.slot, p.guest_addr)),
        Some((placed.slot, placed.guest_addr)),
        "the slot of a linked block was deleted: the list still places \"ram0\" at {VICTIM_GPA:#x}, KVM maps nothing there"
    );
}

/// `mapped_blocks()` counts "mappings owned by live blocks", and `drain_reclaim` "waits for
/// the reclamation of every block freed so far": after a replace, the moved block is
/// neither pending nor waited for, yet it still counts its range (a second time, beside
/// its successor) until call_rcu gets to it — a leak check right after `drain_reclaim`
/// sees one mapping and `len` bytes too many.
#[test]
fn review_after_a_replace_and_drain_reclaim_the_range_is_counted_once() {
    let _s = serial();
    let len = 16 * page_size();
    let list = RamList::new();
    list.alloc("a", len).unwrap();
    assert_eq!(list.drain_reclaim(), 0);
    rcu::drain_call_rcu();
    let before = mapped_blocks();
    let file = memfd(len);
    list.lock().adopt_fd("a", len, file.as_fd(), 0).unwrap();
    assert_eq!(list.drain_reclaim(), 0);
    let after = mapped_blocks();
    rcu::drain_call_rcu();
    let settled = mapped_blocks();
    println!("before {before:?}, after drain_reclaim {after:?}, after drain_call_rcu {settled:?}");
    assert_eq!(
        after, before,
        "one range, counted twice after drain_reclaim returned (settles to {settled:?})"
    );
}
