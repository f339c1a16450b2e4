//! Unit tests of `KvmRam` that need a deterministic interleaving: test-only pause points
//! ([`hooks`]) inside the sync and `remove`, where a test runs a consumer, a vCPU or a
//! concurrent `add` at exactly the moment a wrong ordering would expose.

use super::*;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const PAGE: u64 = KVM_LOG_PAGE_SIZE;

/// Test-only pause points: `reached` runs the closure this thread installed, if any.
pub(crate) mod hooks {
    use std::cell::RefCell;

    /// Where the code under test pauses.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Point {
        /// `sync_slot`: a slot's log was merged into the bitmaps, and the sync is over
        /// for that slot as far as consumers can tell.
        BitsMerged,
        /// `remove`: KVM deleted the slot; the block is not freed yet.
        SlotDeleted,
    }

    type Hook = Box<dyn FnMut(Point)>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs this thread's hook (taken out meanwhile, so it may re-enter the code).
    pub(crate) fn reached(p: Point) {
        let Some(mut f) = HOOK.with(|h| h.borrow_mut().take()) else {
            return;
        };
        f(p);
        HOOK.with(|h| {
            let mut h = h.borrow_mut();
            if h.is_none() {
                *h = Some(f);
            }
        });
    }

    /// Removes the hook when dropped.
    pub(crate) struct Installed;

    impl Drop for Installed {
        fn drop(&mut self) {
            HOOK.with(|h| h.borrow_mut().take());
        }
    }

    /// Installs `f` as this thread's hook until the result is dropped.
    pub(crate) fn install(f: impl FnMut(Point) + 'static) -> Installed {
        HOOK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
        Installed
    }
}

use hooks::Point;

pub(super) fn vm() -> Option<Arc<VmFd>> {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIPPED: no /dev/kvm");
        return None;
    }
    let vm = Kvm::new().unwrap().create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    Some(Arc::new(vm))
}

/// Real-mode code: `mov [page * 4096], al` for each page, then `hlt`.
pub(super) fn writer_program(pages: &[u16]) -> Vec<u8> {
    let mut code = Vec::new();
    for &p in pages {
        code.push(0xa2);
        code.extend_from_slice(&(p << 12).to_le_bytes());
    }
    code.push(0xf4);
    code
}

/// Runs the vCPU in real mode from `rip` (cs = ds = 0) until it halts, storing 0x5a.
fn run_until_hlt(vcpu: &mut VcpuFd, rip: u64) {
    run_storing(vcpu, rip, 0x5a);
}

/// Runs the vCPU in real mode from `rip` (cs = ds = 0), with `al` (the byte the writer
/// program stores), until it halts.
pub(super) fn run_storing(vcpu: &mut VcpuFd, rip: u64, al: u8) {
    let mut sregs = vcpu.get_sregs().unwrap();
    for seg in [&mut sregs.cs, &mut sregs.ds] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = rip;
    regs.rax = u64::from(al);
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::Hlt => return,
            VcpuExit::Intr => continue,
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

/// Issue 10 point 10: a consumer takes a page's bit and copies the page as soon as the
/// sync has merged it; the guest then writes the page again. That write must show up at
/// the next sync. With GET, merge, CLEAR the CLEAR comes after the write and re-protects
/// the page with the write unreported: the page is lost for good.
fn write_after_take_is_logged(mode: DirtyLogMode) {
    let Some(vm) = vm() else { return };
    let ram = KvmRam::with_mode(Arc::new(RamList::new()), vm.clone(), mode).unwrap();
    let placed = ram.add("ram0", MIB, 0, RamBlockOptions::default()).unwrap();
    ram.guest_memory()
        .write_slice(&writer_program(&[5]), GuestAddress(0x1000))
        .unwrap();
    ram.set_dirty_logging("ram0", DirtyClient::Migration, true)
        .unwrap();
    ram.sync_dirty_log().unwrap();
    let m = DirtyClient::Migration;
    ram.dirty().test_and_clear(m, placed.ram_addr, MIB);

    let vcpu = Rc::new(RefCell::new(vm.create_vcpu(0).unwrap()));
    run_until_hlt(&mut vcpu.borrow_mut(), 0x1000);

    let page5 = placed.ram_addr + 5 * PAGE;
    let list = ram.ram().clone();
    let taken = Rc::new(RefCell::new(Vec::new()));
    let hook = {
        let (vcpu, taken) = (vcpu.clone(), taken.clone());
        hooks::install(move |p| {
            if p != Point::BitsMerged || !taken.borrow().is_empty() {
                return;
            }
            // The consumer: take the bit (and copy the page)...
            list.dirty()
                .take_dirty(m, page5, PAGE, |a| taken.borrow_mut().push(a));
            // ...then the guest writes the page again.
            run_until_hlt(&mut vcpu.borrow_mut(), 0x1000);
        })
    };
    let first = ram.sync_dirty_log().unwrap();
    drop(hook);
    assert_eq!(first.dirty_pages, 1, "{mode:?}");
    assert_eq!(
        *taken.borrow(),
        [page5],
        "{mode:?}: the consumer took page 5"
    );
    let second = ram.sync_dirty_log().unwrap();
    assert_eq!(
        (second.dirty_pages, ram.dirty().is_dirty(m, page5)),
        (1, true),
        "{mode:?}: the guest's write after the consumer took page 5 was lost"
    );
}

#[test]
fn a_write_after_the_consumer_took_the_bit_is_logged_manual() {
    write_after_take_is_logged(DirtyLogMode::Manual);
}

#[test]
fn a_write_after_the_consumer_took_the_bit_is_logged_initially_set() {
    write_after_take_is_logged(DirtyLogMode::ManualInitiallySet);
}

#[test]
fn a_write_after_the_consumer_took_the_bit_is_logged_get_clears() {
    write_after_take_is_logged(DirtyLogMode::GetClears);
}

/// Issue 10 point 12: `remove` keeps the slot table locked until the block is freed. An
/// `add` of the same guest range started while `remove` is between the slot's deletion
/// and the free must wait and then succeed; had the lock been dropped in between, it would
/// find the old block still linked there and fail with `GuestOverlap`.
#[test]
fn an_add_racing_a_remove_waits_for_the_free() {
    let Some(vm) = vm() else { return };
    let ram = Arc::new(KvmRam::new(Arc::new(RamList::new()), vm).unwrap());
    let opts = RamBlockOptions::default();
    ram.add("a", MIB, 0, opts).unwrap();
    type Racer = std::thread::JoinHandle<Result<PlacedBlock, KvmRamError>>;
    let racer: Rc<RefCell<Option<Racer>>> = Rc::default();
    let hook = {
        let (ram, racer) = (ram.clone(), racer.clone());
        hooks::install(move |p| {
            if p != Point::SlotDeleted || racer.borrow().is_some() {
                return;
            }
            let ram = ram.clone();
            let t = std::thread::spawn(move || ram.add("b", MIB, 0, opts));
            // Give it every chance to run into the window.
            let start = Instant::now();
            while !t.is_finished() && start.elapsed() < Duration::from_millis(300) {
                std::thread::sleep(Duration::from_millis(5));
            }
            *racer.borrow_mut() = Some(t);
        })
    };
    ram.remove("a").unwrap();
    drop(hook);
    let t = racer.borrow_mut().take().expect("the hook ran");
    let b = t
        .join()
        .unwrap()
        .expect("the racing add of the freed range");
    assert_eq!(b.guest_addr, 0);
    let ids: Vec<String> = ram.placed().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, ["b"]);
}

/// The dirty log counts in 4 KiB pages (x86 KVM), as the bitmaps do; host pages are
/// multiples of it. A guest write to the 65th page of a slot shows up as page 64.
#[test]
fn the_log_counts_in_the_bitmaps_pages() {
    assert_eq!(KVM_LOG_PAGE_SIZE, crate::dirty::PAGE_SIZE);
    assert!(crate::page_size().is_multiple_of(KVM_LOG_PAGE_SIZE));
    let Some(vm) = vm() else { return };
    let ram =
        KvmRam::with_mode(Arc::new(RamList::new()), vm.clone(), DirtyLogMode::Manual).unwrap();
    let size = 65 * PAGE;
    let placed = ram.add("odd", size, 0, RamBlockOptions::default()).unwrap();
    // Page 64 is past a 16-bit offset: mov ax, 0x4000; mov ds, ax; mov [0], al; hlt.
    let code = [0xb8, 0x00, 0x40, 0x8e, 0xd8, 0xa2, 0x00, 0x00, 0xf4];
    ram.guest_memory()
        .write_slice(&code, GuestAddress(0x1000))
        .unwrap();
    ram.set_dirty_logging("odd", DirtyClient::Vga, true)
        .unwrap();
    ram.dirty()
        .test_and_clear(DirtyClient::Vga, placed.ram_addr, size);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    run_until_hlt(&mut vcpu, 0x1000);
    let stats = ram.sync_dirty_log().unwrap();
    assert_eq!(stats.dirty_pages, 1);
    assert_eq!(
        ram.dirty()
            .find_next_dirty(DirtyClient::Vga, placed.ram_addr, placed.ram_addr + size),
        Some(placed.ram_addr + 64 * PAGE)
    );
}

/// A peek shows what the guest wrote since the last sync and takes nothing: the next
/// sync still reports it (the saver relies on that to hold pages back), and a second
/// peek after that sync shows nothing. Without manual protect a peek would clear the
/// log, so there is none.
#[test]
fn a_peek_shows_the_guests_writes_and_leaves_them_to_the_sync() {
    for mode in [DirtyLogMode::Manual, DirtyLogMode::ManualInitiallySet] {
        let Some(vm) = vm() else { return };
        let ram = KvmRam::with_mode(Arc::new(RamList::new()), vm.clone(), mode).unwrap();
        let placed = ram.add("ram0", MIB, 0, RamBlockOptions::default()).unwrap();
        ram.guest_memory()
            .write_slice(&writer_program(&[5, 9]), GuestAddress(0x1000))
            .unwrap();
        ram.set_dirty_logging("ram0", DirtyClient::Migration, true)
            .unwrap();
        ram.sync_dirty_log().unwrap();
        let m = DirtyClient::Migration;
        ram.dirty().test_and_clear(m, placed.ram_addr, MIB);
        assert_eq!(
            ram.peek_dirty_log().unwrap().unwrap().count(),
            0,
            "{mode:?}"
        );

        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_until_hlt(&mut vcpu, 0x1000);
        let peek = ram.peek_dirty_log().unwrap().unwrap();
        assert_eq!(
            peek.word(placed.ram_addr),
            (1 << 5) | (1 << 9),
            "{mode:?}: the peek shows pages 5 and 9"
        );
        // Peeking again changes nothing; the bitmaps were not touched.
        assert_eq!(ram.peek_dirty_log().unwrap().unwrap().count(), 2);
        assert!(!ram.dirty().is_dirty(m, placed.ram_addr + 5 * PAGE));
        let synced = ram.sync_dirty_log().unwrap();
        assert_eq!(
            synced.dirty_pages, 2,
            "{mode:?}: the sync still reports them"
        );
        assert!(ram.dirty().is_dirty(m, placed.ram_addr + 9 * PAGE));
        assert_eq!(
            ram.peek_dirty_log().unwrap().unwrap().count(),
            0,
            "{mode:?}"
        );
    }
    let Some(vm) = vm() else { return };
    let ram = KvmRam::with_mode(Arc::new(RamList::new()), vm, DirtyLogMode::GetClears).unwrap();
    assert!(
        ram.peek_dirty_log().unwrap().is_none(),
        "GET clears: no peek"
    );
}
