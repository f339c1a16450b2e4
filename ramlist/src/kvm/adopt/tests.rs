//! Tests of [`KvmRam::adopt_fd`]: the block (the same object) keeps its slot, guest
//! address, ram_addr and host address; its backing becomes the file; KVM's vCPU writes
//! land in the file's memory from then on (the MMU notifier dropped the old pages); a
//! reference taken before sees the file's memory and keeps it mapped; removing the block
//! unmaps the range once; refusals change nothing.

use super::super::tests::{run_storing, vm, writer_program};
use super::super::{KvmRam, KvmRamError};
use crate::{Backing, RamBlockOptions, RamError, RamList};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// A memfd of `len` bytes.
fn memfd(len: u64) -> std::fs::File {
    // SAFETY: a NUL-terminated name and valid flags; the call makes a new descriptor.
    let fd = unsafe { libc::memfd_create(c"replace-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned to us and nothing else owns it.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len).unwrap();
    f
}

/// Reads byte `at` of a counted reference's memory.
fn byte_via(b: &crate::RamBlockRef, at: u64) -> u8 {
    assert!(at < b.len());
    // SAFETY: `at` lies inside the block's mapping, which the counted reference keeps
    // mapped.
    unsafe { b.host().add(at as usize).read_volatile() }
}

/// Reads byte `at` of the block's memory through its host pointer.
fn byte(ram: &RamList, id: &str, at: u64) -> u8 {
    let guard = rcu::read_lock();
    let b = ram.block_by_id(&guard, id).unwrap();
    assert!(at < b.len());
    // SAFETY: `at` lies inside the block's mapping, which the guard keeps mapped.
    unsafe { b.host().add(at as usize).read_volatile() }
}

#[test]
fn the_block_keeps_its_slot_and_the_guest_writes_land_in_the_file() {
    let Some(vm) = vm() else { return };
    let list = Arc::new(RamList::new());
    let ram = KvmRam::new(list.clone(), vm.clone()).unwrap();
    let before = ram.add("ram0", MIB, 0, RamBlockOptions::default()).unwrap();
    let program = writer_program(&[5]);
    let host_before = {
        let guard = rcu::read_lock();
        let b = list.block_by_id(&guard, "ram0").unwrap();
        // SAFETY: the program fits in the block's first MiB; nothing else uses it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(program.as_ptr(), b.host().add(0x1000), program.len())
        };
        b.host()
    };
    let old = {
        let guard = rcu::read_lock();
        list.block_ref(&guard, "ram0").unwrap()
    };
    // The guest runs on the old memory first: KVM maps page 5 there.
    let mut vcpu = vm.create_vcpu(0).unwrap();
    run_storing(&mut vcpu, 0x1000, 0x11);
    assert_eq!(byte(&list, "ram0", 5 * PAGE), 0x11);

    // The file holds the same program and nothing at page 5.
    let file = memfd(MIB);
    file.write_all_at(&program, 0x1000).unwrap();
    let version = list.version();
    let after = ram
        .adopt_fd("ram0", MIB, file.as_fd(), 0)
        .expect("adopt in place");
    assert_eq!(
        (after.slot, after.guest_addr, after.ram_addr, after.size),
        (before.slot, before.guest_addr, before.ram_addr, before.size),
        "the slot must stay as it was"
    );
    assert_eq!(ram.placed().len(), 1);
    assert_eq!(list.version(), version, "the list's layout did not change");
    assert!(
        old.is_linked() && !old.is_removed(),
        "the block is the same one"
    );
    assert!(
        ram.adopt_fd("ram0", MIB, file.as_fd(), 0).is_err(),
        "a second adoption must be refused"
    );
    {
        let guard = rcu::read_lock();
        let b = list.block_by_id(&guard, "ram0").unwrap();
        assert_eq!(b.host(), host_before, "another host address");
        assert!(matches!(b.backing(), Backing::Fd { offset: 0, .. }));
        assert!(b.is_shared() && b.fd().is_some());
        assert_eq!(list.len(), 1);
    }
    // The old page is gone from this process and from KVM: what is there is the file's.
    assert_eq!(byte(&list, "ram0", 5 * PAGE), 0);
    run_storing(&mut vcpu, 0x1000, 0x22);
    let mut got = [0u8; 1];
    file.read_exact_at(&mut got, 5 * PAGE).unwrap();
    assert_eq!(got[0], 0x22, "the guest's write did not reach the file");
    // The reference taken before the adoption reads the file's memory.
    // SAFETY: page 5 lies inside the block, which the counted reference keeps mapped.
    assert_eq!(
        unsafe { old.host().add(5 * PAGE as usize).read_volatile() },
        0x22
    );
    // Every page of the block is dirty for every client: its contents changed.
    for c in crate::dirty::DirtyClient::ALL {
        assert!(list.dirty().is_dirty(c, after.ram_addr + 7 * PAGE), "{c:?}");
    }
    // And the block still goes as any other, kept mapped while a counted reference
    // lives (reclaimed after it).
    ram.remove("ram0").unwrap();
    assert!(ram.placed().is_empty());
    assert_eq!(
        byte_via(&old, 5 * PAGE),
        0x22,
        "a counted reference keeps it mapped"
    );
    drop(old);
    assert_eq!(list.drain_reclaim(), 0, "the block was reclaimed");
}

#[test]
fn refusals_leave_the_block_as_it_was() {
    let Some(vm) = vm() else { return };
    let list = Arc::new(RamList::new());
    let ram = KvmRam::new(list.clone(), vm).unwrap();
    let placed = ram.add("ram0", MIB, 0, RamBlockOptions::default()).unwrap();
    let version = list.version();
    let file = memfd(2 * MIB);
    let err = ram.adopt_fd("ram0", 2 * MIB, file.as_fd(), 0).unwrap_err();
    assert!(
        matches!(err, KvmRamError::Ram(RamError::NotReplaceable { .. })),
        "{err}"
    );
    let err = ram.adopt_fd("nope", MIB, file.as_fd(), 0).unwrap_err();
    assert!(matches!(err, KvmRamError::UnknownId(_)), "{err}");
    // The file is too short from this offset.
    let err = ram
        .adopt_fd("ram0", MIB, file.as_fd(), 2 * MIB)
        .unwrap_err();
    assert!(
        matches!(err, KvmRamError::Ram(RamError::Mmap { .. })),
        "{err}"
    );
    let err = ram.adopt_fd("ram0", MIB, file.as_fd(), 1).unwrap_err();
    assert!(
        matches!(err, KvmRamError::Ram(RamError::BadHostMemory { .. })),
        "{err}"
    );
    assert_eq!(list.version(), version);
    assert_eq!(ram.find("ram0"), Some(placed));
    let guard = rcu::read_lock();
    let b = list.block_by_id(&guard, "ram0").unwrap();
    assert_eq!(b.backing(), Backing::Anonymous);
    assert!(!b.is_removed());
}
