//! Live migration of a real KVM guest: a tiny real-mode program keeps storing a new byte
//! to 32 pages while the source driver migrates its RAM (KvmRam's dirty log, synced with
//! GET/CLEAR/merge) to a destination thread over a unix socket. After the pause, the
//! destination's memory equals the source's, the untouched pages were never sent (the
//! first KVM sync, which reports every page under KVM_DIRTY_LOG_INITIALLY_SET, is absorbed
//! by the first pass), and KVM's dirty logging is off again.

mod common;
#[path = "common/fake_vm.rs"]
mod fake_vm;
#[path = "common/kvm_guest.rs"]
mod kvm_guest;

use common::read_block;
use fake_vm::FakeDest;
use kvm_guest::{spawn_vcpu, store_program, value_of, VcpuCtl};
use migration::live::{
    incoming, ComponentState, IncomingOptions, MigratableVm, MigrateOptions, MigrationProgress,
    VmError,
};
use migration::stream::PAGE_SIZE;
use migration::transport::{listen, MigrationUri};
use ramlist::dirty::DirtyClient;
use ramlist::kvm::KvmRam;
use ramlist::{RamBlockOptions, RamList};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering::*;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const P: u64 = PAGE_SIZE;
const RAM: u64 = 4 << 20;
const CODE: u64 = 0x1000;
const FIRST_PAGE: u64 = 16;
const PAGES: u64 = 32;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Cpu {
    rip: u64,
    rax: u64,
}

/// The source VM: KVM memory slots over the RAM list, one vCPU thread.
struct KvmVm {
    kvm_ram: KvmRam,
    ctl: Arc<VcpuCtl>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl MigratableVm for KvmVm {
    fn ram(&self) -> Arc<RamList> {
        self.kvm_ram.ram().clone()
    }
    fn start_dirty_log(&self) -> Result<(), VmError> {
        Ok(self
            .kvm_ram
            .set_dirty_logging_all(DirtyClient::Migration, true)?)
    }
    fn stop_dirty_log(&self) -> Result<(), VmError> {
        Ok(self
            .kvm_ram
            .set_dirty_logging_all(DirtyClient::Migration, false)?)
    }
    fn dirty_sync(&self) -> Result<u64, VmError> {
        Ok(self.kvm_ram.sync_dirty_log()?.dirty_pages)
    }
    fn pause(&self) -> Result<bool, VmError> {
        let was = !self.ctl.pause.swap(true, AcqRel);
        while !self.ctl.parked.load(Acquire) {
            thread::sleep(Duration::from_micros(50));
        }
        Ok(was)
    }
    fn resume(&self) -> Result<(), VmError> {
        self.ctl.parked.store(false, Release);
        self.ctl.pause.store(false, Release);
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<ComponentState>, VmError> {
        let (rip, rax) = self.ctl.regs.lock().unwrap().ok_or("no registers")?;
        Ok(vec![ComponentState::encode("cpu0", &Cpu { rip, rax })?])
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Release);
        if let Some(t) = self.thread.lock().unwrap().take() {
            t.join().unwrap();
        }
    }
}

#[test]
fn a_real_kvm_guest_migrates_with_its_dirty_log() {
    let Some(vm) = kvm_guest::vm() else { return };
    let ram = Arc::new(RamList::new());
    let kvm_ram = KvmRam::new(ram.clone(), vm.clone()).unwrap();
    kvm_ram
        .add("ram", RAM, 0, RamBlockOptions::default())
        .unwrap();
    println!("dirty-log mode: {:?}", kvm_ram.mode());
    // The program, written by the VMM (and marked, as every VMM write is).
    let addrs: Vec<u32> = (FIRST_PAGE..FIRST_PAGE + PAGES)
        .map(|p| (p * P) as u32)
        .collect();
    let code = store_program(&addrs);
    {
        let g = rcu::read_lock();
        let b = ram.block_by_id(&g, "ram").unwrap();
        // SAFETY: the code fits in page 1 of the 4 MiB block, kept mapped by the guard;
        // the vCPU does not run yet.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), b.host().add(CODE as usize), code.len())
        };
        ram.dirty().mark_dirty(b.offset() + CODE, code.len() as u64);
    }
    let ctl = Arc::new(VcpuCtl::default());
    let vcpu = vm.create_vcpu(0).unwrap();
    let thread = spawn_vcpu(vcpu, CODE, ctl.clone());
    let src = KvmVm {
        kvm_ram,
        ctl: ctl.clone(),
        thread: Mutex::new(Some(thread)),
    };
    // The guest must run a few times a second for the test to mean anything.
    let t = Instant::now();
    while ctl.runs.load(Acquire) < 3 && t.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(5));
    }
    let runs = ctl.runs.load(Acquire);
    if runs < 3 {
        println!(
            "SKIPPED: guest CPU too slow ({runs} runs of {} instructions in 10 s)",
            3 * PAGES + 1
        );
        return;
    }

    let dst = Arc::new(RamList::new());
    dst.alloc("ram", RAM).unwrap();
    let uri = MigrationUri::Unix(
        std::env::temp_dir().join(format!("mvm-kvm-live-{}.sock", std::process::id())),
    );
    let listener = listen(&uri).unwrap();
    let dest = {
        let dst = dst.clone();
        thread::spawn(move || {
            let mut d = FakeDest::new(dst);
            let conn = listener.accept_timeout(Duration::from_secs(10)).unwrap();
            let r = incoming(&mut d, conn, &IncomingOptions::default());
            (d, r)
        })
    };
    // A slow link, so that the guest writes while the pages travel.
    let opts = MigrateOptions {
        max_bandwidth: Some(1_000_000),
        ..MigrateOptions::default()
    };
    let runs_before = ctl.runs.load(Acquire);
    let progress = MigrationProgress::new();
    let stats = migration::live::migrate_to_uri(&src, &uri, &opts, &progress).unwrap();
    let (d, r) = dest.join().unwrap();
    let r = r.unwrap();
    let runs_after = ctl.runs.load(Acquire);
    println!(
        "kvm guest: {:.3} ms, downtime {:.3} ms, {} bytes, {} pages + {} zero sent, {} \
         skipped, {} iterations; guest runs during the migration: {}",
        stats.total_ms,
        stats.downtime_ms,
        stats.transferred_bytes,
        stats.normal_pages,
        stats.zero_pages,
        stats.skipped_pages,
        stats.iterations,
        runs_after - runs_before
    );
    assert!(d.resumed);
    assert!(
        runs_after > runs_before,
        "the guest wrote during the migration"
    );
    assert_eq!(read_block(&ram, "ram"), read_block(&dst, "ram"));
    // The last run's byte is on every page at the destination, and in its state.
    let cpu: Cpu = d.states[0].decode().unwrap();
    let last = value_of(runs_after - 1);
    assert_eq!(cpu.rax & 0xff, u64::from(last));
    assert_eq!(cpu.rip, CODE + code.len() as u64);
    let mem = read_block(&dst, "ram");
    for p in FIRST_PAGE..FIRST_PAGE + PAGES {
        assert_eq!(mem[(p * P) as usize], last, "page {p}");
    }
    // Only what the guest ever wrote travelled: code, 32 pages, resends of those.
    assert!(
        stats.normal_pages + stats.zero_pages < 200,
        "{} pages sent of {}",
        stats.normal_pages + stats.zero_pages,
        RAM / P
    );
    assert!(stats.skipped_pages >= RAM / P - 1 - PAGES - 16);
    assert_eq!(stats.transferred_bytes, r.summary.bytes);
    assert!(src.kvm_ram.placed().iter().all(|p| !p.logging));
}
