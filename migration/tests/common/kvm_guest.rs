//! A tiny real-mode KVM guest for the migration tests (the idea of ramlist's test
//! helper, written again here: tests do not import across crates): a program that
//! stores `al` at chosen guest-physical addresses below 1 MiB and halts, run again and
//! again on a vCPU thread that can be paused between two runs.
#![allow(dead_code)]

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// A fresh VM, or None (after printing the skip line) when there is no /dev/kvm.
pub fn vm() -> Option<Arc<VmFd>> {
    let Ok(kvm) = Kvm::new() else {
        println!("SKIPPED: no usable /dev/kvm");
        return None;
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
    Some(Arc::new(vm))
}

/// Real-mode code storing `al` at each address (< 1 MiB; ds set per store), then `hlt`.
pub fn store_program(addrs: &[u32]) -> Vec<u8> {
    let mut code = Vec::new();
    for &a in addrs {
        assert!(a < 1 << 20, "real mode reaches 1 MiB");
        code.push(0xb9); // mov cx, imm16
        code.extend_from_slice(&(((a >> 4) & 0xf000) as u16).to_le_bytes());
        code.extend_from_slice(&[0x8e, 0xd9]); // mov ds, cx
        code.push(0xa2); // mov [moffs16], al
        code.extend_from_slice(&((a & 0xffff) as u16).to_le_bytes());
    }
    code.push(0xf4); // hlt
    code
}

/// Runs the program at `rip` (cs = ds = 0) with `al` = `value` until it halts; returns
/// (rip, rax) after the `hlt`.
pub fn run_once(vcpu: &mut VcpuFd, rip: u64, value: u8) -> (u64, u64) {
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    for seg in [&mut sregs.cs, &mut sregs.ds] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = rip;
    regs.rax = u64::from(value);
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(VcpuExit::Intr) => continue,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let regs = vcpu.get_regs().expect("KVM_GET_REGS");
    (regs.rip, regs.rax)
}

/// The value run `n` stores: never zero.
pub fn value_of(n: u64) -> u8 {
    (n % 255 + 1) as u8
}

/// Shared between the test and the vCPU thread.
#[derive(Default)]
pub struct VcpuCtl {
    pub pause: AtomicBool,
    pub parked: AtomicBool,
    pub stop: AtomicBool,
    /// Runs completed.
    pub runs: AtomicU64,
    /// (rip, rax) read from the vCPU when it parked.
    pub regs: Mutex<Option<(u64, u64)>>,
}

/// Starts a vCPU thread running the program at `rip` over and over, run `n` storing
/// [`value_of`]`(n)`, parking between runs while `pause` is set.
pub fn spawn_vcpu(mut vcpu: VcpuFd, rip: u64, ctl: Arc<VcpuCtl>) -> JoinHandle<()> {
    thread::spawn(move || {
        while !ctl.stop.load(Acquire) {
            if ctl.pause.load(Acquire) {
                if !ctl.parked.load(Acquire) {
                    let r = vcpu.get_regs().expect("KVM_GET_REGS");
                    *ctl.regs.lock().unwrap() = Some((r.rip, r.rax));
                    ctl.parked.store(true, Release);
                }
                thread::sleep(Duration::from_micros(100));
                continue;
            }
            ctl.parked.store(false, Release);
            let n = ctl.runs.load(Relaxed);
            run_once(&mut vcpu, rip, value_of(n));
            ctl.runs.store(n + 1, Release);
        }
    })
}
