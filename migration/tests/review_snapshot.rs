//! An outside review's reproductions for `migration::snapshot` (its public Rust API), kept as
//! regression tests: each failed on a23c3fb, where the problem it names was found.
//!
//! 1. Two `write_snapshot`s into one directory at once (two VMMs, one `--to DIR`) share the
//!    temporary names `.memory.tmp`/`.state.tmp`: the result that passes every check of
//!    `open_snapshot` holds one VM's state over a memory file mixing both VMs' pages.
//! 2. `write_snapshot(vm, BASE, Some(BASE))` (a diff into its own base's directory) is
//!    written, and `open_stack(BASE)` then refuses it: the base is gone.

mod common;

use common::Arena;
use migration::live::{ComponentState, MigratableVm, VmError};
use migration::snapshot::{open_snapshot, open_stack, write_snapshot};
use ramlist::{RamBlockOptions, RamList};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A VM over `ram` whose state names it (`tag`): pausing and resuming are no-ops.
struct Vm {
    ram: Arc<RamList>,
    tag: u8,
}

impl MigratableVm for Vm {
    fn ram(&self) -> Arc<RamList> {
        self.ram.clone()
    }
    fn start_dirty_log(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn stop_dirty_log(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn dirty_sync(&self) -> Result<u64, VmError> {
        Ok(0)
    }
    fn pause(&self) -> Result<bool, VmError> {
        Ok(true)
    }
    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<ComponentState>, VmError> {
        Ok(vec![ComponentState {
            name: "tag".into(),
            data: vec![self.tag],
        }])
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("review-snap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vm_filled(len: u64, fill: u8) -> Vm {
    let ram = Arc::new(RamList::new());
    Arena::new(len, fill).add_to(&ram, "ram");
    Vm { ram, tag: fill }
}

#[test]
fn review_two_snapshots_into_one_directory_never_mix() {
    const LEN: u64 = 32 << 20;
    let d = scratch("race");
    let dir = d.join("snap");
    for round in 0..20 {
        let _ = std::fs::remove_dir_all(&dir);
        let handles: Vec<_> = [0x11u8, 0x22]
            .into_iter()
            .map(|tag| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let vm = vm_filled(LEN, tag);
                    write_snapshot(&vm, &dir, None).map(|_| ())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        if results.iter().all(|r| r.is_err()) {
            continue;
        }
        let Ok(snap) = open_snapshot(&dir) else {
            continue;
        };
        let tag = snap.state.states[0].data[0];
        let mut mem = vec![0u8; LEN as usize];
        snap.memory.read_exact_at(&mut mem, 0).unwrap();
        let foreign = mem.iter().filter(|&&b| b != tag).count();
        let _ = std::fs::remove_dir_all(&d);
        assert_eq!(
            foreign, 0,
            "round {round}: results {results:?}; the snapshot that passes open_snapshot has the state of VM {tag:#x} and {foreign} bytes of memory that are not its"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A VM "restored by mapping" from `dir`: its block maps `dir/memory` privately.
fn vm_restored(dir: &Path, len: u64) -> (Vm, std::fs::File) {
    let snap = open_snapshot(dir).unwrap();
    let ram = Arc::new(RamList::new());
    ram.alloc_private_from_fd(
        "ram",
        len,
        snap.memory.as_fd(),
        0,
        RamBlockOptions::default(),
    )
    .unwrap();
    (Vm { ram, tag: 0x33 }, snap.memory)
}

#[test]
fn review_a_diff_into_its_own_base_is_refused() {
    const LEN: u64 = 4 << 20;
    let d = scratch("self-diff");
    let base = d.join("base");
    write_snapshot(&vm_filled(LEN, 0x11), &base, None).unwrap();
    let (vm, _file) = vm_restored(&base, LEN);
    // The restored guest writes one page.
    {
        let g = rcu::read_lock();
        let b = vm.ram.block_by_id(&g, "ram").unwrap();
        // SAFETY: page 3 of the block, which the guard keeps mapped; nothing else uses it.
        unsafe { b.host().add(3 * 4096).write_volatile(0x44) };
    }
    let open = open_snapshot(&base).unwrap();
    let wrote = write_snapshot(&vm, &base, Some(&open));
    let stack = open_stack(&base);
    let _ = std::fs::remove_dir_all(&d);
    if wrote.is_ok() {
        assert!(
            stack.is_ok(),
            "a diff into its base's own directory was written ({wrote:?}); the stack no longer opens: {}",
            stack.unwrap_err()
        );
    }
}
