//! Shared by the KVM integration tests: a fresh VM, and tiny real-mode guest programs that
//! store a byte at chosen guest-physical addresses below 1 MiB, run to `hlt` on a vCPU.
//!
//! Guest code runs emulated (~1000x slower) on these machines, so each program is a
//! handful of instructions.
#![allow(dead_code)] // each test binary uses its own subset

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::sync::Arc;

/// The byte every program stores (held in `al`).
pub const STORED: u8 = 0x5a;

/// A fresh VM, or None (after printing the skip line) when there is no /dev/kvm.
pub fn vm() -> Option<Arc<VmFd>> {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIPPED: no /dev/kvm");
        return None;
    }
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    Some(Arc::new(vm))
}

/// Real-mode code: `mov [page * 4096], al` for each page (ds = 0, so pages below 16),
/// then `hlt`.
pub fn writer_program(pages: &[u16]) -> Vec<u8> {
    let addrs: Vec<u32> = pages.iter().map(|&p| u32::from(p) << 12).collect();
    store_program(&addrs)
}

/// Real-mode code storing `al` at each guest-physical address (below 1 MiB; ds is set
/// per store), then `hlt`.
pub fn store_program(addrs: &[u32]) -> Vec<u8> {
    assert!(
        addrs.iter().all(|&a| a < 1 << 20),
        "real mode reaches 1 MiB"
    );
    let mut code = Vec::new();
    for &a in addrs {
        let seg = ((a >> 4) & 0xf000) as u16;
        let off = (a & 0xffff) as u16;
        code.extend_from_slice(&[0xb9]); // mov cx, imm16
        code.extend_from_slice(&seg.to_le_bytes());
        code.extend_from_slice(&[0x8e, 0xd9]); // mov ds, cx
        code.push(0xa2); // mov moffs16, al
        code.extend_from_slice(&off.to_le_bytes());
    }
    code.push(0xf4); // hlt
    code
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The program reached its `hlt`.
    Halted,
    /// A store hit no memory slot (KVM's view has nothing there).
    MmioWrite(u64),
    /// KVM_RUN itself failed (e.g. EFAULT: a slot's host memory is gone).
    Failed(i32),
}

/// Runs the vCPU in real mode from `rip` (cs = ds = 0) until it halts, a store exits to
/// us, or KVM_RUN fails.
pub fn run(vcpu: &mut VcpuFd, rip: u64) -> RunEnd {
    let mut sregs = vcpu.get_sregs().unwrap();
    for seg in [&mut sregs.cs, &mut sregs.ds] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = rip;
    regs.rax = u64::from(STORED);
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => return RunEnd::Halted,
            Ok(VcpuExit::Intr) => continue,
            Ok(VcpuExit::MmioWrite(addr, _)) => return RunEnd::MmioWrite(addr),
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) => return RunEnd::Failed(e.errno()),
        }
    }
}

/// [`run`], which must end at the `hlt`.
pub fn run_until_hlt(vcpu: &mut VcpuFd, rip: u64) {
    assert_eq!(run(vcpu, rip), RunEnd::Halted);
}
